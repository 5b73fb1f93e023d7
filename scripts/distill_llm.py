"""Distil a teacher into a small causal LM, with a hard-label baseline and a skill evaluation.

    accelerate launch scripts/distill_llm.py                                   # the embedded date-arithmetic demo
    accelerate launch scripts/distill_llm.py --config configs/date_demo.yaml --temperature 4   # YAML + overrides

Every option of DistillationScriptArguments and DistillationConfig (TrainingArguments) can be set in the YAML file
or on the command line; the command line wins.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kd_llm.boundary import run_script
from kd_llm.cli import parse_with_config
from kd_llm.experiment import DistillationScriptArguments, format_table, run_distillation
from kd_llm.training import DistillationConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "date_demo.yaml"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    script_args, config = parse_with_config((DistillationScriptArguments, DistillationConfig), argv)
    results = run_distillation(script_args, config)
    print()
    print(format_table(results))
    print(f"\nSaved the distilled student, its tokenizer and results.json to {config.output_dir}")
    report = results.get("report")
    if report:
        transfer = report["comparison"].get("negative_transfer")
        if transfer is not None:
            print(("WARNING: " if transfer["negative_transfer"] else "") + transfer["verdict"])
        print("Report and model card: " + ", ".join(report["files"]))
    return results


if __name__ == "__main__":
    run_script(main, "distill_llm")  # kd_llm's errors as one line: `distill_llm: <message>` (--debug: traceback)
