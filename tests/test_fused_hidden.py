"""The fused objective on stored (packed) teacher hidden states, pinned against the dense path on materialised logits
and against the fused live-teacher objective on the full [B, T, H] states (values and gradients, 1e-5)."""

from __future__ import annotations

import pytest
import torch

from kd_llm.losses import distillation_objective
from kd_llm.losses.fused import fused_distillation_objective
from kd_llm.losses.fused_hidden import fused_hidden_distillation_objective
from tests.helpers.fused import IGNORE, TOL, assert_same_components, dense_logits, grads_of, make_inputs

LOSSES = ["forward_kl", "reverse_kl", "jsd", "skew_reverse_kl", "tvd"]


def packed(teacher_hidden, labels):
    return teacher_hidden[labels != IGNORE]  # row-major over the valid positions, as a cache stores them


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("cap", [None, 3.0])
def test_packed_states_match_the_dense_objective(loss, temperature, alpha, cap):
    hs, ws, _, ht, wt, labels = make_inputs(shape=(3, 7), hidden=(8, 12), seed=len(loss))
    options = dict(alpha=alpha, loss=loss, temperature=temperature, beta=0.3, skew=0.2)
    dense = distillation_objective(dense_logits(hs, ws), dense_logits(ht, wt, cap=cap), labels, **options)
    fused = fused_hidden_distillation_objective(hs, ws, labels, packed(ht, labels), wt, chunk_size=4,
                                                teacher_softcap=cap, **options)
    assert_same_components(fused, dense)
    for got, want in zip(grads_of(fused.total, (hs, ws)), grads_of(dense.total, (hs, ws))):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_packed_states_match_the_live_fused_objective(chunk_size):
    hs, ws, _, ht, wt, labels = make_inputs(shape=(2, 9), hidden=(6, 10), vocab=(29, 31), masked_every=2, seed=5)
    options = dict(alpha=0.3, loss="forward_kl", temperature=2.0, kd_vocab_size=29, chunk_size=chunk_size)
    live = fused_distillation_objective(hs, ws, labels, ht, wt, **options)
    stored = fused_hidden_distillation_objective(hs, ws, labels, packed(ht, labels), wt, **options)
    assert_same_components(stored, live)
    for got, want in zip(grads_of(stored.total, (hs, ws)), grads_of(live.total, (hs, ws))):
        torch.testing.assert_close(got, want, **TOL)


def test_all_masked_gives_zero_and_identical_models_give_zero_kd():
    hs, ws, _, _, _, labels = make_inputs(shape=(2, 5), hidden=(8, 8), seed=2)
    masked = torch.full_like(labels, IGNORE)
    out = fused_hidden_distillation_objective(hs, ws, masked, hs.detach().reshape(-1, 8)[:0], ws.detach(), alpha=0.5)
    assert out.total.item() == 0.0 and out.kd.item() == 0.0
    same = fused_hidden_distillation_objective(hs, ws, labels, packed(hs.detach(), labels), ws.detach(), alpha=0.0,
                                               loss="jsd", temperature=2.0)
    assert abs(same.kd.item()) < 1e-6


def test_row_count_and_shapes_are_checked():
    hs, ws, _, ht, wt, labels = make_inputs(seed=1)
    with pytest.raises(ValueError, match="supervised positions but teacher_rows holds"):
        fused_hidden_distillation_objective(hs, ws, labels, packed(ht, labels)[1:], wt, alpha=0.5)
    with pytest.raises(ValueError, match="must be \\[n_valid, H_t\\]"):
        fused_hidden_distillation_objective(hs, ws, labels, ht, wt, alpha=0.5)
    with pytest.raises(ValueError, match="required when alpha < 1"):
        fused_hidden_distillation_objective(hs, ws, labels, None, wt, alpha=0.5)
