"""Mixed precision through Accelerate: refuse a setting that Accelerate would silently run in float32.

``bf16`` / ``fp16`` in the config make Accelerate run both models' forward passes under autocast (matmuls in 16 bits,
weights and optimizer states in float32) and hand their outputs back as float32; kd_llm's losses then upcast again,
so every loss term is computed in float32 whatever the precision. On CPU, Accelerate 1.x has bf16 autocast but no
fp16 autocast: with ``fp16=True`` on CPU it quietly trains in float32, so a run would not measure what it claims.
"""

from __future__ import annotations

from accelerate.utils import DistributedType

# These backends cast the model themselves (DeepSpeed's bf16/fp16 sections), without Accelerate's autocast.
_SELF_CASTING_BACKENDS = (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


def check_mixed_precision(accelerator) -> None:
    """Raise if ``accelerator`` was asked for bf16/fp16 but will not apply it."""
    requested = str(accelerator.mixed_precision)
    if requested not in ("fp16", "bf16") or accelerator.distributed_type in _SELF_CASTING_BACKENDS:
        return
    if not accelerator.native_amp:
        device = accelerator.device.type
        hint = ("use bf16=True (CPU has bf16 autocast) or run on a GPU" if requested == "fp16" and device == "cpu"
                else "use a device that supports it, or no mixed precision")
        raise ValueError(
            f"{requested} mixed precision was requested, but Accelerate would run it in float32 on {device} (no "
            f"{requested} autocast there), so the run would not be what its config says: {hint}."
        )
