"""Token-level distillation loss between student and teacher logits (temperature, masking, reduction)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_llm.losses.divergences import DIVERGENCES

REDUCTIONS = ("mean", "sum")


def _check_hyperparameters(loss: str, temperature: float, beta: float, skew: float) -> None:
    if loss not in DIVERGENCES:
        raise ValueError(f"Unknown distillation loss {loss!r}; valid losses are: {', '.join(DIVERGENCES)}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if not 0 < beta < 1:
        raise ValueError(f"beta (JSD mixture weight) must be strictly between 0 and 1, got {beta}.")
    if not 0 < skew < 1:
        raise ValueError(f"skew (skew-KL mixture weight) must be strictly between 0 and 1, got {skew}.")


def _hyperparameters_for(loss: str, *, beta: float, skew: float) -> dict[str, float]:
    """The keyword arguments the divergence ``loss`` takes (most take none)."""
    if loss == "jsd":
        return {"beta": beta}
    if loss in ("skew_forward_kl", "skew_reverse_kl"):
        return {"skew": skew}
    return {}


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 if an input already is: half-precision softmax/KL is not accurate enough."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> Tensor:
    """Per-token divergence between tempered distributions, times T^2 (Hinton), for rows already selected.

    Args:
        student_logits: ``[N, V]``, any float dtype.
        teacher_logits: ``[N, V]``; treated as constants (detached).
    Returns:
        ``[N]`` in float32 (float64 if an input is float64). No masking: select valid rows first.
    """
    _check_hyperparameters(loss, temperature, beta, skew)
    dtype = _compute_dtype(student_logits, teacher_logits)
    # Upcast *before* dividing by T: bf16 logits / 0.5 would round again, and softmax in bf16 is too coarse.
    student_log_probs = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    extra = _hyperparameters_for(loss, beta=beta, skew=skew)
    # T^2 keeps gradient magnitudes comparable across temperatures (the softened gradients scale as 1/T^2).
    return DIVERGENCES[loss](student_log_probs, teacher_log_probs, **extra) * temperature**2


def select_valid_rows(
    student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor, ignore_index: int
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Flatten ``[..., V]`` logits and ``[...]`` labels, keeping only positions whose label is not ignored.

    Selecting before any softmax means masked positions cost nothing and cannot produce NaN (their logits may be
    garbage, e.g. padding). Returns ``(student [N, V], teacher [N, V] or None, labels [N])``.
    """
    vocab_size = student_logits.shape[-1]
    if teacher_logits is not None:
        if teacher_logits.shape[-1] != vocab_size:
            raise ValueError(
                f"Student and teacher logits have different vocabulary sizes ({vocab_size} vs "
                f"{teacher_logits.shape[-1]}). Teacher and student vocabularies must be reconciled first, e.g. "
                "both sliced to the length of the shared tokenizer."
            )
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
                "must have the same shape."
            )
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must match the logits' leading dimensions "
            f"{tuple(student_logits.shape[:-1])} (logits are [..., V], labels [...], already shifted)."
        )
    valid = labels.reshape(-1) != ignore_index
    student_rows = student_logits.reshape(-1, vocab_size)[valid]
    teacher_rows = None if teacher_logits is None else teacher_logits.reshape(-1, vocab_size)[valid]
    return student_rows, teacher_rows, labels.reshape(-1)[valid]


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Distillation loss of a student towards a teacher, reduced over non-ignored positions.

    Args:
        student_logits: ``[..., V]``, e.g. ``[B, L, V]``; already aligned with ``labels`` (the caller shifts).
        teacher_logits: ``[..., V]``, same shape; treated as constants (detached).
        labels: ``[...]``; positions equal to ``ignore_index`` are excluded. Only the mask is used.
        loss: a key of ``DIVERGENCES``: forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl, tvd, mse.
        temperature: T > 0; both distributions are softmax(logits / T) and the divergence is multiplied by T^2.
        beta: JSD mixture weight in (0, 1). skew: skew-KL mixture weight in (0, 1).
        reduction: ``"mean"`` over valid positions, or ``"sum"``.
    Returns:
        A scalar, float32 whatever the input dtype (float64 if an input is float64). With no valid position it is
        exactly 0.0, still attached to the graph, with zero gradients.
    """
    _check_hyperparameters(loss, temperature, beta, skew)
    if reduction not in REDUCTIONS:
        raise ValueError(f"Unknown reduction {reduction!r}; valid reductions are: {', '.join(REDUCTIONS)}.")
    student_rows, teacher_rows, _ = select_valid_rows(student_logits, teacher_logits, labels, ignore_index)
    per_token = token_divergence(
        student_rows, teacher_rows, loss=loss, temperature=temperature, beta=beta, skew=skew
    )
    # The sum over zero rows is an exact, graph-connected 0; dividing by max(N, 1) keeps it so for "mean".
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / max(per_token.shape[0], 1)
