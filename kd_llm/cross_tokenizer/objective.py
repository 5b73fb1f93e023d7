"""alpha * CE(student) + (1 - alpha) * cross-tokenizer KD, normalised like :func:`kd_llm.losses.distillation_objective`.

Both terms are summed (CE over the student's supervised tokens, KD over aligned spans) and divided by
``num_items_in_batch``, the student's supervised tokens in the whole accumulated batch, so gradient accumulation gives
the full-batch mean. With the same tokenizer on both sides every span is one token, and the ``hybrid`` objective is
then exactly :func:`distillation_objective`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_llm.cross_tokenizer.losses import (CROSS_TOKENIZER_LOSSES, hybrid_loss, span_log_probs, span_loss,
                                           span_start_rows, uld_loss)
from kd_llm.cross_tokenizer.shared_vocab import SharedVocabulary
from kd_llm.losses.objective import LossComponents, _normaliser

__all__ = ["CrossTokenizerTerms", "cross_tokenizer_objective"]


@dataclass
class CrossTokenizerTerms(LossComponents):
    """``LossComponents`` plus what to log: aligned spans compared, and (hybrid) the summed share of each side's
    probability on shared tokens over those spans (divide by ``spans`` for the mean)."""

    spans: int = 0
    student_matched_mass: Tensor | None = None
    teacher_matched_mass: Tensor | None = None


def _span_presence(student_spans: Tensor, teacher_spans: Tensor) -> Tensor:
    """``[B, K]`` bool: span ``k`` of row ``b`` has a start on both sides (masking one side masks the span)."""
    num_spans = int(torch.cat((student_spans.flatten(), teacher_spans.flatten(), student_spans.new_full((1,), -1))
                              ).max()) + 1
    present = []
    for spans in (student_spans, teacher_spans):
        starts = span_start_rows(spans)
        side = torch.zeros(spans.shape[0], max(num_spans, 1), dtype=torch.bool, device=spans.device)
        side[starts.nonzero()[:, 0], spans[starts]] = True
        present.append(side)
    return present[0] & present[1]


def _keep_present(spans: Tensor, present: Tensor) -> Tensor:
    rows = torch.arange(spans.shape[0], device=spans.device).unsqueeze(1).expand_as(spans)
    return spans.masked_fill(~present[rows, spans.clamp_min(0)] | (spans < 0), -1)


def _paired_rows(student_logits: Tensor, teacher_logits: Tensor, student_spans: Tensor,
                 teacher_spans: Tensor) -> tuple[Tensor, Tensor]:
    student_rows = student_logits[span_start_rows(student_spans)]
    teacher_rows = teacher_logits[span_start_rows(teacher_spans)]
    if student_rows.shape[0] != teacher_rows.shape[0]:
        raise ValueError(f"the student has {student_rows.shape[0]} aligned spans and the teacher "
                         f"{teacher_rows.shape[0]}; span ids must come from one alignment per row.")
    return student_rows, teacher_rows


def cross_tokenizer_objective(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    student_spans: Tensor,
    teacher_spans: Tensor | None,
    teacher_targets: Tensor | None = None,
    *,
    alpha: float,
    method: str = "hybrid",
    loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    shared: SharedVocabulary | None = None,
    uld_weight: float = 1.0,
    ignore_index: int = -100,
    num_items_in_batch: int | Tensor | None = None,
) -> CrossTokenizerTerms:
    """The cross-tokenizer training objective for one (micro-)batch.

    Args:
        student_logits: ``[B, Ls, Vs]``, aligned with ``labels`` (already shifted).
        teacher_logits: ``[B, Lt, Vt]``, aligned with ``teacher_targets``; None when ``alpha == 1``.
        labels: ``[B, Ls]`` the student's next tokens, ``ignore_index`` where unsupervised.
        student_spans, teacher_spans: ``[B, Ls]`` / ``[B, Lt]`` aligned span id of each predicted token, -1 for none
            (:mod:`kd_llm.cross_tokenizer.alignment`, shifted like the labels).
        teacher_targets: ``[B, Lt]`` the teacher's next tokens; needed by ``method="span"`` only.
        method: ``uld``, ``hybrid`` (needs ``shared``) or ``span``.
        loss, temperature, beta, skew: the divergence and its settings, as in ``kd_loss`` (unused by ``uld``).
        num_items_in_batch: the student's supervised tokens in the accumulated batch; None: this batch's.
    Returns:
        :class:`CrossTokenizerTerms`; all-masked batches give exact zeros with zero gradients.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha (cross-entropy weight) must be in [0, 1], got {alpha}.")
    if method not in CROSS_TOKENIZER_LOSSES:
        raise ValueError(f"Unknown cross-tokenizer loss {method!r}; valid: {', '.join(CROSS_TOKENIZER_LOSSES)}.")
    valid = labels != ignore_index
    normaliser = _normaliser(num_items_in_batch, int(valid.sum()), student_logits.device)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=student_logits.device)
    ce = zero
    if alpha > 0:
        rows = student_logits[valid].to(dtype)
        ce = F.cross_entropy(rows, labels[valid], reduction="sum") / normaliser
    kd, spans, student_mass, teacher_mass = zero, 0, None, None
    if alpha < 1:
        if teacher_logits is None or teacher_spans is None:
            raise ValueError(f"teacher_logits and teacher_spans are required when alpha < 1 (got alpha={alpha}).")
        present = _span_presence(student_spans.masked_fill(~valid, -1), teacher_spans)
        student_spans = _keep_present(student_spans.masked_fill(~valid, -1), present)
        teacher_spans = _keep_present(teacher_spans, present)
        num_spans = present.shape[1]
        if method == "span":
            if teacher_targets is None:
                raise ValueError("method='span' needs teacher_targets, the teacher's next tokens.")
            student_lp = span_log_probs(student_logits, labels, student_spans, num_spans, temperature=temperature)
            teacher_lp = span_log_probs(teacher_logits.detach(), teacher_targets, teacher_spans, num_spans,
                                        temperature=temperature)
            per_span = span_loss(student_lp[present], teacher_lp[present], loss=loss, temperature=temperature,
                                 beta=beta, skew=skew)
        else:
            student_rows, teacher_rows = _paired_rows(student_logits, teacher_logits, student_spans, teacher_spans)
            if method == "uld":
                per_span = uld_loss(student_rows, teacher_rows, temperature=temperature)
            else:
                if shared is None:
                    raise ValueError("method='hybrid' needs shared=shared_vocabulary(student, teacher tokenizers).")
                per_span, student_mass, teacher_mass = hybrid_loss(
                    student_rows, teacher_rows, shared.to(student_rows.device), loss=loss, temperature=temperature,
                    beta=beta, skew=skew, uld_weight=uld_weight)
                student_mass, teacher_mass = student_mass.sum(), teacher_mass.sum()
        spans = int(per_span.shape[0])
        kd = per_span.sum() / normaliser
    total = alpha * ce + (1 - alpha) * kd
    return CrossTokenizerTerms(total=total, ce=ce, kd=kd, spans=spans, student_matched_mass=student_mass,
                               teacher_matched_mass=teacher_mass)
