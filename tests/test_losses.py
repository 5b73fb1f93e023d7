"""Tests for kd_llm.losses against an independent float64 reference written with explicit loops over probabilities."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from kd_llm.losses import DIVERGENCES, LossComponents, distillation_objective, kd_loss, l2_penalty, token_divergence

LOSSES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "mse"]
IGNORE = -100


# ----------------------------------------------------------------------------------------------------------------------
# Naive float64 reference: probability space, Python loops, nothing shared with the module under test.
# ----------------------------------------------------------------------------------------------------------------------


def _naive_softmax(row: torch.Tensor, temperature: float) -> list[torch.Tensor]:
    scaled = [row[v] / temperature for v in range(row.shape[0])]
    shift = max(x for x in scaled if torch.isfinite(x)).detach()
    exps = [torch.exp(x - shift) for x in scaled]  # exp(-inf) is exactly 0
    z = sum(exps)
    return [e / z for e in exps]


def _naive_kl(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for a_v, b_v in zip(a, b):
        if a_v > 0:  # 0 * log(0 / b) = 0
            total = total + a_v * torch.log(a_v / b_v)
    return total


def _naive_divergence(name: str, p: list, q: list, beta: float, skew: float) -> torch.Tensor:
    if name == "forward_kl":
        return _naive_kl(p, q)
    if name == "reverse_kl":
        return _naive_kl(q, p)
    if name == "jsd":
        m = [beta * p_v + (1 - beta) * q_v for p_v, q_v in zip(p, q)]
        return beta * _naive_kl(p, m) + (1 - beta) * _naive_kl(q, m)
    if name == "skew_forward_kl":
        return _naive_kl(p, [skew * p_v + (1 - skew) * q_v for p_v, q_v in zip(p, q)])
    if name == "skew_reverse_kl":
        return _naive_kl(q, [skew * q_v + (1 - skew) * p_v for p_v, q_v in zip(p, q)])
    if name == "tvd":
        return 0.5 * sum(torch.abs(p_v - q_v) for p_v, q_v in zip(p, q))
    if name == "mse":
        return sum((p_v - q_v) ** 2 for p_v, q_v in zip(p, q))
    raise AssertionError(name)


def naive_kd_loss(student, teacher, labels, *, loss, temperature=1.0, beta=0.5, skew=0.1, reduction="mean"):
    """float64 reference of kd_loss: loop over positions, skip ignored ones, T^2 * divergence, then reduce."""
    vocab = student.shape[-1]
    student, teacher, labels = student.reshape(-1, vocab), teacher.reshape(-1, vocab), labels.reshape(-1)
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(labels.shape[0]):
        if labels[i] == IGNORE:
            continue
        p = _naive_softmax(teacher[i], temperature)
        q = _naive_softmax(student[i], temperature)
        total = total + temperature**2 * _naive_divergence(loss, p, q, beta, skew)
        count += 1
    return total if reduction == "sum" else total / max(count, 1)


def naive_cross_entropy_sum(student, labels) -> torch.Tensor:
    vocab = student.shape[-1]
    student, labels = student.reshape(-1, vocab), labels.reshape(-1)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(labels.shape[0]):
        if labels[i] != IGNORE:
            total = total - torch.log(_naive_softmax(student[i], 1.0)[int(labels[i])])
    return total


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def make_inputs(shape, seed=0, scale=2.0, mask_fraction=0.3, dtype=torch.float32):
    """Random student/teacher logits ``[*shape]`` and labels ``[*shape[:-1]]`` with a random ignore mask."""
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    masked = torch.rand(shape[:-1], generator=generator) < mask_fraction
    masked.view(-1)[0] = False  # at least one valid position
    labels[masked] = IGNORE
    return student, teacher, labels


def value_and_grad(fn, student, *args, **kwargs):
    """Evaluate ``fn(student_leaf, *args)`` and return (value, d value / d student)."""
    leaf = student.detach().clone().requires_grad_(True)
    value = fn(leaf, *args, **kwargs)
    value.backward()
    return value.detach(), leaf.grad


# ----------------------------------------------------------------------------------------------------------------------
# kd_loss against the reference
# ----------------------------------------------------------------------------------------------------------------------


def test_registry_lists_every_divergence():
    assert set(DIVERGENCES) == set(LOSSES)


@pytest.mark.parametrize("name", LOSSES)
def test_divergence_functions_map_rows_of_log_probs_to_one_value_each(name):
    student, teacher, _ = make_inputs((4, 9), seed=1)
    value = DIVERGENCES[name](torch.log_softmax(student, -1), torch.log_softmax(teacher, -1))
    assert value.shape == (4,)
    assert value.dtype == torch.float32


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(3, 5, 11), (7, 13)], ids=["3x5x11", "7x13"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("loss", LOSSES)
def test_kd_loss_matches_naive_reference_value_and_gradient(loss, temperature, shape, reduction):
    seed = zlib.crc32(repr((loss, temperature, shape, reduction)).encode())  # stable across runs, unlike hash()
    student, teacher, labels = make_inputs(shape, seed=seed)
    options = dict(loss=loss, temperature=temperature, beta=0.3, skew=0.2, reduction=reduction)

    value, grad = value_and_grad(kd_loss, student, teacher, labels, **options)
    ref_value, ref_grad = value_and_grad(naive_kd_loss, student.double(), teacher.double(), labels, **options)

    assert value.dtype == torch.float32
    assert ref_value > 0
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5)
    # Ignored positions get no gradient at all.
    assert torch.all(grad[labels == IGNORE] == 0)


@pytest.mark.parametrize("loss", LOSSES)
def test_jsd_and_skew_hyperparameters_reach_the_divergence(loss):
    student, teacher, labels = make_inputs((2, 4, 7), seed=3)
    for beta, skew in [(0.1, 0.7), (0.9, 0.4)]:
        value = kd_loss(student, teacher, labels, loss=loss, beta=beta, skew=skew)
        ref = naive_kd_loss(student.double(), teacher.double(), labels, loss=loss, beta=beta, skew=skew)
        torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_token_divergence_is_the_unreduced_per_position_loss(loss):
    student, teacher, labels = make_inputs((6, 10), seed=4, mask_fraction=0.0)
    per_token = token_divergence(student, teacher, loss=loss, temperature=2.0)
    assert per_token.shape == (6,)
    torch.testing.assert_close(per_token.mean(), kd_loss(student, teacher, labels, loss=loss, temperature=2.0))


# ----------------------------------------------------------------------------------------------------------------------
# Identities and limits
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("loss", LOSSES)
def test_identical_logits_give_zero_loss_and_zero_gradient(loss, temperature):
    student, _, labels = make_inputs((3, 4, 9), seed=5, scale=4.0)
    value, grad = value_and_grad(kd_loss, student, student.clone(), labels, loss=loss, temperature=temperature)
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    assert value.item() >= 0.0
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 3.0])
@pytest.mark.parametrize("loss", LOSSES)
def test_value_at_temperature_is_t_squared_times_divergence_of_tempered_distributions(loss, temperature):
    student, teacher, labels = make_inputs((5, 8), seed=6)
    scaled = kd_loss(student, teacher, labels, loss=loss, temperature=temperature)
    unscaled = kd_loss(student / temperature, teacher / temperature, labels, loss=loss, temperature=1.0)
    torch.testing.assert_close(scaled, temperature**2 * unscaled, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(scaled, unscaled)


def test_jsd_is_symmetric_at_beta_one_half():
    student, teacher, labels = make_inputs((4, 6, 12), seed=7)
    forward = kd_loss(student, teacher, labels, loss="jsd", beta=0.5)
    swapped = kd_loss(teacher, student, labels, loss="jsd", beta=0.5)
    torch.testing.assert_close(forward, swapped)
    # ... and not at other betas, so the check above is not vacuous.
    assert not torch.allclose(
        kd_loss(student, teacher, labels, loss="jsd", beta=0.2), kd_loss(teacher, student, labels, loss="jsd", beta=0.2)
    )


@pytest.mark.parametrize("beta", [1e-6, 1 - 1e-6])
def test_jsd_vanishes_at_its_beta_limits(beta):
    student, teacher, labels = make_inputs((4, 6, 12), seed=8)
    assert kd_loss(student, teacher, labels, loss="jsd", beta=0.5).item() > 0.05
    assert kd_loss(student, teacher, labels, loss="jsd", beta=beta).item() < 1e-4


@pytest.mark.parametrize(("skewed", "plain"), [("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")])
def test_skew_kl_tends_to_plain_kl_as_skew_goes_to_zero_and_to_zero_as_skew_goes_to_one(skewed, plain):
    student, teacher, labels = make_inputs((4, 6, 12), seed=9)
    plain_value = kd_loss(student, teacher, labels, loss=plain)
    nearly_plain = kd_loss(student, teacher, labels, loss=skewed, skew=1e-6)
    torch.testing.assert_close(nearly_plain, plain_value, rtol=1e-4, atol=0)
    assert kd_loss(student, teacher, labels, loss=skewed, skew=0.5) < plain_value
    assert kd_loss(student, teacher, labels, loss=skewed, skew=1 - 1e-6).item() < 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# Masking, dtypes and non-finite logits
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES)
def test_all_positions_masked_gives_exact_zero_with_zero_gradients(loss, reduction):
    student, teacher, _ = make_inputs((2, 3, 7), seed=10)
    labels = torch.full((2, 3), IGNORE)
    student[0, 0] = float("nan")  # masked positions are never looked at
    value, grad = value_and_grad(kd_loss, student, teacher, labels, loss=loss, reduction=reduction)
    assert value.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_custom_ignore_index_is_honoured():
    student, teacher, labels = make_inputs((3, 4, 6), seed=11, mask_fraction=0.0)
    labels[0] = -1
    value = kd_loss(student, teacher, labels, ignore_index=-1)
    ref = naive_kd_loss(student.double(), teacher.double(), labels.masked_fill(labels == -1, IGNORE), loss="forward_kl")
    torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("loss", LOSSES)
def test_half_precision_large_logits_at_low_temperature_stay_finite_and_non_negative(loss, dtype):
    student, teacher, labels = make_inputs((2, 5, 32), seed=12, scale=40.0, dtype=dtype)
    value, grad = value_and_grad(kd_loss, student, teacher, labels, loss=loss, temperature=0.5)
    assert value.dtype == torch.float32
    assert torch.isfinite(value) and value.item() >= 0.0
    assert torch.isfinite(grad).all()
    # The computation really happens in float32: same result as upcasting the (rounded) inputs ourselves.
    upcast = kd_loss(student.float(), teacher.float(), labels, loss=loss, temperature=0.5)
    torch.testing.assert_close(value, upcast, rtol=1e-6, atol=0)


@pytest.mark.parametrize("loss", LOSSES)
def test_minus_inf_teacher_logits_give_finite_value_and_gradient(loss):
    student, teacher, labels = make_inputs((3, 4, 10), seed=13)
    teacher[..., -3:] = float("-inf")  # e.g. masked vocabulary padding
    value, grad = value_and_grad(kd_loss, student, teacher, labels, loss=loss, temperature=0.5)
    assert torch.isfinite(value) and value.item() >= 0.0
    assert torch.isfinite(grad).all()
    if loss != "reverse_kl":  # every other divergence is finite in exact arithmetic too
        ref = naive_kd_loss(student.double(), teacher.double(), labels, loss=loss, temperature=0.5)
        torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=1e-6)
    else:  # exact value is +inf: the finite stand-in must still be a strong penalty
        both_masked = student.clone()
        both_masked[..., -3:] = float("-inf")
        assert value > kd_loss(both_masked, teacher, labels, loss=loss, temperature=0.5) + 1.0


@pytest.mark.parametrize("loss", LOSSES)
def test_minus_inf_in_both_models_on_the_same_entries_matches_reference(loss):
    student, teacher, labels = make_inputs((3, 4, 10), seed=14)
    student[..., -2:] = float("-inf")
    teacher[..., -2:] = float("-inf")
    value, grad = value_and_grad(kd_loss, student, teacher, labels, loss=loss, temperature=2.0)
    assert torch.isfinite(grad).all()
    assert torch.all(grad[..., -2:] == 0)
    ref_value, ref_grad = value_and_grad(
        naive_kd_loss, student.double(), teacher.double(), labels, loss=loss, temperature=2.0
    )
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[..., :-2].double(), ref_grad[..., :-2], rtol=1e-4, atol=1e-5)


def test_teacher_logits_are_treated_as_constants():
    student, teacher, labels = make_inputs((2, 3, 5), seed=15)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    kd_loss(student, teacher, labels, loss="jsd").backward()
    assert student.grad is not None
    assert teacher.grad is None


# ----------------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss": "kl"}, "Unknown distillation loss 'kl'.*forward_kl.*reverse_kl.*jsd.*skew_forward_kl.*tvd.*mse"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"beta": 0.0}, "beta .* strictly between 0 and 1"),
        ({"beta": 1.0}, "beta .* strictly between 0 and 1"),
        ({"skew": 0.0}, "skew .* strictly between 0 and 1"),
        ({"skew": 1.5}, "skew .* strictly between 0 and 1"),
        ({"reduction": "none"}, "Unknown reduction 'none'.*mean.*sum"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, match):
    student, teacher, labels = make_inputs((2, 3, 5), seed=16)
    with pytest.raises(ValueError, match=match):
        kd_loss(student, teacher, labels, **kwargs)


def test_vocabulary_mismatch_says_to_reconcile_the_vocabularies():
    student, _, labels = make_inputs((2, 3, 5), seed=17)
    with pytest.raises(ValueError, match=r"vocabulary sizes \(5 vs 7\).*reconciled.*shared tokenizer"):
        kd_loss(student, torch.randn(2, 3, 7), labels)


def test_leading_shape_mismatch_between_student_and_teacher_raises():
    student, _, labels = make_inputs((2, 3, 5), seed=18)
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(student, torch.randn(2, 4, 5), labels)


def test_labels_shape_must_match_logits_leading_dimensions():
    student, teacher, _ = make_inputs((2, 3, 5), seed=19)
    with pytest.raises(ValueError, match=r"labels shape \(2, 4\) must match.*\(2, 3\)"):
        kd_loss(student, teacher, torch.zeros(2, 4, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------------
# distillation_objective and l2_penalty
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_objective_mixes_cross_entropy_and_kd_with_alpha(loss):
    student, teacher, labels = make_inputs((3, 5, 11), seed=20)
    n_valid = int((labels != IGNORE).sum())
    out = distillation_objective(student, teacher, labels, alpha=0.3, loss=loss, temperature=2.0)
    assert isinstance(out, LossComponents)
    ref_ce = naive_cross_entropy_sum(student.double(), labels) / n_valid
    ref_kd = naive_kd_loss(student.double(), teacher.double(), labels, loss=loss, temperature=2.0)
    torch.testing.assert_close(out.ce.double(), ref_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.kd.double(), ref_kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.total, 0.3 * out.ce + 0.7 * out.kd)


def test_objective_with_alpha_one_is_cross_entropy_and_needs_no_teacher():
    student, _, labels = make_inputs((3, 5, 11), seed=21)
    out = distillation_objective(student, None, labels, alpha=1.0)
    assert out.kd.item() == 0.0
    torch.testing.assert_close(out.total, out.ce)
    ref_ce = naive_cross_entropy_sum(student.double(), labels) / int((labels != IGNORE).sum())
    torch.testing.assert_close(out.ce.double(), ref_ce, rtol=1e-5, atol=1e-6)


def test_objective_with_alpha_zero_is_pure_kd():
    student, teacher, labels = make_inputs((3, 5, 11), seed=22)
    out = distillation_objective(student, teacher, labels, alpha=0.0, loss="reverse_kl")
    assert out.ce.item() == 0.0
    torch.testing.assert_close(out.total, kd_loss(student, teacher, labels, loss="reverse_kl"))


@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_micro_batches_normalised_by_global_token_count_reproduce_the_full_batch(as_tensor):
    student, teacher, labels = make_inputs((4, 6, 9), seed=23, mask_fraction=0.0)
    labels[0, 1:] = IGNORE  # very uneven valid-token counts between the two micro-batches
    labels[2, 4:] = IGNORE
    n_total = int((labels != IGNORE).sum())
    options = dict(alpha=0.4, loss="jsd", temperature=2.0)

    full_leaf = student.clone().requires_grad_(True)
    full = distillation_objective(full_leaf, teacher, labels, **options)
    full.total.backward()

    micro_leaf = student.clone().requires_grad_(True)
    num_items = torch.tensor(n_total) if as_tensor else n_total
    accumulated, naive = 0.0, 0.0
    for rows in (slice(0, 2), slice(2, 4)):
        part = distillation_objective(
            micro_leaf[rows], teacher[rows], labels[rows], num_items_in_batch=num_items, **options
        )
        part.total.backward()
        accumulated = accumulated + part.total.detach()
        naive = naive + distillation_objective(micro_leaf[rows], teacher[rows], labels[rows], **options).total / 2

    torch.testing.assert_close(accumulated, full.total.detach())
    torch.testing.assert_close(micro_leaf.grad, full_leaf.grad)
    # Averaging per-micro-batch means would *not* match, so the check above is meaningful.
    assert not torch.allclose(naive.detach(), full.total.detach())


@pytest.mark.parametrize("num_items_in_batch", [None, 0, 5])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_objective_with_every_position_masked_is_zero_with_zero_gradients(alpha, num_items_in_batch):
    student, teacher, _ = make_inputs((2, 3, 7), seed=24)
    labels = torch.full((2, 3), IGNORE)
    leaf = student.clone().requires_grad_(True)
    out = distillation_objective(leaf, teacher, labels, alpha=alpha, num_items_in_batch=num_items_in_batch)
    out.total.backward()
    assert out.total.item() == 0.0 and out.ce.item() == 0.0 and out.kd.item() == 0.0
    assert torch.equal(leaf.grad, torch.zeros_like(leaf.grad))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": -0.1}, r"alpha .* \[0, 1\]"),
        ({"alpha": 1.1}, r"alpha .* \[0, 1\]"),
        ({"alpha": 0.5, "teacher": None}, "teacher_logits are required"),
        ({"alpha": 0.5, "num_items_in_batch": 2}, "num_items_in_batch .* smaller"),
    ],
)
def test_objective_rejects_bad_arguments(kwargs, match):
    student, teacher, labels = make_inputs((2, 3, 5), seed=25, mask_fraction=0.0)
    teacher = kwargs.pop("teacher", teacher)
    with pytest.raises(ValueError, match=match):
        distillation_objective(student, teacher, labels, **kwargs)


def test_l2_penalty_is_the_float32_sum_of_squared_weights():
    weights = [torch.randn(3, 4, dtype=torch.bfloat16, requires_grad=True), torch.randn(5, requires_grad=True)]
    penalty = l2_penalty(weights)
    assert penalty.dtype == torch.float32
    expected = sum(float(w.detach().double().square().sum()) for w in weights)
    assert penalty.item() == pytest.approx(expected, rel=1e-6)
    penalty.backward()
    torch.testing.assert_close(weights[1].grad, 2 * weights[1].detach())
    assert l2_penalty([]).item() == 0.0
    assert math.isfinite(l2_penalty(iter(weights)).item())
