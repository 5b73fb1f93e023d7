"""Place the frozen teacher for the Accelerate backend in use: one process or DDP, FSDP (1 or 2), DeepSpeed ZeRO.

The teacher only runs forward passes, so it is never wrapped for gradient synchronisation:

- one process / DDP: ``accelerator.prepare_model(..., evaluation_mode=True)`` moves it to the device and applies the
  mixed-precision autocast; every process holds a whole copy.
- FSDP: sharded with the accelerator's own FSDP plugin settings (the same layer wrapping, mixed precision and CPU
  offload as the student), so each process holds ``1 / num_processes`` of the teacher and gathers one layer at a
  time during the forward pass. The plugin's auto-wrap policy is restored afterwards: it is derived from the first
  model it sees, and the student (prepared later, by ``Trainer.train``) may have another architecture.
- DeepSpeed: ``deepspeed.initialize(model=teacher, config=...)`` with a copy of the training config stripped of the
  optimizer and scheduler. Under ZeRO-3 the teacher is sharded like the student (stage-3 inference); under ZeRO-1/2
  only optimizer states and gradients would be sharded, which a frozen teacher has none of, so it runs at stage 0
  (a whole copy per process). DeepSpeed is imported only here, when that backend is actually chosen.

This follows how TRL prepares its reference and teacher models (``prepare_deepspeed`` / ``prepare_fsdp``).
"""

from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from typing import Any

from accelerate.utils import DistributedType
from torch import nn

# ZeRO-3 bucket settings that depend on the model width; DeepSpeed cannot resolve "auto" for them itself.
_WIDTH_DEPENDENT = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}
# Training-only sections: a frozen teacher has no optimizer, scheduler or gradients.
_TRAINING_ONLY_KEYS = ("optimizer", "scheduler", "gradient_clipping", "train_batch_size")


def prepare_teacher(accelerator, teacher: nn.Module, *, per_device_batch_size: int = 1) -> nn.Module:
    """Return ``teacher`` (already frozen) placed for ``accelerator``'s backend, in eval mode."""
    distributed_type = accelerator.distributed_type
    if distributed_type == DistributedType.DEEPSPEED:
        return prepare_deepspeed_teacher(accelerator, teacher, per_device_batch_size=per_device_batch_size)
    if distributed_type == DistributedType.FSDP:
        return prepare_fsdp_teacher(accelerator, teacher)
    return accelerator.prepare_model(teacher, evaluation_mode=True).eval()


# ----------------------------------------------------------------------------------------------------- DeepSpeed


def import_deepspeed():
    try:
        import deepspeed
    except ImportError as error:  # the message says what to do instead of a bare ModuleNotFoundError
        raise ImportError(
            "The Accelerate config selects DeepSpeed, but the `deepspeed` package cannot be imported "
            f"({error}). Install it on a machine with a CUDA toolchain (`pip install deepspeed`), or launch with "
            "configs/accelerate/fsdp.yaml (sharded, no extra package) or configs/accelerate/multi_gpu.yaml (DDP)."
        ) from error
    return deepspeed


def deepspeed_teacher_config(train_config: dict, *, hidden_size: int | None, per_device_batch_size: int,
                             mixed_precision: str = "no") -> dict:
    """The DeepSpeed config for the teacher's inference engine, derived from the student's training config.

    ZeRO-3 stays ZeRO-3 (the teacher is sharded across processes); any other stage becomes stage 0. Optimizer,
    scheduler and other training-only keys are dropped. ``"auto"`` values are resolved the way the HF Trainer would
    resolve them for inference, and an ``"auto"`` that only matters for training is dropped. ``train_config`` is not
    modified.
    """
    config = copy.deepcopy(train_config)
    for key in _TRAINING_ONLY_KEYS:
        config.pop(key, None)
    zero = dict(config.get("zero_optimization") or {})
    stage = zero.get("stage", 0)
    if stage == "auto":
        raise ValueError("zero_optimization.stage is 'auto' in the DeepSpeed config: set 0, 1, 2 or 3.")
    if stage == 3:
        for key, value_for in _WIDTH_DEPENDENT.items():
            if zero.get(key, "auto") == "auto":
                if hidden_size is None:
                    zero.pop(key, None)  # DeepSpeed's default; only affects communication bucket sizes
                else:
                    zero[key] = value_for(hidden_size)
        for key in [k for k, v in zero.items() if v == "auto"]:
            zero.pop(key)
        # The teacher keeps no optimizer state: offloading or sharding one is meaningless.
        zero.pop("offload_optimizer", None)
    else:
        zero = {"stage": 0}
    config["zero_optimization"] = zero
    config["train_micro_batch_size_per_gpu"] = per_device_batch_size
    if config.get("gradient_accumulation_steps") == "auto":
        config["gradient_accumulation_steps"] = 1
    for precision, name in (("fp16", "fp16"), ("bf16", "bf16")):
        section = config.get(name)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = mixed_precision == precision
    leftover = _auto_paths(config)
    if leftover:
        raise ValueError(
            f"The DeepSpeed config still has 'auto' at {', '.join(leftover)} for the teacher's engine: give these "
            "values explicitly in the DeepSpeed config file."
        )
    return config


def _auto_paths(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for key, value in node.items() for p in _auto_paths(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    sizes = getattr(config, "hidden_sizes", None)
    if sizes:
        return max(sizes)
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config() if callable(get_text_config) else config
    return getattr(text_config, "hidden_size", None)


def prepare_deepspeed_teacher(accelerator, teacher: nn.Module, *, per_device_batch_size: int = 1) -> nn.Module:
    deepspeed = import_deepspeed()
    plugin = accelerator.state.deepspeed_plugin
    config = deepspeed_teacher_config(plugin.deepspeed_config, hidden_size=_hidden_size(teacher),
                                      per_device_batch_size=per_device_batch_size,
                                      mixed_precision=str(accelerator.mixed_precision))
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


# ---------------------------------------------------------------------------------------------------------- FSDP


@contextmanager
def _restoring_wrap_policy(plugin):
    """Accelerate fixes the plugin's auto-wrap policy from the first model it wraps; keep it for the student."""
    saved = (plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap)
    try:
        yield
    finally:
        plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap = saved


def prepare_fsdp_teacher(accelerator, teacher: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(teacher, (FSDP, FSDPModule)):
        return teacher.eval()
    plugin = accelerator.state.fsdp_plugin
    with _restoring_wrap_policy(plugin):
        if plugin.fsdp_version == 2:
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            # Frozen parameters keep their dtype here (only trainable ones are upcast to fp32 master weights).
            teacher = fsdp2_prepare_model(accelerator, teacher)
            # Accelerate keeps the root and the [final norm, lm_head] group gathered after the forward pass, for
            # the backward pass that starts there. The teacher has no backward pass: without this the gathered
            # lm_head (vocab x hidden, the largest matrix of most LLMs) would stay whole on every process.
            teacher.set_reshard_after_forward(True, recurse=True)
        elif plugin.fsdp_version == 1:
            plugin.set_auto_wrap_policy(teacher)
            ignored = plugin.ignored_modules
            if isinstance(ignored, str):  # a regex over module names, as Accelerate accepts it
                pattern = re.compile(ignored)
                ignored = [module for name, module in teacher.named_modules() if pattern.fullmatch(name)]
            teacher = FSDP(
                teacher,
                sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
                cpu_offload=plugin.cpu_offload,
                auto_wrap_policy=plugin.auto_wrap_policy,
                mixed_precision=plugin.mixed_precision_policy,
                sync_module_states=plugin.sync_module_states,
                backward_prefetch=None,  # no backward pass through the teacher
                forward_prefetch=plugin.forward_prefetch,
                use_orig_params=plugin.use_orig_params,
                param_init_fn=plugin.param_init_fn,
                ignored_modules=ignored,
                limit_all_gathers=plugin.limit_all_gathers,
                device_id=accelerator.device,
            )
        else:
            raise ValueError(f"FSDP version {plugin.fsdp_version} is not supported: use fsdp_version 1 or 2.")
    return teacher.eval()
