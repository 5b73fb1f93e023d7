"""The fused, chunked objective against *sparse* teacher targets (an offline teacher cache's top-k rows).

:func:`kd_llm.losses.sparse.sparse_distillation_objective` needs the student's ``[N, V]`` logits; this computes the
same value from the student's final hidden states and lm_head weight, a chunk of rows at a time, with the gradients
for the hidden states and the weight accumulated chunk by chunk (:mod:`kd_llm.losses.fused`). Each chunk runs
``sparse_token_divergence`` itself, so every tail mode and divergence behaves exactly as the dense sparse path.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from kd_llm.losses.fused import (
    _check_head,
    _flatten,
    _Settings,
    autograd_chunk,
    check_common_arguments,
    default_chunk_rows,
    run_fused,
)
from kd_llm.losses.objective import LossComponents
from kd_llm.losses.sparse import SparseTargets, check_sparse_setup, sparse_token_divergence


def _sparse_divergence(student_logits: Tensor, targets: SparseTargets, s: _Settings) -> Tensor:
    """The dense sparse path's own ``sparse_token_divergence``, per token."""
    return sparse_token_divergence(student_logits, targets, loss=s.loss, temperature=s.temperature,
                                   tail_mode=s.tail_mode, beta=s.beta, skew=s.skew)


_sparse_chunk = functools.partial(autograd_chunk, divergence=_sparse_divergence)


class SparseTeacher:
    """The teacher side of a chunk from sparse targets: the rows ``start:stop`` of the valid positions."""

    chunk_loss = staticmethod(_sparse_chunk)

    def __init__(self, targets: SparseTargets):
        self.targets = targets

    def chunk(self, rows: Tensor, start: int, stop: int, dtype: torch.dtype) -> SparseTargets:
        t = self.targets
        return SparseTargets(t.token_ids[start:stop], t.log_probs[start:stop], t.log_tail[start:stop], t.temperature)


def fused_sparse_distillation_objective(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    targets: SparseTargets | None,
    *,
    alpha: float,
    student_bias: Tensor | None = None,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    tail_mode: str = "tail_bucket",
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    kd_vocab_size: int | None = None,
    chunk_size: int | None = None,
    student_softcap: float | None = None,
) -> LossComponents:
    """``sparse_distillation_objective`` on the logits ``hidden @ weight.T (+ bias)``, without materialising them.

    Args:
        student_hidden: ``[..., H]`` final hidden states, aligned with ``labels`` (the caller shifts).
        student_weight: ``[V, H]`` student lm_head weight. student_bias: optional ``[V]``.
        labels: ``[...]`` hard targets; ``ignore_index`` positions count in neither term.
        targets: sparse targets of the valid positions, in row-major order (None when ``alpha == 1``).
        kd_vocab_size: the distillation term sees the first ``kd_vocab_size`` student columns (the cache's
            vocabulary); the CE term sees all of them.
        Others: as in :func:`kd_llm.losses.fused.fused_distillation_objective` and ``sparse_distillation_objective``.
    Returns:
        ``LossComponents``; ``total`` carries the gradients, ``ce`` and ``kd`` are detached.
    """
    check_common_arguments(alpha=alpha, loss=loss, temperature=temperature, beta=beta, skew=skew,
                           reduction=reduction, num_items_in_batch=num_items_in_batch, chunk_size=chunk_size)
    if student_softcap is not None and not student_softcap > 0:
        raise ValueError(f"student_softcap must be > 0 or None, got {student_softcap}.")
    use_teacher = alpha < 1
    if use_teacher and targets is None:
        raise ValueError(f"sparse teacher targets are required when alpha < 1 (got alpha={alpha}).")
    flat_labels = labels.reshape(-1)
    student_rows = _flatten(student_hidden, labels, "student")
    _check_head(student_rows, student_weight, student_bias, "student")
    vocab = student_weight.shape[0]
    if kd_vocab_size is not None and not 0 < kd_vocab_size <= vocab:
        raise ValueError(f"kd_vocab_size={kd_vocab_size} must be in [1, {vocab}] (the student's vocabulary).")
    teacher = None
    if use_teacher:
        check_sparse_setup(loss, tail_mode, temperature=temperature, cache_temperature=targets.temperature)
        num_valid = int((flat_labels != ignore_index).sum())
        if num_valid != targets.num_rows:
            raise ValueError(f"The batch has {num_valid} supervised positions but the sparse targets hold "
                             f"{targets.num_rows} rows.")
        teacher = SparseTeacher(targets.to(student_rows.device))
    settings = _Settings(
        alpha=float(alpha), loss=loss, temperature=float(temperature), beta=float(beta), skew=float(skew),
        ignore_index=ignore_index, kd_vocab_size=kd_vocab_size, chunk_rows=chunk_size or default_chunk_rows(vocab),
        student_softcap=student_softcap, tail_mode=tail_mode,
    )
    return run_fused(student_rows, student_weight, student_bias, flat_labels, settings, teacher,
                     reduction=reduction, num_items_in_batch=num_items_in_batch)
