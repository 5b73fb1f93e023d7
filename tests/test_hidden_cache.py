"""The hidden-state teacher cache: codec round trips, rows equal to the teacher's final hidden states example by
example, the loss from them equal to the dense loss on the live teacher's logits (float32: 1e-5; float16 / bfloat16 /
int8: within their measured bounds), refusals (another head, a top-k reader, corrupt or unfinished shards) and an
interrupted build resumed."""

from __future__ import annotations

import json

import pytest
import torch

from kd_llm.data.collator import CausalLMCollator
from kd_llm.losses import distillation_objective
from kd_llm.losses.fused_hidden import fused_hidden_distillation_objective
from kd_llm.models.lm_head import HIDDEN_STATE_FORWARD_KWARGS, final_hidden_states, head_of_model
from kd_llm.teacher_cache import TeacherCache, TeacherCacheError
from kd_llm.teacher_cache.hidden_cache import HiddenStateCache, module_hidden_fn
from kd_llm.teacher_cache.hidden_codec import HIDDEN_DTYPES, decode_hidden, encode_hidden
from kd_llm.teacher_cache.metadata import read_metadata
from tests.conftest import tiny_llama
from tests.helpers.cache import build, build_hidden


@pytest.fixture(scope="module")
def teacher(char_tokenizer):
    return tiny_llama(len(char_tokenizer), hidden=48, seed=1).eval()


@pytest.fixture(scope="module")
def hidden_dir(tmp_path_factory, teacher, date_dataset, char_tokenizer):
    path = tmp_path_factory.mktemp("hidden")
    build_hidden(path, teacher, date_dataset, char_tokenizer)
    return path


# ---------------------------------------------------------------- codec

# Worst relative error per value: float16 keeps 11 significant bits, bfloat16 8 (round to nearest: half a step);
# int8 is within half a step of the row's scale max|h| / 127.
RELATIVE = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}


@pytest.mark.parametrize("dtype", HIDDEN_DTYPES)
def test_codec_round_trip(dtype):
    hidden = torch.randn(37, 24, generator=torch.Generator().manual_seed(0)) * 5
    hidden[3, 7] = 300.0  # an outlier dimension, as post-norm states have
    encoded = encode_hidden(hidden, dtype)
    decoded = decode_hidden(encoded["hidden"], encoded.get("scale"), dtype)
    assert decoded.dtype == torch.float32 and decoded.shape == hidden.shape
    error = (decoded - hidden).abs()
    if dtype == "int8":
        bound = hidden.abs().amax(dim=-1, keepdim=True) / 127 / 2
        assert torch.all(error <= bound * (1 + 1e-6))
        assert encoded["hidden"].dtype.itemsize == 1
    else:
        assert torch.all(error <= hidden.abs() * RELATIVE[dtype])
        assert encoded["hidden"].dtype.itemsize == (4 if dtype == "float32" else 2)
    assert error.max() > 0 or dtype == "float32"


def test_codec_refuses_what_it_cannot_store():
    with pytest.raises(ValueError, match="beyond float16's range .*bfloat16"):
        encode_hidden(torch.tensor([[1.0, 7e4]]), "float16")
    with pytest.raises(ValueError, match="inf or NaN"):
        encode_hidden(torch.tensor([[float("nan"), 1.0]]), "bfloat16")
    with pytest.raises(ValueError, match="Unknown hidden-state dtype"):
        encode_hidden(torch.zeros(1, 2), "float8")


# ---------------------------------------------------------------- the stored rows


def test_rows_are_the_teachers_final_hidden_states_on_each_example_alone(hidden_dir, teacher, date_dataset):
    cache = HiddenStateCache.open(hidden_dir, head=head_of_model(teacher), dataset=date_dataset)
    for index in (0, 21, 47):  # in three different shards
        example = date_dataset[index]
        ids = torch.tensor([example["input_ids"]])
        valid = torch.tensor(example["labels"][1:]) != -100
        expected = final_hidden_states(teacher, ids, torch.ones_like(ids))[0, :-1][valid]
        torch.testing.assert_close(cache.states_for([index]), expected, rtol=1e-5, atol=1e-5)


def batch_of(dataset, tokenizer, indices):
    batch = CausalLMCollator(tokenizer.pad_token_id)([dataset[i] for i in indices])
    return batch["input_ids"], batch["attention_mask"], batch["labels"][:, 1:]


def dense_reference(teacher, student, batch, options):
    input_ids, attention_mask, shifted = batch
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    student_logits = student(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    return distillation_objective(student_logits, teacher_logits, shifted, **options)


def cached_objective(cache, head, student, batch, indices, options):
    input_ids, attention_mask, shifted = batch
    outputs = student(input_ids=input_ids, attention_mask=attention_mask, **HIDDEN_STATE_FORWARD_KWARGS)
    hidden = outputs.hidden_states[-1][:, :-1]
    states = cache.gather(torch.tensor(indices), shifted)
    return fused_hidden_distillation_objective(hidden, student.lm_head.weight, shifted, states, head.weight,
                                               teacher_softcap=head.softcap, chunk_size=16, **options)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_loss_from_float32_states_is_the_dense_loss_on_the_live_teacher(hidden_dir, teacher, date_dataset,
                                                                       char_tokenizer, loss, temperature):
    student = tiny_llama(len(char_tokenizer), seed=4)
    indices = [5, 30, 12, 41]  # across shards, out of order
    batch = batch_of(date_dataset, char_tokenizer, indices)
    options = dict(alpha=0.5, loss=loss, temperature=temperature)
    dense = dense_reference(teacher, student, batch, options)
    cached = cached_objective(HiddenStateCache.open(hidden_dir), head_of_model(teacher), student, batch, indices,
                              options)
    for name in ("total", "ce", "kd"):
        torch.testing.assert_close(getattr(cached, name), getattr(dense, name).detach(), rtol=1e-5, atol=1e-5)
    weights = [student.lm_head.weight, student.model.layers[0].mlp.up_proj.weight]
    for got, want in zip(torch.autograd.grad(cached.total, weights), torch.autograd.grad(dense.total, weights)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# Measured on this tiny random teacher (KD relative error vs the dense loss); benchmarks/README.md has the real
# teachers' figures. The bounds are a few times the measured error: loose enough for rounding, tight enough that
# a wrong dtype (or decoding bfloat16 bits as float16) fails.
HALF_BOUNDS = {"float16": 5e-6, "bfloat16": 2e-4, "int8": 2e-4}  # measured: 6e-7, 3.5e-5, 2.5e-5


@pytest.mark.parametrize("dtype", list(HALF_BOUNDS))
def test_loss_from_compact_states_is_within_its_measured_error(tmp_path, teacher, date_dataset, char_tokenizer,
                                                               dtype):
    build_hidden(tmp_path, teacher, date_dataset, char_tokenizer, dtype=dtype, shard_size=48)
    student = tiny_llama(len(char_tokenizer), seed=4)
    indices = list(range(0, 48, 3))
    batch = batch_of(date_dataset, char_tokenizer, indices)
    options = dict(alpha=0.0, loss="reverse_kl", temperature=2.0)
    dense = dense_reference(teacher, student, batch, options).kd.item()
    cached = cached_objective(HiddenStateCache.open(tmp_path), head_of_model(teacher), student, batch, indices,
                              options).kd.item()
    error = abs(cached - dense) / dense
    assert 0 < error < HALF_BOUNDS[dtype]
    metadata = read_metadata(tmp_path)
    per_token = metadata.total_bytes / metadata.supervised_tokens
    assert per_token <= (2 * 48 + 16 if dtype != "int8" else 48 + 16)  # the size goal, d = 48


# ---------------------------------------------------------------- refusals


def test_refuses_another_teachers_head(hidden_dir, char_tokenizer):
    other = tiny_llama(len(char_tokenizer), hidden=48, seed=2)
    with pytest.raises(TeacherCacheError, match="made for another teacher lm_head .*head hash"):
        HiddenStateCache.open(hidden_dir, head=head_of_model(other))


def test_each_reader_refuses_the_other_payload(hidden_dir, tmp_path, teacher, date_dataset, char_tokenizer):
    with pytest.raises(TeacherCacheError, match="holds hidden_states rows, not top_k.*HiddenStateCache"):
        TeacherCache.open(hidden_dir)
    build(tmp_path, teacher, date_dataset, char_tokenizer)
    with pytest.raises(TeacherCacheError, match="holds top_k rows, not hidden_states"):
        HiddenStateCache.open(tmp_path)


def test_refuses_a_corrupt_shard_and_a_batch_the_cache_does_not_hold(tmp_path, teacher, date_dataset,
                                                                     char_tokenizer):
    build_hidden(tmp_path, teacher, date_dataset, char_tokenizer)
    cache = HiddenStateCache.open(tmp_path)
    _, _, shifted = batch_of(date_dataset, char_tokenizer, [3])
    with pytest.raises(TeacherCacheError, match="holds .* positions for example 4 but the batch has"):
        cache.gather(torch.tensor([4]), shifted)
    shard = tmp_path / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(TeacherCacheError, match="shard-00001.arrow is corrupt"):
        HiddenStateCache.open(tmp_path)


class Interrupted(RuntimeError):
    pass


def test_interrupted_build_is_refused_then_resumed_to_the_same_shards(tmp_path, teacher, date_dataset,
                                                                      char_tokenizer):
    run, calls = module_hidden_fn(teacher), []

    def failing(input_ids, attention_mask):
        if len(calls) >= 4:
            raise Interrupted("killed")
        calls.append(len(input_ids))
        return run(input_ids, attention_mask)

    with pytest.raises(Interrupted):
        build_hidden(tmp_path / "c", teacher, date_dataset, char_tokenizer, hidden_fn=failing)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["metadata.json", "shard-00000.arrow"]
    with pytest.raises(TeacherCacheError, match="incomplete .* to resume"):
        HiddenStateCache.open(tmp_path / "c")
    resumed = []

    def counting(input_ids, attention_mask):
        resumed.append(len(input_ids))
        return run(input_ids, attention_mask)

    build_hidden(tmp_path / "c", teacher, date_dataset, char_tokenizer, hidden_fn=counting)
    assert sum(resumed) == 28  # shards 1 and 2 only
    build_hidden(tmp_path / "whole", teacher, date_dataset, char_tokenizer)
    for index in range(3):
        name = f"shard-0000{index}.arrow"
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    with pytest.raises(TeacherCacheError, match="other settings .*hidden_dtype"):
        build_hidden(tmp_path / "c", teacher, date_dataset, char_tokenizer, dtype="float16")


def test_metadata_records_the_head(hidden_dir, teacher):
    values = json.loads((hidden_dir / "metadata.json").read_text())
    head = head_of_model(teacher)
    assert values["payload"] == "hidden_states" and values["hidden_dtype"] == "float32"
    assert values["head_hash"] == head.sha256 and values["head_tied"] is False and values["head_softcap"] is None
    assert values["vocab_size"] == 89 and values["hidden_size"] == 48 and values["complete"] is True
    assert values["bytes_per_supervised_token"] <= 4 * 48 + 16


# ---------------------------------------------------------------- the cache script


def test_cache_script_writes_a_hidden_state_cache_and_refuses_an_ensemble(tmp_path, tiny_teacher_dir):
    import sys
    from pathlib import Path

    scripts = Path(__file__).resolve().parent.parent / "scripts"
    sys.path.insert(0, str(scripts))
    import cache_teacher

    common = ["--config", str(scripts.parent / "configs" / "date_cached_teacher.yaml"), "--teacher",
              str(tiny_teacher_dir), "--teacher_cache", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "o"),
              "--train_size", "12", "--transfer_size", "0", "--disable_tqdm", "true", "--use_cpu", "true",
              "--teacher_cache_format", "hidden_states", "--cache_hidden_dtype", "bfloat16"]
    metadata = cache_teacher.main([*common, "--cache_shard_size", "5"])
    assert metadata.complete and metadata.payload == "hidden_states" and metadata.hidden_dtype == "bfloat16"
    assert len(metadata.shards) == 3 and metadata.hidden_size == 48 and metadata.k == 0
    assert metadata.total_bytes / metadata.supervised_tokens <= 2 * 48 + 16
    with pytest.raises(ValueError, match="an ensemble's target is a mixture"):
        cache_teacher.main([*common, "--teacher_cache", str(tmp_path / "c2"), "--extra_teachers",
                            str(tiny_teacher_dir)])
    with pytest.raises(ValueError, match="teacher_cache_format must be one of"):
        cache_teacher.main([*common, "--teacher_cache_format", "logits"])
    with pytest.raises(ValueError, match="int8 loses up to 0.6%"):
        cache_teacher.main([*common, "--cache_hidden_dtype", "int8"])
