"""Distillation losses: per-token divergences, the masked/tempered ``kd_loss``, and the trainer's objective.

* ``divergences``: pure functions on log-probabilities, ``[N, V], [N, V] -> [N]``, registered in ``DIVERGENCES``;
* ``kd_loss``: temperature, ignore_index masking, float32 upcast and reduction around one divergence;
* ``objective``: alpha * cross-entropy + (1 - alpha) * KD, normalised for exact gradient accumulation;
* ``fused``: the same objective from final hidden states and lm_head weights, chunked, never building [N, V] logits.
"""

from kd_llm.losses.divergences import DIVERGENCES
from kd_llm.losses.kd_loss import kd_loss, token_divergence
from kd_llm.losses.fused import fused_distillation_objective, fused_kd_loss
from kd_llm.losses.objective import LossComponents, distillation_objective, l2_penalty

__all__ = ["DIVERGENCES", "LossComponents", "distillation_objective", "fused_distillation_objective",
           "fused_kd_loss", "kd_loss", "l2_penalty", "token_divergence"]
