"""Cross-tokenizer distillation losses, per aligned span, as pure functions.

Rows are *span starts* (see :func:`span_start_rows`): for aligned span ``k``, the student's and the teacher's
next-token distributions at the common boundary where the span begins, both conditioned on the same text. All inputs
are logits; every function upcasts to float32 (float64 stays), works in log space and multiplies by T^2 like
:func:`kd_llm.losses.token_divergence`.

* :func:`uld_loss` (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss
  for LLMs"): L1 (the 1-D Wasserstein distance between the two distributions seen as ranked masses) between the
  sorted probability vectors, the shorter padded with zeros. Needs no vocabulary mapping; ignores which token is
  which, so it does **not** reduce to KD for equal tokenizers.
* :func:`hybrid_loss` (the shared-vocabulary hybrid, as in TRL's GOLD trainer): the chosen divergence over the shared
  tokens plus one "tail" outcome holding each side's unmatched mass, plus ULD between the two unmatched parts. With
  the same tokenizer on both sides nothing is unmatched and it **equals** ``kd_loss`` (tested to 1e-6).
* :func:`span_loss` (approximate likelihood matching, Minixhofer, Vulić and Ponti 2025, "Cross-Tokenizer
  Distillation via Approximate Likelihood Matching"): for every aligned span, the probability of the span's text under
  each model by the chain rule over that model's own tokens, teacher-forced, compared as two-outcome distributions
  ("this text" vs anything else). Exact: each product is the model's probability of emitting exactly its own
  tokenization of the span after the same text (the boundaries are common, so the conditioning is the same text).
  Approximate: the probability of the *string* sums over every tokenization of it and over tokens that run past the
  span's end; the canonical tokenization is taken as all of it (it carries most of the mass for trained models,
  Phan et al. 2024 measure the gap). At T != 1 the tokens are tempered one by one, so the product is a tempered path
  probability, not the tempered string probability. It compares one number per span, not distributions, so it
  does not reduce to KD either.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_llm.cross_tokenizer.shared_vocab import SharedVocabulary
from kd_llm.losses.divergences import DIVERGENCES
from kd_llm.losses.kd_loss import _check_hyperparameters, _compute_dtype, _hyperparameters_for

__all__ = ["CROSS_TOKENIZER_LOSSES", "hybrid_loss", "span_log_probs", "span_loss", "span_start_rows", "uld_loss"]

CROSS_TOKENIZER_LOSSES = ("uld", "hybrid", "span")


def span_start_rows(span_ids: Tensor) -> Tensor:
    """``[B, L]`` span ids (-1: none) -> ``[B, L]`` bool, True at the first position of each span. Row-major order
    of the True entries is the (row, span) order on both sides, so gathered rows pair up one to one."""
    previous = F.pad(span_ids[:, :-1], (1, 0), value=-1)
    return (span_ids >= 0) & (span_ids != previous)


def _sorted_l1(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """``[N, A], [N, B] -> [N]``: sum |sort(p) - sort(q)|, descending, the shorter padded with zeros."""
    width = max(student_probs.shape[-1], teacher_probs.shape[-1])
    student_sorted = F.pad(student_probs.sort(dim=-1, descending=True).values, (0, width - student_probs.shape[-1]))
    teacher_sorted = F.pad(teacher_probs.sort(dim=-1, descending=True).values, (0, width - teacher_probs.shape[-1]))
    return (student_sorted - teacher_sorted).abs().sum(dim=-1)


def uld_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """ULD per span start. ``[N, Vs], [N, Vt] -> [N]`` (float32), times T^2; the teacher is detached."""
    _check_hyperparameters("forward_kl", temperature, 0.5, 0.1)
    dtype = _compute_dtype(student_logits, teacher_logits)
    student_probs = F.softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher_probs = F.softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    return _sorted_l1(student_probs, teacher_probs) * temperature**2


def _with_tail(log_probs: Tensor, matched: Tensor, unmatched: Tensor) -> Tensor:
    """``[N, V] -> [N, M + 1]``: the matched columns, then log of the unmatched mass (-inf when nothing is left)."""
    tail = (torch.logsumexp(log_probs[:, unmatched], dim=-1, keepdim=True) if unmatched.numel()
            else log_probs.new_full((log_probs.shape[0], 1), -math.inf))
    return torch.cat((log_probs[:, matched], tail), dim=-1)


def hybrid_loss(student_logits: Tensor, teacher_logits: Tensor, shared: SharedVocabulary, *,
                loss: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1,
                uld_weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Shared-vocabulary hybrid per span start. ``[N, Vs], [N, Vt] -> ([N], [N], [N])``.

    Returns ``(loss, student_matched_mass, teacher_matched_mass)``: the divergence over the shared tokens plus a
    tail outcome, plus ``uld_weight`` times the sorted L1 between the unmatched (unnormalised) probabilities, all
    times T^2; and the share of each side's tempered probability on shared tokens (detached, for logging).
    """
    _check_hyperparameters(loss, temperature, beta, skew)
    dtype = _compute_dtype(student_logits, teacher_logits)
    student_log_probs = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    student_part = _with_tail(student_log_probs, shared.student_ids, shared.student_unmatched)
    teacher_part = _with_tail(teacher_log_probs, shared.teacher_ids, shared.teacher_unmatched)
    divergence = DIVERGENCES[loss](student_part, teacher_part, **_hyperparameters_for(loss, beta=beta, skew=skew))
    total = divergence
    if uld_weight and shared.student_unmatched.numel() and shared.teacher_unmatched.numel():
        total = total + uld_weight * _sorted_l1(student_log_probs[:, shared.student_unmatched].exp(),
                                                teacher_log_probs[:, shared.teacher_unmatched].exp())
    student_mass = 1.0 - student_part[:, -1].detach().exp()
    teacher_mass = 1.0 - teacher_part[:, -1].exp()
    return total * temperature**2, student_mass, teacher_mass


def span_log_probs(logits: Tensor, targets: Tensor, span_ids: Tensor, num_spans: int, *,
                   temperature: float = 1.0) -> Tensor:
    """Chain rule per span: ``[B, L, V]`` logits, ``[B, L]`` targets and span ids (-1: none) -> ``[B, K]``, the sum
    of ``log softmax(logits / T)[target]`` over each span's tokens (``K = num_spans``, rows padded with 0)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    valid = span_ids >= 0
    safe_targets = targets.masked_fill(~valid, 0)
    # logsumexp once per position rather than a full log_softmax: the same value, without a second [B, L, V] tensor.
    scaled = logits.to(dtype) / temperature
    token_log_probs = scaled.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)
    token_log_probs = token_log_probs.masked_fill(~valid, 0.0)
    out = token_log_probs.new_zeros(span_ids.shape[0], num_spans)
    return out.scatter_add(1, span_ids.masked_fill(~valid, 0).clamp_max(max(num_spans - 1, 0)), token_log_probs)


def _log1mexp(log_p: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable on both ends (Maechler 2012)."""
    near_zero = log_p > -math.log(2)
    # Each branch sees only inputs it is used for: torch.where would leak the other branch's inf gradient as NaN.
    high = torch.log(-torch.expm1(log_p.masked_fill(~near_zero, -1.0)))
    low = torch.log1p(-torch.exp(log_p.masked_fill(near_zero, -1.0)))
    return torch.where(near_zero, high, low)


# A span probability of exactly 1 has log(1 - p) = -inf, whose gradient is infinite; the student's is kept below.
_MAX_STUDENT_LOG_PROB = -1e-6


def span_loss(student_span_log_probs: Tensor, teacher_span_log_probs: Tensor, *, loss: str = "forward_kl",
              temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1) -> Tensor:
    """Approximate likelihood matching per span. ``[N], [N] -> [N]``: the divergence between the two-outcome
    distributions (p, 1 - p) of the teacher's and the student's span probabilities, times T^2."""
    _check_hyperparameters(loss, temperature, beta, skew)
    student = student_span_log_probs.clamp_max(_MAX_STUDENT_LOG_PROB)
    teacher = teacher_span_log_probs.detach().clamp_max(0.0)
    student_pair = torch.stack((student, _log1mexp(student)), dim=-1)
    teacher_pair = torch.stack((teacher, _log1mexp(teacher)), dim=-1)
    extra = _hyperparameters_for(loss, beta=beta, skew=skew)
    return DIVERGENCES[loss](student_pair, teacher_pair, **extra) * temperature**2
