"""Tune temperature, alpha and the divergence with short runs, scored by exact match on the eval split.

The seeds stress that T and alpha decide the outcome of distillation, so ``scripts/sweep.py`` searches them cheaply:
one teacher is loaded and evaluated once, the data is built once, and every trial trains a fresh copy of the same
student (same initialisation, same data order) for ``trial_max_steps`` steps. The result is a table, a plot, and the
best trial written back as a YAML config that ``scripts/distill_llm.py`` launches as it is.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import datasets

from kd_llm.data.sources import build_dataset, evaluation_records, load_records
from kd_llm.distillation_modes import load_teachers, student_factory
from kd_llm.experiment import (DistillationScriptArguments, _evaluate, _train, make_student_factory,
                               teacher_transfer_set)
from kd_llm.losses import DIVERGENCES
from kd_llm.secret_filter import is_secret_key, redact_secrets
from kd_llm.training import DistillationConfig

SWEEP_FILES = {"json": "sweep.json", "table": "sweep.md", "plot": "sweep.png", "best": "best_config.yaml"}
# What a trial changes; everything else comes from the base config.
SEARCHED = ("temperature", "alpha", "distillation_loss")


@dataclass
class SweepArguments:
    """The search space and budget of ``scripts/sweep.py``."""

    temperatures: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0],
                                      metadata={"help": "Temperatures to try (each > 0)."})
    alphas: list[float] = field(default_factory=lambda: [0.2, 0.5, 0.8],
                                metadata={"help": "Hard-label weights to try (each in [0, 1])."})
    losses: list[str] = field(default_factory=lambda: ["forward_kl", "reverse_kl", "jsd"],
                              metadata={"help": f"Divergences to try, among {', '.join(DIVERGENCES)}."})
    search: str = field(default="grid", metadata={"help": "`grid` (every combination) or `random` (num_trials draws "
                                                          "from the grid, without repeats)."})
    num_trials: int | None = field(default=None, metadata={"help": "Random search: trials to run. Grid: an upper "
                                                                    "bound (None = the whole grid)."})
    sweep_seed: int = field(default=0, metadata={"help": "Seed of the random search's draws."})
    trial_max_steps: int = field(default=200, metadata={"help": "Optimizer steps per trial (a short budget)."})
    sweep_dir: str = field(default="outputs/sweep", metadata={"help": "Where the table, plot, JSON and best config "
                                                                      "go."})

    def __post_init__(self):
        if self.search not in ("grid", "random"):
            raise ValueError(f"search must be 'grid' or 'random', got {self.search!r}.")
        for name in ("temperatures", "alphas", "losses"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty: give at least one value to try.")
        if any(t <= 0 for t in self.temperatures):
            raise ValueError(f"Every temperature must be > 0, got {self.temperatures}.")
        if any(not 0 <= a <= 1 for a in self.alphas):
            raise ValueError(f"Every alpha must be in [0, 1], got {self.alphas}.")
        unknown = sorted(set(self.losses) - set(DIVERGENCES))
        if unknown:
            raise ValueError(f"Unknown loss(es) {unknown}; choose among {', '.join(DIVERGENCES)}.")
        if self.num_trials is not None and self.num_trials < 1:
            raise ValueError(f"num_trials must be >= 1, got {self.num_trials}.")
        if self.search == "random" and self.num_trials is None:
            raise ValueError("search=random needs num_trials: how many combinations to draw.")
        if self.trial_max_steps < 1:
            raise ValueError(f"trial_max_steps must be >= 1, got {self.trial_max_steps}.")


def trial_settings(sweep: SweepArguments) -> list[dict]:
    """The trials to run, each a dict over ``SEARCHED``, in a deterministic order."""
    grid = [dict(zip(SEARCHED, combo)) for combo in itertools.product(sweep.temperatures, sweep.alphas, sweep.losses)]
    # alpha = 1 ignores T and the loss: one trial stands for all of them.
    seen, unique = set(), []
    for trial in grid:
        key = ("hard",) if trial["alpha"] == 1 else tuple(trial.values())
        if key not in seen:
            seen.add(key)
            unique.append(trial)
    if sweep.search == "random":
        return random.Random(sweep.sweep_seed).sample(unique, min(sweep.num_trials, len(unique)))
    return unique[: sweep.num_trials] if sweep.num_trials else unique


def best_trial(trials: list[dict], metric: str = "mean_category_exact_match") -> dict:
    """The highest-scoring trial; ties go to the earlier one (the grid order), so the choice is reproducible."""
    return max(trials, key=lambda t: (t[metric], -t["index"]))


def run_sweep(sweep: SweepArguments, args: DistillationScriptArguments, config: DistillationConfig) -> dict:
    """Run every trial and write ``SWEEP_FILES`` into ``sweep.sweep_dir``. Returns the JSON written."""
    if not args.evaluate_skills:
        raise ValueError("A sweep scores trials by exact match on the eval split: leave evaluate_skills on.")
    if args.distillation_mode != "offline" or args.extra_teachers:
        raise ValueError("scripts/sweep.py tunes T, alpha and the loss of offline distillation from one teacher; "
                         f"distillation_mode={args.distillation_mode!r} and extra_teachers are not swept: remove "
                         "them, or run scripts/distill_llm.py.")
    out = Path(sweep.sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = trial_settings(sweep)
    # One teacher (merged with teacher_adapter, as distill_llm.py loads it), one tokenizer and one dataset for every
    # trial.
    teachers = load_teachers(args)
    teacher, tokenizer = teachers.teacher, teachers.tokenizer
    task_options = {"prompt_style": args.prompt_style} if args.dataset == "date_arithmetic" else {}
    train_records = load_records(args.dataset, split="train", size=args.train_size, seed=args.problem_seed,
                                 **task_options)
    train_dataset = build_dataset(train_records, tokenizer, max_length=args.max_length,
                                  use_chat_template=args.use_chat_template, source_name=args.dataset)
    eval_records = evaluation_records(args.dataset, args.eval_dataset, size=args.eval_size, seed=args.problem_seed,
                                      **task_options)
    calibration = tokenizer.batch_decode(train_dataset[: args.calibration_size]["input_ids"],
                                         skip_special_tokens=True) if args.prune_strategy == "importance" else None
    new_student = student_factory(args, teacher, make_student_factory(args, teacher, tokenizer, calibration))
    kd_dataset = train_dataset  # the KD trials also learn from the transfer set, as in distill_llm.py
    if args.transfer_size:
        transfer = teacher_transfer_set(teacher, tokenizer, args, task_options)
        kd_dataset = datasets.concatenate_datasets([train_dataset, transfer.cast(train_dataset.features)])
    teacher_row = _evaluate("teacher", teacher, tokenizer, args, eval_records, {"train_seconds": None})

    trials = []
    for index, values in enumerate(settings):
        trial_config = dataclasses.replace(
            config, **values, final_temperature=values["temperature"], temperature_schedule="constant",
            max_steps=sweep.trial_max_steps, output_dir=str(out / f"trial_{index:03d}"), save_strategy="no",
            report_to="none", push_to_hub=False,
            precompute_teacher_logits=config.precompute_teacher_logits and values["alpha"] < 1,
        )
        started = time.perf_counter()
        distils = values["alpha"] < 1
        trainer, _ = _train(new_student(), teacher if distils else None, tokenizer, trial_config,
                            kd_dataset if distils else train_dataset)
        row = _evaluate(f"trial {index}", trainer.model, tokenizer, args, eval_records, {})
        trials.append({"index": index, **values, "exact_match": row["exact_match"],
                       "mean_category_exact_match": row["mean_category_exact_match"],
                       "per_category": row["per_category"], "seconds": round(time.perf_counter() - started, 1)})
        print(f"trial {index + 1}/{len(settings)}: {values} -> {100 * row['mean_category_exact_match']:.1f}% EM")

    best = best_trial(trials)
    result = {"teacher": args.teacher, "teacher_exact_match": teacher_row["mean_category_exact_match"],
              "trial_max_steps": sweep.trial_max_steps, "eval_size": len(eval_records), "search": sweep.search,
              "transfer_examples": len(kd_dataset) - len(train_dataset),
              "trials": trials, "best": best, "files": {k: str(out / v) for k, v in SWEEP_FILES.items()}}
    (out / SWEEP_FILES["json"]).write_text(json.dumps(redact_secrets(result), indent=2))
    (out / SWEEP_FILES["table"]).write_text(format_sweep_table(result))
    plot_sweep(trials, out / SWEEP_FILES["plot"])
    write_best_config(best, explicit_settings(args, config), out / SWEEP_FILES["best"])
    return result


def format_sweep_table(result: dict) -> str:
    """Markdown: one row per trial, best first."""
    lines = [f"Sweep of {len(result['trials'])} trials, {result['trial_max_steps']} steps each, exact match on "
             f"{result['eval_size']} eval problems (teacher: {100 * result['teacher_exact_match']:.1f}%).", "",
             "| rank | T | alpha | loss | mean EM | seconds |", "|---:|---:|---:|---|---:|---:|"]
    ranked = sorted(result["trials"], key=lambda t: (-t["mean_category_exact_match"], t["index"]))
    for rank, t in enumerate(ranked, 1):
        loss = "(hard labels)" if t["alpha"] == 1 else t["distillation_loss"]
        lines.append(f"| {rank} | {t['temperature']:g} | {t['alpha']:g} | {loss} | "
                     f"{100 * t['mean_category_exact_match']:.1f} | {t['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_sweep(trials: list[dict], path: Path) -> None:
    """Exact match against T, one line per (loss, alpha)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = sorted({(t["distillation_loss"], t["alpha"]) for t in trials if t["alpha"] < 1})
    for loss, alpha in series:
        points = sorted((t["temperature"], 100 * t["mean_category_exact_match"]) for t in trials
                        if t["distillation_loss"] == loss and t["alpha"] == alpha)
        ax.plot(*zip(*points), marker="o", label=f"{loss}, alpha={alpha:g}")
    for t in trials:  # hard labels ignore T: a reference line across the plot
        if t["alpha"] == 1:
            ax.axhline(100 * t["mean_category_exact_match"], color="black", linestyle="--",
                       label="hard labels only (alpha=1)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("temperature T")
    ax.set_ylabel("mean exact match (%)")
    ax.set_title("Distillation sweep: exact match on the eval split")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def explicit_settings(args: DistillationScriptArguments, config: DistillationConfig) -> dict:
    """The options of a run that differ from their defaults, as plain YAML values: the base of ``best_config.yaml``."""
    values = {}
    defaults = (DistillationScriptArguments(), DistillationConfig(output_dir=config.output_dir))
    for given, default in zip((args, config), defaults):
        for f in dataclasses.fields(given):
            if not f.init or f.name.startswith("_") or is_secret_key(f.name):  # never a token in the YAML
                continue
            value, base = getattr(given, f.name), getattr(default, f.name)
            if value != base:
                value = getattr(value, "value", value)  # enums such as lr_scheduler_type
                if isinstance(value, (str, int, float, bool, list)) or value is None:
                    values[f.name] = value
    values["output_dir"] = config.output_dir
    return values


def write_best_config(best: dict, base_values: dict, path: Path) -> None:
    """The base config with the best trial's settings, as a YAML file ``scripts/distill_llm.py`` launches."""
    values = {**base_values, "temperature": best["temperature"], "final_temperature": best["temperature"],
              "temperature_schedule": "constant", "alpha": best["alpha"],
              "distillation_loss": best["distillation_loss"]}
    header = (f"# The best trial of a kd_llm sweep: {100 * best['mean_category_exact_match']:.1f}% mean exact match "
              f"after a short run.\n# Launch:  accelerate launch scripts/distill_llm.py --config {path}\n")
    path.write_text(header + yaml.safe_dump(redact_secrets(values), sort_keys=False))
