"""Peak memory of the distillation loss, dense (materialised logits) against fused (chunked), forward + backward.

What is measured: starting from the final hidden states of both models and their lm_head weights (already in
memory), the extra memory at the peak of computing the loss (alpha 0.5, forward KL, T 2) and its backward pass,
which leaves the gradients of the student's hidden states and lm_head weight (both paths produce them, so both
peaks include the ``[V, H]`` weight gradient).

How (CPU): every measurement runs in a fresh Python process. After the inputs are allocated and written, the
process resets its peak resident set size (``echo 5 > /proc/self/clear_refs``) and reads ``VmRSS``; after the loss's
backward pass it reads the new peak, ``VmHWM``. Peak - baseline is what the loss needed. glibc's malloc would keep
some freed blocks in its heap (and move its mmap threshold up to 32 MiB as it goes), so the child runs with
``MALLOC_MMAP_THRESHOLD_=65536``: every tensor buffer is its own mmap, returned to the system when freed, and the
resident size follows the live tensors. (tracemalloc cannot see PyTorch's allocations.) On a CUDA machine
(``--device cuda``) ``torch.cuda.max_memory_allocated`` is used instead, after ``reset_peak_memory_stats``.

Dense sizes that would not fit in this machine's memory (``--max-gib``) are not run: their peak is extrapolated
from a straight-line fit over the measured smaller token counts (dense memory is linear in N: every buffer is
``[N, V]``), and marked ``"extrapolated": true``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loss_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS_DIR, machine_info, write_json  # noqa: E402

# lm_head widths: SmolLM2-135M (576) from SmolLM2-360M (960) at V=49,152; Gemma-3-270M (640) from Gemma-3-1B (1152)
# at V=262,144.
HIDDEN = {49_152: (576, 960), 262_144: (640, 1152)}
REPORT_ROWS = (1024, 4096)
FIT_ROWS = (128, 256, 512)  # dense: measured where they fit, for the line through the points
FLATNESS_ROWS = (256, 1024, 2048, 4096)  # fused at V=262,144: flat in T?


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(path: str, vocab: int, rows: int, chunk_size: int | None, device: str) -> dict:
    import torch

    from kd_llm.losses import distillation_objective, fused_distillation_objective

    torch.set_num_threads(1)
    student_width, teacher_width = HIDDEN.get(vocab, (576, 960))
    generator = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(rows, student_width, generator=generator).to(device).requires_grad_()
    student_weight = (torch.randn(vocab, student_width, generator=generator) * 0.02).to(device).requires_grad_()
    teacher_hidden = torch.randn(rows, teacher_width, generator=generator).to(device)
    teacher_weight = (torch.randn(vocab, teacher_width, generator=generator) * 0.02).to(device)
    labels = torch.randint(0, vocab, (rows,), generator=generator).to(device)
    labels[: rows // 4] = -100  # a prompt quarter, not supervised
    options = dict(alpha=0.5, loss="forward_kl", temperature=2.0)

    if device == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        baseline = _status_kib("VmRSS") * 1024
    if path == "dense":
        student_logits = student_hidden @ student_weight.T
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.T
        terms = distillation_objective(student_logits, teacher_logits, labels, **options)
    else:
        terms = fused_distillation_objective(student_hidden, student_weight, labels, teacher_hidden, teacher_weight,
                                             chunk_size=chunk_size, **options)
    terms.total.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    weight_grad = student_weight.grad.numel() * student_weight.grad.element_size()
    return {"path": path, "vocab": vocab, "rows": rows, "student_width": student_width,
            "teacher_width": teacher_width, "peak_bytes": peak - baseline, "weight_grad_bytes": weight_grad,
            "loss": float(terms.total.detach()), "method": "cuda.max_memory_allocated" if device == "cuda" else "VmHWM-VmRSS"}


def measure(path: str, vocab: int, rows: int, chunk_size: int | None, device: str) -> dict:
    """One measurement in a fresh process (its own allocator state and peak)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, __file__, "--child", path, str(vocab), str(rows), str(chunk_size or 0), device]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{path} V={vocab} N={rows} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{path:5s} V={vocab:>7,} N={rows:>5,}: {result['peak_bytes'] / 2**20:9.1f} MiB", flush=True)
    return result


def line_fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of peak bytes against rows."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y - slope * mean_x, slope


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=sorted(HIDDEN))
    parser.add_argument("--rows", type=int, nargs="+", default=list(REPORT_ROWS))
    parser.add_argument("--chunk-size", type=int, default=0, help="fused rows per chunk (0: the default)")
    parser.add_argument("--max-gib", type=float, default=6.0,
                        help="largest dense run to attempt; bigger ones are extrapolated (shared machine)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    chunk = args.chunk_size or None
    machine = machine_info()
    rows_out = []
    fits = {}
    limit = min(args.max_gib * 2**30, 0.6 * available_bytes())
    for vocab in args.vocab:
        # Dense: measure the small sizes, then every larger one the fit so far says fits; extrapolate the rest.
        dense_points, dense_results = [], {}
        for rows in sorted(set(FIT_ROWS) | set(args.rows)):
            if len(dense_points) >= 2 and args.device == "cpu":
                intercept, slope = line_fit(dense_points)
                if intercept + slope * rows > limit:
                    continue
            dense_results[rows] = measure("dense", vocab, rows, chunk, args.device)
            dense_points.append((rows, dense_results[rows]["peak_bytes"]))
        intercept, slope = line_fit(dense_points)
        residual = max(abs(y - (intercept + slope * x)) / y for x, y in dense_points)
        fits[vocab] = {"intercept_bytes": round(intercept), "bytes_per_row": round(slope),
                       "bytes_per_row_in_units_of_4V": round(slope / (4 * vocab), 2),
                       "measured_rows": [x for x, _ in dense_points], "max_relative_residual": round(residual, 4)}
        for rows in args.rows:
            if rows in dense_results:
                rows_out.append(dense_results[rows] | {"extrapolated": False})
            else:
                predicted = intercept + slope * rows
                print(f"dense V={vocab:>7,} N={rows:>5,}: extrapolated {predicted / 2**20:9.1f} MiB (not run: over "
                      f"{limit / 2**30:.1f} GiB)", flush=True)
                rows_out.append({"path": "dense", "vocab": vocab, "rows": rows, "peak_bytes": int(predicted),
                                 "extrapolated": True,
                                 "method": f"linear fit over measured N = {[x for x, _ in dense_points]}"})
        for rows in args.rows:
            rows_out.append(measure("fused", vocab, rows, chunk, args.device) | {"extrapolated": False})
    flatness = []
    if 262_144 in args.vocab:
        done = {r["rows"]: r for r in rows_out if r["path"] == "fused" and r["vocab"] == 262_144}
        for rows in FLATNESS_ROWS:
            flatness.append(done.get(rows) or measure("fused", 262_144, rows, chunk, args.device))
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {"benchmark": "loss_memory", "machine": machine, "device": args.device,
              "settings": {"alpha": 0.5, "loss": "forward_kl", "temperature": 2.0, "fused_chunk_rows": chunk or "default",
                           "hidden_widths": {str(v): HIDDEN[v] for v in HIDDEN}},
              "measurements": rows_out, "dense_linear_fit": {str(v): f for v, f in fits.items()},
              "fused_flatness_V262144": flatness}
    output = args.output or RESULTS_DIR / f"loss_memory_{args.device}.json"
    write_json(output, result)
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, path, vocab, rows, chunk, device = sys.argv
        print(json.dumps(child(path, int(vocab), int(rows), int(chunk) or None, device)))
    else:
        main()
