"""On-policy (lmbda > 0) and seq_kd with packing=True (kd_llm.training.on_policy, kd_llm.data.packing): the packed
batches generate the padded batches' samples (same prompts, seeds, rows), the generated examples are packed again,
and their loss and gradients are the padded generated batches' (1e-5); a whole run trains the padded run's student."""

from __future__ import annotations

import pytest
import torch

from kd_llm.data.packing import PACKED_EXAMPLE_KEY, PROMPT_START_KEY, PackingCollator, unpack
from kd_llm.training.on_policy import COMPLETION_SOURCE_KEY, STUDENT, TEACHER, packed_prompts
from tests.conftest import tiny_llama
from tests.helpers.training import loss_and_gradients, max_difference, params
from tests.test_on_policy import make_trainer


def examples_of(batch) -> list[tuple[list[int], list[int]]]:
    """Each example's (tokens, labels) without padding, in example order, from a padded or packed batch."""
    if PACKED_EXAMPLE_KEY in batch:
        ids = batch[PACKED_EXAMPLE_KEY]
        return [(t.tolist(), y.tolist()) for t, y in zip(unpack(batch["input_ids"], ids), unpack(batch["labels"], ids))]
    out = []
    for tokens, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        out.append((tokens[:n].tolist(), labels[:n].tolist()))
    return out


def completions_of(batch) -> list[list[int]]:
    return [[t for t, y in zip(tokens, labels) if y != -100] for tokens, labels in examples_of(batch)]


def micro_batches(trainer, dataset, count=2, size=4):
    return [trainer.data_collator([dataset[i] for i in range(k * size, (k + 1) * size)]) for k in range(count)]


def assert_same_loss_and_gradients(padded, packed, padded_batch, packed_batch):
    padded_loss, padded_grads = loss_and_gradients(padded, padded_batch)
    packed_loss, packed_grads = loss_and_gradients(packed, packed_batch)
    assert padded_loss > 0
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    assert set(packed_grads) == set(padded_grads)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=1e-5, rtol=1e-4)


GENERATION = {
    "on-policy (student samples)": (dict(lmbda=1.0), STUDENT),
    "seq_kd greedy (teacher writes)": (dict(seq_kd=True), TEACHER),
    "seq_kd sampled": (dict(seq_kd=True, seq_kd_decoding="sample"), TEACHER),
}


@pytest.mark.parametrize("fused_loss", ["false", "true"])
@pytest.mark.parametrize("kind", GENERATION)
def test_packed_batches_generate_the_padded_samples_and_train_on_them_exactly(tmp_path, char_tokenizer, date_dataset,
                                                                              kind, fused_loss):
    settings, source = GENERATION[kind]
    common = dict(generation_max_new_tokens=12, fused_loss=fused_loss, **settings)
    padded = make_trainer(tmp_path / "padded", char_tokenizer, date_dataset, packing=False, **common)
    # Rows of 160 tokens: generated examples (prompt + at most 12 tokens) are shorter than the dataset's longest.
    packed = make_trainer(tmp_path / "packed", char_tokenizer, date_dataset, packing=True, packing_max_length=160,
                          **common)
    assert packed.fused_loss == padded.fused_loss == (fused_loss == "true")
    padded_in, packed_in = micro_batches(padded, date_dataset), micro_batches(packed, date_dataset)
    assert all(b["input_ids"].shape[0] < 4 for b in packed_in)  # the dataset's examples share rows
    generated = {}
    for name, trainer, batches in (("padded", padded, padded_in), ("packed", packed, packed_in)):
        generated[name] = trainer.completion_generator.replace(batches, step=3, student=trainer.model,
                                                               teacher=trainer.teacher)
    for padded_out, packed_out, original in zip(generated["padded"], generated["packed"], padded_in):
        assert padded_out[COMPLETION_SOURCE_KEY] == packed_out[COMPLETION_SOURCE_KEY] == source
        # The same examples, prompts and samples; only the layout differs.
        assert examples_of(packed_out) == examples_of(padded_out)
        assert completions_of(padded_out) != completions_of(original)  # new completions were written
        assert "attention_mask" not in packed_out and "position_ids" in packed_out
        assert packed_out["input_ids"].shape[0] < padded_out["input_ids"].shape[0]  # packed again
        assert packed_out["input_ids"].numel() < padded_out["input_ids"].numel()
        assert_same_loss_and_gradients(padded, packed, padded_out, packed_out)


def test_packed_on_policy_and_seq_kd_training_trains_the_padded_runs_student(tmp_path, char_tokenizer, date_dataset):
    """The trainer's own path (get_batch_samples, num_items_in_batch, accumulation): lmbda=0.5 with seq_kd, so a
    step mixes student samples and teacher-written batches. Every batch is regenerated, so the dataset's examples
    may be cut to 32 tokens (their prompts are at most 28): generated examples longer than that get rows of their
    own, never cut."""
    settings = dict(lmbda=0.5, seq_kd=True, max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                    generation_max_new_tokens=10)
    padded = make_trainer(tmp_path / "padded", char_tokenizer, date_dataset, packing=False, **settings)
    packed = make_trainer(tmp_path / "packed", char_tokenizer, date_dataset, packing=True, packing_max_length=32,
                          packing_overlong="truncate", **settings)
    seen = []
    original = packed.completion_generator.replace

    def replace(batches, **kwargs):
        out = original(batches, **kwargs)
        seen.extend(out)
        return out

    packed.completion_generator.replace = replace
    padded.train()
    packed.train()
    sources = {b.get(COMPLETION_SOURCE_KEY) for b in seen}
    assert sources == {STUDENT, TEACHER}
    assert all(PACKED_EXAMPLE_KEY in b for b in seen)
    assert max(b["input_ids"].shape[1] for b in seen) > 32  # a generated example longer than packing_max_length
    assert packed.data_collator.truncated > 0
    assert max_difference(params(padded.model), params(tiny_llama(len(char_tokenizer), seed=2))) > 1e-3
    assert max_difference(params(packed.model), params(padded.model)) < 1e-4  # Adam: see test_packed_trainer
    losses = lambda t: [e["total_loss"] for e in t.state.log_history if "total_loss" in e]  # noqa: E731
    assert losses(packed) == pytest.approx(losses(padded), rel=1e-5)
    logged = lambda t, key: [e[key] for e in t.state.log_history if key in e]  # noqa: E731
    assert logged(packed, "generated_tokens") == logged(padded, "generated_tokens")
    assert logged(packed, "on_policy_fraction") == logged(padded, "on_policy_fraction")


def test_packed_prompts_refuse_the_examples_padded_prompts_refuse(char_tokenizer):
    collate = PackingCollator(char_tokenizer.pad_token_id, prompt_starts=True)
    fine = {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}
    batch = collate([fine, {"input_ids": [9, 10, 11], "labels": [-100, 10, 11]}])
    assert batch[PROMPT_START_KEY].tolist() == [2, 1]
    assert packed_prompts(batch) == [[5, 6], [9]]
    # Packing masks each example's first label, so only the collator's prompt starts can tell these apart.
    no_prompt = {"input_ids": [9, 10, 11], "labels": [9, 10, 11]}
    with pytest.raises(ValueError, match="Example 1 of the batch is supervised from its first token"):
        packed_prompts(collate([fine, no_prompt]))
    with pytest.raises(ValueError, match="Example 0 of the batch has no supervised label"):
        packed_prompts(collate([{"input_ids": [9, 10], "labels": [-100, -100]}, fine]))
    with pytest.raises(ValueError, match="prompt_starts=True"):
        packed_prompts(PackingCollator(char_tokenizer.pad_token_id)([fine]))


def test_ema_self_distillation_on_policy_with_packing_trains_the_padded_runs_student(tmp_path, char_tokenizer,
                                                                                     date_dataset):
    """The EMA teacher (a moving copy of the student) scores the student's packed samples as a live teacher does."""
    from tests.test_packed_trainer import mode_trainer

    # lmbda < 1: the EMA starts as the student (no KD signal) and moves away from it on the dataset's batches.
    settings = dict(lmbda=0.5, generation_max_new_tokens=10, max_steps=4, per_device_train_batch_size=4,
                    gradient_accumulation_steps=2)
    padded = mode_trainer("ema", tmp_path / "padded", char_tokenizer, date_dataset, packing=False, **settings)
    packed = mode_trainer("ema", tmp_path / "packed", char_tokenizer, date_dataset, packing=True,
                          packing_max_length=160, **settings)
    padded.train()
    packed.train()
    assert max_difference(params(padded.model), params(tiny_llama(len(char_tokenizer), seed=2))) > 1e-3
    assert max_difference(params(packed.model), params(padded.model)) < 1e-4
    losses = lambda t: [e["total_loss"] for e in t.state.log_history if "total_loss" in e]  # noqa: E731
    assert losses(packed) == pytest.approx(losses(padded), rel=1e-5)
    fractions = [e["on_policy_fraction"] for e in packed.state.log_history if "on_policy_fraction" in e]
    assert len(fractions) == 4 and 0 < sum(fractions) < 4
    assert any(e["kd_loss"] > 0 for e in packed.state.log_history[1:] if "kd_loss" in e)


def test_generated_examples_are_packed_into_no_more_tokens_than_padding():
    """Completions that all ran to max_new_tokens have near-equal lengths: rows of packing_max_length would compute
    their last row's padding (5 + 3 examples of 96 tokens in rows of 512: 2 x 480 tokens against 8 x 96 padded), so
    rows as long as the longest example are taken; varied lengths still share long rows."""
    from kd_llm.training.on_policy import build_completion_batch

    equal = build_completion_batch([[1] * 64] * 8, [[5] * 32] * 8, 0, STUDENT, packing_max_length=512)
    assert equal["input_ids"].shape == (8, 96)  # what padding computes, not 2 x 480
    assert examples_of(equal) == examples_of(build_completion_batch([[1] * 64] * 8, [[5] * 32] * 8, 0, STUDENT))
    lengths = [2, 30, 4, 28, 6, 26, 8, 24]
    varied = build_completion_batch([[1] * 4] * 8, [[5] * n for n in lengths], 0, STUDENT, packing_max_length=512)
    padded = build_completion_batch([[1] * 4] * 8, [[5] * n for n in lengths], 0, STUDENT)
    assert varied["input_ids"].shape == (1, sum(lengths) + 32)  # all in one row of 512
    assert varied["input_ids"].numel() == 160 < padded["input_ids"].numel() == 8 * 34
    assert examples_of(varied) == examples_of(padded)


@pytest.mark.parametrize("stored", ["precompute_teacher_logits", "teacher_cache"])
def test_routed_stored_and_live_targets_with_packing_train_the_padded_runs_student(tmp_path, char_tokenizer,
                                                                                   date_dataset, stored):
    """Routed: stored targets serve the packed dataset batches, the live teacher the packed student samples
    (lmbda = 0.5, seed 2: steps of both kinds); the packed run trains the padded run's student."""
    from kd_llm.models.loading import load_model
    from kd_llm.training.targets import Routed
    from tests.helpers.cache import build as build_cache

    teacher_dir = tmp_path / "teacher"
    tiny_llama(len(char_tokenizer), hidden=48, seed=1).save_pretrained(teacher_dir)
    settings = dict(lmbda=0.5, seed=2, max_steps=4, generation_max_new_tokens=10, optim="sgd", learning_rate=0.5)
    if stored == "teacher_cache":
        build_cache(tmp_path / "cache", load_model(teacher_dir), date_dataset, char_tokenizer, k=16, temperature=2.0)
        settings["teacher_cache"] = str(tmp_path / "cache")
    else:
        settings["precompute_teacher_logits"] = True
    runs = {}
    for packing in (False, True):
        runs[packing] = make_trainer(tmp_path / str(packing), char_tokenizer, date_dataset, packing=packing,
                                     teacher=load_model(teacher_dir), packing_max_length=160 if packing else 0,
                                     **settings)
        assert isinstance(runs[packing].target, Routed)
        runs[packing].train()
    padded, packed = runs[False], runs[True]
    fractions = [e["on_policy_fraction"] for e in packed.state.log_history if "on_policy_fraction" in e]
    assert 0 < sum(fractions) < len(fractions) == 4  # both targets served training batches
    assert max_difference(params(padded.model), params(tiny_llama(len(char_tokenizer), seed=2))) > 1e-3
    assert max_difference(params(packed.model), params(padded.model)) < 1e-5
