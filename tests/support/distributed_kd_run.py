"""A few distillation steps on tiny saved models, for tests/test_distributed.py to run under ``accelerate launch``.

    accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes 2 \
        tests/support/distributed_kd_run.py --models DIR --output DIR --per_device_train_batch_size 4

``--models`` holds ``teacher/`` and ``student/`` (saved by the test with ``save_pretrained``, so every process and
every run start from the same weights). The main process writes ``student.safetensors`` (the trained student's
parameters, gathered whole under FSDP) and ``run.json`` (how the run was distributed, and its logged losses).
Also importable: :func:`run` trains in the calling process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script by accelerate launch: make `kd_llm` importable from the checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from kd_llm import DistillationConfig, DistillationTrainer  # noqa: E402
from kd_llm.data.sources import build_dataset, load_records  # noqa: E402
from kd_llm.models.char_tokenizer import build_char_tokenizer  # noqa: E402

DATASET_SIZE = 48


def run(models: Path, output: Path, *, per_device_train_batch_size: int, max_steps: int = 3, seed: int = 0,
        use_cpu: bool = True, **overrides) -> DistillationTrainer:
    tokenizer = build_char_tokenizer()
    dataset = build_dataset(load_records("date_arithmetic", size=DATASET_SIZE, seed=1), tokenizer)
    teacher = LlamaForCausalLM.from_pretrained(models / "teacher", use_safetensors=True)
    student = LlamaForCausalLM.from_pretrained(models / "student", use_safetensors=True)
    config = DistillationConfig(
        output_dir=str(output / "trainer"), max_steps=max_steps, per_device_train_batch_size=per_device_train_batch_size,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=use_cpu,
        disable_tqdm=True, seed=seed, alpha=0.5, temperature=2.0, **overrides,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                  processing_class=tokenizer)
    trainer.train()
    state = trainer.accelerator.get_state_dict(trainer.model)  # whole tensors, also under FSDP / ZeRO-3
    if trainer.accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        save_file({name: t.detach().float().cpu().contiguous() for name, t in state.items()},
                  str(output / "student.safetensors"))
        info = {
            "num_processes": trainer.accelerator.num_processes,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "teacher_type": type(trainer.teacher).__name__,
            "target": trainer.target.name,
            "mixed_precision": trainer.accelerator.mixed_precision,
            "losses": [entry["total_loss"] for entry in trainer.state.log_history if "total_loss" in entry],
            "global_step": trainer.state.global_step,
        }
        (output / "run.json").write_text(json.dumps(info, indent=2))
    trainer.accelerator.wait_for_everyone()
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--per_device_train_batch_size", type=int, required=True)
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--packed_output", type=Path, default=None,
                        help="Afterwards, also train the same run with packing=True (fused loss), writing here.")
    parser.add_argument("--hidden_cache", type=Path, default=None,
                        help="A hidden-state teacher cache of the teacher over the run's data, for --cached_output.")
    parser.add_argument("--cached_output", type=Path, default=None,
                        help="Afterwards, also train packed from --hidden_cache (fused loss), writing here.")
    parser.add_argument("--fsdp_teacher_check", type=Path, default=None,
                        help="Afterwards, also run tests/support/fsdp_teacher_run.py's check, writing to this folder.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.models, args.output, per_device_train_batch_size=args.per_device_train_batch_size,
        max_steps=args.max_steps)
    if args.packed_output is not None:
        run(args.models, args.packed_output, per_device_train_batch_size=args.per_device_train_batch_size,
            max_steps=args.max_steps, packing=True, fused_loss="true")
    if args.cached_output is not None:
        run(args.models, args.cached_output, per_device_train_batch_size=args.per_device_train_batch_size,
            max_steps=args.max_steps, packing=True, fused_loss="true", teacher_cache=str(args.hidden_cache),
            teacher_cache_format="hidden_states")
    if args.fsdp_teacher_check is not None:  # one launch for two checks: process start-up dominates their time
        from tests.support.fsdp_teacher_run import check_fsdp_teacher

        check_fsdp_teacher(args.models, args.fsdp_teacher_check)


if __name__ == "__main__":
    main()
