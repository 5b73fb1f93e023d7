"""Fused, chunked distillation objective: from final hidden states and lm_head weights, never ``[N, V]`` logits.

``distillation_objective`` needs both models' logits for every position: at a 262k vocabulary and 4k tokens that is
4 GiB per float32 copy, and the softmaxes, the divergence and their gradients make several such copies.
``fused_distillation_objective`` takes the hidden states that feed the two lm_heads instead and works through the
supervised rows a chunk at a time: a chunk's logits exist only while that chunk is processed. The gradients for the
student's hidden states and lm_head weight (and bias) are computed during the forward pass, chunk by chunk, and only
scaled by the incoming gradient in the backward pass (the approach of Liger-Kernel's fused linear cross-entropy).

Per chunk, the loss is the same code as the dense path (``token_divergence``, ``log_softmax`` + ``nll_loss``), run on
the chunk's logits with a local autograd graph; so every divergence, temperature and the T^2 scaling behave exactly
as in ``kd_loss`` / ``distillation_objective``, which the tests pin to 1e-5. Forward KL (the default) and the CE term
alone have their chunk gradient written out instead (``softmax - onehot``, ``T (q_T - p_T)``): about half the
``[rows, V]`` buffers and passes, pinned to the same dense values.

Only ``total`` carries gradients: ``ce`` and ``kd`` come back detached (their gradients were folded into
``total``'s in the forward pass). Double backward is not supported.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from kd_llm.losses.kd_loss import REDUCTIONS, _check_hyperparameters, token_divergence
from kd_llm.losses.objective import LossComponents, _normaliser

# Default chunk: about 2^22 logits (16 MiB in float32) per model. Each chunk holds a handful of [rows, V] buffers
# (two models' logits, their softmaxes, the gradient), so ~100-200 MiB at most, whatever N; and at 64 rows or more
# the lm_head matmuls stay compute-bound rather than re-reading the [V, H] weight for a few rows.
DEFAULT_LOGITS_PER_CHUNK = 2**22
MIN_DEFAULT_ROWS = 64


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk when none is given: ``2^22 / V``, at least 64 (V=49,152: 85 rows; V=262,144: 64 rows)."""
    return max(MIN_DEFAULT_ROWS, DEFAULT_LOGITS_PER_CHUNK // max(vocab_size, 1))


def soft_cap(logits: Tensor, cap: float | None) -> Tensor:
    """Gemma's final-logit soft cap ``cap * tanh(logits / cap)``, the same operations as the model's forward."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


@dataclass(frozen=True)
class _Settings:
    alpha: float
    loss: str
    temperature: float
    beta: float
    skew: float
    ignore_index: int
    kd_vocab_size: int | None
    chunk_rows: int
    student_softcap: float | None
    tail_mode: str | None = None  # sparse (cached) targets only: kd_llm.losses.sparse's tail handling


def _head(hidden: Tensor, weight: Tensor, bias: Tensor | None, cap: float | None, dtype: torch.dtype) -> Tensor:
    """A chunk's logits: the matmul in the weights' dtype (as the model's lm_head does), then upcast and soft-capped.
    The cap is applied after the upcast, so it is computed in float32 even for half-precision models."""
    return soft_cap(F.linear(hidden.to(weight.dtype), weight, bias).to(dtype), cap)


# Divergences whose chunk gradient is written out in closed form (fewer [rows, V] buffers, fewer passes); the others
# go through autograd on the chunk's logits with the dense path's own code.
CLOSED_FORM_LOSSES = ("forward_kl",)


def autograd_chunk(raw: Tensor, teacher_chunk, targets: Tensor, kd_columns: int, s: _Settings, *, divergence):
    """``(CE sum, KD sum, d(alpha * CE + (1 - alpha) * KD) / d raw)`` for one chunk, by autograd through
    ``divergence(student_logits, teacher_chunk, settings) -> [rows]``, the dense path's own per-token code.
    ``raw``: the chunk's logits before any soft cap."""
    with torch.enable_grad():  # forward() runs under no_grad: `raw` becomes the local graph's leaf
        raw.requires_grad_(True)
        logits = soft_cap(raw, s.student_softcap)
        objective = torch.zeros((), dtype=raw.dtype, device=raw.device)
        ce = kd = objective
        if s.alpha > 0:
            ce = F.nll_loss(F.log_softmax(logits, dim=-1), targets, reduction="sum")
            objective = objective + s.alpha * ce
        if teacher_chunk is not None:
            kd = divergence(logits[:, :kd_columns], teacher_chunk, s).sum()
            objective = objective + (1 - s.alpha) * kd
        (grad,) = torch.autograd.grad(objective, raw)
    return ce.detach(), kd.detach(), grad


def _dense_divergence(student_logits: Tensor, teacher_logits: Tensor, s: _Settings) -> Tensor:
    return token_divergence(student_logits, teacher_logits, loss=s.loss, temperature=s.temperature, beta=s.beta,
                            skew=s.skew)


_autograd_chunk = functools.partial(autograd_chunk, divergence=_dense_divergence)


def _closed_form_chunk(raw: Tensor, teacher_logits: Tensor | None, targets: Tensor, kd_columns: int, s: _Settings):
    """As :func:`_autograd_chunk`, for CE and forward KL, with the gradient written out:
    d CE / dz = softmax(z) - onehot(target), d [T^2 KL(p_T || q_T)] / dz = T (q_T - p_T). Logits here are finite
    (a matmul's output), so none of the -inf care of ``divergences._kl`` is needed; values agree with it to
    rounding. About half the [rows, V] buffers of the autograd version."""
    logits = soft_cap(raw, s.student_softcap)
    zero = torch.zeros((), dtype=raw.dtype, device=raw.device)
    ce = kd = zero
    if s.alpha > 0:
        log_q = F.log_softmax(logits, dim=-1)
        ce = F.nll_loss(log_q, targets, reduction="sum")
        grad = log_q.exp_().mul_(s.alpha)
        grad[torch.arange(targets.shape[0], device=grad.device), targets] -= s.alpha
    else:
        grad = torch.zeros_like(logits)
    if teacher_logits is not None:
        temperature = s.temperature
        log_q_t = F.log_softmax(logits[:, :kd_columns] / temperature, dim=-1)
        log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
        p_t = log_p_t.exp()
        per_row = log_p_t.sub_(log_q_t).mul_(p_t).sum(dim=-1)
        # divergences._kl clamps rounding below 0 to 0, which also stops those rows' gradient: do the same.
        kept = (per_row >= 0).to(p_t.dtype).unsqueeze(-1)
        kd = per_row.clamp_min(0.0).sum() * temperature**2
        grad[:, :kd_columns].add_(log_q_t.exp_().sub_(p_t).mul_(kept), alpha=(1 - s.alpha) * temperature)
    if s.student_softcap is not None:  # chain rule through cap * tanh(raw / cap): times 1 - tanh^2
        grad.mul_(1 - (logits / s.student_softcap).square())
    return ce, kd, grad


class LmHeadTeacher:
    """The teacher side of a chunk, from the teacher's hidden states and lm_head: its logits for the chunk's rows."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None, kd_columns: int,
                 loss: str):
        # Only the shared columns are ever compared: the rest of the teacher's lm_head is never computed.
        self.hidden, self.weight = hidden, weight[:kd_columns]
        self.bias = None if bias is None else bias[:kd_columns]
        self.softcap = softcap
        self.chunk_loss = _closed_form_chunk if loss in CLOSED_FORM_LOSSES else _autograd_chunk

    def chunk(self, rows: Tensor, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        return _head(self.hidden.index_select(0, rows), self.weight, self.bias, self.softcap, dtype)


class _FusedDistillation(torch.autograd.Function):
    """Inputs are already flattened: hidden ``[N, H]``, labels ``[N]``. ``teacher``: None (CE alone) or an object
    with ``chunk(rows, start, stop, dtype)`` (what the chunk loss compares against, for the valid rows
    ``start:stop`` whose indices are ``rows``) and ``chunk_loss``. Returns ``(total, ce, kd)`` scalars."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, labels, normaliser, settings: _Settings, teacher):
        s = settings
        dtype = torch.promote_types(student_hidden.dtype, torch.float32)
        device = student_hidden.device
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        # Gradients of the *unnormalised* sum alpha * CE_sum + (1 - alpha) * KD_sum; divided by the normaliser once.
        grad_hidden = torch.zeros_like(student_hidden) if need_hidden else None
        grad_weight = torch.zeros(student_weight.shape, dtype=dtype, device=device) if need_weight else None
        grad_bias = torch.zeros(student_bias.shape, dtype=dtype, device=device) if need_bias else None
        ce_sum = torch.zeros((), dtype=dtype, device=device)
        kd_sum = torch.zeros((), dtype=dtype, device=device)
        kd_columns = s.kd_vocab_size if s.kd_vocab_size is not None else student_weight.shape[0]
        chunk_loss = _closed_form_chunk if teacher is None else teacher.chunk_loss

        valid_rows = (labels != s.ignore_index).nonzero().squeeze(1)
        for start in range(0, valid_rows.shape[0], s.chunk_rows):
            stop = min(start + s.chunk_rows, valid_rows.shape[0])
            rows = valid_rows[start:stop]
            hidden = student_hidden.index_select(0, rows)
            raw = F.linear(hidden.to(student_weight.dtype), student_weight, student_bias).to(dtype)
            teacher_chunk = None if teacher is None else teacher.chunk(rows, start, stop, dtype)
            ce, kd, grad_logits = chunk_loss(raw, teacher_chunk, labels.index_select(0, rows), kd_columns, s)
            ce_sum += ce
            kd_sum += kd
            if need_hidden:
                grad_hidden.index_copy_(0, rows, (grad_logits.to(student_weight.dtype) @ student_weight)
                                        .to(grad_hidden.dtype))
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), hidden.to(dtype))
            if need_bias:
                grad_bias += grad_logits.sum(dim=0)

        ce_value = ce_sum / normaliser
        kd_value = kd_sum / normaliser
        total = s.alpha * ce_value + (1 - s.alpha) * kd_value
        grads = []
        for grad, like in ((grad_hidden, student_hidden), (grad_weight, student_weight), (grad_bias, student_bias)):
            if grad is not None:
                # In place where the dtype allows: a [V, H] copy would raise the peak memory by one weight gradient.
                grad = grad.div_(normaliser) if grad.dtype == dtype else (grad.to(dtype) / normaliser)
                grad = grad.to(like.dtype)
            grads.append(grad)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
        ctx.has_grad = tuple(g is not None for g in grads)
        ctx.mark_non_differentiable(ce_value, kd_value)
        return total, ce_value, kd_value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        # The usual case is loss.backward() on this very scalar: hand the stored gradients over without a copy.
        # Otherwise scale them in place (a second backward through this graph then fails loudly on the version
        # counter instead of using scaled gradients).
        unit = bool(grad_total == 1)
        out = []
        for grad, present in zip(ctx.saved_tensors, ctx.has_grad):
            out.append((grad if unit else grad.mul_(grad_total.to(grad.dtype))) if present else None)
        return out[0], out[1], out[2], None, None, None, None


def _flatten(hidden: Tensor, labels: Tensor, name: str) -> Tensor:
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"{name} hidden states {tuple(hidden.shape)} must be [..., H] with the leading dimensions of labels "
            f"{tuple(labels.shape)} (already shifted, like the logits of the dense path)."
        )
    return hidden.reshape(-1, hidden.shape[-1])


def _check_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, name: str) -> None:
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{name} lm_head weight {tuple(weight.shape)} must be [V, H] with H = {hidden.shape[-1]} "
                         f"(the hidden size of the {name} hidden states).")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{name} lm_head bias {tuple(bias.shape)} must be [V] = [{weight.shape[0]}].")


def fused_distillation_objective(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    *,
    alpha: float,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
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
    """``distillation_objective`` on the logits ``hidden @ weight.T (+ bias)``, without materialising them.

    Args:
        student_hidden: ``[..., H_s]`` final (post-norm) hidden states, aligned with ``labels`` (the caller shifts).
        student_weight: ``[V, H_s]`` student lm_head weight (tied or not: gradients go to this tensor).
        labels: ``[...]`` hard targets; ``ignore_index`` positions count in neither term.
        teacher_hidden: ``[..., H_t]``, same leading shape; constants (no gradient). None when ``alpha == 1``.
        teacher_weight: ``[V_t, H_t]`` teacher lm_head weight; constant.
        alpha: weight of the cross-entropy in [0, 1]; 0 skips the CE term, 1 skips the teacher.
        student_bias, teacher_bias: optional ``[V]`` / ``[V_t]`` lm_head biases.
        loss, temperature, beta, skew: as in ``kd_loss`` (the KD term is T^2 * divergence of the tempered softmaxes).
        reduction: ``"mean"``: divide both terms by ``num_items_in_batch`` (or this batch's valid-token count when
            None); ``"sum"``: summed over valid tokens.
        kd_vocab_size: compare over the first ``kd_vocab_size`` columns (required when ``V != V_t``, e.g. embedding
            padding). The CE term uses all ``V`` student columns.
        chunk_size: rows per chunk (default ``default_chunk_rows(V)``). Results do not depend on it beyond rounding.
        student_softcap, teacher_softcap: Gemma-style final-logit soft cap (``cap * tanh(z / cap)``), or None.
    Returns:
        ``LossComponents`` of float32 scalars (float64 for float64 hidden states). ``total`` carries the gradients;
        ``ce`` and ``kd`` are detached. With no valid token all are exactly 0, with zero gradients.
    """
    check_common_arguments(alpha=alpha, loss=loss, temperature=temperature, beta=beta, skew=skew,
                           reduction=reduction, num_items_in_batch=num_items_in_batch, chunk_size=chunk_size)
    if teacher_softcap is not None and not teacher_softcap > 0:
        raise ValueError(f"teacher_softcap must be > 0 or None, got {teacher_softcap}.")
    if student_softcap is not None and not student_softcap > 0:
        raise ValueError(f"student_softcap must be > 0 or None, got {student_softcap}.")
    use_teacher = alpha < 1
    if use_teacher and (teacher_hidden is None or teacher_weight is None):
        raise ValueError(f"teacher_hidden and teacher_weight are required when alpha < 1 (got alpha={alpha}).")

    flat_labels = labels.reshape(-1)
    student_rows = _flatten(student_hidden, labels, "student")
    _check_head(student_rows, student_weight, student_bias, "student")
    teacher_rows = None
    if use_teacher:
        teacher_rows = _flatten(teacher_hidden, labels, "teacher").detach()
        _check_head(teacher_rows, teacher_weight, teacher_bias, "teacher")
        vocab, teacher_vocab = student_weight.shape[0], teacher_weight.shape[0]
        if kd_vocab_size is None and vocab != teacher_vocab:
            raise ValueError(
                f"Student and teacher lm_heads have different vocabulary sizes ({vocab} vs {teacher_vocab}). Pass "
                "kd_vocab_size=<length of the shared tokenizer> to compare over the shared columns."
            )
        if kd_vocab_size is not None and not 0 < kd_vocab_size <= min(vocab, teacher_vocab):
            raise ValueError(f"kd_vocab_size={kd_vocab_size} must be in [1, {min(vocab, teacher_vocab)}] (the "
                             "smaller of the two vocabularies).")
        teacher_weight = teacher_weight.detach()
        teacher_bias = None if teacher_bias is None else teacher_bias.detach()

    settings = _Settings(
        alpha=float(alpha), loss=loss, temperature=float(temperature), beta=float(beta), skew=float(skew),
        ignore_index=ignore_index, kd_vocab_size=kd_vocab_size if use_teacher else None,
        chunk_rows=chunk_size or default_chunk_rows(student_weight.shape[0]), student_softcap=student_softcap,
    )
    teacher = None
    if use_teacher:
        teacher = LmHeadTeacher(teacher_rows, teacher_weight, teacher_bias, teacher_softcap,
                                kd_vocab_size or student_weight.shape[0], loss)
    return run_fused(student_rows, student_weight, student_bias, flat_labels, settings, teacher,
                     reduction=reduction, num_items_in_batch=num_items_in_batch)


def check_common_arguments(*, alpha, loss, temperature, beta, skew, reduction, num_items_in_batch,
                           chunk_size) -> None:
    """One clear ``ValueError`` for any bad argument the fused objectives share."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha (cross-entropy weight) must be in [0, 1], got {alpha}.")
    _check_hyperparameters(loss, temperature, beta, skew)
    if reduction not in REDUCTIONS:
        raise ValueError(f"Unknown reduction {reduction!r}; valid reductions are: {', '.join(REDUCTIONS)}.")
    if reduction == "sum" and num_items_in_batch is not None:
        raise ValueError("num_items_in_batch normalises a 'mean' reduction; it cannot be combined with 'sum'.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}.")


def run_fused(student_rows: Tensor, student_weight: Tensor, student_bias: Tensor | None, flat_labels: Tensor,
              settings: _Settings, teacher, *, reduction: str, num_items_in_batch) -> LossComponents:
    """Normalise and run :class:`_FusedDistillation` on flattened rows (arguments already checked)."""
    num_valid = None
    if reduction == "sum":
        normaliser = 1.0
    else:
        # An int num_items_in_batch is checked against the valid count (one sync, as in the dense path).
        if num_items_in_batch is None or not isinstance(num_items_in_batch, Tensor):
            num_valid = int((flat_labels != settings.ignore_index).sum())
        normaliser = _normaliser(num_items_in_batch, num_valid or 0, student_rows.device)
    total, ce, kd = _FusedDistillation.apply(student_rows, student_weight, student_bias, flat_labels, normaliser,
                                             settings, teacher)
    return LossComponents(total=total, ce=ce, kd=kd)


def fused_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor,
    **kwargs,
) -> Tensor:
    """``kd_loss`` (the distillation term alone, ``alpha = 0``) from hidden states and lm_head weights.

    Takes the keyword arguments of :func:`fused_distillation_objective` (loss, temperature, beta, skew, ignore_index,
    reduction, kd_vocab_size, chunk_size, biases, soft caps). Returns a scalar with gradients.
    """
    if "alpha" in kwargs:
        raise TypeError("fused_kd_loss is the KD term alone; use fused_distillation_objective to mix in CE.")
    return fused_distillation_objective(student_hidden, student_weight, labels, teacher_hidden, teacher_weight,
                                        alpha=0.0, **kwargs).total
