"""kd_llm.data.packing: the best-fit packer, the packed layout, and that transformers isolates packed examples."""

import random

import pytest
import torch

from kd_llm.data.collator import CausalLMCollator
from kd_llm.data.formatting import IGNORE_INDEX
from kd_llm.data.packing import (
    PACKED_EXAMPLE_KEY,
    PackingCollator,
    best_fit,
    model_inputs,
    pack_shifted,
    packing_attention_problem,
    supervised_order,
    unpack,
)
from tests.conftest import CHAR_VOCAB, tiny_llama


def naive_best_fit(lengths, capacity):
    """Reference: longest first, each into the fullest bin it fits in (scanning every bin)."""
    bins, fill = [], []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if fill[b] + lengths[index] <= capacity]
        if fits:
            best = min(fits, key=lambda b: (capacity - fill[b], b))
            bins[best].append(index)
            fill[best] += lengths[index]
        else:
            bins.append([index])
            fill.append(lengths[index])
    return bins


def examples(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, CHAR_VOCAB, (n,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * (n // 3) + ids[n // 3:]  # a prompt, then the supervised completion
        out.append({"input_ids": ids, "labels": labels, "cache_index": len(out)})
    return out


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_matches_the_naive_reference_and_fills_every_bin_within_capacity(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 30))]
    bins = best_fit(lengths, 40)
    assert bins == naive_best_fit(lengths, 40)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 40 for b in bins)


def test_best_fit_packs_complementary_lengths_into_full_bins():
    assert best_fit([7, 3, 5, 5, 10], 10) == [[4], [0, 1], [2, 3]]


def test_packed_layout_restarts_positions_and_masks_each_examples_first_label():
    features = examples([5, 9, 3, 12, 7, 2])
    batch = PackingCollator(pad_token_id=0, passthrough_keys=("cache_index",))(features)
    ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
    example_ids = batch[PACKED_EXAMPLE_KEY]
    assert "attention_mask" not in batch
    assert ids.shape == (4, 12)  # 12 | 9+3 | 7+5 | 2 (+10 padding)
    assert batch["cache_index"].tolist() == list(range(6))
    for e, feature in enumerate(features):
        where = example_ids == e
        assert ids[where].tolist() == feature["input_ids"]
        assert positions[where].tolist() == list(range(len(feature["input_ids"])))
        assert labels[where].tolist() == [IGNORE_INDEX] + feature["labels"][1:]
    padding = example_ids < 0
    assert (labels[padding] == IGNORE_INDEX).all() and (ids[padding] == 0).all()
    # The supervised tokens the shifted labels count are those of the padded batch.
    padded = CausalLMCollator(0)(features)
    assert (labels[:, 1:] != IGNORE_INDEX).sum() == (padded["labels"][:, 1:] != IGNORE_INDEX).sum()


def test_overlong_examples_are_refused_or_truncated_never_split(caplog):
    features = examples([4, 11, 6])
    with pytest.raises(ValueError, match="11 tokens, more than packing_max_length=8"):
        PackingCollator(0, max_length=8)(features)
    collator = PackingCollator(0, max_length=8, overlong="truncate")
    with caplog.at_level("WARNING", logger="kd_llm.data.packing"):
        batch = collator(features)
        collator(features)
    assert collator.truncated == 2
    assert [r.getMessage() for r in caplog.records] == [
        "packing_overlong=truncate: an example of 11 tokens was cut to packing_max_length=8 (further cuts are "
        "counted, not logged)."]
    assert batch["input_ids"].shape[1] <= 8
    assert batch["input_ids"][batch[PACKED_EXAMPLE_KEY] == 1].tolist() == features[1]["input_ids"][:8]
    with pytest.raises(ValueError, match="overlong must be one of"):
        PackingCollator(0, overlong="split")


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_rows_give_each_example_its_unpacked_logits(implementation):
    model = tiny_llama(CHAR_VOCAB)
    model.config._attn_implementation = implementation
    model.eval()
    features = examples([5, 9, 3, 12, 7, 2])
    packed = PackingCollator(0)(features)
    padded = CausalLMCollator(0)(features)
    with torch.no_grad():
        packed_logits = unpack(model(**model_inputs(packed), use_cache=False).logits, packed[PACKED_EXAMPLE_KEY])
        padded_logits = model(**model_inputs(padded), use_cache=False).logits
        # What transformers does with a 2-D mask next to packed position_ids: examples attend across each other.
        masked = dict(packed, attention_mask=(packed[PACKED_EXAMPLE_KEY] >= 0).long())
        leaking = unpack(model(**model_inputs(masked), use_cache=False).logits, packed[PACKED_EXAMPLE_KEY])
    for e, feature in enumerate(features):
        n = len(feature["input_ids"])
        torch.testing.assert_close(packed_logits[e], padded_logits[e, :n], atol=1e-5, rtol=0)
    assert max((leaking[e] - padded_logits[e, :len(f["input_ids"])]).abs().max() for e, f in enumerate(features)) > 1e-3


def test_pack_shifted_lays_per_example_targets_into_packed_rows():
    features = examples([5, 3, 4])
    packed = PackingCollator(0, max_length=8)(features)
    padded = CausalLMCollator(0)(features)
    per_example = torch.randn(3, padded["input_ids"].shape[1] - 1, 2)  # e.g. a teacher's per-position targets
    laid = pack_shifted(per_example, packed[PACKED_EXAMPLE_KEY], packed["position_ids"], fill=-1.0)
    example_ids, shifted_labels = packed[PACKED_EXAMPLE_KEY], packed["labels"][:, 1:]
    for e, feature in enumerate(features):
        n = len(feature["input_ids"])
        inside = (example_ids[:, :-1] == e) & (example_ids[:, 1:] == e)
        assert inside.sum() == n - 1
        torch.testing.assert_close(laid[inside], per_example[e, :n - 1])
    # Every position packing masks (a boundary or padding) is filled, and carries no label.
    filled = (laid == -1.0).all(-1)
    assert (shifted_labels[filled] == IGNORE_INDEX).all()


def test_supervised_order_lays_stored_per_example_rows_onto_the_packed_supervised_positions():
    """A store of teacher targets holds each example's supervised rows contiguously (precomputed logits, the top-k and
    hidden-state caches); concatenated in supervised_order, they land where pack_shifted lays the padded targets."""
    features = examples([5, 9, 3, 12, 7, 2, 8])
    for feature, row in zip(features, [40, 3, 17, 8, 25, 11, 0]):
        feature["cache_index"] = row  # rows of the training set, not positions in the batch
    packed = PackingCollator(0, max_length=16, passthrough_keys=("cache_index",))(features)
    padded = CausalLMCollator(0, passthrough_keys=("cache_index",))(features)
    per_example = torch.randn(len(features), padded["input_ids"].shape[1] - 1, 3)
    padded_shifted = padded["labels"][:, 1:]
    stored = {f["cache_index"]: per_example[e][padded_shifted[e] != IGNORE_INDEX] for e, f in enumerate(features)}

    assert supervised_order(padded["cache_index"], padded_shifted) == (
        [f["cache_index"] for f in features], [len(stored[f["cache_index"]]) for f in features])
    shifted = packed["labels"][:, 1:]
    order, counts = supervised_order(packed["cache_index"], shifted, packed[PACKED_EXAMPLE_KEY])
    assert sorted(order) == sorted(stored) and order != packed["cache_index"].tolist()  # best-fit reordered them
    assert counts == [len(stored[row]) for row in order]
    supervised = shifted != IGNORE_INDEX
    laid = torch.zeros(*shifted.shape, 3)
    laid[supervised] = torch.cat([stored[row] for row in order])
    expected = pack_shifted(per_example, packed[PACKED_EXAMPLE_KEY], packed["position_ids"])
    torch.testing.assert_close(laid[supervised], expected[supervised], rtol=0, atol=0)


def test_flash_attention_is_named_as_unable_to_isolate_packed_rows():
    model = tiny_llama(CHAR_VOCAB)
    assert packing_attention_problem(model, "student") is None
    model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in packing_attention_problem(model, "student")
