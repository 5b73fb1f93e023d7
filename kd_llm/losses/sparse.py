"""Distillation against *sparse* teacher targets: the teacher's top-k log-probabilities and the mass of the rest.

An offline teacher cache (:mod:`kd_llm.teacher_cache`) keeps, for every supervised position, the ``k`` most likely
token ids, their log-probabilities over the full vocabulary at the temperature ``T_cache`` they were taken at, and
the log of the remaining (tail) mass. The tail is handled explicitly, one of :data:`TAIL_MODES`:

- ``renormalise``: teacher and student are both renormalised over the ``k`` stored ids, and compared there. The
  student's mass outside those ids is not penalised by the distillation term (the cross-entropy term still trains
  it). Any divergence is well defined on the renormalised ``k``-outcome distributions.
- ``tail_bucket``: the tail is one extra outcome, so both are distributions over ``k + 1`` buckets; the student's
  bucket is ``1 - sum of its probabilities over the k ids``, computed as a log-sum-exp over the other ids (no
  cancellation). Only f-divergences are allowed (forward/reverse KL, JSD, skew KLs, TVD): merging outcomes can only
  lower an f-divergence (data-processing inequality), so the value is a lower bound of the dense one that becomes
  exact as ``k -> V``. ``mse`` compares entry by entry and has no such meaning on a merged tail, so it is refused.

Temperature. Stored values are log-softmax(z / T_cache). Training at ``T == T_cache`` uses them as they are. At
another ``T`` the top-k renormalised distribution is still exact (``softmax(z_i / T)`` restricted to the k ids is
``p_i ** (T_cache / T)`` renormalised, and the top-k set does not depend on T), so ``renormalise`` re-tempers. The
tail mass at another T depends on the individual tail logits, which are not stored, so ``tail_bucket`` at
``T != T_cache`` is refused: rebuild the cache at that temperature. Either way the divergence is multiplied by T^2,
as in :func:`kd_llm.losses.kd_loss`.

Everything is float32 (or wider) and in log space, like the dense losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_llm.losses.divergences import DIVERGENCES
from kd_llm.losses.kd_loss import REDUCTIONS, _check_hyperparameters, _compute_dtype, _hyperparameters_for
from kd_llm.losses.objective import LossComponents, _normaliser

TAIL_MODES = ("renormalise", "tail_bucket")
# f-divergences: the (k + 1)-bucket value is a lower bound of the dense one (data-processing inequality).
TAIL_BUCKET_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
SPARSE_DIVERGENCES = {"renormalise": tuple(DIVERGENCES), "tail_bucket": TAIL_BUCKET_DIVERGENCES}


@dataclass
class SparseTargets:
    """Teacher targets for ``N`` positions (already the valid ones, in the order the loss selects them).

    token_ids: ``[N, k]`` int64, distinct ids per row.
    log_probs: ``[N, k]`` float32, teacher log-probabilities of those ids over the full vocabulary at ``temperature``.
    log_tail: ``[N]`` float32, log of the teacher mass outside ``token_ids`` (``-inf`` when there is none).
    temperature: the temperature ``T_cache`` the values were taken at.
    """

    token_ids: Tensor
    log_probs: Tensor
    log_tail: Tensor
    temperature: float

    def __post_init__(self):
        n, k = self.token_ids.shape
        if self.log_probs.shape != (n, k) or self.log_tail.shape != (n,):
            raise ValueError(
                f"SparseTargets: token_ids {tuple(self.token_ids.shape)}, log_probs {tuple(self.log_probs.shape)} "
                f"and log_tail {tuple(self.log_tail.shape)} must be [N, k], [N, k] and [N]."
            )

    @property
    def num_rows(self) -> int:
        return self.token_ids.shape[0]

    def to(self, device) -> "SparseTargets":
        return SparseTargets(self.token_ids.to(device), self.log_probs.to(device), self.log_tail.to(device),
                             self.temperature)


def check_sparse_setup(loss: str, tail_mode: str, *, temperature: float | None = None,
                       cache_temperature: float | None = None) -> None:
    """Raise one clear ``ValueError`` if ``loss`` / ``tail_mode`` / the temperatures cannot be used together."""
    if tail_mode not in TAIL_MODES:
        raise ValueError(f"Unknown tail mode {tail_mode!r}; valid modes are: {', '.join(TAIL_MODES)}.")
    if loss not in SPARSE_DIVERGENCES[tail_mode]:
        raise ValueError(
            f"distillation_loss={loss!r} is not defined on sparse targets with tail_mode={tail_mode!r}: the tail's "
            f"individual probabilities are not stored, and {loss!r} is not an f-divergence, so it has no meaning on "
            f"a merged tail bucket. Use one of {', '.join(SPARSE_DIVERGENCES[tail_mode])}, or tail_mode='renormalise'."
        )
    if (tail_mode == "tail_bucket" and temperature is not None and cache_temperature is not None
            and not same_temperature(temperature, cache_temperature)):
        raise ValueError(
            f"The teacher cache holds values at temperature {cache_temperature:g} and training asks for "
            f"{temperature:g}. With tail_mode='tail_bucket' the tail mass at another temperature is unknown (it "
            "depends on every tail logit). Rebuild the cache at the training temperature, train at "
            f"{cache_temperature:g}, or use tail_mode='renormalise' (top-k renormalised values re-temper exactly)."
        )


def same_temperature(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0)


def teacher_bucket_log_probs(targets: SparseTargets, *, tail_mode: str, temperature: float) -> Tensor:
    """Teacher log-probabilities over the compared outcomes: ``[N, k]`` (renormalise) or ``[N, k + 1]``."""
    check_sparse_setup("forward_kl", tail_mode, temperature=temperature, cache_temperature=targets.temperature)
    log_probs = targets.log_probs.float() if targets.log_probs.dtype != torch.float64 else targets.log_probs
    if tail_mode == "renormalise":
        if not same_temperature(temperature, targets.temperature):
            # log p_i = z_i / T_c - c, so (T_c / T) * log p_i = z_i / T - c'; renormalising removes c'.
            log_probs = log_probs * (targets.temperature / temperature)
        return log_probs - torch.logsumexp(log_probs, dim=-1, keepdim=True)
    return torch.cat((log_probs, targets.log_tail.to(log_probs.dtype).unsqueeze(-1)), dim=-1)


def student_bucket_log_probs(student_rows: Tensor, token_ids: Tensor, *, tail_mode: str,
                             temperature: float) -> Tensor:
    """Student log-probabilities at ``temperature`` over the same outcomes as :func:`teacher_bucket_log_probs`."""
    dtype = _compute_dtype(student_rows)
    log_q = F.log_softmax(student_rows.to(dtype) / temperature, dim=-1)
    top = log_q.gather(-1, token_ids)
    if tail_mode == "renormalise":
        return top - torch.logsumexp(top, dim=-1, keepdim=True)
    if token_ids.shape[-1] >= log_q.shape[-1]:
        # Every id is stored: the tail is empty. A logsumexp over nothing would give NaN gradients.
        tail = torch.full_like(top[:, :1], -math.inf)
    else:
        # Sum over the ids *outside* the top-k rather than 1 - sum inside: no cancellation when the top-k hold
        # nearly all the mass.
        tail = torch.logsumexp(log_q.scatter(-1, token_ids, -math.inf), dim=-1, keepdim=True)
    return torch.cat((top, tail), dim=-1)


def sparse_token_divergence(student_rows: Tensor, targets: SparseTargets, *, loss: str = "forward_kl",
                            temperature: float = 1.0, tail_mode: str = "tail_bucket", beta: float = 0.5,
                            skew: float = 0.1) -> Tensor:
    """Per-row divergence ``D(teacher || student)`` on sparse targets, times T^2.

    Args:
        student_rows: ``[N, V]`` student logits of the selected positions (any float dtype).
        targets: :class:`SparseTargets` for the same ``N`` rows; ids must be ``< V``.
    Returns:
        ``[N]`` float32 (float64 for float64 logits).
    """
    _check_hyperparameters(loss, temperature, beta, skew)
    check_sparse_setup(loss, tail_mode, temperature=temperature, cache_temperature=targets.temperature)
    if student_rows.shape[0] != targets.num_rows:
        raise ValueError(f"{student_rows.shape[0]} student rows but {targets.num_rows} sparse target rows.")
    if targets.num_rows and int(targets.token_ids.max()) >= student_rows.shape[-1]:
        raise ValueError(
            f"Sparse targets name token id {int(targets.token_ids.max())} but the student has only "
            f"{student_rows.shape[-1]} logits: the cache was made with a larger vocabulary."
        )
    student = student_bucket_log_probs(student_rows, targets.token_ids, tail_mode=tail_mode, temperature=temperature)
    teacher = teacher_bucket_log_probs(targets, tail_mode=tail_mode, temperature=temperature).to(student.dtype)
    extra = _hyperparameters_for(loss, beta=beta, skew=skew)
    return DIVERGENCES[loss](student, teacher.detach(), **extra) * temperature**2


def _valid_rows(student_logits: Tensor, labels: Tensor, targets: SparseTargets, ignore_index: int) -> Tensor:
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must match the logits' leading dimensions "
            f"{tuple(student_logits.shape[:-1])} (logits are [..., V], labels [...], already shifted)."
        )
    valid = labels.reshape(-1) != ignore_index
    rows = student_logits.reshape(-1, student_logits.shape[-1])[valid]
    if rows.shape[0] != targets.num_rows:
        raise ValueError(
            f"The batch has {rows.shape[0]} supervised positions but the sparse targets hold {targets.num_rows} "
            "rows: targets must be given for exactly the positions whose label is not ignored, in row-major order."
        )
    return rows


def sparse_kd_loss(student_logits: Tensor, targets: SparseTargets, labels: Tensor, *, loss: str = "forward_kl",
                   temperature: float = 1.0, tail_mode: str = "tail_bucket", beta: float = 0.5, skew: float = 0.1,
                   ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """The sparse counterpart of :func:`kd_llm.losses.kd_loss`: equal to it when ``k == V``.

    Args:
        student_logits: ``[..., V]`` aligned with ``labels`` (the caller shifts).
        targets: sparse targets of the positions where ``labels != ignore_index``, in row-major order.
        labels: ``[...]``; only the mask is used.
    Returns:
        A float32 scalar; exactly 0 (graph-connected, zero gradients) when no position is valid.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"Unknown reduction {reduction!r}; valid reductions are: {', '.join(REDUCTIONS)}.")
    rows = _valid_rows(student_logits, labels, targets, ignore_index)
    per_token = sparse_token_divergence(rows, targets, loss=loss, temperature=temperature, tail_mode=tail_mode,
                                        beta=beta, skew=skew)
    total = per_token.sum()
    return total if reduction == "sum" else total / max(per_token.shape[0], 1)


def sparse_distillation_objective(student_logits: Tensor, targets: SparseTargets | None, labels: Tensor, *,
                                  alpha: float, loss: str = "forward_kl", temperature: float = 1.0,
                                  tail_mode: str = "tail_bucket", beta: float = 0.5, skew: float = 0.1,
                                  ignore_index: int = -100, num_items_in_batch: int | Tensor | None = None,
                                  kd_vocab_size: int | None = None) -> LossComponents:
    """``alpha * CE + (1 - alpha) * sparse KD``, normalised like :func:`kd_llm.losses.distillation_objective`.

    ``kd_vocab_size`` limits the distillation term to the first columns (the cache's vocabulary, when the student's
    embedding is padded); the CE term uses every student logit.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha (cross-entropy weight) must be in [0, 1], got {alpha}.")
    if alpha < 1 and targets is None:
        raise ValueError(f"sparse teacher targets are required when alpha < 1 (got alpha={alpha}).")
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    rows = student_logits.reshape(-1, student_logits.shape[-1])[valid]
    normaliser = _normaliser(num_items_in_batch, rows.shape[0], rows.device)
    dtype = torch.promote_types(rows.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=rows.device)
    ce = zero
    if alpha > 0:
        ce = F.nll_loss(F.log_softmax(rows.to(dtype), dim=-1), flat_labels[valid], reduction="sum") / normaliser
    kd = zero
    if alpha < 1:
        if rows.shape[0] != targets.num_rows:
            raise ValueError(f"The batch has {rows.shape[0]} supervised positions but the sparse targets hold "
                             f"{targets.num_rows} rows.")
        kd_rows = rows if kd_vocab_size is None else rows[..., :kd_vocab_size]
        kd = sparse_token_divergence(kd_rows, targets.to(rows.device), loss=loss, temperature=temperature,
                                     tail_mode=tail_mode, beta=beta, skew=skew).sum() / normaliser
    return LossComponents(total=alpha * ce + (1 - alpha) * kd, ce=ce, kd=kd)
