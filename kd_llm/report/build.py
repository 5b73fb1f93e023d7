"""Assemble the distillation report (``report.json``) from measured models, and render it as Markdown tables.

A report holds one entry per model (role ``teacher``, ``student``, ``baseline`` or ``untrained``) with its skill
scores and its measured costs, then one comparison per student: size and speed against the teacher, the fraction of
the teacher's lead over the hard-label baseline that the student recovers, and the negative-transfer verdict.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform

import torch

from kd_llm.report.checks import SCORE_KEY, negative_transfer

SCHEMA_VERSION = 1
ROLES = ("teacher", "untrained", "baseline", "student")
FRAMEWORKS = ("kd_llm", "torch", "transformers", "accelerate", "datasets", "evaluate", "peft", "huggingface_hub",
              "safetensors")


def framework_versions() -> dict[str, str]:
    versions = {}
    for name in FRAMEWORKS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def environment(device: torch.device | str) -> dict:
    """The machine the measurements ran on: device name, threads, Python and library versions."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                             platform.machine())
    return {"device": str(device), "device_name": name, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(),
            "framework_versions": framework_versions()}


def recovered_fraction(teacher: float, baseline: float, student: float) -> float | None:
    """Share of the teacher's lead over the hard-label baseline that the student recovers,
    ``(student - baseline) / (teacher - baseline)``: 1 matches the teacher, 0 the baseline, below 0 is worse than the
    baseline. None when the teacher has no lead to recover."""
    return None if teacher <= baseline else (student - baseline) / (teacher - baseline)


def _ratio(numerator, denominator):
    return None if numerator is None or not denominator else numerator / denominator


def lookup(entry: dict, *path):
    value = entry
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def compare(student: dict, teacher: dict, baseline: dict | None, *, large_batch: str) -> dict:
    """Ratios of ``student`` to ``teacher`` (< 1: smaller, slower...), recovered fraction and negative transfer."""
    speed = lambda entry, batch: lookup(entry, "speed", batch, "tokens_per_second")  # noqa: E731
    ratios = {
        "parameters": _ratio(student.get("parameters"), teacher.get("parameters")),
        "size_on_disk": _ratio(lookup(student, "size_on_disk", "bytes"), lookup(teacher, "size_on_disk", "bytes")),
        "tokens_per_second_batch_1": _ratio(speed(student, "batch_1"), speed(teacher, "batch_1")),
        f"tokens_per_second_{large_batch}": _ratio(speed(student, large_batch), speed(teacher, large_batch)),
        "peak_memory": _ratio(lookup(student, "memory", "peak_bytes"), lookup(teacher, "memory", "peak_bytes")),
    }
    comparison = {
        "student": student["name"],
        "ratios": ratios,
        # The usual way to say it: the teacher is N times the student's size.
        "teacher_student_size_ratio": _ratio(teacher.get("parameters"), student.get("parameters")),
        "recovered_fraction": None,
        "negative_transfer": None,
    }
    scores = [lookup(entry, "skill", SCORE_KEY) for entry in (teacher, student)]
    if baseline is not None and None not in scores and lookup(baseline, "skill", SCORE_KEY) is not None:
        teacher_score, student_score = scores
        baseline_score = baseline["skill"][SCORE_KEY]
        comparison["recovered_fraction"] = recovered_fraction(teacher_score, baseline_score, student_score)
        comparison["negative_transfer"] = negative_transfer(student_score, baseline_score, student["skill"]["count"])
    return comparison


def build_report(entries: list[dict], *, device, benchmark: dict, eval_info: dict, teacher_check: dict | None = None,
                 run: dict | None = None) -> dict:
    """The whole report. ``entries``: one dict per model with ``name``, ``role``, ``source``, ``skill`` (scores from
    :func:`kd_llm.evaluation.skills.evaluate_skill`, or None) and the measurements of
    :func:`kd_llm.report.measure.measure_model` merged in."""
    for entry in entries:
        if entry.get("role") not in ROLES:
            raise ValueError(f"Report entry {entry.get('name')!r} has role {entry.get('role')!r}; expected one of "
                             f"{', '.join(ROLES)}.")
    by_role = {role: [e for e in entries if e["role"] == role] for role in ROLES}
    if len(by_role["teacher"]) != 1 or not by_role["student"] or len(by_role["baseline"]) > 1:
        raise ValueError("A report needs exactly one teacher, at least one student and at most one baseline; got "
                         + ", ".join(f"{len(v)} {k}" for k, v in by_role.items()) + ".")
    teacher = by_role["teacher"][0]
    baseline = by_role["baseline"][0] if by_role["baseline"] else None
    large_batch = f"batch_{benchmark['batch_size']}"
    return {
        "schema_version": SCHEMA_VERSION,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device),
        "benchmark": benchmark,
        "eval": eval_info,
        "models": entries,
        "comparisons": [compare(s, teacher, baseline, large_batch=large_batch) for s in by_role["student"]],
        "teacher_check": teacher_check,
        "run": run,
    }


# ----------------------------------------------------------------------------------------------- Markdown rendering

def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _megabytes(value) -> str:
    return "–" if value is None else f"{value / 1e6:.2f}"


def format_ratio(value) -> str:
    return "–" if value is None else f"{value:.3g}×"


def categories(report: dict) -> list[str]:
    return sorted({c for e in report["models"] for c in (lookup(e, "skill", "per_category") or {})})


def skill_table(report: dict) -> str:
    """Exact match (%) per category, mean over categories and overall, one row per model."""
    names = categories(report)
    lines = ["| model | " + " | ".join(names) + " | mean | overall |",
             "|---|" + "---:|" * (len(names) + 2)]
    for entry in report["models"]:
        per = lookup(entry, "skill", "per_category") or {}
        cells = [_percent(per.get(c)) for c in names]
        cells += [_percent(lookup(entry, "skill", SCORE_KEY)), _percent(lookup(entry, "skill", "exact_match"))]
        lines.append(f"| {entry['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bpb_table(report: dict) -> str:
    """Bits per byte on the same held-out text, one row per model that has it; '' when no model has it."""
    measured = [e for e in report["models"] if (e.get("bits_per_byte") or {}).get("bits_per_byte") is not None]
    skipped = [e for e in report["models"] if (e.get("bits_per_byte") or {}).get("skipped")]
    if not measured:
        return (f"Bits per byte: not measured ({skipped[0]['bits_per_byte']['skipped']})" if skipped else "")
    source = measured[0]["bits_per_byte"].get("source", "?")
    lines = [f"Bits per byte (lower is better; tokenizer-independent) on held-out text `{source}` "
             f"({measured[0]['bits_per_byte']['bytes']:,} bytes):", "",
             "| model | bits per byte | tokens | bytes per token |", "|---|---:|---:|---:|"]
    for entry in measured:
        bpb = entry["bits_per_byte"]
        lines.append(f"| {entry['name']} | {bpb['bits_per_byte']:.4f} | {bpb['tokens']:,} | "
                     f"{bpb['bytes_per_token']} |")
    return "\n".join(lines)


def cost_table(report: dict) -> str:
    """Parameters, size on disk, latency and throughput at both batch sizes, and peak inference memory."""
    batch = report["benchmark"]["batch_size"]
    large = f"batch_{batch}"
    lines = [f"| model | parameters | disk (MB) | latency b1 (ms) | tok/s b1 | latency b{batch} (ms) | tok/s b{batch} "
             "| peak memory (MB) |", "|---|" + "---:|" * 7]
    for entry in report["models"]:
        if "speed" not in entry:
            continue
        latency = lambda b: lookup(entry, "speed", b, "latency_seconds")  # noqa: E731
        tps = lambda b: lookup(entry, "speed", b, "tokens_per_second")  # noqa: E731
        cells = [f"{entry['parameters']:,}", _megabytes(lookup(entry, "size_on_disk", "bytes")),
                 f"{1000 * latency('batch_1'):.1f}", f"{tps('batch_1'):.0f}",
                 f"{1000 * latency(large):.1f}", f"{tps(large):.0f}",
                 _megabytes(lookup(entry, "memory", "peak_bytes"))]
        lines.append(f"| {entry['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_lines(report: dict) -> list[str]:
    """One bullet list per student: size ratio, speed and size ratios, recovered fraction, negative-transfer verdict."""
    batch = report["benchmark"]["batch_size"]
    out = []
    for comparison in report["comparisons"]:
        ratios = comparison["ratios"]
        out.append(f"**{comparison['student']}** against the teacher:")
        size = comparison["teacher_student_size_ratio"]
        out.append(f"- teacher/student size ratio: {format_ratio(size)} (the student has "
                   f"{format_ratio(ratios['parameters'])} the teacher's parameters, "
                   f"{format_ratio(ratios['size_on_disk'])} its size on disk)")
        out.append("- speed (student/teacher tokens per second): "
                   f"{format_ratio(ratios['tokens_per_second_batch_1'])} at batch 1, "
                   f"{format_ratio(ratios[f'tokens_per_second_batch_{batch}'])} at batch {batch}")
        out.append(f"- peak inference memory (student/teacher): {format_ratio(ratios['peak_memory'])}")
        fraction = comparison["recovered_fraction"]
        if comparison["negative_transfer"] is None:
            out.append("- recovered fraction of the teacher's lead: – (no hard-label baseline was measured)")
        elif fraction is None:
            out.append("- recovered fraction of the teacher's lead: – (the teacher does not beat the hard-label "
                       "baseline)")
        else:
            out.append("- recovered fraction of the teacher's lead over the hard-label baseline: "
                       f"{100 * fraction:.0f}%")
        if comparison["negative_transfer"] is not None:
            verdict = comparison["negative_transfer"]["verdict"]
            out.append(f"- **{verdict}**" if comparison["negative_transfer"]["negative_transfer"] else f"- {verdict}")
        out.append("")
    return out
