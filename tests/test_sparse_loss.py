"""The loss on sparse (top-k + tail) teacher targets: equal to the dense kd_loss at k = V, equal to naive references
below it, a lower bound of the dense f-divergences, and the temperature rule."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd_llm.losses import DIVERGENCES, distillation_objective, kd_loss
from kd_llm.losses.sparse import (
    TAIL_BUCKET_DIVERGENCES,
    SparseTargets,
    sparse_distillation_objective,
    sparse_kd_loss,
    sparse_token_divergence,
)

V = 11


def logits(rows: int, seed: int, scale: float = 3.0, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(rows, V, generator=generator)).to(dtype)


def top_k_targets(teacher_logits: torch.Tensor, k: int, temperature: float, *, shuffle: bool = True) -> SparseTargets:
    """Targets built directly from the definition, in float64 (independent of the cache codec)."""
    log_probs = F.log_softmax(teacher_logits.double() / temperature, dim=-1)
    top, ids = log_probs.topk(k, dim=-1)
    if shuffle:  # the loss must not depend on the order of the stored ids
        order = torch.stack([torch.randperm(k, generator=torch.Generator().manual_seed(i)) for i in range(len(ids))])
        top, ids = top.gather(-1, order), ids.gather(-1, order)
    probs = log_probs.exp()
    tail = 1.0 - probs.gather(-1, ids).sum(-1)
    log_tail = torch.where(tail > 0, tail.clamp_min(1e-300).log(), torch.full_like(tail, -math.inf))
    if k == V:
        log_tail = torch.full_like(tail, -math.inf)
    return SparseTargets(ids, top, log_tail, temperature)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("tail_mode,loss", [("renormalise", loss) for loss in DIVERGENCES]
                         + [("tail_bucket", loss) for loss in TAIL_BUCKET_DIVERGENCES])
def test_full_vocabulary_equals_dense_kd_loss_and_its_gradient(tail_mode, loss, temperature):
    student = logits(10, seed=1).reshape(2, 5, V).requires_grad_(True)
    teacher = logits(10, seed=2).reshape(2, 5, V)
    labels = torch.tensor([[1, -100, 3, 4, -100], [-100, 6, 7, 8, 9]])
    valid = labels.reshape(-1) != -100
    targets = top_k_targets(teacher.reshape(-1, V)[valid], V, temperature)

    sparse = sparse_kd_loss(student, targets, labels, loss=loss, temperature=temperature, tail_mode=tail_mode)
    (sparse_grad,) = torch.autograd.grad(sparse, student)
    dense = kd_loss(student, teacher, labels, loss=loss, temperature=temperature)
    (dense_grad,) = torch.autograd.grad(dense, student)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-7, atol=1e-10)


def naive_bucket_divergence(p: np.ndarray, q: np.ndarray, loss: str) -> float:
    if loss == "forward_kl":
        return float(sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0))
    if loss == "reverse_kl":
        return float(sum(b * math.log(b / a) for a, b in zip(p, q) if b > 0))
    if loss == "tvd":
        return float(0.5 * np.abs(p - q).sum())
    raise AssertionError(loss)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "tvd"])
@pytest.mark.parametrize("k", [1, 4, 10])
def test_tail_bucket_matches_a_naive_reference(loss, k):
    temperature = 2.0
    student, teacher = logits(6, seed=3), logits(6, seed=4)
    targets = top_k_targets(teacher, k, temperature)
    got = sparse_token_divergence(student, targets, loss=loss, temperature=temperature, tail_mode="tail_bucket")
    for row in range(6):
        p_full = np.exp(teacher[row].numpy() / temperature)
        p_full /= p_full.sum()
        q_full = np.exp(student[row].numpy() / temperature)
        q_full /= q_full.sum()
        ids = targets.token_ids[row].numpy()
        p = np.append(p_full[ids], 1 - p_full[ids].sum())
        q = np.append(q_full[ids], 1 - q_full[ids].sum())
        expected = naive_bucket_divergence(p, q, loss) * temperature**2
        assert got[row].item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("cache_temperature,temperature", [(1.0, 1.0), (1.0, 3.0), (2.0, 0.5)])
def test_renormalise_retempers_exactly(cache_temperature, temperature):
    """Values stored at T_cache give the top-k renormalised distribution at any T: compared with softmax(z / T)
    restricted to the same ids, computed from the logits themselves."""
    student, teacher = logits(5, seed=5), logits(5, seed=6)
    targets = top_k_targets(teacher, 4, cache_temperature)
    got = sparse_token_divergence(student, targets, loss="forward_kl", temperature=temperature,
                                  tail_mode="renormalise")
    for row in range(5):
        ids = targets.token_ids[row]
        p = F.softmax(teacher[row, ids] / temperature, dim=-1)
        q = F.softmax(student[row, ids] / temperature, dim=-1)
        expected = (p * (p.log() - q.log())).sum() * temperature**2
        assert got[row].item() == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("loss", TAIL_BUCKET_DIVERGENCES)
def test_tail_bucket_is_a_lower_bound_that_tightens_with_k(loss):
    """Merging outcomes can only lower an f-divergence (data processing), so the value grows with k up to the dense
    one."""
    student, teacher = logits(8, seed=7), logits(8, seed=8)
    labels = torch.zeros(8, dtype=torch.long)
    dense = kd_loss(student, teacher, labels, loss=loss, temperature=1.5, reduction="sum").item()
    values = [sparse_kd_loss(student, top_k_targets(teacher, k, 1.5), labels, loss=loss, temperature=1.5,
                             reduction="sum").item() for k in range(1, V + 1)]
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(dense, rel=1e-9)
    assert values[0] < dense


def test_student_tail_stays_accurate_when_the_top_k_hold_nearly_everything():
    """1 - sum(top-k) cancels in float32; the tail bucket sums the other ids instead."""
    student = torch.zeros(2, V)
    student[:, :3] = 25.0  # the tail holds about 8 * e^-25 / 3 ~ 3.7e-11 of the mass
    teacher_targets = top_k_targets(logits(2, seed=9), 3, 1.0, shuffle=False)
    teacher_targets.token_ids[:] = torch.arange(3)
    got = sparse_token_divergence(student, SparseTargets(teacher_targets.token_ids, teacher_targets.log_probs.float(),
                                                         teacher_targets.log_tail.float(), 1.0),
                                  loss="reverse_kl", tail_mode="tail_bucket")
    reference = sparse_token_divergence(student.double(), teacher_targets, loss="reverse_kl",
                                        tail_mode="tail_bucket")
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=0)


def test_all_masked_batch_gives_exact_zero_and_zero_gradients():
    student = logits(4, seed=10, dtype=torch.float32).reshape(1, 4, V).requires_grad_(True)
    labels = torch.full((1, 4), -100)
    empty = SparseTargets(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, 5), torch.zeros(0), 1.0)
    for mode in ("renormalise", "tail_bucket"):
        value = sparse_kd_loss(student, empty, labels, tail_mode=mode)
        (grad,) = torch.autograd.grad(value, student)
        assert value.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_sparse_objective_equals_the_dense_objective_at_full_vocabulary():
    """alpha mix, num_items_in_batch normalisation, and a student whose embedding is padded past the cache's
    vocabulary (kd_vocab_size)."""
    student = torch.cat((logits(6, seed=11), torch.full((6, 3), 2.0, dtype=torch.float64)), dim=-1)
    student = student.reshape(2, 3, V + 3).requires_grad_(True)
    teacher = torch.cat((logits(6, seed=12), torch.full((6, 3), -5.0, dtype=torch.float64)), dim=-1).reshape(2, 3, -1)
    labels = torch.tensor([[1, 2, -100], [4, -100, 13]])
    valid = labels.reshape(-1) != -100
    targets = top_k_targets(teacher.reshape(-1, V + 3)[valid][:, :V], V, 2.0)
    sparse = sparse_distillation_objective(student, targets, labels, alpha=0.3, temperature=2.0,
                                           num_items_in_batch=9, kd_vocab_size=V)
    dense = distillation_objective(student, teacher, labels, alpha=0.3, temperature=2.0, num_items_in_batch=9,
                                   kd_vocab_size=V)
    for name in ("total", "ce", "kd"):
        assert getattr(sparse, name).item() == pytest.approx(getattr(dense, name).item(), rel=1e-9)


def test_clear_errors():
    student, teacher = logits(3, seed=13), logits(3, seed=14)
    targets = top_k_targets(teacher, 4, 2.0)
    with pytest.raises(ValueError, match="Rebuild the cache at the training temperature"):
        sparse_token_divergence(student, targets, temperature=1.0, tail_mode="tail_bucket")
    with pytest.raises(ValueError, match="not an f-divergence"):
        sparse_token_divergence(student, targets, loss="mse", temperature=2.0, tail_mode="tail_bucket")
    with pytest.raises(ValueError, match="Unknown tail mode"):
        sparse_token_divergence(student, targets, temperature=2.0, tail_mode="drop")
    with pytest.raises(ValueError, match="larger vocabulary"):
        sparse_token_divergence(student[:, :4], targets, temperature=2.0)
    with pytest.raises(ValueError, match="supervised positions"):
        sparse_kd_loss(student, targets, torch.tensor([0, 1, -100]), temperature=2.0)
