"""The fused objective against sparse (cached top-k) targets, pinned against kd_llm.losses.sparse on materialised
logits: values and gradients within 1e-5."""

import pytest
import torch

from kd_llm.losses.fused_sparse import fused_sparse_distillation_objective
from kd_llm.losses.sparse import SPARSE_DIVERGENCES, SparseTargets, sparse_distillation_objective, sparse_kd_loss
from kd_llm.teacher_cache.codec import top_k_rows
from tests.helpers.fused import IGNORE, TOL, assert_same_components, dense_logits, grads_of, make_inputs


def targets_for(teacher_logits, labels, *, k, temperature, vocab=None):
    valid = labels.reshape(-1) != IGNORE
    rows = teacher_logits.reshape(-1, teacher_logits.shape[-1])[valid]
    ids, log_probs, log_tail = top_k_rows(rows, k=k, temperature=temperature, vocab_size=vocab or rows.shape[-1])
    return SparseTargets(ids, log_probs, log_tail, temperature)


CASES = [(mode, loss) for mode, losses in SPARSE_DIVERGENCES.items() for loss in losses]


@pytest.mark.parametrize("tail_mode, loss", CASES)
@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_matches_the_dense_sparse_objective(tail_mode, loss, alpha):
    hs, ws, bs, ht, wt, labels = make_inputs(shape=(3, 7), bias=True, seed=len(loss) + len(tail_mode))
    temperature = 2.0
    targets = targets_for(dense_logits(ht, wt), labels, k=8, temperature=temperature)
    options = dict(alpha=alpha, loss=loss, temperature=temperature, tail_mode=tail_mode, beta=0.3, skew=0.2)
    dense = sparse_distillation_objective(dense_logits(hs, ws, bs), targets, labels, **options)
    fused = fused_sparse_distillation_objective(hs, ws, labels, targets, student_bias=bs, chunk_size=4, **options)
    assert_same_components(fused, dense)
    for got, want in zip(grads_of(fused.total, (hs, ws, bs)), grads_of(dense.total, (hs, ws, bs))):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_padded_student_vocabulary_retempered_renormalised_targets_and_global_normaliser(chunk_size):
    hs, ws, _, ht, wt, labels = make_inputs(vocab=(45, 41), seed=3)
    targets = targets_for(dense_logits(ht, wt), labels, k=6, temperature=1.0)
    options = dict(alpha=0.3, loss="jsd", temperature=1.5, tail_mode="renormalise", kd_vocab_size=41,
                   num_items_in_batch=30)
    dense = sparse_distillation_objective(dense_logits(hs, ws), targets, labels, **options)
    fused = fused_sparse_distillation_objective(hs, ws, labels, targets, chunk_size=chunk_size, **options)
    assert_same_components(fused, dense)
    for got, want in zip(grads_of(fused.total, (hs, ws)), grads_of(dense.total, (hs, ws))):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kd_term_alone_matches_sparse_kd_loss(reduction):
    hs, ws, _, ht, wt, labels = make_inputs(shape=(2, 9), seed=5)
    targets = targets_for(dense_logits(ht, wt), labels, k=41, temperature=1.0)  # k = V: the tail is empty
    dense = sparse_kd_loss(dense_logits(hs, ws), targets, labels, loss="forward_kl", reduction=reduction)
    fused = fused_sparse_distillation_objective(hs, ws, labels, targets, alpha=0.0, reduction=reduction,
                                                chunk_size=4).total
    torch.testing.assert_close(fused, dense.detach(), **TOL)
    for got, want in zip(grads_of(fused, (hs, ws)), grads_of(dense, (hs, ws))):
        torch.testing.assert_close(got, want, **TOL)


def test_all_masked_gives_zero_and_bad_targets_are_refused():
    hs, ws, _, ht, wt, labels = make_inputs()
    targets = targets_for(dense_logits(ht, wt), labels, k=4, temperature=1.0)
    with pytest.raises(ValueError, match="supervised positions but the sparse targets hold"):
        fused_sparse_distillation_objective(hs[:1], ws, labels[:1], targets, alpha=0.5)
    with pytest.raises(ValueError, match="sparse teacher targets are required"):
        fused_sparse_distillation_objective(hs, ws, labels, None, alpha=0.5)
    with pytest.raises(ValueError):  # tail_bucket holds at the cache's temperature only
        fused_sparse_distillation_objective(hs, ws, labels, targets, alpha=0.5, temperature=2.0)
    labels.fill_(IGNORE)
    empty = SparseTargets(targets.token_ids[:0], targets.log_probs[:0], targets.log_tail[:0], 1.0)
    out = fused_sparse_distillation_objective(hs, ws, labels, empty, alpha=0.5)
    assert out.total.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads_of(out.total, (hs, ws)))
