"""PNG plots of a run: every logged loss component, the temperature, and skill per category.

matplotlib runs on the Agg backend (files only, no display); every figure is closed after saving.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Trainer's end-of-training summary (train_loss, train_runtime...) is one averaged point, not a curve.
SUMMARY_KEYS = ("train_runtime", "train_loss")
BAR_COLORS = {"teacher": "#4c72b0", "baseline": "#dd8452", "student": "#55a868", "untrained": "#8c8c8c"}


def loss_components(log_history: list[dict]) -> list[str]:
    """Logged ``*_loss`` keys of the training entries (``ce_loss``, ``kd_loss``, ``total_loss``, and any other
    component such as ``hidden_loss`` or ``attention_loss``), in order of first appearance; ``eval_*`` variants are
    drawn with their training counterpart."""
    names: list[str] = []
    for entry in log_history:
        if any(key in entry for key in SUMMARY_KEYS):
            continue
        for key, value in entry.items():
            name = key.removeprefix("eval_")
            if name.endswith("_loss") and isinstance(value, (int, float)) and name not in names:
                names.append(name)
    return names


def series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the log history, skipping the end-of-training summary."""
    points = [(entry["step"], entry[key]) for entry in log_history
              if key in entry and "step" in entry and not any(k in entry for k in SUMMARY_KEYS)
              and isinstance(entry[key], (int, float)) and math.isfinite(entry[key])]
    return [s for s, _ in points], [v for _, v in points]


def plot_losses(log_history: list[dict], path: str | Path, *, baseline_log_history: list[dict] | None = None,
                title: str = "Distillation training losses") -> Path | None:
    """One panel per loss component (they live on different scales), training as a line, evaluation as dots, and
    the hard-label baseline's cross-entropy dashed in the ``ce_loss`` panel when given (its other terms are not the
    same objective). None when nothing was logged."""
    names = loss_components(log_history)
    if not names:
        return None
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.4 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names):
        steps, values = series(log_history, name)
        if steps:
            axis.plot(steps, values, marker="." if len(steps) < 30 else None, label="distillation run")
        eval_steps, eval_values = series(log_history, f"eval_{name}")
        if eval_steps:
            axis.plot(eval_steps, eval_values, "o", label="eval")
        if baseline_log_history and name == "ce_loss":  # the one term both objectives share
            base_steps, base_values = series(baseline_log_history, name)
            if base_steps:
                axis.plot(base_steps, base_values, "--", color="#dd8452", label="hard-label baseline")
        axis.set_title(name)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(names):]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path)


def plot_temperature(log_history: list[dict], path: str | Path) -> Path | None:
    steps, values = series(log_history, "temperature")
    if not steps:
        return None
    figure, axis = plt.subplots(figsize=(5.5, 3.4))
    axis.plot(steps, values, marker="." if len(steps) < 30 else None)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("temperature T")
    axis.set_title("Distillation temperature")
    low, high = min(values), max(values)
    margin = 0.1 * (high - low) if high > low else 0.5  # a constant T still gets a readable axis
    axis.set_ylim(low - margin, high + margin)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def plot_categories(models: list[dict], path: str | Path, *, roles=("teacher", "baseline", "student")) -> Path | None:
    """Grouped bars of exact match per category (and the mean over categories), one bar per model of ``roles``."""
    shown = [m for m in models if m["role"] in roles and (m.get("skill") or {}).get("per_category")]
    if not shown:
        return None
    names = sorted({c for m in shown for c in m["skill"]["per_category"]})
    groups = [*names, "mean"]
    width = 0.8 / len(shown)
    figure, axis = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) * max(1, len(shown) / 2)), 4.2))
    for index, model in enumerate(shown):
        values = [model["skill"]["per_category"].get(c, float("nan")) for c in names]
        values.append(model["skill"]["mean_category_exact_match"])
        positions = [g + (index - (len(shown) - 1) / 2) * width for g in range(len(groups))]
        color = BAR_COLORS.get(model["role"]) if sum(m["role"] == model["role"] for m in shown) == 1 else None
        bars = axis.bar(positions, [100 * v for v in values], width, label=model["name"], color=color)
        axis.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    axis.set_xticks(range(len(groups)), groups)
    axis.set_ylabel("exact match (%)")
    axis.set_ylim(0, 110)
    axis.set_title("Skill per category")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
