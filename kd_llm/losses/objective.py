"""The training objective: a mix of hard-label cross-entropy and distillation, normalised for gradient accumulation."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_llm.losses.kd_loss import select_valid_rows, token_divergence


@dataclass
class LossComponents:
    """Scalars of one (micro-)batch. ``total`` is what to backpropagate; ``ce`` and ``kd`` are its two terms, both
    already normalised the same way (not yet weighted by alpha), still attached to the graph: detach to log them."""

    total: Tensor
    ce: Tensor
    kd: Tensor


def _normaliser(num_items_in_batch: int | Tensor | None, num_valid: int, device: torch.device) -> Tensor | float:
    """What to divide summed losses by: the global token count if given, else this batch's; never less than 1."""
    if num_items_in_batch is None:
        return float(max(num_valid, 1))
    if isinstance(num_items_in_batch, Tensor):
        # A tensor (as the HF Trainer passes it) stays on device: comparing it to num_valid would force a sync.
        return num_items_in_batch.to(device=device, dtype=torch.float32).clamp_min(1.0)
    if num_items_in_batch < num_valid:
        raise ValueError(
            f"num_items_in_batch ({num_items_in_batch}) is smaller than the {num_valid} valid tokens of this "
            "micro-batch; it must count the valid (non-ignored) tokens of the whole accumulated batch."
        )
    return float(max(num_items_in_batch, 1))


def distillation_objective(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    *,
    alpha: float,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = -100,
    num_items_in_batch: int | Tensor | None = None,
    kd_vocab_size: int | None = None,
) -> LossComponents:
    """total = alpha * CE(student, labels) + (1 - alpha) * KD(student, teacher).

    Args:
        student_logits: ``[..., V]``, aligned with ``labels`` (the caller shifts).
        teacher_logits: ``[..., V]`` or None when ``alpha == 1`` (the KD term is then skipped).
        labels: ``[...]`` hard targets; ``ignore_index`` positions count in neither term.
        alpha: weight of the cross-entropy in [0, 1]; ``alpha == 0`` skips the CE term.
        loss, temperature, beta, skew: as in ``kd_loss``.
        num_items_in_batch: valid tokens in the whole accumulated batch (all gradient-accumulation micro-batches).
            Both terms are *summed* over tokens and divided by it, so summing the micro-batch losses gives exactly
            the full-batch token mean. When None, this batch's own valid-token count is used.
        kd_vocab_size: compare teacher and student over their first ``kd_vocab_size`` logits only (the shared
            tokenizer length, when one model's embedding is padded). The CE term always uses every student logit,
            so the student still learns to keep its padding columns unlikely.
    Returns:
        ``LossComponents`` of float32 scalars (float64 for float64 inputs). With no valid token all are exactly 0,
        with zero gradients.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha (cross-entropy weight) must be in [0, 1], got {alpha}.")
    if alpha < 1 and teacher_logits is None:
        raise ValueError(f"teacher_logits are required when alpha < 1 (got alpha={alpha}).")
    use_teacher = teacher_logits if alpha < 1 else None
    if use_teacher is not None and kd_vocab_size is not None:
        for name, logits in (("student", student_logits), ("teacher", use_teacher)):
            if logits.shape[-1] < kd_vocab_size:
                raise ValueError(f"kd_vocab_size={kd_vocab_size} exceeds the {name}'s {logits.shape[-1]} logits.")
        # Bring the teacher to the student's width; the columns past kd_vocab_size are dropped again below.
        use_teacher = F.pad(use_teacher[..., :kd_vocab_size], (0, student_logits.shape[-1] - kd_vocab_size))
    student_rows, teacher_rows, target_rows = select_valid_rows(student_logits, use_teacher, labels, ignore_index)
    normaliser = _normaliser(num_items_in_batch, student_rows.shape[0], student_rows.device)
    dtype = torch.promote_types(student_rows.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=student_rows.device)

    ce = zero
    if alpha > 0:
        log_probs = F.log_softmax(student_rows.to(dtype), dim=-1)
        ce = F.nll_loss(log_probs, target_rows, reduction="sum") / normaliser
    kd = zero
    if teacher_rows is not None:
        if kd_vocab_size is not None:
            student_rows, teacher_rows = student_rows[..., :kd_vocab_size], teacher_rows[..., :kd_vocab_size]
        per_token = token_divergence(
            student_rows, teacher_rows, loss=loss, temperature=temperature, beta=beta, skew=skew
        )
        kd = per_token.sum() / normaliser
    # A skipped term is an exact constant 0, so the mix below is just the computed term.
    total = alpha * ce + (1 - alpha) * kd
    return LossComponents(total=total, ce=ce, kd=kd)


def l2_penalty(parameters: Iterable[Tensor]) -> Tensor:
    """Sum of squared weights, accumulated in float32 (the optional ``l2_weight`` term). Empty input gives 0."""
    squares = [parameter.float().square().sum() for parameter in parameters]
    if not squares:
        return torch.zeros((), dtype=torch.float32)
    return torch.stack(squares).sum()
