"""A few KD steps under FSDP2 for benchmarks/gpu_check.py (``accelerate launch --config_file
configs/accelerate/fsdp.yaml --num_processes 1 benchmarks/gpu_fsdp_run.py --output OUT.json``).

Tiny models built from configs, random token data (no ``datasets``), bf16 autocast, packed batches; writes how the run
was distributed, whether student and teacher were sharded, and the logged losses. ``--cpu``: the same run in this
process without FSDP (the dry run: Accelerate runs no FSDP on CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)

    from benchmarks.gpu_check import _ListDataset, random_examples, tiny_models
    from kd_llm import DistillationConfig, DistillationTrainer
    from kd_llm.models.char_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    teacher, student = tiny_models(len(tokenizer), "cpu")
    with tempfile.TemporaryDirectory() as folder:
        config = DistillationConfig(
            output_dir=folder, max_steps=args.steps, per_device_train_batch_size=8, learning_rate=1e-2,
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0, alpha=0.5,
            temperature=2.0, use_cpu=args.cpu, bf16=True, packing=True)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config,
                                      train_dataset=_ListDataset(random_examples(48, len(tokenizer))),
                                      processing_class=tokenizer)
        trainer.train()
    losses = [e["total_loss"] for e in trainer.state.log_history if "total_loss" in e]
    student_type = type(trainer.model_wrapped).__name__
    sharded = any(type(p).__name__ == "DTensor" for p in trainer.model.parameters())  # FSDP2 shards as DTensors
    teacher_sharded = any(type(p).__name__ == "DTensor" for p in trainer.teacher.parameters())
    result = {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "num_processes": trainer.accelerator.num_processes,
        "mixed_precision": trainer.accelerator.mixed_precision,
        "student_wrapper": student_type, "student_sharded": sharded, "teacher_sharded": teacher_sharded,
        "losses": losses, "global_step": trainer.state.global_step,
    }
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    result["ok"] = finite and trainer.state.global_step == args.steps and (args.cpu or (sharded and teacher_sharded))
    if trainer.accelerator.is_main_process:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
