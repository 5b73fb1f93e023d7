"""Inputs and checks for the fused objective, pinned against the dense path on materialised logits."""

from __future__ import annotations

import torch

IGNORE = -100
TOL = dict(rtol=1e-5, atol=1e-5)


def make_inputs(shape=(3, 7), hidden=(8, 12), vocab=(41, 41), *, bias=False, masked_every=3, seed=0,
                dtype=torch.float32):
    """Student/teacher hidden states and lm_heads with logits of a realistic spread, labels with masked positions."""
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=generator, dtype=dtype)  # noqa: E731
    student_hidden = randn(*shape, hidden[0]).requires_grad_()
    student_weight = (randn(vocab[0], hidden[0]) * 0.7).requires_grad_()
    student_bias = randn(vocab[0]).requires_grad_() if bias else None
    teacher_hidden = randn(*shape, hidden[1])
    teacher_weight = randn(vocab[1], hidden[1]) * 0.7
    labels = torch.randint(0, min(vocab), shape, generator=generator)
    flat = labels.view(-1)
    if masked_every:
        flat[::masked_every] = IGNORE
    return student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, labels


def dense_logits(hidden, weight, bias=None, cap=None):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits if cap is None else torch.tanh(logits / cap) * cap


def grads_of(value, tensors):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(value, tensors, allow_unused=False)


def assert_same_components(fused, dense):
    for name in ("total", "ce", "kd"):
        torch.testing.assert_close(getattr(fused, name), getattr(dense, name).detach(), **TOL)
