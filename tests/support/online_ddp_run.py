"""A few online (mutual) distillation steps on tiny saved models, for tests/test_online.py to run under
``accelerate launch`` with 2 CPU processes:

    accelerate launch --config_file configs/accelerate/multi_gpu.yaml tests/support/online_ddp_run.py \
        --models DIR --output DIR --per_device_train_batch_size 4

``--models`` holds ``teacher/`` and ``student/``. The main process writes ``student.safetensors`` and
``teacher.safetensors`` (both trained) and ``run.json``. Also importable: :func:`run` trains in the calling process.
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

from kd_llm import DistillationConfig  # noqa: E402
from kd_llm.data.sources import build_dataset, load_records  # noqa: E402
from kd_llm.models.char_tokenizer import build_char_tokenizer  # noqa: E402
from kd_llm.training.online import MutualDistillationTrainer  # noqa: E402


def run(models: Path, output: Path, *, per_device_train_batch_size: int, max_steps: int = 3):
    tokenizer = build_char_tokenizer()
    dataset = build_dataset(load_records("date_arithmetic", size=48, seed=1), tokenizer)
    config = DistillationConfig(
        output_dir=str(output / "trainer"), max_steps=max_steps, per_device_train_batch_size=per_device_train_batch_size,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        seed=0, alpha=0.5, temperature=2.0,
    )
    trainer = MutualDistillationTrainer(
        model=LlamaForCausalLM.from_pretrained(models / "student", use_safetensors=True),
        teacher_model=LlamaForCausalLM.from_pretrained(models / "teacher", use_safetensors=True),
        args=config, teacher_learning_rate=3e-3, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    if trainer.accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        for name, model in (("student", trainer.model), ("teacher", trainer.teacher_unwrapped)):
            save_file({k: t.detach().float().cpu().contiguous() for k, t in model.state_dict().items()},
                      str(output / f"{name}.safetensors"))
        info = {"num_processes": trainer.accelerator.num_processes,
                "teacher_wrapper": type(trainer.teacher).__name__,
                "losses": [e["loss"] for e in trainer.state.log_history if "teacher_total_loss" in e]}
        (output / "run.json").write_text(json.dumps(info, indent=2))
    trainer.accelerator.wait_for_everyone()
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--per_device_train_batch_size", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.models, args.output, per_device_train_batch_size=args.per_device_train_batch_size)


if __name__ == "__main__":
    main()
