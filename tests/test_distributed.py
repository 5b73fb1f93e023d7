"""kd_llm across processes, on CPU (gloo) through ``accelerate launch``.

- Data parallel: 2 processes x batch 4 give the same student as 1 process x batch 8 (each process takes its shard of
  the same global batch, and the loss is normalised by the supervised tokens of the whole global batch).
- FSDP (1 and 2) and DeepSpeed ZeRO-3 teacher placement: each process holds half of the teacher and the sharded
  teacher's logits equal the whole teacher's. (Accelerate runs neither FSDP nor DeepSpeed training on CPU processes,
  so the sharded *trainer* is not run here; DeepSpeed is skipped where it is not installed.)
"""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import CHAR_VOCAB, tiny_llama
from tests.helpers.launch import SUPPORT, accelerate_launch
from tests.support.distributed_kd_run import run



@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Teacher and student saved once, so that every process and every run start from the same weights."""
    models = tmp_path_factory.mktemp("models")
    tiny_llama(CHAR_VOCAB, hidden=48, seed=1).save_pretrained(models / "teacher")
    tiny_llama(CHAR_VOCAB, seed=2).save_pretrained(models / "student")
    return models


def max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def hidden_cache_dir(saved_models, tmp_path_factory, char_tokenizer):
    """A float32 hidden-state cache of the saved teacher over the runs' data (tests.support.distributed_kd_run)."""
    from transformers import LlamaForCausalLM

    from kd_llm.data.sources import build_dataset, load_records
    from tests.helpers.cache import build_hidden
    from tests.support.distributed_kd_run import DATASET_SIZE

    path = tmp_path_factory.mktemp("ddp_cache") / "hidden"
    teacher = LlamaForCausalLM.from_pretrained(saved_models / "teacher", use_safetensors=True).eval()
    dataset = build_dataset(load_records("date_arithmetic", size=DATASET_SIZE, seed=1), char_tokenizer)
    build_hidden(path, teacher, dataset, char_tokenizer, dtype="float32")
    return path


@pytest.fixture(scope="module")
def data_parallel_launch(saved_models, hidden_cache_dir, tmp_path_factory):
    """One `accelerate launch` of 2 CPU processes with configs/accelerate/multi_gpu.yaml: 3 KD steps at batch 4 per
    process, packed, packed from a hidden-state cache, then the FSDP teacher check (sharing the launch: process
    start-up is most of the time)."""
    out = tmp_path_factory.mktemp("ddp")
    accelerate_launch("--config_file", "configs/accelerate/multi_gpu.yaml", str(SUPPORT / "distributed_kd_run.py"),
                      "--models", str(saved_models), "--output", str(out / "run"),
                      "--per_device_train_batch_size", "4", "--packed_output", str(out / "packed"),
                      "--hidden_cache", str(hidden_cache_dir), "--cached_output", str(out / "cached"),
                      "--fsdp_teacher_check", str(out / "fsdp"))
    return out


def test_two_processes_of_four_match_one_process_of_eight(saved_models, data_parallel_launch, tmp_path):
    ddp_info = json.loads((data_parallel_launch / "run" / "run.json").read_text())
    assert ddp_info["num_processes"] == 2 and ddp_info["distributed_type"] == "DistributedType.MULTI_CPU"
    assert ddp_info["global_step"] == 3

    run(saved_models, tmp_path / "single", per_device_train_batch_size=8)
    run(saved_models, tmp_path / "half", per_device_train_batch_size=4)  # what a wrong data split would give
    ddp = load_file(str(data_parallel_launch / "run" / "student.safetensors"))
    single = load_file(str(tmp_path / "single" / "student.safetensors"))
    half = load_file(str(tmp_path / "half" / "student.safetensors"))
    initial = load_file(str(saved_models / "student" / "model.safetensors"))

    assert max_difference(single, initial) > 1e-3  # it trained
    assert max_difference(ddp, single) < 1e-5
    assert max_difference(half, single) > 1e-3  # so the comparison can tell the global batches apart
    single_losses = json.loads((tmp_path / "single" / "run.json").read_text())["losses"]
    assert ddp_info["losses"] == pytest.approx(single_losses, rel=1e-5)


def test_two_packed_processes_match_one_padded_process(saved_models, data_parallel_launch, tmp_path):
    """packing=True across 2 processes: each packs its own shard; the student equals 1 packed process x 8, and the
    losses those of 1 padded process x 8."""
    packed_info = json.loads((data_parallel_launch / "packed" / "run.json").read_text())
    assert packed_info["num_processes"] == 2 and packed_info["global_step"] == 3
    run(saved_models, tmp_path / "single", per_device_train_batch_size=8, fused_loss="true", packing=True)
    run(saved_models, tmp_path / "padded", per_device_train_batch_size=8, fused_loss="true")
    packed = load_file(str(data_parallel_launch / "packed" / "student.safetensors"))
    single = load_file(str(tmp_path / "single" / "student.safetensors"))
    padded = load_file(str(tmp_path / "padded" / "student.safetensors"))
    initial = load_file(str(saved_models / "student" / "model.safetensors"))
    assert max_difference(single, initial) > 1e-3
    # Each process packs its own 4 examples into other rows than one process packs 8: the gradients agree to float
    # rounding (1e-5, tests/test_packed_trainer.py), which Adam's division by sqrt(v) amplifies in near-zero
    # gradients over 3 steps to ~3e-5 in the weights; a wrong data split moves them by > 1e-3 (test above).
    assert max_difference(packed, single) < 1e-4
    assert max_difference(single, padded) < 1e-4
    for other in ("single", "padded"):
        losses = json.loads((tmp_path / other / "run.json").read_text())["losses"]
        assert packed_info["losses"] == pytest.approx(losses, rel=1e-5)


def test_two_packed_processes_from_a_hidden_state_cache_match_one_padded_process(saved_models, hidden_cache_dir,
                                                                                data_parallel_launch, tmp_path):
    """packing=True from a stored teacher target across 2 processes: each process re-lays the cached states of its
    own examples into its packed rows; the student equals 1 padded process x 8 from the same cache."""
    cached_info = json.loads((data_parallel_launch / "cached" / "run.json").read_text())
    assert cached_info["num_processes"] == 2 and cached_info["global_step"] == 3
    assert cached_info["target"].startswith("hidden-state teacher cache (fused)")
    run(saved_models, tmp_path / "padded", per_device_train_batch_size=8, fused_loss="true",
        teacher_cache=str(hidden_cache_dir), teacher_cache_format="hidden_states")
    cached = load_file(str(data_parallel_launch / "cached" / "student.safetensors"))
    padded = load_file(str(tmp_path / "padded" / "student.safetensors"))
    initial = load_file(str(saved_models / "student" / "model.safetensors"))
    assert max_difference(padded, initial) > 1e-3
    assert max_difference(cached, padded) < 1e-5  # measured 1.8e-6
    losses = json.loads((tmp_path / "padded" / "run.json").read_text())["losses"]
    assert cached_info["losses"] == pytest.approx(losses, rel=1e-5)


def check_shards(results: list[dict], tolerance: float = 1e-5) -> None:
    total = results[0]["total_numel"]
    assert sum(r["local_numel"] for r in results) == total  # every parameter element held exactly once
    for r in results:
        assert r["max_abs_diff"] < tolerance
        assert r["local_numel"] < 0.6 * total
        assert not r["training"] and not r["requires_grad"]


def read_ranks(directory: Path) -> list[dict]:
    return [json.loads((directory / f"rank{i}.json").read_text()) for i in range(2)]


def test_fsdp_teacher_is_sharded_and_gives_the_whole_teachers_logits(data_parallel_launch):
    ranks = read_ranks(data_parallel_launch / "fsdp")
    assert ranks[0]["num_processes"] == 2
    for version in ("fsdp1", "fsdp2"):
        check_shards([r[version] for r in ranks])
        assert all(r[version]["policy_restored"] for r in ranks)


@pytest.mark.slow
def test_deepspeed_zero3_teacher_is_sharded_and_gives_the_whole_teachers_logits(saved_models, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    accelerate_launch("--multi_gpu", str(SUPPORT / "deepspeed_teacher_run.py"), "--models", str(saved_models),
                      "--output", str(tmp_path))
    ranks = read_ranks(tmp_path)
    assert all(r["world_size"] == 2 and r["zero_stage"] == 3 for r in ranks)
    check_shards(ranks)
