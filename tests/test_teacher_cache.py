"""Offline teacher cache: codec round trips, shards that match the teacher example by example, refusals (other
teacher, tokenizer, data, corrupt or incomplete shards), atomic and resumable writing, and training with no teacher."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd_llm import DistillationTrainer
from kd_llm.data.collator import CausalLMCollator
from kd_llm.losses import kd_loss
from kd_llm.losses.sparse import sparse_kd_loss
from kd_llm.teacher_cache import (
    TeacherCache,
    TeacherCacheError,
    module_teacher_fn,
    state_dict_sha256,
    tokenizer_sha256,
    write_teacher_cache,
)
from kd_llm.teacher_cache.codec import decode_rows, encode_rows, index_dtype, top_k_rows
from kd_llm.teacher_cache.metadata import read_metadata
from kd_llm.teacher_cache.reader import check_cache_teacher
from tests.conftest import teacher_watching_trainer, tiny_distillation_config as train_config, tiny_llama
from tests.helpers.cache import build


@pytest.fixture(scope="module")
def teacher(char_tokenizer):
    return tiny_llama(len(char_tokenizer), hidden=48, seed=1).eval()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, teacher, date_dataset, char_tokenizer):
    path = tmp_path_factory.mktemp("cache")
    build(path, teacher, date_dataset, char_tokenizer)
    return path


# ---------------------------------------------------------------- codec


def test_index_dtype_is_the_narrowest_that_holds_the_vocabulary():
    assert index_dtype(89) == np.uint8 and index_dtype(256) == np.uint8
    assert index_dtype(257) == np.uint16 and index_dtype(49152) == np.uint16
    assert index_dtype(65537) == np.uint32


@pytest.mark.parametrize("codec", ["float16", "sqrt_uint8", "log_uint8"])
def test_codec_round_trip(codec):
    vocab = 300
    teacher_logits = 4 * torch.randn(50, vocab, generator=torch.Generator().manual_seed(0))
    ids, log_probs, log_tail = top_k_rows(teacher_logits, k=20, temperature=1.0, vocab_size=vocab)
    encoded = encode_rows(ids, log_probs, log_tail, vocab_size=vocab, codec=codec)
    assert encoded["gaps"].dtype == np.uint16
    got_ids, got_log_probs, got_log_tail = decode_rows(encoded["gaps"], encoded["values"], encoded["log_tail"],
                                                       codec=codec)
    reference = F.log_softmax(teacher_logits.double(), dim=-1)
    assert torch.equal(got_ids, reference.topk(20, dim=-1).indices.sort(dim=-1).values)
    # Proper distributions over k + 1 buckets, by construction of the decoder.
    total = got_log_probs.double().exp().sum(-1) + got_log_tail.double().exp()
    torch.testing.assert_close(total, torch.ones(50, dtype=torch.float64), rtol=0, atol=1e-5)
    true_tail = 1 - reference.gather(-1, got_ids).exp().sum(-1)
    torch.testing.assert_close(got_log_tail.double().exp(), true_tail, rtol=2e-3, atol=0)
    # Each codec's promised precision on the stored probabilities.
    p, p_hat = reference.gather(-1, got_ids).exp(), got_log_probs.double().exp()
    if codec == "float16":
        # half a float16 step of the log-probability (11 significant bits), plus the renormalisation
        assert ((p_hat.log() - p.log()).abs() <= p.log().abs() * 2.0**-11 + 1e-4).all()
    elif codec == "sqrt_uint8":
        assert (p_hat.sqrt() - p.sqrt()).abs().max() <= 1.0 / 255
    else:
        assert ((p_hat.log() - p.log()).abs().max()) <= 24 / 255


# ---------------------------------------------------------------- writing and reading


def test_rows_match_the_teacher_run_on_each_example_alone(cache_dir, teacher, date_dataset):
    """Padding, length-sorted batches and sharding must not move a row: compare with an unpadded run per example."""
    cache = TeacherCache.open(cache_dir)
    assert cache.metadata.supervised_tokens == sum(sum(x != -100 for x in row[1:]) for row in date_dataset["labels"])
    for index in (0, 7, 19, 20, 33, 47):  # first, middle and last shard, both sides of a shard boundary
        example = date_dataset[index]
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
        valid = torch.tensor(example["labels"][1:]) != -100
        ids, log_probs, log_tail = top_k_rows(logits[valid], k=16, temperature=2.0, vocab_size=89)
        got = cache.targets_for([index])
        assert torch.equal(got.token_ids, ids)
        torch.testing.assert_close(got.log_probs, log_probs, rtol=0, atol=5e-3)
        torch.testing.assert_close(got.log_tail, log_tail, rtol=2e-3, atol=0)


def test_gather_returns_rows_in_the_order_the_loss_selects_them(cache_dir, date_dataset, char_tokenizer):
    cache = TeacherCache.open(cache_dir)
    order = [30, 2, 45]
    batch = CausalLMCollator(char_tokenizer.pad_token_id)([date_dataset[i] for i in order])
    got = cache.gather(torch.tensor(order), batch["labels"][:, 1:])
    expected = [cache.targets_for([i]) for i in order]
    assert torch.equal(got.token_ids, torch.cat([e.token_ids for e in expected]))
    assert got.num_rows == int((batch["labels"][:, 1:] != -100).sum())
    changed = batch["labels"][:, 1:].clone()
    changed[1, -1] = -100 if changed[1, -1] != -100 else 5
    with pytest.raises(TeacherCacheError, match="dataset changed after the cache was built"):
        cache.gather(torch.tensor(order), changed)


def test_embedded_teacher_meets_the_size_and_error_goals(tmp_path):
    """The demo's teacher at k = 64 with the default codec: under 100 bytes per supervised token, and the cached
    forward KL within 1% of the dense loss for a student near the teacher (its logits plus noise)."""
    from kd_llm.data.sources import build_dataset, load_records
    from kd_llm.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer("embedded:date-teacher")
    model = load_model("embedded:date-teacher").eval()
    dataset = build_dataset(load_records("date_arithmetic", size=64, seed=5), tokenizer)
    metadata = write_teacher_cache(
        module_teacher_fn(model), dataset, tmp_path / "c", collator=CausalLMCollator(tokenizer.pad_token_id),
        teacher="embedded:date-teacher", teacher_hash=state_dict_sha256(model),
        tokenizer_hash=tokenizer_sha256(tokenizer), vocab_size=len(tokenizer), k=64, temperature=1.0,
        shard_size=64, progress=False,
    )
    assert metadata.value_codec == "sqrt_uint8"
    assert metadata.total_bytes / metadata.supervised_tokens < 100
    cache = TeacherCache.open(tmp_path / "c", tokenizer=tokenizer, dataset=dataset, teacher=model)
    batch = CausalLMCollator(tokenizer.pad_token_id)([dataset[i] for i in range(64)])
    with torch.no_grad():
        teacher_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    student_logits = teacher_logits + torch.randn(teacher_logits.shape, generator=torch.Generator().manual_seed(0))
    labels = batch["labels"][:, 1:]
    dense = kd_loss(student_logits, teacher_logits, labels).item()
    cached = sparse_kd_loss(student_logits, cache.gather(torch.arange(64), labels), labels).item()
    assert abs(cached - dense) < 0.01 * dense


# ---------------------------------------------------------------- refusals


def test_refuses_another_tokenizer(cache_dir, char_tokenizer):
    import copy

    other = copy.deepcopy(char_tokenizer)
    other.add_tokens(["<extra>"])
    with pytest.raises(TeacherCacheError, match="another tokenizer"):
        TeacherCache.open(cache_dir, tokenizer=other)
    TeacherCache.open(cache_dir, tokenizer=char_tokenizer)


def test_refuses_another_teacher(cache_dir, teacher, char_tokenizer):
    with pytest.raises(TeacherCacheError, match="another teacher"):
        TeacherCache.open(cache_dir, teacher=tiny_llama(len(char_tokenizer), hidden=48, seed=2))
    TeacherCache.open(cache_dir, teacher=teacher)
    # The metadata-only check a script runs before it frees its teacher.
    with pytest.raises(TeacherCacheError, match="another teacher"):
        check_cache_teacher(cache_dir, tiny_llama(len(char_tokenizer), hidden=48, seed=2))
    check_cache_teacher(cache_dir, teacher)


def test_refuses_other_data(cache_dir, date_dataset):
    with pytest.raises(TeacherCacheError, match="covers other data"):
        TeacherCache.open(cache_dir, dataset=date_dataset.select(range(47, -1, -1)))  # same examples, other order
    TeacherCache.open(cache_dir, dataset=date_dataset)


def test_refuses_a_corrupt_shard(tmp_path, teacher, date_dataset, char_tokenizer):
    build(tmp_path, teacher, date_dataset, char_tokenizer)
    shard = tmp_path / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(TeacherCacheError, match="shard-00001.arrow is corrupt"):
        TeacherCache.open(tmp_path)


def test_refuses_a_folder_that_is_no_cache(tmp_path):
    with pytest.raises(TeacherCacheError, match="not a teacher cache"):
        TeacherCache.open(tmp_path)


class Interrupted(RuntimeError):
    pass


def counting(teacher, calls: list, fail_after: int | None = None):
    run = module_teacher_fn(teacher)

    def teacher_fn(input_ids, attention_mask):
        if fail_after is not None and len(calls) >= fail_after:
            raise Interrupted("killed")
        calls.append(len(input_ids))
        return run(input_ids, attention_mask)
    return teacher_fn


def test_interrupted_build_leaves_whole_shards_and_resumes(tmp_path, teacher, date_dataset, char_tokenizer):
    calls = []
    # shard 0 (20 examples) takes 3 batches of 8; the 5th call is in shard 1
    with pytest.raises(Interrupted):
        build(tmp_path / "c", teacher, date_dataset, char_tokenizer, teacher_fn=counting(teacher, calls, 4))
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert files == ["metadata.json", "shard-00000.arrow"]  # no half shard, no temporary file
    metadata = read_metadata(tmp_path / "c")
    assert not metadata.complete and [s.file for s in metadata.shards] == ["shard-00000.arrow"]
    with pytest.raises(TeacherCacheError, match="incomplete .* to resume"):
        TeacherCache.open(tmp_path / "c")

    # A crash in the middle of a write leaves only a temporary file, which the next run removes.
    (tmp_path / "c" / "shard-00001.arrow.tmp-12345").write_bytes(b"half a shard")
    resumed = []
    build(tmp_path / "c", teacher, date_dataset, char_tokenizer, teacher_fn=counting(teacher, resumed))
    assert sum(resumed) == 28  # shards 1 and 2 only (48 - 20 examples)
    build(tmp_path / "whole", teacher, date_dataset, char_tokenizer)
    assert not list((tmp_path / "c").glob("*.tmp-*"))
    for index in range(3):
        name = f"shard-0000{index}.arrow"
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    TeacherCache.open(tmp_path / "c", dataset=date_dataset)


def test_resume_recomputes_a_corrupt_shard_and_refuses_other_settings(tmp_path, teacher, date_dataset,
                                                                        char_tokenizer):
    build(tmp_path, teacher, date_dataset, char_tokenizer)
    (tmp_path / "shard-00002.arrow").write_bytes(b"garbage")
    calls = []
    build(tmp_path, teacher, date_dataset, char_tokenizer, teacher_fn=counting(teacher, calls))
    assert sum(calls) == 8  # shard 2 holds examples 40..47
    TeacherCache.open(tmp_path)
    with pytest.raises(TeacherCacheError, match="other settings .*k: cache 16 vs now 32"):
        build(tmp_path, teacher, date_dataset, char_tokenizer, k=32)
    other = tmp_path / "unrelated"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(TeacherCacheError, match="not empty"):
        build(other, teacher, date_dataset, char_tokenizer)


def test_metadata_records_what_the_cache_is(cache_dir):
    values = json.loads((cache_dir / "metadata.json").read_text())
    for key in ("teacher", "teacher_hash", "tokenizer_hash", "dataset_fingerprint", "k", "temperature",
                "value_codec", "index_dtype", "vocab_size", "bytes_per_supervised_token"):
        assert values[key] not in (None, "")
    assert values["k"] == 16 and values["temperature"] == 2.0 and values["index_dtype"] == "uint8"
    assert values["complete"] is True and len(values["shards"]) == 3


# ---------------------------------------------------------------- training from the cache




def params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_training_from_a_full_cache_matches_the_live_teacher(tmp_path, teacher, date_dataset, char_tokenizer):
    """k = V: the cached objective is the dense one, so training needs no teacher and lands where it would with one
    (up to the float16 storage of the values)."""
    build(tmp_path / "c", teacher, date_dataset, char_tokenizer, k=89)
    # Plain SGD: Adam would blow the float16 rounding of near-zero gradients up to full-size steps.
    sgd = dict(optim="sgd", learning_rate=0.5, alpha=0.0)
    live = DistillationTrainer(model=tiny_llama(89, seed=2), teacher_model=teacher,
                               args=train_config(tmp_path / "a", **sgd), train_dataset=date_dataset,
                               processing_class=char_tokenizer)
    live.train()
    cached = DistillationTrainer(model=tiny_llama(89, seed=2), args=train_config(tmp_path / "b", **sgd,
                                                                                teacher_cache=str(tmp_path / "c")),
                                 train_dataset=date_dataset, processing_class=char_tokenizer)
    assert cached.teacher is None and cached.teacher_cache is not None
    cached.train()
    start = params(tiny_llama(89, seed=2))
    moved = max((params(live.model)[k] - start[k]).abs().max().item() for k in start)
    differs = max((params(live.model)[k] - params(cached.model)[k]).abs().max().item() for k in start)
    assert differs < 1e-2 * moved  # a misaligned row would move the student as much as training does
    kd = lambda t: [e["kd_loss"] for e in t.state.log_history if "kd_loss" in e]  # noqa: E731
    assert kd(cached) == pytest.approx(kd(live), rel=1e-3)


def test_trainer_refuses_a_cache_it_cannot_use(tmp_path, cache_dir, teacher, date_dataset, char_tokenizer):
    student = tiny_llama(89, seed=2)
    with pytest.raises(ValueError, match="Rebuild the cache at the training temperature"):
        DistillationTrainer(model=student, args=train_config(tmp_path, teacher_cache=str(cache_dir), temperature=1.0),
                            train_dataset=date_dataset, processing_class=char_tokenizer)
    with pytest.raises(TeacherCacheError, match="covers other data"):
        DistillationTrainer(model=student, args=train_config(tmp_path, teacher_cache=str(cache_dir)),
                            train_dataset=date_dataset.select(range(40)), processing_class=char_tokenizer)
    with pytest.raises(TeacherCacheError, match="another teacher"):
        DistillationTrainer(model=student, teacher_model=tiny_llama(89, hidden=48, seed=3),
                            args=train_config(tmp_path, teacher_cache=str(cache_dir)),
                            train_dataset=date_dataset, processing_class=char_tokenizer)
    # renormalise re-tempers exactly, so another temperature trains.
    trainer = DistillationTrainer(model=student, args=train_config(tmp_path, teacher_cache=str(cache_dir),
                                                                   temperature=1.0, max_steps=1,
                                                                   teacher_cache_tail_mode="renormalise"),
                                  train_dataset=date_dataset, processing_class=char_tokenizer)
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["kd_loss"])


@pytest.mark.parametrize("overrides,message", [
    (dict(distillation_loss="mse"), "cannot be computed from a teacher cache"),
    (dict(precompute_teacher_logits=True), "set precompute_teacher_logits=False"),
    (dict(final_temperature=1.0, temperature_schedule="linear"), "use a constant temperature"),
    (dict(teacher_cache_tail_mode="drop"), "teacher_cache_tail_mode must be one of"),
])
def test_config_refuses_settings_a_cache_cannot_serve(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train_config(tmp_path, teacher_cache="somewhere", **overrides)


# ---------------------------------------------------------------- the two scripts


def test_cache_script_then_distill_script_train_from_the_cache(tmp_path, char_tokenizer, monkeypatch):
    """configs/date_cached_teacher.yaml's two commands on a tiny teacher: cache_teacher.py writes the cache of the
    run (train set plus the teacher-written transfer set), distill_llm.py trains the KD student from it with the
    teacher out of memory, and refuses a cache that another teacher made."""
    import sys
    from pathlib import Path

    import kd_llm.distillation_modes

    seen = {}
    monkeypatch.setattr(kd_llm.distillation_modes, "DistillationTrainer", teacher_watching_trainer(seen, 40))

    scripts = Path(__file__).resolve().parent.parent / "scripts"
    sys.path.insert(0, str(scripts))
    import cache_teacher
    import distill_llm

    teacher_dir = tmp_path / "teacher"
    tiny_llama(len(char_tokenizer), hidden=40, seed=1).save_pretrained(teacher_dir)
    char_tokenizer.save_pretrained(teacher_dir)
    common = ["--config", str(scripts.parent / "configs" / "date_cached_teacher.yaml"), "--teacher", str(teacher_dir),
              "--teacher_cache", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), "--train_size", "12",
              "--transfer_size", "4", "--max_new_tokens", "12", "--disable_tqdm", "true", "--use_cpu", "true"]
    metadata = cache_teacher.main([*common, "--cache_k", "8", "--cache_shard_size", "10"])
    assert metadata.complete and metadata.k == 8 and metadata.num_examples >= 13 and len(metadata.shards) == 2
    results = distill_llm.main([*common, "--max_steps", "2", "--per_device_train_batch_size", "4",
                                "--compare_hard_labels", "false", "--evaluate_skills", "false",
                                "--write_report", "false", "--force", "true", "--logging_steps", "1"])
    assert results["steps"] == 2
    # The teacher is the only model 40 wide; the config packs: the cached top-k is laid into packed rows.
    assert seen == {"teacher_model": None, "teachers alive": 0, "packed batches": True}
    assert results["teacher_cache"]["k"] == 8 and results["teacher_cache"]["tail_mode"] == "tail_bucket"
    logged = [entry["kd_loss"] for entry in results["kd_log_history"] if "kd_loss" in entry]
    assert len(logged) == 2 and all(value > 0 for value in logged)
    with pytest.raises(ValueError, match="other settings"):
        cache_teacher.main([*common, "--cache_k", "16"])
    other_teacher = tmp_path / "other_teacher"
    tiny_llama(len(char_tokenizer), hidden=40, seed=5).save_pretrained(other_teacher)
    char_tokenizer.save_pretrained(other_teacher)
    with pytest.raises(TeacherCacheError, match="another teacher"):
        distill_llm.main([*common, "--teacher", str(other_teacher), "--max_steps", "1", "--compare_hard_labels",
                          "false", "--evaluate_skills", "false", "--write_report", "false", "--force", "true"])


def test_an_ensemble_is_cached_as_its_mixture(tmp_path, teacher, date_dataset, char_tokenizer):
    from kd_llm.teacher_cache.build import teacher_fingerprint, teacher_function
    from kd_llm.training.teachers import TeacherEnsemble, mix_log_probs

    second = tiny_llama(89, hidden=32, seed=4).eval()
    ensemble = TeacherEnsemble([teacher, lambda: second], [0.25, 0.75])
    fingerprint = teacher_fingerprint(ensemble)
    assert fingerprint != state_dict_sha256(teacher)
    assert fingerprint != teacher_fingerprint(TeacherEnsemble([teacher, second], [0.5, 0.5]))
    subset = date_dataset.select(range(6))
    write_teacher_cache(teacher_function(ensemble, temperature=2.0, vocab_size=89), subset, tmp_path,
                        collator=CausalLMCollator(0), teacher="pair", teacher_hash=fingerprint,
                        tokenizer_hash=tokenizer_sha256(char_tokenizer), vocab_size=89, k=89, temperature=2.0,
                        value_codec="float16", progress=False)
    example = subset[3]
    with torch.no_grad():
        input_ids = torch.tensor([example["input_ids"]])
        mixture = mix_log_probs([teacher(input_ids=input_ids).logits, second(input_ids=input_ids).logits],
                                [0.25, 0.75], temperature=2.0)[0, :-1]
    valid = torch.tensor(example["labels"][1:]) != -100
    got = TeacherCache.open(tmp_path).targets_for([3])
    torch.testing.assert_close(got.log_probs, mixture[valid], rtol=0, atol=5e-3)
