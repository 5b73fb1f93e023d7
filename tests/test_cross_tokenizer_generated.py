"""On-policy (lmbda) and seq_kd across tokenizers (kd_llm.cross_tokenizer.generated): generated completions decoded,
rendered again for both models and aligned; the same tokenizer passed as "different" gives the same-tokenizer step;
the real SmolLM2 / Gemma-3 pair trains a few steps; samples that cannot be aligned are dropped and counted."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from kd_llm import DistillationTrainer
from kd_llm.cross_tokenizer.alignment import align_sides
from kd_llm.cross_tokenizer.data import (RECORD, STUDENT_SPANS, TEACHER_INPUT_IDS, TEACHER_SPANS,
                                         build_cross_tokenizer_dataset, record_column)
from kd_llm.cross_tokenizer.generated import CrossTokenizerRows, sampled_side, without_end
from kd_llm.cross_tokenizer.rendering import record_with_text, render_side
from kd_llm.data.collator import CausalLMCollator
from kd_llm.data.sources import build_dataset, load_records
from kd_llm.models.char_tokenizer import build_char_tokenizer
from kd_llm.training.on_policy import STUDENT, TEACHER, CompletionGenerator
from tests.conftest import tiny_distillation_config as make_config, tiny_llama
from tests.helpers.tokenizers import REAL_TEXTS, needs_gemma, needs_smollm2, packaged_tokenizer
from tests.helpers.training import max_difference, params
from tests.test_cross_tokenizer_trainer import tiny_gemma3


def real_pair():
    return packaged_tokenizer("smollm2-135m-instruct"), packaged_tokenizer("gemma3-270m")


def no_specials(model, tokenizer, eos_bias: float = 0.0):
    """``model`` that never emits a special token but EOS (bias -30 on their logits; EOS gets ``eos_bias``), so its
    generations are plain text that any tokenizer reads, ending at different lengths."""
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        for special in tokenizer.all_special_ids:
            head.bias[special] = -30.0
        head.bias[tokenizer.eos_token_id] = eos_bias
    model.lm_head = head
    return model


def span_texts(tokenizer, ids, spans):
    """Aligned span id -> its tokens decoded on their own (not through offsets)."""
    grouped = {}
    for token, span in zip(ids, spans):
        if span >= 0:
            grouped.setdefault(span, []).append(token)
    return [tokenizer.decode(grouped[k], skip_special_tokens=True) for k in sorted(grouped)]


# ---------------------------------------------------------------- the re-tokenised sample's alignment, real tokenizers


def pieces(tokenizer, text):
    """A non-canonical tokenization of ``text``, as a sampling student may write it: each character on its own."""
    return [token for char in text for token in tokenizer(char, add_special_tokens=False)["input_ids"]]


@needs_gemma
@needs_smollm2
@pytest.mark.parametrize("text", REAL_TEXTS)
@pytest.mark.parametrize("ended", [True, False])
def test_a_students_sample_re_tokenised_for_the_teacher_is_aligned_over_its_whole_completion(text, ended):
    student_tokenizer, teacher_tokenizer = real_pair()
    record = {"prompt": "Copy this sentence:", "completion": "(the dataset's answer)"}
    prompt = render_side(record, student_tokenizer, use_chat_template=True)
    prompt_ids = prompt.input_ids[: next(i for i, label in enumerate(prompt.labels) if label != -100)]
    eos = student_tokenizer.convert_tokens_to_ids("<|im_end|>")
    sample = pieces(student_tokenizer, text) + ([eos] if ended else [])
    assert sample[:-1] != student_tokenizer(text, add_special_tokens=False)["input_ids"]  # not the canonical tokens
    rows = CrossTokenizerRows(student_tokenizer, teacher_tokenizer)
    batch = rows.build({RECORD: [record_column(record, use_chat_template=True)]}, [prompt_ids], [sample], STUDENT,
                       [eos])
    assert rows.run_totals()["xtok_dropped_samples"] == 0
    n = int(batch["attention_mask"][0].sum())
    assert batch["input_ids"][0, :n].tolist() == prompt_ids + sample  # the student trains on its own sample
    assert batch["labels"][0, :n].tolist() == [-100] * len(prompt_ids) + sample
    teacher_n = int(batch["kd_teacher_attention_mask"][0].sum())
    teacher_ids = batch[TEACHER_INPUT_IDS][0, :teacher_n].tolist()
    expected = render_side(record_with_text(record, text), teacher_tokenizer, use_chat_template=True)
    assert teacher_ids == (expected if ended else without_end(expected)).input_ids  # the teacher's own rendering
    student_spans = batch[STUDENT_SPANS][0, :n].tolist()
    teacher_spans = batch[TEACHER_SPANS][0, :teacher_n].tolist()
    # Every sampled token is in an aligned span, and span by span both sides hold the same characters: the text once.
    assert all(span >= 0 for span in student_spans[len(prompt_ids):])
    if text == REAL_TEXTS[0]:  # the emoji's byte pieces reach no boundary: a span of several sampled tokens
        side = sampled_side(prompt_ids, sample, student_tokenizer, [eos])
        assert any(isinstance(cut, tuple) and cut[0] == "inside" for cut in side.cuts)
    student_texts = span_texts(student_tokenizer, batch["input_ids"][0, :n].tolist(), student_spans)
    teacher_texts = span_texts(teacher_tokenizer, teacher_ids, teacher_spans)
    assert len(student_texts) == len(teacher_texts)
    text_spans = slice(None, -1) if ended else slice(None)  # with an EOS, the last span is the end of the text
    assert student_texts[text_spans] == teacher_texts[text_spans] and "".join(student_texts[text_spans]) == text
    if ended:
        assert student_texts[-1] == teacher_texts[-1] == ""
    else:  # it did not end: neither side supervises end markup
        assert teacher_ids[-1] != teacher_tokenizer.eos_token_id


@needs_gemma
@needs_smollm2
@pytest.mark.parametrize("text", REAL_TEXTS[:2])
def test_teacher_written_text_is_rendered_for_the_student_and_for_the_teacher_again(text):
    student_tokenizer, teacher_tokenizer = real_pair()
    record = {"prompt": "Copy this sentence:", "completion": "(the dataset's answer)"}
    written = pieces(teacher_tokenizer, text) + [teacher_tokenizer.eos_token_id]  # not Gemma's canonical tokens
    rows = CrossTokenizerRows(student_tokenizer, teacher_tokenizer)
    batch = rows.build({RECORD: [record_column(record, use_chat_template=True)]}, [[2]], [written], TEACHER,
                       [teacher_tokenizer.eos_token_id])
    new = record_with_text(record, text)
    student = render_side(new, student_tokenizer, use_chat_template=True)
    teacher = render_side(new, teacher_tokenizer, use_chat_template=True)
    n, teacher_n = int(batch["attention_mask"][0].sum()), int(batch["kd_teacher_attention_mask"][0].sum())
    assert batch["input_ids"][0, :n].tolist() == student.input_ids and batch["labels"][0, :n].tolist() == student.labels
    assert batch[TEACHER_INPUT_IDS][0, :teacher_n].tolist() == teacher.input_ids  # what the teacher scores
    alignment = align_sides(student, teacher)
    assert batch[STUDENT_SPANS][0, :n].tolist() == alignment.student_spans
    assert batch[TEACHER_SPANS][0, :teacher_n].tolist() == alignment.teacher_spans


def test_samples_that_cannot_be_aligned_contribute_nothing_and_are_counted(caplog):
    tokenizer, other = build_char_tokenizer(), build_char_tokenizer("0123456789abc\n")  # other lacks most letters
    record = {"prompt": "q", "completion": "12"}
    prompt = tokenizer("q\n")["input_ids"]
    eos = tokenizer.eos_token_id
    rows = CrossTokenizerRows(tokenizer, other)
    samples = [tokenizer("12", add_special_tokens=False)["input_ids"] + [eos],  # fine
               [tokenizer.convert_tokens_to_ids("1"), tokenizer.unk_token_id, eos],  # a special token inside the text
               tokenizer("xyz", add_special_tokens=False)["input_ids"] + [eos]]  # the teacher cannot spell it
    value = record_column(record, use_chat_template=False)
    with caplog.at_level("WARNING"):
        batch = rows.build({RECORD: [value] * 3}, [prompt] * 3, samples, STUDENT, [eos])
    assert rows.run_totals() == {"xtok_dropped_samples": 2,
                                 "xtok_dropped_by_reason": {"special token": 1, "rendering": 1}}
    assert (batch["labels"][0] != -100).sum() == 3 and (batch[STUDENT_SPANS][0] >= 0).sum() == 3
    for row in (1, 2):  # no loss, no supervised token to count in num_items_in_batch
        assert (batch["labels"][row] == -100).all() and (batch[STUDENT_SPANS][row] == -1).all()
        assert (batch[TEACHER_SPANS][row] == -1).all()
    assert "special token" in caplog.text and "does not reproduce" in caplog.text
    assert rows.pop_log_metrics() == {"xtok_dropped_samples": 2} and rows.pop_log_metrics() == {
        "xtok_dropped_samples": 0}


def test_a_sample_that_stops_at_once_is_aligned_at_the_end_of_the_text():
    tokenizer = build_char_tokenizer()
    eos = tokenizer.eos_token_id
    side = sampled_side([1, 5], [eos], tokenizer, [eos])
    assert side.text == "" and side.cuts == [None, None, 1] and side.labels == [-100, -100, eos]


# ---------------------------------------------------------------- the same tokenizer passed as "different"


def trainers(tmp_path, records, *, teacher, student, **settings):
    tokenizer, other = build_char_tokenizer(), build_char_tokenizer()  # equal tokenizers, two objects
    settings = dict(fused_loss="false", generation_max_new_tokens=12, **settings)
    plain = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher,
                                args=make_config(tmp_path / "plain", **settings),
                                train_dataset=build_dataset(records, tokenizer), processing_class=tokenizer)
    cross = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher,
                                args=make_config(tmp_path / "cross", cross_tokenizer_loss="hybrid", **settings),
                                train_dataset=build_cross_tokenizer_dataset(records, tokenizer, other),
                                processing_class=tokenizer, teacher_tokenizer=other)
    return plain, cross


def loss_and_grads(trainer, batch):
    model = trainer.model
    model.train()
    model.zero_grad()
    num_items = (batch["labels"][:, 1:] != -100).sum()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def check_same_step(plain, cross, step, source):
    size = 8
    batches = [trainer.data_collator([trainer.train_dataset[i] for i in range(size)]) for trainer in (plain, cross)]
    [plain_batch], [cross_batch] = (trainer.completion_generator.replace([batch], step=step, student=trainer.model,
                                                                         teacher=trainer.teacher)
                                    for trainer, batch in zip((plain, cross), batches))
    assert plain_batch["kd_completion_source"] == cross_batch["kd_completion_source"] == source
    assert cross.completion_generator.rows.run_totals()["xtok_dropped_samples"] == 0
    # The same generated tokens (same seeds), and the teacher reads the very same ids in its own rendering.
    assert torch.equal(plain_batch["input_ids"], cross_batch["input_ids"])
    assert torch.equal(plain_batch["labels"], cross_batch["labels"])
    assert torch.equal(cross_batch[TEACHER_INPUT_IDS], cross_batch["input_ids"])
    lengths = plain_batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # some rows stopped at their EOS, others ran to generation_max_new_tokens
    plain_loss, plain_grads = loss_and_grads(plain, plain_batch)
    cross_loss, cross_grads = loss_and_grads(cross, cross_batch)
    assert plain_loss > 0 and torch.allclose(cross_loss, plain_loss, atol=1e-6, rtol=1e-6)
    assert all(torch.allclose(c, p, atol=1e-6, rtol=1e-5) for c, p in zip(cross_grads, plain_grads))


@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_on_policy_step_with_the_same_tokenizer_as_different_equals_the_same_tokenizer_step(tmp_path, char_tokenizer,
                                                                                           loss):
    records = load_records("date_arithmetic", size=8, seed=1)
    teacher = tiny_llama(len(char_tokenizer), hidden=48, seed=1)
    student = no_specials(tiny_llama(len(char_tokenizer), seed=2), char_tokenizer, eos_bias=2.0)
    plain, cross = trainers(tmp_path, records, teacher=teacher, student=student, lmbda=1.0, distillation_loss=loss)
    check_same_step(plain, cross, step=3, source=STUDENT)


@pytest.mark.parametrize("decoding", ["greedy", "sample"])
def test_seq_kd_step_with_the_same_tokenizer_as_different_equals_the_same_tokenizer_step(tmp_path, char_tokenizer,
                                                                                        decoding):
    records = load_records("date_arithmetic", size=8, seed=1)
    teacher = no_specials(tiny_llama(len(char_tokenizer), hidden=48, seed=1), char_tokenizer, eos_bias=1.5)
    student = tiny_llama(len(char_tokenizer), seed=2)
    plain, cross = trainers(tmp_path, records, teacher=teacher, student=student, seq_kd=True, seq_kd_decoding=decoding)
    check_same_step(plain, cross, step=2, source=TEACHER)


@pytest.mark.parametrize("buffer", [0, 1])
def test_cross_tokenizer_samples_are_the_same_tokenizer_samples_whatever_the_buffer(char_tokenizer, buffer):
    records = load_records("date_arithmetic", size=12, seed=1)
    other = build_char_tokenizer()
    student = no_specials(tiny_llama(len(char_tokenizer), seed=2), char_tokenizer, eos_bias=2.0)
    plain_set, cross_set = build_dataset(records, char_tokenizer), build_cross_tokenizer_dataset(
        records, char_tokenizer, other)
    settings = dict(lmbda=0.5, seq_kd=False, seq_kd_decoding="greedy", max_new_tokens=10, temperature=1.0, seed=7,
                    pad_token_id=char_tokenizer.pad_token_id, tokenizer=char_tokenizer)
    plain = CompletionGenerator(**settings)  # today's buffer, one call per micro-batch
    cross = CompletionGenerator(**settings, buffer=buffer, rows=CrossTokenizerRows(char_tokenizer, other))
    cross_collate = cross.rows.collate
    for step in range(3):
        plain_batches = [CausalLMCollator(char_tokenizer.pad_token_id)([plain_set[i] for i in range(k, k + 3)])
                         for k in range(0, 12, 3)]
        cross_batches = [cross_collate([cross_set[i] for i in range(k, k + 3)]) for k in range(0, 12, 3)]
        plain_out = plain.replace(plain_batches, step=step, student=student, teacher=None)
        cross_out = cross.replace(cross_batches, step=step, student=student, teacher=None)
        for p, c in zip(plain_out, cross_out):  # the same on-policy choices, the same samples
            assert p.get("kd_completion_source") == c.get("kd_completion_source")
            assert torch.equal(p["input_ids"], c["input_ids"]) and torch.equal(p["labels"], c["labels"])
    assert 0 < plain.stats.on_policy_batches < plain.stats.micro_batches


def test_resumed_cross_tokenizer_on_policy_run_ends_where_the_full_run_does(tmp_path, char_tokenizer):
    records = load_records("date_arithmetic", size=16, seed=1)
    other = build_char_tokenizer()
    dataset = build_cross_tokenizer_dataset(records, char_tokenizer, other)
    settings = dict(lmbda=0.5, max_steps=4, per_device_train_batch_size=4, generation_max_new_tokens=8,
                    cross_tokenizer_loss="hybrid")

    def run(folder, resume=None, **extra):
        teacher = tiny_llama(len(char_tokenizer), hidden=48, seed=1)
        trainer = DistillationTrainer(model=tiny_llama(len(char_tokenizer), seed=2), teacher_model=teacher,
                                      args=make_config(tmp_path / folder, **settings, **extra), train_dataset=dataset,
                                      processing_class=char_tokenizer, teacher_tokenizer=other)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run("full")
    fractions = [e["on_policy_fraction"] for e in full.state.log_history if "on_policy_fraction" in e]
    assert 0 < sum(fractions) < 4
    run("stopped", save_strategy="steps", save_steps=2)
    resumed = run("resumed", resume=str(tmp_path / "stopped" / "run" / "checkpoint-2"))
    assert max_difference(params(full.model), params(resumed.model)) < 1e-6


# ---------------------------------------------------------------- the real pair, tiny random models


@needs_gemma
@needs_smollm2
@pytest.mark.parametrize("settings", [dict(lmbda=0.5), dict(seq_kd=True, seq_kd_decoding="sample")],
                         ids=["lmbda=0.5", "seq_kd"])
def test_real_tokenizers_train_on_generated_completions(tmp_path, settings):
    student_tokenizer, teacher_tokenizer = real_pair()
    records = [{"prompt": "Copy this sentence:", "completion": text} for text in REAL_TEXTS]
    dataset = build_cross_tokenizer_dataset(records, student_tokenizer, teacher_tokenizer, max_length=64)
    teacher = tiny_gemma3(len(teacher_tokenizer))
    before = params(teacher)
    student = tiny_llama(len(student_tokenizer), hidden=16, heads=2, kv_heads=1, seed=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher,
                                  args=make_config(tmp_path, cross_tokenizer_loss="hybrid", max_steps=3,
                                                   per_device_train_batch_size=2, generation_max_new_tokens=6,
                                                   **settings),
                                  train_dataset=dataset, processing_class=student_tokenizer,
                                  teacher_tokenizer=teacher_tokenizer)
    generated = []
    original = trainer.target.terms

    def terms(outputs, batch, request):
        result = original(outputs, batch, request)
        if batch.generated:
            generated.append(result.spans)
        return result

    trainer.target.terms = terms
    trainer.train()
    logged = [e for e in trainer.state.log_history if "kd_loss" in e]
    assert len(logged) == 3 and all(math.isfinite(e["total_loss"]) for e in logged)
    assert generated and sum(generated) > 0  # generated batches were aligned and scored
    windows = [e for e in trainer.state.log_history if "xtok_dropped_samples" in e]
    assert windows and all(e["xtok_dropped_samples"] >= 0 for e in windows)
    totals = trainer.completion_generator.run_totals()
    assert totals["on_policy_batches" if "lmbda" in settings else "seq_kd_batches"] > 0
    assert max_difference(before, params(teacher)) == 0 and not teacher.training


def test_a_training_set_that_cannot_serve_generated_completions_is_refused_before_training(tmp_path, char_tokenizer):
    other = build_char_tokenizer()

    def build(dataset, **settings):
        return DistillationTrainer(model=tiny_llama(len(char_tokenizer)), teacher_model=tiny_llama(len(other)),
                                   args=make_config(tmp_path, cross_tokenizer_loss="hybrid", **settings),
                                   train_dataset=dataset, processing_class=char_tokenizer, teacher_tokenizer=other)

    texts = build_cross_tokenizer_dataset([{"text": "12 ab"}, {"text": "cd"}], char_tokenizer, other)
    with pytest.raises(ValueError, match="record 0 has no prompt in the student's rendering"):
        build(texts, lmbda=0.5)
    with pytest.raises(ValueError, match="record 0 has no prompt in the teacher's rendering .* nothing to write"):
        build(texts, seq_kd=True)
    records = build_cross_tokenizer_dataset(load_records("date_arithmetic", size=4, seed=1), char_tokenizer, other)
    with pytest.raises(ValueError, match="no kd_record column"):
        build(records.remove_columns(RECORD), lmbda=0.5)
    assert build(records.remove_columns(RECORD)).completion_generator is None  # dataset batches need no record
