"""Shard a saved tiny teacher with kd_llm's FSDP teacher placement on CPU processes (gloo), for
tests/test_distributed.py, and compare its logits with the unsharded teacher's.

    accelerate launch --multi_gpu --num_processes 2 tests/support/fsdp_teacher_run.py --models DIR --output DIR

Accelerate 1.15 turns an FSDP config into plain DDP when the processes run on CPU (its FSDP mode needs GPUs), so the
whole trainer cannot be run under FSDP here; this drives ``prepare_fsdp_teacher`` directly, with the accelerator's
FSDP plugin built by hand, for FSDP versions 1 and 2. Every process writes ``rank<i>.json``.
tests/support/distributed_kd_run.py also calls :func:`check_fsdp_teacher` (``--fsdp_teacher_check DIR``): one launch, two checks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from accelerate.utils import FullyShardedDataParallelPlugin  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from kd_llm.models.loading import freeze_teacher  # noqa: E402
from kd_llm.training.teacher_placement import prepare_fsdp_teacher  # noqa: E402


def local_numel(parameter: torch.Tensor) -> int:
    """Elements this process stores: a DTensor's (FSDP2) local shard, or a FlatParameter's (FSDP1) shard."""
    return parameter.to_local().numel() if hasattr(parameter, "to_local") else parameter.numel()


def check_fsdp_teacher(models: Path, output: Path) -> None:
    """Shard the teacher with FSDP 1 and 2 over the initialised process group; write this process's findings."""
    state = PartialState(cpu=True)
    reference = freeze_teacher(LlamaForCausalLM.from_pretrained(models / "teacher", use_safetensors=True))
    total = sum(p.numel() for p in reference.parameters())
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, reference.config.vocab_size, (3, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0  # a left-padded row
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    results = {"num_processes": state.num_processes, "distributed_type": str(state.distributed_type)}
    for version in (1, 2):
        plugin = FullyShardedDataParallelPlugin(fsdp_version=version, auto_wrap_policy="transformer_based_wrap")
        policy_before = plugin.auto_wrap_policy
        accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), device=torch.device("cpu"),
                                      mixed_precision="no", is_main_process=state.is_main_process)
        teacher = freeze_teacher(LlamaForCausalLM.from_pretrained(models / "teacher", use_safetensors=True))
        sharded = prepare_fsdp_teacher(accelerator, teacher)
        with torch.no_grad():
            logits = sharded(input_ids=input_ids, attention_mask=attention_mask).logits
        results[f"fsdp{version}"] = {
            "wrapper": type(sharded).__name__,
            "max_abs_diff": (logits - expected).abs().max().item(),
            # after the forward pass: the teacher must not stay gathered
            "local_numel": sum(local_numel(p) for p in sharded.parameters()),
            "total_numel": total,
            "training": sharded.training,
            "requires_grad": any(p.requires_grad for p in sharded.parameters()),
            "policy_restored": plugin.auto_wrap_policy is policy_before,
        }
    output.mkdir(parents=True, exist_ok=True)
    (output / f"rank{state.process_index}.json").write_text(json.dumps(results, indent=2))
    state.wait_for_everyone()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    check_fsdp_teacher(args.models, args.output)


if __name__ == "__main__":
    main()
