"""The fused, chunked objective against *stored* teacher hidden states: one row per supervised position (what a
hidden-state teacher cache holds), with the teacher's lm_head weight and soft cap.

:func:`kd_llm.losses.fused.fused_distillation_objective` takes the teacher's hidden states for every position of the
batch (``[..., H_t]``, aligned with the labels); a cache stores only the supervised ones. This runs the same chunks
(:class:`kd_llm.losses.fused.LmHeadTeacher`, the same closed-form or autograd chunk losses) on the packed rows: the
chunk of valid rows ``start:stop`` reads teacher rows ``start:stop``. So it gives the fused live-teacher objective's
values and gradients, and through it the dense ``distillation_objective``'s, for every divergence and temperature.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kd_llm.losses.fused import (
    LmHeadTeacher,
    _check_head,
    _flatten,
    _head,
    _Settings,
    check_common_arguments,
    default_chunk_rows,
    run_fused,
)
from kd_llm.losses.objective import LossComponents


class PackedLmHeadTeacher(LmHeadTeacher):
    """The teacher side of a chunk from hidden states of the valid positions only, in row-major order."""

    def chunk(self, rows: Tensor, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        return _head(self.hidden[start:stop], self.weight, self.bias, self.softcap, dtype)


def fused_hidden_distillation_objective(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    teacher_rows: Tensor | None,
    teacher_weight: Tensor | None,
    *,
    alpha: float,
    student_bias: Tensor | None = None,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    kd_vocab_size: int | None = None,
    chunk_size: int | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
) -> LossComponents:
    """``distillation_objective`` with teacher logits ``softcap(teacher_rows @ teacher_weight.T)``, from hidden states,
    without materialising either model's ``[N, V]`` logits.

    Args:
        student_hidden: ``[..., H_s]`` final hidden states, aligned with ``labels`` (the caller shifts).
        student_weight: ``[V, H_s]`` student lm_head weight. student_bias: optional ``[V]``.
        labels: ``[...]`` hard targets; ``ignore_index`` positions count in neither term.
        teacher_rows: ``[n_valid, H_t]`` the teacher's final hidden states at the valid positions, row-major over
            ``labels != ignore_index`` (a constant; None when ``alpha == 1``).
        teacher_weight: ``[V_t, H_t]`` the teacher's lm_head weight (bias-free: a teacher with an lm_head bias or any
            other logit post-processing is refused before its states are stored).
        Others: as in :func:`kd_llm.losses.fused.fused_distillation_objective`.
    Returns:
        ``LossComponents``; ``total`` carries the gradients, ``ce`` and ``kd`` are detached.
    """
    check_common_arguments(alpha=alpha, loss=loss, temperature=temperature, beta=beta, skew=skew,
                           reduction=reduction, num_items_in_batch=num_items_in_batch, chunk_size=chunk_size)
    for name, cap in (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap)):
        if cap is not None and not cap > 0:
            raise ValueError(f"{name} must be > 0 or None, got {cap}.")
    flat_labels = labels.reshape(-1)
    student_rows = _flatten(student_hidden, labels, "student")
    _check_head(student_rows, student_weight, student_bias, "student")
    vocab = student_weight.shape[0]
    teacher = None
    if alpha < 1:
        if teacher_rows is None or teacher_weight is None:
            raise ValueError(f"teacher_rows and teacher_weight are required when alpha < 1 (got alpha={alpha}).")
        if teacher_rows.ndim != 2:
            raise ValueError(f"teacher_rows {tuple(teacher_rows.shape)} must be [n_valid, H_t].")
        _check_head(teacher_rows, teacher_weight, None, "teacher")
        num_valid = int((flat_labels != ignore_index).sum())
        if num_valid != teacher_rows.shape[0]:
            raise ValueError(f"The batch has {num_valid} supervised positions but teacher_rows holds "
                             f"{teacher_rows.shape[0]} rows.")
        teacher_vocab = teacher_weight.shape[0]
        if kd_vocab_size is None and vocab != teacher_vocab:
            raise ValueError(f"Student and teacher lm_heads have different vocabulary sizes ({vocab} vs "
                             f"{teacher_vocab}). Pass kd_vocab_size=<length of the shared tokenizer>.")
        if kd_vocab_size is not None and not 0 < kd_vocab_size <= min(vocab, teacher_vocab):
            raise ValueError(f"kd_vocab_size={kd_vocab_size} must be in [1, {min(vocab, teacher_vocab)}] (the "
                             "smaller of the two vocabularies).")
        teacher = PackedLmHeadTeacher(teacher_rows.detach().to(student_rows.device), teacher_weight.detach(), None,
                                      teacher_softcap, kd_vocab_size or vocab, loss)
    settings = _Settings(
        alpha=float(alpha), loss=loss, temperature=float(temperature), beta=float(beta), skew=float(skew),
        ignore_index=ignore_index, kd_vocab_size=kd_vocab_size if alpha < 1 else None,
        chunk_rows=chunk_size or default_chunk_rows(vocab), student_softcap=student_softcap,
    )
    return run_fused(student_rows, student_weight, student_bias, flat_labels, settings, teacher,
                     reduction=reduction, num_items_in_batch=num_items_in_batch)
