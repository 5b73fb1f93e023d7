"""Search temperature, alpha and the divergence with short distillation runs, scored on the eval split.

    python scripts/sweep.py                       # configs/sweep_date.yaml: the date-arithmetic demo's student
    python scripts/sweep.py --config configs/date_demo.yaml --temperatures 1 2 4 --alphas 0.2 0.5 --losses forward_kl \
        --trial_max_steps 100 --sweep_dir outputs/sweep

Writes sweep.json, sweep.md (the table), sweep.png (the plot) and best_config.yaml, which
`accelerate launch scripts/distill_llm.py --config <sweep_dir>/best_config.yaml` runs as it is.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kd_llm.boundary import run_script
from kd_llm.cli import parse_with_config
from kd_llm.experiment import DistillationScriptArguments
from kd_llm.sweep import SweepArguments, run_sweep
from kd_llm.training import DistillationConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sweep_date.yaml"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    sweep, script_args, config = parse_with_config((SweepArguments, DistillationScriptArguments, DistillationConfig),
                                                   argv)
    result = run_sweep(sweep, script_args, config)
    print(open(result["files"]["table"]).read())
    print("Best config: " + result["files"]["best"])
    return result


if __name__ == "__main__":
    run_script(main, "sweep")
