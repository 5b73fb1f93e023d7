"""An ensemble of frozen teachers (:class:`~kd_llm.training.teachers.TeacherEnsemble`) as a target: the weighted
mixture of their tempered distributions reaches the dense loss as logits ``T * log p_mix``, at each step's
temperature (see :mod:`kd_llm.training.teachers` for why that is exact)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kd_llm.losses import LossComponents, distillation_objective
from kd_llm.training.targets.base import KDBatch, LossRequest, TeacherTarget, student_logits


class EnsembleMixture(TeacherTarget):
    """``load_members()`` loads (once) every teacher that is not in memory yet, checked and placed by the trainer:
    with precomputed logits the teachers were freed after building them, and evaluation needs them back."""

    name = "ensemble mixture of live teachers (dense)"
    fused = False
    scores_generated = False  # on-policy and seq_kd from an ensemble are refused (kd_llm.training.rules)

    def __init__(self, ensemble, load_members: Callable[[], None]):
        self.ensemble, self.load_members = ensemble, load_members

    def terms(self, student_outputs, batch: KDBatch, request: LossRequest) -> LossComponents:
        teacher_logits = None
        if request.alpha < 1:
            self.load_members()
            with torch.no_grad():
                teacher_logits = self.ensemble.target_logits(
                    batch.inputs["input_ids"], batch.inputs.get("attention_mask"), temperature=request.temperature,
                    vocab_size=request.kd_vocab_size, position_ids=batch.inputs.get("position_ids"))[:, :-1]
        return distillation_objective(student_logits(student_outputs), teacher_logits, batch.shifted_labels,
                                      kd_vocab_size=request.kd_vocab_size, **request.objective_kwargs)
