"""Compact encoding of a teacher's top-k distribution, one row per supervised position.

A row holds the ``k`` most likely token ids, their log-probabilities over the full vocabulary at temperature
``T_cache``, and the log of the mass outside them (the tail). The encoding, chosen to stay under ~100 bytes per
supervised token at ``k = 64`` (measured in benchmarks/README.md, "Teacher cache"):

- ids are sorted ascending and delta-coded (the first id, then the gaps, all >= 1), in the narrowest unsigned
  integer that holds the vocabulary (uint8 / uint16 / uint32). Small gaps repeat a lot, so the shard compressor
  (zstd, lossless) shrinks them far more than raw ids: top-k *sets* are what distillation needs, the rank order is
  implied by the values.
- values, in the same (id) order, one of :data:`VALUE_CODECS`:
  ``sqrt_uint8`` (default) stores ``round(255 * sqrt(p))``. Quantising sqrt(p) uniformly makes every entry add about
  the same KL(p || p_hat), since KL(p || p + d) ~ sum d^2 / (2 p) = 2 sum (d sqrt p)^2: large probabilities get
  fine steps, and entries under ~4e-6 round to 0 (dequantised to a small floor, see :data:`SQRT_UINT8_ZERO`).
  Best for forward KL; for reverse KL (which weighs errors by the student's mass) prefer ``log_uint8``.
  ``log_uint8`` stores ``-log p`` on a uniform 8-bit grid over ``[0, LOG_UINT8_RANGE]`` (same relative error for
  every probability). ``float16`` stores the log-probability itself (2 bytes; near lossless, for reference).
- the tail's log-mass as float16 (``-inf`` when ``k == V``).

Decoding rescales the dequantised top-k so that they sum to ``1 - tail`` exactly: the rounding errors do not add
up to an improper distribution, and the largest probability (the one quantisation hurts most in absolute terms) is
effectively recovered from the others and the exact tail.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

VALUE_CODECS = ("sqrt_uint8", "log_uint8", "float16")
LOG_UINT8_RANGE = 24.0  # nats: log_uint8 clamps -log p to [0, 24] (p >= 3.8e-11), steps of 0.094 nats
# sqrt_uint8 level 0 means p < (0.5 / 255)^2 = 3.8e-6. It decodes to 1e-8, not 0, so that a reverse KL does not see
# an impossible token (log 0) where the teacher only gave a small probability; and not to mid-bin (1e-6), because a
# confident teacher has dozens of such entries, mostly far smaller, and 1e-6 each added a forward-KL bias of a few
# 1e-4 nats per token (a third of the loss for a student within 0.001 nats of the teacher; 1e-8: under 1%).
SQRT_UINT8_ZERO = 1e-8


def index_dtype(vocab_size: int) -> np.dtype:
    """Narrowest unsigned dtype for ids and gaps of a vocabulary of ``vocab_size`` tokens."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"vocabulary of {vocab_size} tokens is too large for the teacher cache (at most 2^32).")


def value_dtype(codec: str) -> np.dtype:
    check_value_codec(codec)
    return np.dtype(np.float16) if codec == "float16" else np.dtype(np.uint8)


def check_value_codec(codec: str) -> None:
    if codec not in VALUE_CODECS:
        raise ValueError(f"Unknown value codec {codec!r}; valid codecs are: {', '.join(VALUE_CODECS)}.")


@torch.no_grad()
def top_k_rows(logits: Tensor, *, k: int, temperature: float, vocab_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """From teacher logits ``[N, >= vocab_size]``: ``(ids [N, k'] sorted ascending, log_probs [N, k'], log_tail
    [N])`` at ``temperature`` over the first ``vocab_size`` columns, with ``k' = min(k, vocab_size)``.

    Columns past ``vocab_size`` are embedding padding no tokenizer produces; the dense losses ignore them too.
    """
    log_probs = torch.log_softmax(logits[..., :vocab_size].float() / temperature, dim=-1)
    top, ids = log_probs.topk(min(k, vocab_size), dim=-1)
    if ids.shape[-1] == vocab_size:
        log_tail = torch.full_like(top[:, 0], -math.inf)
    else:
        # The sum over the ids outside the top-k, not 1 - sum inside: no cancellation for confident teachers.
        log_tail = torch.logsumexp(log_probs.scatter(-1, ids, -math.inf), dim=-1)
    ids, order = ids.sort(dim=-1)
    return ids, top.gather(-1, order), log_tail


def encode_rows(ids: Tensor, log_probs: Tensor, log_tail: Tensor, *, vocab_size: int,
                codec: str) -> dict[str, np.ndarray]:
    """Arrays to store: ``gaps [N, k]`` (delta-coded ids), ``values [N, k]`` and ``log_tail [N]`` (float16)."""
    check_value_codec(codec)
    ids = ids.cpu().long()
    gaps = torch.diff(ids, dim=-1, prepend=torch.zeros_like(ids[:, :1]))
    log_probs = log_probs.cpu().double()
    if codec == "float16":
        values = log_probs.numpy().astype(np.float16)
    elif codec == "sqrt_uint8":
        values = torch.round(255.0 * torch.exp(0.5 * log_probs)).clamp(0, 255).numpy().astype(np.uint8)
    else:
        scaled = (-log_probs).clamp(0.0, LOG_UINT8_RANGE) * (255.0 / LOG_UINT8_RANGE)
        values = torch.round(scaled).numpy().astype(np.uint8)
    return {"gaps": gaps.numpy().astype(index_dtype(vocab_size)), "values": values,
            "log_tail": log_tail.cpu().numpy().astype(np.float16)}


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends; 0 at x == -inf."""
    x = x.clamp_max(0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def decode_rows(gaps: np.ndarray | Tensor, values: np.ndarray | Tensor, log_tail: np.ndarray | Tensor, *,
                codec: str) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`encode_rows`: ``(ids [N, k] int64, log_probs [N, k] float32, log_tail [N] float32)``.

    The log-probabilities are rescaled so that ``sum(exp(log_probs)) == 1 - exp(log_tail)`` per row.
    """
    check_value_codec(codec)
    gaps = torch.as_tensor(np.asarray(gaps).astype(np.int64))
    ids = gaps.cumsum(dim=-1)
    values = torch.as_tensor(np.asarray(values))
    if codec == "float16":
        log_probs = values.double()
    elif codec == "sqrt_uint8":
        probs = (values.double() / 255.0).square().clamp_min(SQRT_UINT8_ZERO)
        log_probs = probs.log()
    else:
        log_probs = -values.double() * (LOG_UINT8_RANGE / 255.0)
    tail = torch.as_tensor(np.asarray(log_tail).astype(np.float32)).double()
    log_probs = log_probs - torch.logsumexp(log_probs, dim=-1, keepdim=True) + _log1mexp(tail).unsqueeze(-1)
    return ids, log_probs.float(), tail.float()
