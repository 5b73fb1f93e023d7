"""Per-token divergences between a teacher distribution p and a student distribution q.

Every function takes **log-probabilities** (float32 or wider) of shape ``[N, V]`` -- student first, teacher second --
and returns one value per row, shape ``[N]``. They are pure: no temperature, masking or reduction (see ``kd_loss``).

Everything is computed in log space. Entries with probability exactly 0 (log-probability ``-inf``, e.g. masked
vocabulary padding) are legal inputs: they contribute 0 and produce no NaN in the value or in the gradient. The
``-inf`` entries are replaced by finite values *before* any arithmetic, because ``torch.where`` on an already computed
NaN/inf branch still leaks NaN into the gradient (``0 * inf`` in the backward pass of the multiplication).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

# Stand-in for log(0) where a KL's *reference* distribution has an exact zero but the weighting distribution does not
# (e.g. reverse KL against a teacher that masks part of the vocabulary). The true value is +inf, whose gradient is
# NaN after the softmax backward; we treat the zero as an underflow to the smallest normal float32 (log ~ -87.3)
# instead, which keeps the value finite and still pushes the student's mass off that entry.
LOG_ZERO_FLOOR = math.log(torch.finfo(torch.float32).tiny)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v). ``[N, V], [N, V] -> [N]``, never negative."""
    a_is_zero = torch.isneginf(log_a)
    # Where a_v == 0 the term is 0 whatever b_v is: zero both logs so no -inf reaches the subtraction.
    safe_log_a = log_a.masked_fill(a_is_zero, 0.0)
    safe_log_b = log_b.masked_fill(a_is_zero, 0.0).masked_fill(torch.isneginf(log_b) & ~a_is_zero, LOG_ZERO_FLOOR)
    kl = (log_a.exp() * (safe_log_a - safe_log_b)).sum(dim=-1)
    # Rounding can make a mathematically zero KL slightly negative (e.g. identical inputs through a mixture).
    return kl.clamp_min(0.0)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    """log(weight * a + (1 - weight) * b), computed with logsumexp. ``[N, V], [N, V] -> [N, V]``.

    Entries where both a and b are 0 get a finite placeholder: the mixture is then 0 too, but every caller weights
    those entries by a or b (both 0), and logsumexp over two ``-inf`` has a NaN gradient.
    """
    both_zero = torch.isneginf(log_a) & torch.isneginf(log_b)
    stacked = torch.stack(
        (log_a.masked_fill(both_zero, 0.0) + math.log(weight), log_b.masked_fill(both_zero, 0.0) + math.log1p(-weight))
    )
    return torch.logsumexp(stacked, dim=0)


def forward_kl(student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """KL(p || q): mean-seeking, the classic Hinton distillation target. ``[N, V], [N, V] -> [N]``."""
    return _kl(teacher_log_probs, student_log_probs)


def reverse_kl(student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """KL(q || p): mode-seeking (MiniLLM-style). ``[N, V], [N, V] -> [N]``.

    Where the teacher has probability exactly 0 and the student does not, the true value is +inf; see
    ``LOG_ZERO_FLOOR`` for the finite stand-in used instead.
    """
    return _kl(student_log_probs, teacher_log_probs)


def jsd(student_log_probs: Tensor, teacher_log_probs: Tensor, beta: float = 0.5) -> Tensor:
    """Generalised Jensen-Shannon divergence (GKD). ``[N, V], [N, V] -> [N]``.

    beta * KL(p || m) + (1 - beta) * KL(q || m) with m = beta * p + (1 - beta) * q; beta = 0.5 is the symmetric JSD,
    and the value goes to 0 as beta goes to 0 or 1 (m collapses onto one of the two distributions).
    """
    log_m = _log_mixture(teacher_log_probs, student_log_probs, beta)
    return beta * _kl(teacher_log_probs, log_m) + (1.0 - beta) * _kl(student_log_probs, log_m)


def skew_forward_kl(student_log_probs: Tensor, teacher_log_probs: Tensor, skew: float = 0.1) -> Tensor:
    """Skew KL (DistiLLM): KL(p || s * p + (1 - s) * q); bounded where q vanishes. ``[N, V], [N, V] -> [N]``."""
    return _kl(teacher_log_probs, _log_mixture(teacher_log_probs, student_log_probs, skew))


def skew_reverse_kl(student_log_probs: Tensor, teacher_log_probs: Tensor, skew: float = 0.1) -> Tensor:
    """Skew reverse KL (DistiLLM): KL(q || s * q + (1 - s) * p). ``[N, V], [N, V] -> [N]``."""
    return _kl(student_log_probs, _log_mixture(student_log_probs, teacher_log_probs, skew))


def tvd(student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """Total variation distance 1/2 * sum_v |p_v - q_v|. ``[N, V], [N, V] -> [N]``."""
    return 0.5 * (teacher_log_probs.exp() - student_log_probs.exp()).abs().sum(dim=-1)


def mse(student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """Squared error between probability vectors, sum_v (p_v - q_v)^2. ``[N, V], [N, V] -> [N]``."""
    return (teacher_log_probs.exp() - student_log_probs.exp()).square().sum(dim=-1)


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
    "mse": mse,
}
