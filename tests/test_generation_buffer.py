"""The on-policy / seq_kd generation buffer (kd_llm.training.on_policy): all micro-batches of an optimizer step in one
`generate` call per model, with the samples of one call per micro-batch (today's), also across a resume."""

from __future__ import annotations

import pytest
import torch

from kd_llm.data.collator import CausalLMCollator
from kd_llm.training.on_policy import (
    STUDENT,
    CompletionGenerator,
    generate_completions,
    generation_seed,
    prompts_from_labels,
)
from tests.conftest import tiny_llama
from tests.helpers.training import max_difference, params
from tests.test_on_policy import eos_biased, make_trainer, spy_on_generation

SEED, STEP, MAX_NEW = 7, 5, 16


def micro_batches(tokenizer, dataset, count=4, size=3):
    collate = CausalLMCollator(tokenizer.pad_token_id)
    return [collate([dataset[i] for i in range(k * size, (k + 1) * size)]) for k in range(count)]


def generator(tokenizer, buffer, **overrides):
    values = dict(lmbda=1.0, seq_kd=False, seq_kd_decoding="greedy", max_new_tokens=MAX_NEW, temperature=1.0,
                  seed=SEED, pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer, buffer=buffer)
    values.update(overrides)
    return CompletionGenerator(**values)


def completions(batches) -> list[list[list[int]]]:
    """Each micro-batch's supervised completion tokens, row by row."""
    out = []
    for batch in batches:
        rows = []
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            rows.append(ids[labels != -100].tolist())
        out.append(rows)
    return out


@pytest.fixture
def student(char_tokenizer):
    # Biased towards EOS: completions end at different lengths, some rows long after others have stopped.
    return eos_biased(tiny_llama(len(char_tokenizer), seed=2), char_tokenizer.eos_token_id, bias=2.0)


@pytest.mark.parametrize("buffer, calls", [(0, 1), (2, 2), (1, 4)])
def test_buffer_writes_the_samples_of_one_call_per_micro_batch_in_fewer_calls(char_tokenizer, date_dataset, student,
                                                                              buffer, calls):
    batches = micro_batches(char_tokenizer, date_dataset)
    buffered = generator(char_tokenizer, buffer)
    out = buffered.replace(batches, step=STEP, student=student, teacher=None)
    assert buffered.stats.generate_calls == calls
    eos = char_tokenizer.eos_token_id
    lengths = set()
    for index, (batch, got) in enumerate(zip(batches, completions(out))):
        # Today's path: one generate call for this micro-batch, under torch.manual_seed(its seed).
        reference = generate_completions(
            student, prompts_from_labels(batch["input_ids"], batch["labels"]), pad_token_id=char_tokenizer.pad_token_id,
            eos_ids=[eos], max_new_tokens=MAX_NEW, do_sample=True, temperature=1.0,
            seed=generation_seed(SEED, STEP, index, 0, STUDENT))
        assert got == reference
        lengths.update(len(row) for row in got)
        assert all(row[-1] == eos or len(row) == MAX_NEW for row in got)  # each row stops at its EOS
    assert len(lengths) > 2  # rows of very different lengths share the buffered call


def test_buffered_samples_differ_between_micro_batches_and_steps(char_tokenizer, date_dataset, student):
    """The seeds are per micro-batch and step: the same prompts give other samples elsewhere (the test above can
    tell a buffer that shared one RNG stream from one that did not)."""
    batch = micro_batches(char_tokenizer, date_dataset, count=1)[0]
    twice = generator(char_tokenizer, 0).replace([batch, batch], step=STEP, student=student, teacher=None)
    later = generator(char_tokenizer, 0).replace([batch, batch], step=STEP + 1, student=student, teacher=None)
    first, second = completions(twice)
    assert first != second and completions(later)[0] != first


def test_seq_kd_teacher_targets_are_buffered_too(char_tokenizer, date_dataset, student):
    teacher = eos_biased(tiny_llama(len(char_tokenizer), hidden=48, seed=1), char_tokenizer.eos_token_id, bias=2.0)
    batches = micro_batches(char_tokenizer, date_dataset)
    for decoding in ("sample", "greedy"):
        one = generator(char_tokenizer, 1, lmbda=0.0, seq_kd=True, seq_kd_decoding=decoding)
        all_at_once = generator(char_tokenizer, 0, lmbda=0.0, seq_kd=True, seq_kd_decoding=decoding)
        expected = completions(one.replace(batches, step=STEP, student=student, teacher=teacher))
        assert completions(all_at_once.replace(batches, step=STEP, student=student, teacher=teacher)) == expected
        assert (one.stats.generate_calls, all_at_once.stats.generate_calls) == (4, 1)
    with pytest.raises(ValueError, match="buffer must be >= 0"):
        generator(char_tokenizer, -1)


def test_trainer_with_the_buffer_trains_todays_student_and_logs_the_generation_share(tmp_path, char_tokenizer,
                                                                                   date_dataset):
    settings = dict(lmbda=0.5, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                    generation_max_new_tokens=12)
    per_micro_batch = make_trainer(tmp_path / "one", char_tokenizer, date_dataset, generation_buffer=1, **settings)
    buffered = make_trainer(tmp_path / "all", char_tokenizer, date_dataset, generation_buffer=0, **settings)
    seen = spy_on_generation(buffered)
    per_micro_batch.train()
    buffered.train()
    assert any(b.get("kd_completion_source") == STUDENT for _, _, after in seen for b in after)
    assert max_difference(params(per_micro_batch.model), params(buffered.model)) == 0.0
    logs = [e for e in buffered.state.log_history if "generation_share" in e]
    assert len(logs) == 3 and all(0 < e["generation_share"] < 1 for e in logs if e["on_policy_fraction"] > 0)
    assert all(e["generate_calls"] <= 1 for e in logs)
    assert max(e["generate_calls"] for e in per_micro_batch.state.log_history if "generate_calls" in e) > 1
