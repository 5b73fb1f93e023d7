"""Export kd_llm's date-arithmetic evaluation as a local lm-evaluation-harness task (YAML + JSONL).

    python scripts/export_lm_eval_task.py --output_dir lm_eval_tasks
    lm_eval --model hf --model_args pretrained=outputs/date_demo --apply_chat_template \
        --include_path lm_eval_tasks --tasks kd_date_arithmetic

Use the run's --eval_size, --problem_seed and --prompt_style to score the same problems as its results.json
(the defaults are those of configs/date_demo.yaml).
"""

from __future__ import annotations

from pathlib import Path

from kd_llm.boundary import run_script
from kd_llm.cli import ScriptParser, positive_int
from kd_llm.evaluation.lm_eval_task import DEFAULT_TASK_NAME, export_lm_eval_task, lm_eval_command
from kd_llm.tasks.date_arithmetic import PROMPT_STYLES


def main(argv: list[str] | None = None) -> Path:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="Folder to write <task_name>.yaml and .jsonl into.")
    parser.add_argument("--task_name", default=DEFAULT_TASK_NAME, help="lm-eval task name.")
    parser.add_argument("--size", type=positive_int, default=500, help="Held-out problems (the run's eval_size).")
    parser.add_argument("--seed", type=int, default=0, help="Problem seed (the run's problem_seed).")
    parser.add_argument("--prompt_style", default="compact", choices=PROMPT_STYLES,
                        help="compact (embedded teacher) or verbose (chat LLMs), as the run's prompt_style.")
    parser.add_argument("--max_gen_toks", type=positive_int, default=160, help="Generation budget (the run's max_new_tokens).")
    args = parser.parse_args(argv)
    config = export_lm_eval_task(args.output_dir, task_name=args.task_name, size=args.size, seed=args.seed,
                                 prompt_style=args.prompt_style, max_gen_toks=args.max_gen_toks)
    print(f"Wrote {config} and {config.with_suffix('.jsonl')}. Evaluate a student with:\n"
          f"  {lm_eval_command('<student folder>', args.output_dir, args.task_name)}")
    return config


if __name__ == "__main__":
    run_script(main, "export_lm_eval_task")
