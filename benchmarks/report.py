"""Markdown tables (for benchmarks/README.md) from the JSON results of run.py and loss_memory.py.

    .venv/bin/python benchmarks/report.py [--throughput FILE] [--memory FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS_DIR  # noqa: E402
from benchmarks.run import LIMITS, limit_of  # noqa: E402

MIB = 2**20


def throughput_table(result: dict) -> str:
    s, cpu, wall = result["settings"], result["summary"]["cpu"], result["summary"]["wall"]
    lines = [
        f"{s['preset']} shapes: teacher {s['teacher_layers']} layers, student {s['student_layers']} layers, hidden "
        f"{s['hidden_size']}, V = {s['vocab_size']:,}; batch {s['batch']} x {s['length']} = {s['tokens_per_step']:,} "
        f"tokens; {s['repeats']} interleaved repeats, medians; {s['threads']} thread(s); cache = {s['cache']}"
        + (f" (top-{s['top_k']})" if s.get("top_k") else "") + ".",
        "",
        "| path | CPU s / step | steps/s (CPU) | tokens/s (CPU) | limit | ratio to limit (CPU) | ratio (wall) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in cpu["ratio_to_limit"]:
        limit_key = limit_of(name)
        lines.append(f"| {name} | {cpu['median_s'][name]:.2f} | {cpu['steps_per_s'][name]:.3f} | "
                     f"{cpu['tokens_per_s'][name]:,.0f} | {cpu['limit_s'][limit_key]:.2f} s ({limit_key}) | "
                     f"**{cpu['ratio_to_limit'][name]:.3f}** | {wall['ratio_to_limit'][name]:.3f} |")
    for name in [n for n in LIMITS if n in cpu["median_s"]]:
        lines.append(f"| {name} | {cpu['median_s'][name]:.2f} | | "
                     + (f"{cpu['tokens_per_s'][name]:,.0f}" if name in cpu["tokens_per_s"] else "") + " | | | |")
    loads = result["machine"].get("load_average_1min_per_round", [])
    if loads:
        lines += ["", f"1-minute load average during the run: {min(loads)}-{max(loads)} "
                      f"on {result['machine']['logical_cores']} logical cores."]
    return "\n".join(lines)


def memory_table(result: dict) -> str:
    by_key = {(m["path"], m["vocab"], m["rows"]): m for m in result["measurements"]}
    lines = ["| V | B·T | dense peak | fused peak | fused / dense | of which [V, H] weight gradient |",
             "|---|---|---|---|---|---|"]
    for vocab in sorted({m["vocab"] for m in result["measurements"]}):
        for rows in sorted({m["rows"] for m in result["measurements"] if m["vocab"] == vocab}):
            dense, fused = by_key.get(("dense", vocab, rows)), by_key.get(("fused", vocab, rows))
            if dense is None or fused is None:
                continue
            mark = " (extrapolated)" if dense.get("extrapolated") else ""
            lines.append(f"| {vocab:,} | {rows:,} | {dense['peak_bytes'] / MIB:,.0f} MiB{mark} | "
                         f"{fused['peak_bytes'] / MIB:,.0f} MiB | 1/{dense['peak_bytes'] / fused['peak_bytes']:.0f} | "
                         f"{fused['weight_grad_bytes'] / MIB:,.0f} MiB |")
    fits = result.get("dense_linear_fit", {})
    if fits:
        lines += ["", "Dense fit (peak = a + b·N over the measured N): " + "; ".join(
            f"V={int(v):,}: b = {f['bytes_per_row'] / MIB:.2f} MiB/row = {f['bytes_per_row_in_units_of_4V']} float32 "
            f"[N, V] copies, measured N = {f['measured_rows']}, max residual {f['max_relative_residual']:.1%}"
            for v, f in fits.items())]
    flat = result.get("fused_flatness_V262144", [])
    if flat:
        lines += ["", "Fused at V = 262,144 against B·T: " + ", ".join(
            f"{m['rows']:,}: {m['peak_bytes'] / MIB:,.0f} MiB" for m in flat)]
    return "\n".join(lines)


def hidden_cache_table(result: dict) -> str:
    """Bytes per supervised token and error against the dense loss, per format, divergence and temperature."""
    cells = [key for key in result["rows"][0] if key.startswith("T=")]
    cells += [key for row in result["rows"] for key in row if key.startswith("T=") and key not in cells]
    lines = [f"`{result['teacher']}` (V = {result['vocab_size']:,}, d = {result['hidden_size']}, soft cap "
             f"{result['head_softcap']}), student `{result['student']}`, {result['examples']} examples, "
             f"{result['supervised_tokens']:,} supervised tokens; goal: <= 0.1% at <= 2·d + 16 = "
             f"{result['goal_bytes_per_token']} bytes/token.", "",
             "| format | bytes/token | " + " | ".join(cells) + " |", "|---|---|" + "---|" * len(cells)]
    for row in result["rows"]:
        values = [f"{row[c]['error_pct']:+.4f}%" if c in row else "" for c in cells]
        lines.append(f"| {row['format']} | {row['bytes_per_token']:,.1f} | " + " | ".join(values) + " |")
    dense = result["rows"][0]
    lines += ["", "Dense loss: " + ", ".join(f"{c} {dense[c]['dense']:.4g}" for c in cells if c in dense) + "."]
    side = result.get("side_process_bytes_per_token")
    if side:
        lines += ["", "Side-process teacher, bytes per token received: " + ", ".join(
            f"{name} {value:,.0f}" for name, value in side.items()) + "."]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--throughput", type=Path, default=RESULTS_DIR / "throughput_smollm2.json")
    parser.add_argument("--memory", type=Path, default=RESULTS_DIR / "loss_memory_cpu.json")
    parser.add_argument("--hidden_cache", type=Path, nargs="*",
                        default=sorted(RESULTS_DIR.glob("hidden_cache_*.json")))
    args = parser.parse_args(argv)
    renders = [(args.throughput, throughput_table), (args.memory, memory_table),
               *((path, hidden_cache_table) for path in args.hidden_cache)]
    for path, render in renders:
        if path.is_file():
            print(f"<!-- from {path.name} -->")
            print(render(json.loads(path.read_text())))
            print()


if __name__ == "__main__":
    main()
