"""Shard a saved tiny teacher as a DeepSpeed ZeRO-3 inference engine with kd_llm's teacher placement, on CPU
processes, for tests/test_distributed.py (skipped where ``deepspeed`` is not installed), and compare its logits with
the unsharded teacher's.

    accelerate launch --multi_gpu --num_processes 2 tests/support/deepspeed_teacher_run.py --models DIR --output DIR

This drives ``prepare_deepspeed_teacher`` directly, with the accelerator's DeepSpeed config given by hand: on CPU,
Accelerate and the HF Trainer count one process under DeepSpeed, so the whole trainer cannot run here. Every process
writes ``rank<i>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from kd_llm.models.loading import freeze_teacher  # noqa: E402
from kd_llm.training.teacher_placement import import_deepspeed, prepare_deepspeed_teacher  # noqa: E402

# The training config as Accelerate's DeepSpeed plugin would hold it for configs/accelerate/deepspeed_zero3.yaml.
TRAIN_CONFIG = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"},
                                                    "offload_param": {"device": "none"},
                                                    "stage3_gather_16bit_weights_on_model_save": True},
    "bf16": {"enabled": False}, "fp16": {"enabled": False},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    deepspeed = import_deepspeed()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    reference = freeze_teacher(LlamaForCausalLM.from_pretrained(args.models / "teacher", use_safetensors=True))
    torch.manual_seed(0)
    input_ids = torch.randint(3, reference.config.vocab_size, (3, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=TRAIN_CONFIG)),
                                  mixed_precision="no")
    teacher = freeze_teacher(LlamaForCausalLM.from_pretrained(args.models / "teacher", use_safetensors=True))
    engine = prepare_deepspeed_teacher(accelerator, teacher, per_device_batch_size=3)
    with torch.no_grad():
        logits = engine(input_ids=input_ids, attention_mask=attention_mask).logits
    parameters = list(engine.module.parameters())
    results = {
        "world_size": world,
        "local_rank": os.environ.get("LOCAL_RANK"),
        "zero_stage": engine.zero_optimization_stage(),
        "max_abs_diff": (logits.float() - expected).abs().max().item(),
        "local_numel": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in parameters),
        "total_numel": sum(p.numel() for p in reference.parameters()),
        "training": engine.module.training,  # DeepSpeedEngine.eval() switches the wrapped module only
        "requires_grad": any(p.requires_grad for p in parameters),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"rank{rank}.json").write_text(json.dumps(results, indent=2))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
