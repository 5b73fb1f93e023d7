"""Teacher placement per Accelerate backend: the DeepSpeed inference config, the DeepSpeed and single-process paths.

FSDP and DeepSpeed sharding across real processes are in tests/test_distributed.py.
"""

import sys
import types
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DeepSpeedPlugin, DistributedType

from kd_llm.models.loading import freeze_teacher
from kd_llm.training.teacher_placement import deepspeed_teacher_config, prepare_teacher
from tests.conftest import CHAR_VOCAB, tiny_llama

ZERO3_YAML = "configs/accelerate/deepspeed_zero3.yaml"
PLUGIN_FIELDS = ("zero_stage", "gradient_accumulation_steps", "gradient_clipping", "offload_optimizer_device",
                 "offload_param_device", "zero3_init_flag", "zero3_save_16bit_model")


def plugin_config_from_yaml(path: str) -> dict:
    """The DeepSpeed config Accelerate builds from one of our accelerate YAML files (no deepspeed needed)."""
    values = load_config_from_file(path).deepspeed_config
    return DeepSpeedPlugin(**{k: v for k, v in values.items() if k in PLUGIN_FIELDS}).deepspeed_config


def test_zero3_training_config_becomes_a_sharded_inference_config():
    train = plugin_config_from_yaml(ZERO3_YAML)
    train["optimizer"] = {"type": "AdamW", "params": {"lr": "auto"}}
    train["scheduler"] = {"type": "WarmupLR"}
    train["bf16"] = {"enabled": "auto"}
    train["zero_optimization"]["reduce_bucket_size"] = "auto"
    snapshot = repr(train)
    config = deepspeed_teacher_config(train, hidden_size=64, per_device_batch_size=4, mixed_precision="bf16")

    assert repr(train) == snapshot  # the student's config is left alone
    zero = config["zero_optimization"]
    assert zero["stage"] == 3  # the teacher is sharded like the student
    assert zero["reduce_bucket_size"] == 64 * 64
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert zero["stage3_param_persistence_threshold"] == 640
    assert "offload_optimizer" not in zero and zero["offload_param"] == train["zero_optimization"]["offload_param"]
    for key in ("optimizer", "scheduler", "gradient_clipping", "train_batch_size"):
        assert key not in config
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["bf16"] == {"enabled": True}
    assert "auto" not in repr(config)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_lower_zero_stages_give_a_whole_teacher_per_process(stage):
    train = {"zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}},
             "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "fp16": {"enabled": "auto"}}
    config = deepspeed_teacher_config(train, hidden_size=64, per_device_batch_size=2, mixed_precision="fp16")
    assert config["zero_optimization"] == {"stage": 0}
    assert config["fp16"] == {"enabled": True} and config["gradient_accumulation_steps"] == 1


def test_unresolvable_auto_is_named():
    train = {"zero_optimization": {"stage": 3}, "communication_data_type": "auto"}
    with pytest.raises(ValueError, match="communication_data_type"):
        deepspeed_teacher_config(train, hidden_size=8, per_device_batch_size=1)
    with pytest.raises(ValueError, match="stage is 'auto'"):
        deepspeed_teacher_config({"zero_optimization": {"stage": "auto"}}, hidden_size=8, per_device_batch_size=1)


def deepspeed_accelerator(config: dict):
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, mixed_precision="no",
                           state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))


def test_missing_deepspeed_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import fails, as on a machine without it
    teacher = freeze_teacher(tiny_llama(CHAR_VOCAB, seed=1))
    with pytest.raises(ImportError, match="pip install deepspeed.*fsdp.yaml"):
        prepare_teacher(deepspeed_accelerator(plugin_config_from_yaml(ZERO3_YAML)), teacher)


def test_deepspeed_path_initializes_an_inference_engine_in_eval_mode(monkeypatch):
    calls = []

    class FakeEngine(torch.nn.Module):  # like DeepSpeedEngine: eval() switches the wrapped module
        def __init__(self, module):
            super().__init__()
            self.module = module

    def initialize(*, model, config):
        calls.append(config)
        model.train()  # the engine must come back in eval mode whatever initialize did
        return FakeEngine(model), None, None, None

    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(initialize=initialize))
    teacher = freeze_teacher(tiny_llama(CHAR_VOCAB, hidden=48, seed=1))
    engine = prepare_teacher(deepspeed_accelerator(plugin_config_from_yaml(ZERO3_YAML)), teacher,
                             per_device_batch_size=8)
    assert len(calls) == 1 and calls[0]["zero_optimization"]["stage"] == 3
    assert calls[0]["train_micro_batch_size_per_gpu"] == 8
    assert calls[0]["zero_optimization"]["stage3_param_persistence_threshold"] == 480  # 10 x hidden 48
    assert engine.module is teacher and not teacher.training


def test_single_process_teacher_is_placed_not_wrapped():
    accelerator = Accelerator(cpu=True)
    teacher = freeze_teacher(tiny_llama(CHAR_VOCAB, seed=1))
    placed = prepare_teacher(accelerator, teacher)
    assert placed is teacher and not placed.training  # no DDP wrapper around a frozen model
    assert all(p.device == accelerator.device and not p.requires_grad for p in placed.parameters())
