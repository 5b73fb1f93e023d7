"""The fused, chunked objective pinned against the dense path on materialised logits (values and gradients, 1e-5)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kd_llm.losses import distillation_objective, kd_loss
from kd_llm.losses.fused import default_chunk_rows, fused_distillation_objective, fused_kd_loss
from tests.helpers.fused import IGNORE, TOL, assert_same_components, dense_logits, grads_of, make_inputs

LOSSES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "mse"]

@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_matches_dense_objective_value_and_gradients(loss, temperature, alpha):
    hs, ws, bs, ht, wt, labels = make_inputs(shape=(3, 7), bias=True, seed=len(loss))
    options = dict(alpha=alpha, loss=loss, temperature=temperature, beta=0.3, skew=0.2)
    dense = distillation_objective(dense_logits(hs, ws, bs), dense_logits(ht, wt), labels, **options)
    fused = fused_distillation_objective(hs, ws, labels, ht, wt, student_bias=bs, chunk_size=4, **options)
    assert_same_components(fused, dense)
    for got, want in zip(grads_of(fused.total, (hs, ws, bs)), grads_of(dense.total, (hs, ws, bs))):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 13, 64, None])
@pytest.mark.parametrize("shape", [(1, 1), (2, 9), (5, 3), (17,)])
def test_chunk_size_and_odd_shapes_do_not_change_the_result(chunk_size, shape):
    hs, ws, _, ht, wt, labels = make_inputs(shape=shape, hidden=(5, 9), vocab=(23, 23), masked_every=2, seed=3)
    labels.view(-1)[-1] = 4  # at least one supervised position
    options = dict(alpha=0.5, loss="jsd", temperature=2.0)
    dense = distillation_objective(dense_logits(hs, ws), dense_logits(ht, wt), labels, **options)
    fused = fused_distillation_objective(hs, ws, labels, ht, wt, chunk_size=chunk_size, **options)
    assert_same_components(fused, dense)
    for got, want in zip(grads_of(fused.total, (hs, ws)), grads_of(dense.total, (hs, ws))):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_kd_loss_matches_kd_loss_for_both_reductions(loss, reduction):
    hs, ws, _, ht, wt, labels = make_inputs(shape=(2, 11), hidden=(6, 6), vocab=(31, 31), seed=7)
    dense = kd_loss(dense_logits(hs, ws), dense_logits(ht, wt), labels, loss=loss, temperature=1.5,
                    reduction=reduction)
    fused = fused_kd_loss(hs, ws, ht, wt, labels, loss=loss, temperature=1.5, reduction=reduction, chunk_size=3)
    torch.testing.assert_close(fused, dense.detach(), **TOL)
    for got, want in zip(grads_of(fused, (hs, ws)), grads_of(dense, (hs, ws))):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_micro_batches_normalised_by_global_count_add_up_to_the_full_batch(as_tensor):
    hs, ws, _, ht, wt, labels = make_inputs(shape=(4, 6), seed=11)
    labels[0, :5] = IGNORE  # micro-batches with very different token counts
    options = dict(alpha=0.4, loss="forward_kl", temperature=2.0, chunk_size=3)
    full = fused_distillation_objective(hs, ws, labels, ht, wt, **options)
    full_grads = grads_of(full.total, (hs, ws))
    count = int((labels != IGNORE).sum())
    num_items = torch.tensor(count) if as_tensor else count
    parts = [fused_distillation_objective(hs[i:i + 2], ws, labels[i:i + 2], ht[i:i + 2], wt,
                                          num_items_in_batch=num_items, **options) for i in (0, 2)]
    torch.testing.assert_close(sum(p.total for p in parts), full.total, **TOL)
    torch.testing.assert_close(sum(p.ce for p in parts), full.ce, **TOL)
    for got, want in zip(grads_of(sum(p.total for p in parts), (hs, ws)), full_grads):
        torch.testing.assert_close(got, want, **TOL)
    # ... and each part equals the dense objective with the same normaliser.
    dense = distillation_objective(dense_logits(hs[:2], ws), dense_logits(ht[:2], wt), labels[:2], alpha=0.4,
                                   temperature=2.0, num_items_in_batch=num_items)
    assert_same_components(parts[0], dense)


def test_padded_teacher_vocabulary_is_compared_over_the_shared_columns():
    hs, ws, _, ht, wt, labels = make_inputs(vocab=(37, 45), seed=5)
    options = dict(alpha=0.2, loss="reverse_kl", temperature=1.3, kd_vocab_size=33)
    dense = distillation_objective(dense_logits(hs, ws), dense_logits(ht, wt), labels, **options)
    fused = fused_distillation_objective(hs, ws, labels, ht, wt, chunk_size=6, **options)
    assert_same_components(fused, dense)
    for got, want in zip(grads_of(fused.total, (hs, ws)), grads_of(dense.total, (hs, ws))):
        torch.testing.assert_close(got, want, **TOL)
    with pytest.raises(ValueError, match="kd_vocab_size"):
        fused_distillation_objective(hs, ws, labels, ht, wt, alpha=0.5)
    with pytest.raises(ValueError, match="kd_vocab_size=40"):
        fused_distillation_objective(hs, ws, labels, ht, wt, alpha=0.5, kd_vocab_size=40)


@pytest.mark.parametrize("loss", ["forward_kl", "tvd"])
def test_soft_capped_logits_match_the_dense_path(loss):
    hs, ws, _, ht, wt, labels = make_inputs(seed=9)
    ws, wt = (ws.detach() * 8).requires_grad_(), wt * 8  # logits of +-30 or so, where the cap bends them
    options = dict(alpha=0.5, loss=loss, temperature=2.0)
    dense = distillation_objective(dense_logits(hs, ws, cap=30.0), dense_logits(ht, wt, cap=20.0), labels, **options)
    fused = fused_distillation_objective(hs, ws, labels, ht, wt, student_softcap=30.0, teacher_softcap=20.0,
                                         chunk_size=5, **options)
    assert_same_components(fused, dense)
    for got, want in zip(grads_of(fused.total, (hs, ws)), grads_of(dense.total, (hs, ws))):
        torch.testing.assert_close(got, want, **TOL)
    uncapped = fused_distillation_objective(hs, ws, labels, ht, wt, chunk_size=5, **options)
    assert abs(uncapped.total.item() - fused.total.item()) > 1e-3  # the cap really changed something


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_positions_masked_gives_exact_zero_with_zero_gradients(alpha, reduction):
    hs, ws, bs, ht, wt, labels = make_inputs(bias=True)
    labels.fill_(IGNORE)
    out = fused_distillation_objective(hs, ws, labels, ht, wt, student_bias=bs, alpha=alpha, reduction=reduction)
    assert out.total.item() == 0.0 and out.ce.item() == 0.0 and out.kd.item() == 0.0
    assert out.total.requires_grad
    for grad in grads_of(out.total, (hs, ws, bs)):
        assert torch.count_nonzero(grad) == 0


def test_gradients_scale_with_the_incoming_gradient_and_accumulate_on_tied_weights():
    hs, ws, _, ht, wt, labels = make_inputs(seed=13)
    out = fused_distillation_objective(hs, ws, labels, ht, wt, alpha=0.5, temperature=2.0)
    once = grads_of(out.total, (hs, ws))
    out = fused_distillation_objective(hs, ws, labels, ht, wt, alpha=0.5, temperature=2.0)
    # The weight also used elsewhere (as a tied input embedding would be): autograd adds both contributions.
    embedding_grad = grads_of(ws[labels.clamp_min(0)].square().sum(), (ws,))[0]
    extra = ws[labels.clamp_min(0)].square().sum()
    twice = grads_of(-2.5 * out.total + extra, (hs, ws))
    torch.testing.assert_close(twice[0], -2.5 * once[0], **TOL)
    torch.testing.assert_close(twice[1], -2.5 * once[1] + embedding_grad, **TOL)


def test_float64_gradients_pass_gradcheck():
    hs, ws, bs, ht, wt, labels = make_inputs(shape=(2, 3), hidden=(3, 4), vocab=(6, 6), bias=True,
                                             dtype=torch.float64, seed=17)

    def total(hidden, weight, bias):
        return fused_distillation_objective(hidden, weight, labels, ht, wt, student_bias=bias, alpha=0.3,
                                            loss="jsd", temperature=1.5, chunk_size=2).total

    assert total(hs, ws, bs).dtype == torch.float64
    assert torch.autograd.gradcheck(total, (hs, ws, bs))


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces (forward and backward both run through the mode)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_logits_exist_one_chunk_at_a_time():
    vocab, rows, chunk = 97, 64, 8
    hs, ws, _, ht, wt, labels = make_inputs(shape=(rows,), hidden=(4, 4), vocab=(vocab, vocab), masked_every=0)
    fused_mode, dense_mode = LargestTensor(), LargestTensor()
    with fused_mode:
        fused_distillation_objective(hs, ws, labels, ht, wt, alpha=0.5, chunk_size=chunk).total.backward()
    with dense_mode:
        distillation_objective(hs @ ws.T, ht @ wt.T, labels, alpha=0.5).total.backward()
    assert dense_mode.largest >= rows * vocab  # the check can see full logits when they exist
    assert fused_mode.largest <= chunk * vocab


def test_half_precision_inputs_stay_finite_and_close_to_float32():
    hs, ws, _, ht, wt, labels = make_inputs(seed=19)
    options = dict(alpha=0.5, loss="forward_kl", temperature=0.5)
    reference = fused_distillation_objective(hs, ws, labels, ht, wt, **options)
    half = fused_distillation_objective(hs.detach().bfloat16().requires_grad_(), ws.detach().bfloat16(), labels,
                                        ht.bfloat16(), wt.bfloat16(), **options)
    assert half.total.dtype == torch.float32 and torch.isfinite(half.total)
    torch.testing.assert_close(half.total, reference.total.detach(), rtol=0.05, atol=0.05)


def test_default_chunk_rows():
    assert default_chunk_rows(49_152) == 85
    assert default_chunk_rows(262_144) == 64
    assert default_chunk_rows(100) == 2**22 // 100


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=1.5), "alpha"),
    (dict(alpha=0.5, loss="nope"), "Unknown distillation loss"),
    (dict(alpha=0.5, temperature=0.0), "temperature"),
    (dict(alpha=0.5, reduction="max"), "reduction"),
    (dict(alpha=0.5, reduction="sum", num_items_in_batch=5), "cannot be combined"),
    (dict(alpha=0.5, chunk_size=0), "chunk_size"),
    (dict(alpha=0.5, student_softcap=-1.0), "student_softcap"),
    (dict(alpha=0.5, num_items_in_batch=2), "num_items_in_batch"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    hs, ws, _, ht, wt, labels = make_inputs()
    with pytest.raises(ValueError, match=match):
        fused_distillation_objective(hs, ws, labels, ht, wt, **kwargs)


def test_bad_shapes_raise_clear_errors():
    hs, ws, _, ht, wt, labels = make_inputs()
    with pytest.raises(ValueError, match="teacher_hidden and teacher_weight are required"):
        fused_distillation_objective(hs, ws, labels, alpha=0.5)
    with pytest.raises(ValueError, match="leading dimensions of labels"):
        fused_distillation_objective(hs[:, :-1], ws, labels, ht, wt, alpha=0.5)
    with pytest.raises(ValueError, match=r"must be \[V, H\]"):
        fused_distillation_objective(hs, ws.T, labels, ht, wt, alpha=0.5)
    with pytest.raises(ValueError, match="bias"):
        fused_distillation_objective(hs, ws, labels, ht, wt, alpha=0.5, student_bias=torch.zeros(3))
    assert fused_distillation_objective(hs, ws, labels, alpha=1.0).kd.item() == 0.0  # CE alone needs no teacher


@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])  # the closed-form chunk and the autograd chunk
def test_a_student_identical_to_its_teacher_gets_zero_kd_and_only_the_ce_gradient(loss):
    hs, ws, _, _, _, labels = make_inputs(hidden=(8, 8), seed=23)
    out = fused_distillation_objective(hs, ws, labels, hs.detach(), ws.detach(), alpha=0.3, loss=loss,
                                       temperature=2.0, chunk_size=4)
    assert out.kd.item() == pytest.approx(0.0, abs=1e-6)
    ce_only = fused_distillation_objective(hs, ws, labels, alpha=1.0, chunk_size=4)
    for got, want in zip(grads_of(out.total, (hs, ws)), grads_of(ce_only.total, (hs, ws))):
        torch.testing.assert_close(got, 0.3 * want, **TOL)


def test_closed_form_forward_kl_matches_the_autograd_chunk(monkeypatch):
    import kd_llm.losses.fused as fused

    hs, ws, bs, ht, wt, labels = make_inputs(shape=(4, 5), bias=True, seed=29)
    ws = (ws.detach() * 6).requires_grad_()  # large logits, bent by the soft cap
    options = dict(alpha=0.35, loss="forward_kl", temperature=0.7, student_softcap=5.0, teacher_softcap=4.0,
                   chunk_size=3)
    closed = fused_distillation_objective(hs, ws, labels, ht, wt, student_bias=bs, **options)
    closed_grads = grads_of(closed.total, (hs, ws, bs))
    monkeypatch.setattr(fused, "CLOSED_FORM_LOSSES", ())
    generic = fused_distillation_objective(hs, ws, labels, ht, wt, student_bias=bs, **options)
    assert_same_components(closed, generic)
    for got, want in zip(closed_grads, grads_of(generic.total, (hs, ws, bs))):
        torch.testing.assert_close(got, want, **TOL)
