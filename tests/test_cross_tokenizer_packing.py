"""Packed cross-tokenizer batches (packing: true with cross_tokenizer_loss, dataset batches): the same loss and
gradients as the same examples padded, for every cross-tokenizer loss, with char and real tokenizers; the trainer."""

import pytest
import torch

from kd_llm import DistillationTrainer
from kd_llm.cross_tokenizer.data import (STUDENT_SPANS, TEACHER_INPUT_IDS, TEACHER_LABELS, TEACHER_SPANS,
                                         CrossTokenizerCollator, CrossTokenizerPackingCollator,
                                         build_cross_tokenizer_dataset)
from kd_llm.cross_tokenizer.teacher import cross_tokenizer_settings, live_teacher_terms, pop_cross_tokenizer_inputs
from kd_llm.data.packing import PACKED_EXAMPLE_KEY
from kd_llm.data.sources import load_records
from kd_llm.models.char_tokenizer import build_char_tokenizer
from tests.conftest import tiny_distillation_config as make_config, tiny_llama
from tests.helpers.tokenizers import REAL_TEXTS, needs_gemma, needs_smollm2, packaged_tokenizer
from tests.helpers.training import max_difference, params
from tests.test_cross_tokenizer_trainer import tiny_gemma3

METHODS = ("hybrid", "uld", "span")


def pad_id(tokenizer):
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def loss_and_grads(student, teacher, batch, settings):
    """The cross-tokenizer objective of one collated batch (alpha 0.5, T=2) and the student's gradients."""
    batch = dict(batch)
    batch.pop(PACKED_EXAMPLE_KEY, None)
    labels = batch.pop("labels")
    teacher_inputs = pop_cross_tokenizer_inputs(batch)
    batch.pop(TEACHER_LABELS)
    student.zero_grad()
    logits = student(**batch, use_cache=False).logits[:, :-1]
    terms = live_teacher_terms(teacher, logits, labels[:, 1:], teacher_inputs, settings, alpha=0.5, temperature=2.0,
                               loss="forward_kl", beta=0.5, skew=0.1,
                               num_items_in_batch=int((labels[:, 1:] != -100).sum()))
    terms.total.backward()
    return terms, {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}


def check_packed_equals_padded(rows, student, teacher, student_tokenizer, teacher_tokenizer, method, max_length):
    settings = cross_tokenizer_settings(method, student_tokenizer, teacher_tokenizer, student, teacher)
    teacher.eval()
    padded = CrossTokenizerCollator(pad_id(student_tokenizer), pad_id(teacher_tokenizer))(rows)
    packed = CrossTokenizerPackingCollator(pad_id(student_tokenizer), pad_id(teacher_tokenizer),
                                           max_length=max_length)(rows)
    assert packed["input_ids"].shape[0] < len(rows)  # several examples share rows: the test packs something
    assert "attention_mask" not in packed and "kd_teacher_attention_mask" not in packed
    padded_terms, padded_grads = loss_and_grads(student, teacher, padded, settings)
    packed_terms, packed_grads = loss_and_grads(student, teacher, packed, settings)
    assert padded_terms.spans > 0 and packed_terms.spans == padded_terms.spans
    assert padded_terms.kd.item() > 0
    assert packed_terms.total.item() == pytest.approx(padded_terms.total.item(), abs=1e-5)
    assert packed_terms.kd.item() == pytest.approx(padded_terms.kd.item(), abs=1e-5)
    assert packed_grads.keys() == padded_grads.keys()
    assert max(float((packed_grads[k] - padded_grads[k]).abs().max()) for k in padded_grads) < 1e-5


def char_rows(size=8):
    tokenizer = build_char_tokenizer()
    dataset = build_cross_tokenizer_dataset(load_records("date_arithmetic", size=size, seed=3), tokenizer, tokenizer)
    return [dataset[i] for i in range(len(dataset))], tokenizer


@pytest.mark.parametrize("method", METHODS)
def test_packed_batch_gives_the_padded_loss_and_gradients_with_char_tokenizers(method):
    rows, tokenizer = char_rows()
    longest = max(len(r["input_ids"]) for r in rows)
    check_packed_equals_padded(rows, tiny_llama(len(tokenizer), seed=2), tiny_llama(len(tokenizer), hidden=48, seed=1),
                               tokenizer, tokenizer, method, max_length=2 * longest + 3)


@needs_gemma
@needs_smollm2
@pytest.mark.parametrize("method", METHODS)
def test_packed_batch_gives_the_padded_loss_and_gradients_with_real_tokenizers(method):
    student_tokenizer = packaged_tokenizer("smollm2-135m-instruct")
    teacher_tokenizer = packaged_tokenizer("gemma3-270m")
    records = [{"prompt": "Copy this sentence:", "completion": text} for text in REAL_TEXTS]
    dataset = build_cross_tokenizer_dataset(records, student_tokenizer, teacher_tokenizer, max_length=64)
    rows = [dataset[i] for i in range(len(dataset))]
    longest = max(len(r["input_ids"]) for r in rows)
    check_packed_equals_padded(rows, tiny_llama(len(student_tokenizer), hidden=16, heads=2, kv_heads=1, seed=2),
                               tiny_gemma3(len(teacher_tokenizer)), student_tokenizer, teacher_tokenizer, method,
                               max_length=2 * longest)


def test_packed_rows_renumber_spans_and_mask_each_examples_first_token():
    rows, tokenizer = char_rows(4)
    packed = CrossTokenizerPackingCollator(pad_id(tokenizer), pad_id(tokenizer), max_length=10_000)(rows)
    assert packed["input_ids"].shape[0] == 1  # all four in one row, on both sides
    spans, teacher_spans = packed[STUDENT_SPANS][0], packed[TEACHER_SPANS][0]
    ids = packed[PACKED_EXAMPLE_KEY][0]
    order = torch.unique_consecutive(ids[ids >= 0]).tolist()
    starts = [int((ids == e).nonzero()[0]) for e in order]
    expected = []
    offset = 0
    for e in order:
        own = [-1] + [s + offset if s >= 0 else -1 for s in rows[e][STUDENT_SPANS][1:]]
        expected += own
        offset += max(rows[e][STUDENT_SPANS]) + 1
    assert spans[:len(expected)].tolist() == expected
    assert teacher_spans[:len(expected)].tolist() == expected  # one tokenizer: the same on both sides
    assert all(packed["kd_teacher_position_ids"][0, s] == 0 for s in starts)
    assert all(packed[TEACHER_LABELS][0, s] == -100 and packed["labels"][0, s] == -100 for s in starts)
    assert packed[TEACHER_INPUT_IDS][0, :len(expected)].tolist() == packed["input_ids"][0, :len(expected)].tolist()


def test_a_packed_cross_tokenizer_run_trains_like_the_padded_one(tmp_path):
    tokenizer, other = build_char_tokenizer(), build_char_tokenizer()
    records = load_records("date_arithmetic", size=16, seed=1)
    dataset = build_cross_tokenizer_dataset(records, tokenizer, other)
    teacher = tiny_llama(len(other), hidden=48, seed=1)
    students = {}
    for packing in (False, True):
        students[packing] = tiny_llama(len(tokenizer), seed=2)
        before = params(students[packing])
        trainer = DistillationTrainer(model=students[packing], teacher_model=teacher,
                                      args=make_config(tmp_path / str(packing), cross_tokenizer_loss="hybrid",
                                                       packing=packing, max_steps=2),
                                      train_dataset=dataset, processing_class=tokenizer, teacher_tokenizer=other)
        if packing:
            assert isinstance(trainer.data_collator, CrossTokenizerPackingCollator)
        trainer.train()
        assert max_difference(before, params(students[packing])) > 0
    assert max_difference(params(students[False]), params(students[True])) < 1e-5


@pytest.mark.parametrize("setting,message", [
    ({"lmbda": 0.5}, "packing is not supported with cross_tokenizer_loss and lmbda=0.5: generated cross-tokenizer "
                     "rows are not packed yet"),
    ({"seq_kd": True}, "packing is not supported with cross_tokenizer_loss and seq_kd"),
    ({"packing_overlong": "truncate", "packing_max_length": 64}, "packing_overlong=truncate is not supported with "
                                                                 "cross_tokenizer_loss"),
])
def test_what_cross_tokenizer_packing_still_refuses(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, cross_tokenizer_loss="hybrid", packing=True, **setting)
    assert make_config(tmp_path, cross_tokenizer_loss="hybrid", packing=True).packing
