"""StepShuffledLengthSampler: a permutation, sorted by length within each optimizer step only."""

import random

import pytest

from kd_llm.data.sampling import StepShuffledLengthSampler


def steps(order, size):
    return [order[i:i + size] for i in range(0, len(order), size)]


def test_each_epoch_is_a_permutation_sorted_within_steps_only():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(103)]
    order = list(StepShuffledLengthSampler(lengths, step_size=8, seed=1))
    assert sorted(order) == list(range(103))
    for chunk in steps(order, 8):
        assert [lengths[i] for i in chunk] == sorted(lengths[i] for i in chunk)
    # Not sorted globally: steps are a random mix, so their mean lengths vary and are not increasing.
    means = [sum(lengths[i] for i in c) / len(c) for c in steps(order, 8)]
    assert means != sorted(means)


def test_order_depends_on_seed_and_epoch_only():
    lengths = list(range(50))
    a, b = StepShuffledLengthSampler(lengths, 4, seed=3), StepShuffledLengthSampler(lengths, 4, seed=3)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(StepShuffledLengthSampler(lengths, 4, seed=4)) != list(a)


def test_bad_step_size_is_refused():
    with pytest.raises(ValueError, match="step_size"):
        StepShuffledLengthSampler([1, 2], step_size=0)
