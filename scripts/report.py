"""Write a distillation report for checkpoints on disk: teacher, student folder(s) and an optional hard-label baseline,
all scored on the same held-out problems and measured (size, latency, tokens/s, peak memory) on the same machine.

    python scripts/report.py --teacher embedded:date-teacher --student outputs/date_demo \\
        --baseline outputs/date_demo/hard_label_baseline
    python scripts/report.py --teacher embedded:date-teacher --student outputs/run_a outputs/run_b --output_dir cmp

Writes report.md, report.json and plots/ to --output_dir (default: the first student's folder) and, unless
--no_card, the first student's model card (README.md). When the first student's folder holds the results.json of
its distillation run, the evaluation settings default to that run's, and the recipe, the training curves and the
teacher check come from it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kd_llm.boundary import run_script
from kd_llm.cli import ScriptParser, positive_int
from kd_llm.data.sources import evaluation_records
from kd_llm.errors import MissingPathError
from kd_llm.report.artifacts import RESULTS_JSON
from kd_llm.report.measure import BenchmarkSettings
from kd_llm.report.run import report_on_checkpoints

# Evaluation settings: command line, else the first student's run (results.json), else these.
DEFAULTS = {"dataset": "date_arithmetic", "eval_dataset": None, "eval_size": 500, "problem_seed": 0, "prompt_style": "compact",
            "max_new_tokens": 160, "generation_batch_size": 100, "use_chat_template": True}


def parse_args(argv=None) -> argparse.Namespace:
    parser = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="Teacher model spec (folder, Hub id, .gguf, packaged:, "
                                                         "embedded:).")
    parser.add_argument("--student", required=True, nargs="+", help="Student folder(s); the first gets the card.")
    parser.add_argument("--baseline", default=None, help="Hard-label baseline folder (optional).")
    parser.add_argument("--output_dir", default=None, help="Where to write the report (default: first student).")
    parser.add_argument("--dataset", default=None, help="Skill / eval data (default: the run's, else "
                                                        "date_arithmetic).")
    parser.add_argument("--eval_dataset", default=None, help="Held-out records (JSONL / dataset folder) instead of "
                                                             "the eval split of --dataset (default: the run's).")
    parser.add_argument("--eval_size", type=positive_int, default=None, help="Held-out problems to score.")
    parser.add_argument("--problem_seed", type=int, default=None, help="Seed of the problem generator.")
    parser.add_argument("--prompt_style", default=None, help="date_arithmetic prompts: compact or verbose.")
    parser.add_argument("--max_new_tokens", type=positive_int, default=None, help="Generation budget per answer.")
    parser.add_argument("--generation_batch_size", type=positive_int, default=None, help="Prompts generated together.")
    parser.add_argument("--no_chat_template", action="store_true", default=None,
                        help="Give raw prompts, without the chat template.")
    parser.add_argument("--benchmark_batch_size", type=positive_int, default=16, help="The larger batch of the speed test.")
    parser.add_argument("--benchmark_new_tokens", type=positive_int, default=32, help="Tokens generated per timed prompt.")
    parser.add_argument("--repeats", type=positive_int, default=5, help="Timed runs per batch size (median reported).")
    parser.add_argument("--no_memory", action="store_true", help="Skip the peak-memory measurement.")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available).")
    parser.add_argument("--no_card", action="store_true", help="Do not write the model card (README.md).")
    parser.add_argument("--model_id", default=None, help="Hub repo id used in the card's quick-start snippet.")
    parser.add_argument("--license", default=None, help="Card license (default: the teacher's when known).")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow custom modelling code.")
    return parser.parse_args(argv)


def evaluation_settings(args: argparse.Namespace) -> dict:
    """Each setting from the command line, else from the first student's run, else :data:`DEFAULTS`."""
    results_file = Path(args.student[0]) / RESULTS_JSON
    run = {}
    if results_file.is_file():
        run = json.loads(results_file.read_text()).get("script_arguments") or {}
    given = {"dataset": args.dataset, "eval_dataset": args.eval_dataset, "eval_size": args.eval_size, "problem_seed": args.problem_seed,
             "prompt_style": args.prompt_style, "max_new_tokens": args.max_new_tokens,
             "generation_batch_size": args.generation_batch_size,
             "use_chat_template": None if args.no_chat_template is None else not args.no_chat_template}
    return {key: given[key] if given[key] is not None else run.get(key, DEFAULTS[key]) for key in DEFAULTS}


def main(argv=None) -> dict:
    args = parse_args(argv)
    for folder in [*args.student, *([args.baseline] if args.baseline else [])]:
        if not Path(folder).is_dir():
            raise MissingPathError(f"{folder} is not a folder; --student and --baseline take model folders saved "
                                    "by a run (config.json + model.safetensors).")
    settings = evaluation_settings(args)
    task_options = {"prompt_style": settings["prompt_style"]} if settings["dataset"] == "date_arithmetic" else {}
    records = evaluation_records(settings["dataset"], settings["eval_dataset"], size=settings["eval_size"],
                                 seed=settings["problem_seed"], **task_options)
    outcome = report_on_checkpoints(
        teacher=args.teacher, students=args.student, baseline=args.baseline,
        output_dir=args.output_dir or args.student[0], task=settings["dataset"], eval_records=records,
        max_new_tokens=settings["max_new_tokens"], batch_size=settings["generation_batch_size"],
        use_chat_template=settings["use_chat_template"],
        settings=BenchmarkSettings(batch_size=args.benchmark_batch_size, new_tokens=args.benchmark_new_tokens,
                                   repeats=args.repeats, measure_memory=not args.no_memory),
        device=args.device, trust_remote_code=args.trust_remote_code, write_card=not args.no_card,
        model_id=args.model_id, license=args.license)
    transfer = outcome["comparison"]["negative_transfer"]
    if transfer is not None:
        print(("WARNING: " if transfer["negative_transfer"] else "") + transfer["verdict"])
    print("Wrote " + ", ".join(outcome["files"]))
    return outcome


if __name__ == "__main__":
    run_script(main, "report")
