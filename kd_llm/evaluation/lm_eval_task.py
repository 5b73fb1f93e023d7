"""The date-arithmetic skill as a local lm-evaluation-harness task: a YAML config plus the held-out problems as JSONL.

The task is the same evaluation as :func:`kd_llm.evaluation.skills.evaluate_skill`: the eval split of
:mod:`kd_llm.tasks.date_arithmetic` (same size, seed and prompt style give the same problems), greedy generation
(``generate_until``), the answer extracted as :func:`~kd_llm.tasks.date_arithmetic.extract_answer` does (first line,
text after the last ``>``; :data:`ANSWER_REGEX` is that rule as an lm-eval ``regex`` filter) and exact match.

Run it on a distilled checkpoint (``--apply_chat_template`` formats prompts as the student was trained)::

    lm_eval --model hf --model_args pretrained=outputs/date_demo --apply_chat_template \\
        --include_path lm_eval_tasks --tasks kd_date_arithmetic
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from kd_llm.data.sources import load_records

DEFAULT_TASK_NAME = "kd_date_arithmetic"
# Line boundaries of str.splitlines(): the answer lives on the first line of the completion.
_LINE_BREAKS = r"\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
# Leading whitespace, then (greedily) everything up to the last ">" of the first line, then the answer: the rest of
# that line. lm-eval's regex filter keeps group 1 and strips it.
ANSWER_REGEX = rf"^\s*(?:[^{_LINE_BREAKS}]*>)?([^{_LINE_BREAKS}]*)"


def lm_eval_command(pretrained: str, task_dir: str | Path, task_name: str = DEFAULT_TASK_NAME,
                    limit: int | None = None) -> str:
    command = (f"lm_eval --model hf --model_args pretrained={pretrained} --apply_chat_template "
               f"--include_path {task_dir} --tasks {task_name} --batch_size 16")
    return command + (f" --limit {limit}" if limit else "")


def task_config(task_name: str, data_file: Path, *, max_gen_toks: int) -> dict:
    return {
        "task": task_name,
        "dataset_path": "json",
        # lm-eval hands data_files to datasets.load_dataset as they are, relative to the working directory:
        # an absolute path makes the task folder usable from anywhere on this machine.
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": max_gen_toks},
        "filter_list": [{"name": "extract-answer", "filter": [
            {"function": "regex", "regex_pattern": ANSWER_REGEX, "group_select": 0, "fallback": "[invalid]"},
            {"function": "take_first"},
        ]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def export_lm_eval_task(folder: str | Path, *, task_name: str = DEFAULT_TASK_NAME, size: int = 500, seed: int = 0,
                        prompt_style: str = "compact", max_gen_toks: int = 160) -> Path:
    """Write ``<task_name>.yaml`` and ``<task_name>.jsonl`` (prompt, answer, category per line) into ``folder``;
    return the YAML's path. ``size``/``seed``/``prompt_style`` are the run's ``eval_size``/``problem_seed``/
    ``prompt_style``."""
    if not task_name.replace("_", "").isalnum():
        raise ValueError(f"task_name must hold only letters, digits and '_', got {task_name!r}.")
    if max_gen_toks < 1:
        raise ValueError(f"max_gen_toks must be at least 1, got {max_gen_toks}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = load_records("date_arithmetic", split="eval", size=size, seed=seed, prompt_style=prompt_style)
    data_file = folder / f"{task_name}.jsonl"
    data_file.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "answer", "category")}) + "\n"
                                 for r in records))
    config_file = folder / f"{task_name}.yaml"
    header = (f"# lm-evaluation-harness task: kd_llm's date-arithmetic eval split ({size} problems, seed {seed}, "
              f"{prompt_style} prompts).\n# Written by scripts/export_lm_eval_task.py. Run:\n"
              f"#   {lm_eval_command('<student folder>', folder, task_name)}\n")
    config_file.write_text(header + yaml.dump(task_config(task_name, data_file, max_gen_toks=max_gen_toks),
                                              Dumper=_Dumper, sort_keys=False))
    return config_file


class _Dumper(yaml.SafeDumper):
    """Writes strings with line breaks double-quoted ("\\n"), which reads better than YAML's folded form."""


_Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style='"' if "\n" in value else None))
