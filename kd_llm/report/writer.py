"""Write a report to a folder: ``report.json``, ``report.md`` and the PNG plots (names in :mod:`.artifacts`)."""

from __future__ import annotations

import json
from pathlib import Path

from kd_llm.report import artifacts
from kd_llm.report.build import bpb_table, comparison_lines, cost_table, format_ratio, lookup, skill_table
from kd_llm.report.recipe import recipe_lines
from kd_llm.secret_filter import redact_secrets


def _fraction_sentence(comparison: dict) -> str:
    fraction = comparison["recovered_fraction"]
    if fraction is None:
        return ""
    return f" It recovers {100 * fraction:.0f}% of the teacher's lead over the hard-label baseline."


def summary(report: dict) -> str:
    """Two or three sentences: how much smaller and faster the first student is, what it recovers, and negative
    transfer when there is any (said first)."""
    comparison = report["comparisons"][0]
    batch = report["benchmark"]["batch_size"]
    ratios = comparison["ratios"]
    size = comparison["teacher_student_size_ratio"]
    speed_1, speed_b = ratios["tokens_per_second_batch_1"], ratios[f"tokens_per_second_batch_{batch}"]
    text = (f"The teacher is {format_ratio(size)} the size of the student ({comparison['student']}) in parameters; "
            f"the student generates {format_ratio(speed_1)} the teacher's tokens per second at batch 1 and "
            f"{format_ratio(speed_b)} at batch {batch}." + _fraction_sentence(comparison))
    transfer = comparison["negative_transfer"]
    if transfer is not None and transfer["negative_transfer"]:
        text = f"**{transfer['verdict']}** " + text
    return text


def measurement_notes(report: dict) -> list[str]:
    env, bench = report["environment"], report["benchmark"]
    methods = sorted({lookup(e, "memory", "method") for e in report["models"] if lookup(e, "memory", "method")})
    notes = [
        f"- Machine: {env['device']} ({env['device_name']}), {env['torch_threads']} torch thread(s), "
        f"torch {env['framework_versions'].get('torch', '?')}, transformers "
        f"{env['framework_versions'].get('transformers', '?')}; every model measured here, one after the other.",
        f"- Skill: greedy generation on {report['eval'].get('count', '?')} held-out problems of "
        f"`{report['eval'].get('task', '?')}`, exact match of the extracted answer, per category and averaged over "
        "categories (`mean`); `overall` weighs every problem equally.",
        f"- Speed: greedy decoding of exactly {bench['new_tokens']} new tokens per prompt (EOS suppressed, so early "
        f"stops do not count as speed), median of {bench['repeats']} timed runs after one warm-up, at batch 1 and at "
        f"batch {bench['batch_size']}; latency is the wall time of one `generate` call.",
        "- Size on disk: bytes of the safetensors weight files (" +
        ", ".join(sorted({lookup(e, 'size_on_disk', 'how') for e in report['models'] if 'size_on_disk' in e})) + ").",
    ]
    if methods:
        notes.append(f"- Peak memory during inference (batch {bench['batch_size']}): " + "; ".join(methods) + ". On "
                     "CPU this includes the allocator's and the loader's own overhead, which dominates for "
                     "models of a few MB.")
    else:
        notes.append("- Peak memory: not measured (measure_memory off).")
    return notes


def teacher_check_lines(check: dict | None) -> list[str]:
    if not check:
        return ["Teacher check: not run."]
    if not check["ran"]:
        return [f"Teacher check: not run ({check.get('reason', 'no skill evaluation')})."]
    line = (f"Teacher check before training: teacher {100 * check['teacher_score']:.1f}% mean exact match, untrained "
            f"student {100 * check['untrained_student_score']:.1f}%, minimum {100 * check['min_teacher_accuracy']:.1f}%"
            f": {'passed' if check['passed'] else 'FAILED'}")
    if check["forced"]:
        line += " — training went ahead because --force was given (" + "; ".join(check["problems"]) + ")"
    return [line + "."]


def render_markdown(report: dict) -> str:
    plots = report.get("plots", [])
    lines = ["# Distillation report", "", summary(report), "", "## Skill (exact match, %)", "", skill_table(report),
             ""]
    if bpb_table(report):
        lines += ["## Bits per byte", "", bpb_table(report), ""]
    lines += ["## Size and speed", "", cost_table(report), "", "## Student against teacher", "",
             *comparison_lines(report), *teacher_check_lines(report.get("teacher_check")), ""]
    if report.get("run"):
        lines += ["## Distillation recipe", "", *recipe_lines(report["run"]), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem.replace('_', ' ')}]({p})" for p in plots] + [""]
    lines += ["## How it was measured", "", *measurement_notes(report), "",
              f"_Written {report['created_utc']} by kd_llm "
              f"{report['environment']['framework_versions'].get('kd_llm', '')}._", ""]
    return "\n".join(lines)


def write_report(report: dict, output_dir: str | Path, *, log_history: list[dict] | None = None,
                 baseline_log_history: list[dict] | None = None) -> list[Path]:
    """Draw the plots, then write ``report.json`` and ``report.md`` into ``output_dir``; returns the files written."""
    from kd_llm.report.plots import plot_categories, plot_losses, plot_temperature  # matplotlib: the report extra

    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    drawn = [
        plot_losses(log_history or [], folder / artifacts.LOSS_PLOT, baseline_log_history=baseline_log_history),
        plot_temperature(log_history or [], folder / artifacts.TEMPERATURE_PLOT),
        plot_categories(report["models"], folder / artifacts.CATEGORY_PLOT),
    ]
    report["plots"] = [path.relative_to(folder).as_posix() for path in drawn if path is not None]
    written = redact_secrets(report)  # the card is rendered from report.json: no token reaches either
    (folder / artifacts.REPORT_JSON).write_text(json.dumps(written, indent=2, default=str))
    (folder / artifacts.REPORT_MARKDOWN).write_text(render_markdown(written))
    return [folder / artifacts.REPORT_JSON, folder / artifacts.REPORT_MARKDOWN, *(folder / p for p in report["plots"])]
