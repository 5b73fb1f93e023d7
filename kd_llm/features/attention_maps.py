"""Attention maps of causal LMs, computed from captured projections, and the KL losses between two models' maps.

Stock ``sdpa``/flash attention never materialise the attention weights, and forcing ``eager`` attention would slow the
whole forward and keep every layer's ``[B, H, T, T]`` weights. Instead :mod:`kd_llm.features.capture` records the
outputs of ``q_proj``/``k_proj``/``v_proj`` (and the rotary ``position_embeddings`` passed to ``self_attn``) of the
mapped layers only, and this module rebuilds ``softmax(Q K^T * scaling)`` under the causal mask exactly as the model's
eager attention does: per-head or full-width ``q_norm``/``k_norm``, rotary embeddings (also partial rotary), the
layer's own ``scaling`` (Gemma's ``query_pre_attn_scalar``), logit soft-capping and sliding windows.

Memory: maps are built over blocks of query rows (``query_chunk``), and with gradients each block runs under
activation checkpointing, so at most one block's ``[B, H, chunk, T]`` scores exist at a time, in the forward and in
the backward pass.

Two losses, both ``KL(teacher || student)`` per valid query row, summed over rows (the caller divides by the token
count of the accumulated batch):

- ``head_mean``: KL between the head-averaged attention distributions (a mixture over heads), so any head counts and
  GQA layouts compare;
- ``relation`` (MiniLMv2, Wang et al. 2021): the Q-Q, K-K and V-V self-relations ``softmax(X_r X_r^T / sqrt(d_r))``
  of the projections split into ``relation_heads`` equal slices, averaged over the three relations and the relation
  heads. Only the projection widths must be divisible by ``relation_heads``; head counts and head widths may differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd, log, sqrt

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kd_llm.errors import KdLlmError

ATTENTION_LOSSES = ("head_mean", "relation")
_MASKED = torch.finfo(torch.float32).min  # like eager attention: exp() of it is exactly 0, and it stays finite


class UnsupportedAttentionError(KdLlmError, ValueError):
    """An attention layer whose maps kd_llm cannot rebuild; the message names the layer and what is missing."""


@dataclass
class AttentionGeometry:
    """What it takes to rebuild one attention layer's map from its ``q_proj``/``k_proj`` outputs."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    sliding_window: int | None
    softcap: float | None
    uses_rope: bool
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    q_norm_per_head: bool
    k_norm_per_head: bool

    @property
    def widths(self) -> tuple[int, int, int]:
        """Widths of the Q, K and V projections."""
        return (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim)


def attention_geometry(attention: nn.Module, where: str) -> AttentionGeometry:
    """Read (and check) the geometry of ``attention`` (a decoder layer's ``self_attn``); ``where`` names it in errors."""
    name = type(attention).__name__
    projections = [getattr(attention, p, None) for p in ("q_proj", "k_proj", "v_proj")]
    if not all(isinstance(getattr(p, "out_features", None), int) for p in projections):
        raise UnsupportedAttentionError(
            f"{where} ({name}) has no separate q_proj/k_proj/v_proj linear layers (fused QKV, e.g. Phi-3 or GPT-2), "
            "so its attention maps cannot be rebuilt. Use hidden-state distillation (hidden_weight) for this model, "
            "or attention distillation with a Llama/Qwen/Mistral/Gemma-style model."
        )
    head_dim = getattr(attention, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim < 1:
        raise UnsupportedAttentionError(f"{where} ({name}) has no integer head_dim attribute.")
    q_width, k_width, v_width = (p.out_features for p in projections)
    if q_width % head_dim or k_width % head_dim or k_width != v_width:
        raise UnsupportedAttentionError(
            f"{where} ({name}): projection widths q={q_width}, k={k_width}, v={v_width} are not whole heads of "
            f"{head_dim}."
        )
    num_heads, num_kv_heads = q_width // head_dim, k_width // head_dim
    if num_heads % num_kv_heads:
        raise UnsupportedAttentionError(f"{where} ({name}): {num_heads} query heads do not share {num_kv_heads} KV "
                                        "heads evenly.")
    if getattr(attention, "sinks", None) is not None:
        raise UnsupportedAttentionError(f"{where} ({name}) uses attention sinks, which kd_llm does not rebuild.")
    norms = {}
    for kind, width in (("q", q_width), ("k", k_width)):
        norm = getattr(attention, f"{kind}_norm", None)
        per_head = False
        if norm is not None:
            weight = getattr(norm, "weight", None)
            size = weight.shape[-1] if isinstance(weight, Tensor) else None
            if size not in (head_dim, width):
                raise UnsupportedAttentionError(
                    f"{where} ({name}) has a {kind}_norm of width {size}, neither the head width {head_dim} nor the "
                    f"projection width {width}; kd_llm cannot tell how it is applied, so it refuses this layer."
                )
            per_head = size == head_dim and size != width
        norms[kind] = (norm, per_head)
    config = getattr(attention, "config", None)
    window = (attention.sliding_window if hasattr(attention, "sliding_window")
              else getattr(config, "sliding_window", None))
    return AttentionGeometry(
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        scaling=float(getattr(attention, "scaling", head_dim ** -0.5)),
        sliding_window=int(window) if window else None,
        softcap=getattr(attention, "attn_logit_softcapping", None) or None,
        uses_rope=bool(getattr(attention, "use_rope", True)),
        q_norm=norms["q"][0], k_norm=norms["k"][0], q_norm_per_head=norms["q"][1], k_norm_per_head=norms["k"][1],
    )


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of ``x`` ``[B, H, T, D]`` with ``cos``/``sin`` ``[B, T, R]`` (``R <= D``: partial rotary keeps
    the last ``D - R`` dims as they are), the rotate-half convention of Llama, Qwen, Mistral and Gemma."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    head, tail = x[..., :rotary], x[..., rotary:]
    return torch.cat((head * cos + _rotate_half(head) * sin, tail), dim=-1)


def _heads(x: Tensor, heads: int) -> Tensor:
    """``[B, T, H*D]`` -> ``[B, H, T, D]``."""
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def queries_and_keys(query: Tensor, key: Tensor, geometry: AttentionGeometry,
                     position_embeddings: tuple[Tensor, Tensor] | None, where: str) -> tuple[Tensor, Tensor]:
    """The layer's attention queries ``[B, H, T, D]`` and keys ``[B, H_kv, T, D]`` from raw projection outputs, in
    float32, after ``q_norm``/``k_norm`` and the rotary embedding, as the model's attention sees them."""
    states = []
    for x, norm, per_head, heads in ((query, geometry.q_norm, geometry.q_norm_per_head, geometry.num_heads),
                                     (key, geometry.k_norm, geometry.k_norm_per_head, geometry.num_kv_heads)):
        if norm is not None and not per_head:
            x = norm(x)  # OLMo-2 style: one norm over the whole projection, before the split into heads
        x = _heads(x, heads)
        if norm is not None and per_head:
            x = norm(x)  # Qwen3 / Gemma-3 style: per-head norm over head_dim
        states.append(x.float())
    query_states, key_states = states
    if geometry.uses_rope:
        if position_embeddings is None:
            raise UnsupportedAttentionError(
                f"{where}: no position_embeddings reached self_attn, so the rotary embedding cannot be applied. "
                "Models that compute RoPE inside attention are not supported by attention distillation."
            )
        cos, sin = position_embeddings
        query_states = apply_rotary(query_states, cos.float(), sin.float())
        key_states = apply_rotary(key_states, cos.float(), sin.float())
    return query_states, key_states


def allowed_keys(key_valid: Tensor, start: int, stop: int, sliding_window: int | None = None,
                 segments: Tensor | None = None) -> Tensor:
    """``[B, 1, rows, stop]`` boolean mask for query rows ``start:stop``: causal, not padding, inside the window,
    and (packed rows, ``segments`` ``[B, T]`` example ids) inside the query's own example."""
    rows = torch.arange(start, stop, device=key_valid.device)[:, None]
    keys = torch.arange(stop, device=key_valid.device)[None, :]
    allowed = keys <= rows
    if sliding_window is not None:
        allowed = allowed & (rows - keys < sliding_window)
    allowed = allowed[None, None] & key_valid[:, None, None, :stop].bool()
    if segments is not None:
        allowed = allowed & (segments[:, None, start:stop, None] == segments[:, None, None, :stop])
    return allowed


def attention_log_probs(query: Tensor, key: Tensor, geometry: AttentionGeometry, key_valid: Tensor,
                        start: int, stop: int, segments: Tensor | None = None) -> Tensor:
    """Per-head log attention ``[B, H, stop - start, stop]`` of query rows ``start:stop`` over keys ``0:stop``;
    query ``[B, H, T, D]`` and key ``[B, H_kv, T, D]`` as from :func:`queries_and_keys`."""
    batch, heads, _, dim = query.shape
    groups = heads // key.shape[1]
    # Grouped-query attention without copying K: [B, H_kv, G, rows, D] @ [B, H_kv, 1, D, keys].
    q = query[:, :, start:stop].reshape(batch, key.shape[1], groups, stop - start, dim)
    scores = (q @ key[:, :, None, :stop].transpose(-1, -2)) * geometry.scaling
    if geometry.softcap is not None:
        scores = torch.tanh(scores / geometry.softcap) * geometry.softcap
    scores = scores.reshape(batch, heads, stop - start, stop)
    scores = scores.masked_fill(~allowed_keys(key_valid, start, stop, geometry.sliding_window, segments), _MASKED)
    return torch.log_softmax(scores, dim=-1)


def _row_kl(teacher_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    """KL(teacher || student) over the last axis. Masked keys have teacher probability exactly 0 and add nothing."""
    teacher_probs = teacher_log_probs.exp()
    return (teacher_probs * (teacher_log_probs - student_log_probs)).sum(-1)


def _head_mean(log_probs: Tensor) -> Tensor:
    """log of the head-averaged distribution: logsumexp over heads minus log H (stays in log space)."""
    return torch.logsumexp(log_probs, dim=1) - log(log_probs.shape[1])


def _chunked_row_sum(block_fn, tensors: tuple[Tensor, ...], length: int, chunk: int) -> Tensor:
    """Sum of ``block_fn(*tensors, start, stop)`` over row blocks; each block is recomputed in the backward pass
    (activation checkpointing) when it needs gradients, so only one block of scores is alive at a time."""
    total = None
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    for start in range(0, length, chunk):
        stop = min(length, start + chunk)
        if needs_grad:
            part = checkpoint(block_fn, *tensors, start, stop, use_reentrant=False)
        else:
            part = block_fn(*tensors, start, stop)
        total = part if total is None else total + part
    return total


def head_mean_attention_kl(student_qk: tuple[Tensor, Tensor], teacher_qk: tuple[Tensor, Tensor],
                           student_geometry: AttentionGeometry, teacher_geometry: AttentionGeometry,
                           attention_mask: Tensor, query_chunk: int, segments: Tensor | None = None) -> Tensor:
    """Sum over valid query rows of KL(teacher's head-averaged map || student's), float32 scalar.

    ``*_qk`` are ``(queries, keys)`` from :func:`queries_and_keys`; ``attention_mask`` ``[B, T]`` marks valid tokens,
    which select both the keys a row may attend to and the rows that count; ``segments`` (packed rows) keeps each
    row's keys inside its own example."""
    valid = attention_mask.bool()

    def block(s_q, s_k, t_q, t_k, start, stop):
        with torch.no_grad():
            teacher = _head_mean(attention_log_probs(t_q, t_k, teacher_geometry, valid, start, stop, segments))
        student = _head_mean(attention_log_probs(s_q, s_k, student_geometry, valid, start, stop, segments))
        return (_row_kl(teacher, student) * valid[:, start:stop]).sum()

    return _chunked_row_sum(block, (*student_qk, *teacher_qk), attention_mask.shape[1], query_chunk)


def default_relation_heads(student_widths: tuple[int, ...], teacher_widths: tuple[int, ...], cap: int) -> int:
    """The largest count ``<= cap`` dividing every projection width of both layers (at least 1)."""
    common = 0
    for width in (*student_widths, *teacher_widths):
        common = gcd(common, width)
    return max(r for r in range(1, max(1, cap) + 1) if common % r == 0)


def check_relation_heads(relation_heads: int, widths: dict[str, tuple[int, int, int]], where: str) -> None:
    """Every Q/K/V width of both models must split into ``relation_heads`` equal slices."""
    bad = {f"{model} {kind}": width for model, triple in widths.items() for kind, width in zip("QKV", triple)
           if width % relation_heads}
    if bad:
        common = 0
        for triple in widths.values():
            for width in triple:
                common = gcd(common, width)
        divisors = [r for r in range(1, common + 1) if common % r == 0]
        raise UnsupportedAttentionError(
            f"relation_heads={relation_heads} does not divide the projection widths of {where} "
            f"({', '.join(f'{k}={v}' for k, v in bad.items())}). Choose one of {divisors}, or 0 for automatic."
        )


def relation_attention_kl(student_qkv: tuple[Tensor, Tensor, Tensor], teacher_qkv: tuple[Tensor, Tensor, Tensor],
                          attention_mask: Tensor, relation_heads: int, query_chunk: int,
                          segments: Tensor | None = None) -> Tensor:
    """MiniLMv2 self-relation distillation: for X in (Q, K, V) (raw projections ``[B, T, width]``, widths may differ
    between the models), split X into ``relation_heads`` slices, take ``softmax(X_r X_r^T / sqrt(d_r))`` under the
    causal and padding mask, and sum KL(teacher || student) over valid query rows; averaged over the three relations
    and the relation heads. Float32 scalar; exactly 0 when both models give the same projections."""
    valid = attention_mask.bool()
    total = None
    for student_x, teacher_x in zip(student_qkv, teacher_qkv):
        s, t = _heads(student_x.float(), relation_heads), _heads(teacher_x.float(), relation_heads)

        def block(s_x, t_x, start, stop):
            def log_relation(x):
                scores = (x[:, :, start:stop] @ x[:, :, :stop].transpose(-1, -2)) / sqrt(x.shape[-1])
                scores = scores.masked_fill(~allowed_keys(valid, start, stop, segments=segments), _MASKED)
                return torch.log_softmax(scores, dim=-1)

            with torch.no_grad():
                teacher = log_relation(t_x)
            kl = _row_kl(teacher, log_relation(s_x)).mean(1)  # mean over relation heads -> [B, rows]
            return (kl * valid[:, start:stop]).sum()

        part = _chunked_row_sum(block, (s, t), attention_mask.shape[1], query_chunk)
        total = part if total is None else total + part
    return total / 3
