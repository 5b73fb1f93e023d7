"""The memory estimate against figures computed by hand for SmolLM2-135M-sized models, and its warning."""

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kd_llm import DistillationConfig
from kd_llm.training import memory_estimate as me
from kd_llm.training.memory_estimate import (
    MemoryEstimateWarning,
    estimate_memory,
    launch_sharding,
    report_memory_estimate,
    warn_if_too_large,
)
from tests.conftest import tiny_llama


def smollm2_sized(layers: int) -> LlamaForCausalLM:
    """SmolLM2-135M's shapes (vocab 49,152, width 576, 9 heads / 3 KV heads of 64, MLP 1,536, tied embeddings), no
    memory: built on the meta device."""
    config = LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=layers, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, tie_word_embeddings=True)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


# By hand. Embedding 49,152 x 576 = 28,311,552 (tied: the lm_head adds nothing). One layer: q 576x576 = 331,776,
# k and v 576x192 = 110,592 each, o 331,776, gate/up/down 3 x 576 x 1,536 = 2,654,208, two norms 1,152:
# 3,540,096. Final norm 576.
TEACHER_PARAMETERS = 28_311_552 + 30 * 3_540_096 + 576  # 134,515,008: SmolLM2-135M
STUDENT_PARAMETERS = 28_311_552 + 15 * 3_540_096 + 576  # 81,413,568
TOKENS = 8 * 256
# Kept per token and layer: 6 x 576 + 2 x 192 + 4 x 1,536 = 9,984 values; plus 2 x 576 outside the layers.
LAYER_VALUES = 9_984


@pytest.fixture(scope="module")
def teacher():
    return smollm2_sized(30)


@pytest.fixture(scope="module")
def student():
    return smollm2_sized(15)


def test_dense_bf16_figures(student, teacher):
    estimate = estimate_memory(student, teacher, batch_size=8, sequence_length=256, precision="bf16", alpha=0.5)
    assert TEACHER_PARAMETERS == 134_515_008
    expected = {
        "student weights": 325_654_272,  # 81,413,568 x 4 bytes (float32 master weights under bf16)
        "student gradients": 325_654_272,
        "AdamW states": 651_308_544,  # two float32 moments
        "student activations": 618_135_552,  # 2,048 tokens x (15 x 9,984 + 1,152) values x 2 bytes
        "student logits": 2_013_265_920,  # 2,048 x 49,152 x 4 bytes x 5 buffers (3 + CE 1 + KD 1)
        "teacher logits": 1_610_612_736,  # 2,048 x 49,152 x 4 bytes x 4 buffers
        "teacher weights": 538_060_032,  # 134,515,008 x 4 bytes
        "teacher activations": 45_613_056,  # one layer under no_grad: 2,048 x (9,984 + 1,152) x 2 bytes
    }
    assert estimate.items == expected
    assert estimate.total == sum(expected.values()) == 6_128_304_384  # 5.71 GiB
    assert estimate.items["student weights"] == STUDENT_PARAMETERS * 4
    assert estimate.items["student activations"] == TOKENS * (15 * LAYER_VALUES + 1152) * 2
    assert "5.707 GiB" in estimate.format()


def test_fused_path_replaces_full_logits_by_one_chunk(student, teacher):
    estimate = estimate_memory(student, teacher, batch_size=8, sequence_length=256, precision="bf16", alpha=0.5,
                               loss_path="fused")
    # Default chunk: max(64, 2^22 // 49,152) = 85 rows. Student: 85 x 49,152 x 4 x (2 + 1 + 1) buffers
    # + its final hidden state and that state's gradient 2 x 2,048 x 576 x 4 + the lm_head gradient 49,152 x 576 x 4.
    assert estimate.items["student logits"] == 66_846_720 + 9_437_184 + 113_246_208
    # Teacher: 85 x 49,152 x 4 x 3 + its final hidden state 2,048 x 576 x 4.
    assert estimate.items["teacher logits"] == 50_135_040 + 4_718_592
    dense = estimate_memory(student, teacher, batch_size=8, sequence_length=256, precision="bf16", alpha=0.5)
    assert {k: v for k, v in estimate.items.items() if "logits" not in k} == \
        {k: v for k, v in dense.items.items() if "logits" not in k}


def test_precision_checkpointing_and_hard_labels(student, teacher):
    fp32 = estimate_memory(student, teacher, batch_size=8, sequence_length=256, precision="no", alpha=0.5)
    assert fp32.items["student activations"] == TOKENS * (15 * LAYER_VALUES + 1152) * 4  # float32 activations
    checkpointed = estimate_memory(student, teacher, batch_size=8, sequence_length=256, precision="bf16",
                                   gradient_checkpointing=True)
    # each layer's input (15 x 576) + one layer recomputed (9,984) + 1,152, at 2 bytes
    assert checkpointed.items["student activations"] == TOKENS * 19_776 * 2 == 81_002_496
    hard = estimate_memory(student, teacher, batch_size=8, sequence_length=256, precision="bf16", alpha=1.0)
    assert hard.items["student logits"] == TOKENS * 49152 * 4 * 4  # no distillation buffer
    assert hard.items["teacher logits"] == 0
    no_teacher = estimate_memory(student, None, batch_size=8, sequence_length=256, alpha=1.0)
    assert "teacher weights" not in no_teacher.items


def test_a_teacher_cache_keeps_the_kd_buffers_and_drops_the_teacher(student, teacher):
    cached = estimate_memory(student, None, batch_size=8, sequence_length=256, precision="bf16", alpha=0.5,
                             loss_path="fused", teacher_cache=True)
    live = estimate_memory(student, teacher, batch_size=8, sequence_length=256, precision="bf16", alpha=0.5,
                           loss_path="fused")
    assert sum(value for name, value in cached.items.items() if name.startswith("teacher")) == 0
    assert cached.items["student logits"] == live.items["student logits"]  # the student's KD buffer is still there
    # A cache beside a loaded teacher (kept for evaluation): its weights count, its logits are never built.
    beside = estimate_memory(student, teacher, batch_size=8, sequence_length=256, precision="bf16", alpha=0.5,
                             loss_path="fused", teacher_cache=True)
    assert beside.items["teacher logits"] == 0 and beside.items["teacher weights"] == live.items["teacher weights"]


@pytest.mark.parametrize("zero_stage, sharded", [
    (None, {"student weights", "student gradients", "AdamW states", "teacher weights"}),  # FSDP: everything
    (1, {"AdamW states"}),
    (2, {"student gradients", "AdamW states"}),
    (3, {"student weights", "student gradients", "AdamW states", "teacher weights"}),
])
def test_sharding_divides_what_each_scheme_shards(student, teacher, zero_stage, sharded):
    whole = estimate_memory(student, teacher, batch_size=8, sequence_length=256, precision="bf16")
    split = estimate_memory(student, teacher, batch_size=8, sequence_length=256, precision="bf16", shard_degree=4,
                            zero_stage=zero_stage)
    for name, value in whole.items.items():
        assert split.items[name] == (value // 4 if name in sharded else value), name


def test_warning_fires_only_above_capacity():
    estimate = estimate_memory(tiny_llama(89), tiny_llama(89, hidden=48), batch_size=4, sequence_length=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_too_large(estimate, estimate.total, "test device")
    with pytest.warns(MemoryEstimateWarning, match="exceeds the test device's"):
        assert warn_if_too_large(estimate, estimate.total - 1, "test device")
    with pytest.warns(MemoryEstimateWarning, match="for 2 processes"):
        warn_if_too_large(estimate, estimate.total * 3 // 2, "test device", processes_sharing=2)


def test_report_prints_and_warns_for_the_run_config(tmp_path, monkeypatch, date_dataset):
    monkeypatch.setattr(me, "device_capacity", lambda use_cpu: (1024, "tiny test device"))
    config = DistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=True,
                                per_device_train_batch_size=4, fused_loss="false", precompute_teacher_logits=True)
    printed = []
    with pytest.warns(MemoryEstimateWarning, match="tiny test device"):
        estimate = report_memory_estimate(tiny_llama(89), tiny_llama(89, hidden=48), config, date_dataset,
                                          print_fn=printed.append)
    longest = max(len(ids) for ids in date_dataset["input_ids"])
    assert estimate.precision == "bf16" and estimate.loss_path == "dense" and estimate.tokens == 4 * longest
    supervised = sum(sum(label != -100 for label in labels[1:]) for labels in date_dataset["labels"])
    assert estimate.items["teacher logit cache"] == supervised * 89 * 4
    assert "total" in printed[0] and "tiny test device" in printed[0] and "bf16 autocast" in printed[0]


def test_sharding_from_the_launch_environment(monkeypatch):
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert launch_sharding() == (1, None)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launch_sharding() == (1, None)  # plain DDP: whole copies
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert launch_sharding() == (4, None)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert launch_sharding() == (4, 3)


def test_longest_sequence(date_dataset):
    from kd_llm.training.memory_estimate import longest_sequence

    expected = max(len(ids) for ids in date_dataset["input_ids"])
    assert longest_sequence(date_dataset) == expected
    assert longest_sequence(date_dataset.remove_columns("length")) == expected


def test_packing_bounds_the_estimate_by_one_row_per_example_of_packing_max_length(tmp_path, student, teacher):
    from kd_llm.training.memory_estimate import estimate_for_run

    common = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=8)
    padded = estimate_for_run(student, teacher, DistillationConfig(**common), sequence_length=256)
    packed = estimate_for_run(student, teacher, DistillationConfig(packing=True, **common), sequence_length=256)
    long_rows = estimate_for_run(student, teacher, DistillationConfig(packing=True, packing_max_length=1024, **common),
                                 sequence_length=256)
    assert packed.tokens == padded.tokens == 8 * 256  # rows never longer than the longest example
    assert long_rows.tokens == 8 * 1024
    assert any("packing: bounded by 8 rows of 1024 tokens" in note for note in long_rows.notes)
