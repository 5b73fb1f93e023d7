"""Every GPU check of kd_llm in one command, for the day a GPU is lent (``benchmarks/gpu_check.sh``).

Sections, cheapest first; each is timed, and an error in one is recorded and the next one still runs:

1. ``trainer``: the tiny-model trainer on CUDA under bf16 and fp16 autocast, dense and fused loss, padded and
   packed batches: losses finite, every loss term float32, the teacher frozen (eval mode, no gradients, weights
   unchanged), the student trained; packed rows give each example its padded logits (fp32, sdpa on CUDA).
2. ``loss_memory``: the fused chunked loss against the dense loss at V = 262,144 (Gemma-3 widths), B*T from 2k to
   16k rows: peak CUDA memory above the inputs and time of forward + backward, both paths (dense may run out of
   memory at 16k: recorded as such).
3. ``kd_step``: a real KD training step at SmolLM2-135M shapes (random weights: teacher 30 layers, student 15),
   bf16 autocast: dense vs fused with a live teacher, the hidden-state cache path, and the limits (teacher forward,
   plain CE step); steps/s, tokens/s and peak memory (benchmarks/run.py's step functions).
4. ``fsdp``: ``accelerate launch`` with ``configs/accelerate/fsdp.yaml`` on one process: a few sharded KD steps
   (the FSDP2 trainer path that CPU cannot run), benchmarks/gpu_fsdp_run.py.

Nothing here needs ``datasets`` or ``evaluate`` (the GPU machine has neither) or any download: models are built from
configs, data is random token ids, the tokenizer is kd_llm's character tokenizer. Results go to
``benchmarks/results/gpu_check.json``. ``--dry-run`` runs every section on CPU at toy sizes (tests/test_gpu_check.py),
so the script cannot rot before a GPU is lent.

    bash benchmarks/gpu_check.sh              # on the GPU machine, < 8 minutes on one H200
    bash benchmarks/gpu_check.sh --dry-run    # CPU, seconds
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import RESULTS_DIR, machine_info, median, write_json  # noqa: E402

SECTIONS = ("trainer", "loss_memory", "kd_step", "fsdp")


# ---- 1. the tiny-model trainer on CUDA ---------------------------------------------------------------------------

def tiny_models(vocab: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(hidden, seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            intermediate_size=2 * hidden, max_position_embeddings=256,
                                            pad_token_id=0, bos_token_id=1, eos_token_id=2)).to(device)

    return build(48, 1), build(32, 2)


def random_examples(count: int, vocab: int, seed: int = 0) -> list[dict]:
    """Tokenized examples of 8..64 tokens, the first third a prompt (labels -100): mixed lengths, as real data."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        n = int(torch.randint(8, 65, (1,), generator=generator))
        ids = torch.randint(4, vocab, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return rows


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def check_trainer(device: str, precision: str, fused: str, packing: bool, output: Path) -> dict:
    from kd_llm import DistillationConfig, DistillationTrainer
    from kd_llm.models.char_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    teacher, student = tiny_models(len(tokenizer), device)
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    student_before = {name: p.detach().clone() for name, p in student.named_parameters()}
    config = DistillationConfig(
        output_dir=str(output), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=0, alpha=0.5, temperature=2.0,
        use_cpu=device == "cpu", bf16=precision == "bf16", fp16=precision == "fp16", fused_loss=fused,
        packing=packing)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config,
                                  train_dataset=_ListDataset(random_examples(48, len(tokenizer))),
                                  processing_class=tokenizer)
    dtypes = set()
    record = trainer._record

    def recording(terms, loss, temperature, scale):
        dtypes.update({str(terms.ce.dtype), str(terms.kd.dtype), str(loss.dtype)})
        return record(terms, loss, temperature, scale)

    trainer._record = recording
    trainer.train()
    losses = [e["total_loss"] for e in trainer.state.log_history if "total_loss" in e]
    teacher_changed = max((p.detach() - before[n]).abs().max().item() for n, p in teacher.named_parameters())
    student_moved = max((p.detach() - student_before[n]).abs().max().item() for n, p in student.named_parameters())
    checks = {
        "losses_finite": bool(losses) and all(math.isfinite(x) for x in losses),
        "loss_terms_float32": dtypes == {"torch.float32"},
        "teacher_eval_mode": not trainer.teacher.training,
        "teacher_no_grad": not any(p.requires_grad for p in trainer.teacher.parameters()),
        "teacher_unchanged": teacher_changed == 0.0,
        "student_trained": student_moved > 0.0,
    }
    return {"precision": precision, "fused_loss": fused, "packing": packing, "loss_path_fused": trainer.fused_loss,
            "losses": losses, "loss_dtypes": sorted(dtypes), "checks": checks, "ok": all(checks.values())}


def check_packed_logits(device: str) -> dict:
    """Packed rows against padded rows on this device (fp32, sdpa): the largest per-example logit difference."""
    from kd_llm.data.collator import CausalLMCollator
    from kd_llm.data.packing import PACKED_EXAMPLE_KEY, PackingCollator, model_inputs, unpack

    _, model = tiny_models(89, device)
    model.eval()
    features = random_examples(12, 89, seed=1)
    packed = {k: v.to(device) for k, v in PackingCollator(0)(features).items()}
    padded = {k: v.to(device) for k, v in CausalLMCollator(0)(features).items()}
    with torch.no_grad():
        per_example = unpack(model(**model_inputs(packed), use_cache=False).logits, packed[PACKED_EXAMPLE_KEY])
        reference = model(**model_inputs(padded), use_cache=False).logits
    worst = max((per_example[e] - reference[e, :len(f["input_ids"])]).abs().max().item()
                for e, f in enumerate(features))
    return {"rows": int(packed["input_ids"].shape[0]), "examples": len(features), "max_abs_diff": worst,
            "ok": worst < 1e-4}


def section_trainer(device: str, dry_run: bool) -> dict:
    precisions = ("bf16",) if device == "cpu" else ("bf16", "fp16")  # fp16 on CPU is refused by kd_llm
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for precision in precisions:
            for fused in ("false", "true"):
                for packing in (False, True):
                    runs.append(check_trainer(device, precision, fused, packing, Path(folder) / "run"))
    packed = check_packed_logits(device)
    return {"runs": runs, "packed_logits": packed, "ok": all(r["ok"] for r in runs) and packed["ok"]}


# ---- 2. fused vs dense loss memory at V = 262,144 -----------------------------------------------------------------

def loss_once(path: str, vocab: int, rows: int, device: str, widths=(640, 1152)) -> dict:
    from kd_llm.losses import distillation_objective, fused_distillation_objective

    generator = torch.Generator().manual_seed(0)
    student_width, teacher_width = widths
    student_hidden = torch.randn(rows, student_width, generator=generator).to(device).requires_grad_()
    student_weight = (torch.randn(vocab, student_width, generator=generator) * 0.02).to(device).requires_grad_()
    teacher_hidden = torch.randn(rows, teacher_width, generator=generator).to(device)
    teacher_weight = (torch.randn(vocab, teacher_width, generator=generator) * 0.02).to(device)
    labels = torch.randint(0, vocab, (rows,), generator=generator).to(device)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    start = time.perf_counter()
    common = dict(alpha=0.5, temperature=2.0)
    if path == "dense":
        loss = distillation_objective((student_hidden @ student_weight.T)[None], (teacher_hidden @ teacher_weight.T)[None],
                                      labels[None], **common).total
    else:
        loss = fused_distillation_objective(student_hidden[None], student_weight, labels[None], teacher_hidden[None],
                                            teacher_weight, **common).total
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {"path": path, "vocab": vocab, "rows": rows, "seconds": round(seconds, 4), "loss": float(loss.detach())}
    if cuda:
        out["peak_gib"] = round((torch.cuda.max_memory_allocated() - baseline) / 2**30, 3)
    return out


def section_loss_memory(device: str, dry_run: bool) -> dict:
    vocab = 4096 if dry_run else 262_144
    sizes = (64, 128) if dry_run else (2048, 4096, 8192, 16384)
    rows = []
    for n in sizes:
        for path in ("fused", "dense"):
            try:
                loss_once(path, vocab, n, device)  # warm-up: kernels, allocator
                rows.append(loss_once(path, vocab, n, device))
            except torch.OutOfMemoryError:
                rows.append({"path": path, "vocab": vocab, "rows": n, "oom": True})
            if device == "cuda":
                torch.cuda.empty_cache()
    agree = {}
    for n in sizes:
        pair = {r["path"]: r for r in rows if r["rows"] == n and "loss" in r}
        if len(pair) == 2:
            agree[n] = abs(pair["dense"]["loss"] - pair["fused"]["loss"]) < 1e-3 * max(1.0, abs(pair["dense"]["loss"]))
    return {"rows": rows, "dense_equals_fused": agree, "ok": all(agree.values()) and bool(agree)}


# ---- 3. real KD step at SmolLM2-135M shapes ---------------------------------------------------------------------

def section_kd_step(device: str, dry_run: bool) -> dict:
    from benchmarks import run as throughput

    preset = dict(throughput.PRESETS["tiny" if dry_run else "smollm2"])
    if not dry_run:
        preset.update(batch=8, length=1024)  # 8k tokens a step
    teacher = throughput.build_model(preset, preset["teacher_layers"], seed=1).to(device).eval()
    student = throughput.build_model(preset, preset["student_layers"], seed=2).to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    batch = {k: v.to(device) for k, v in throughput.make_batch(preset, seed=0).items()}
    dtype = torch.bfloat16
    with torch.autocast(device_type=device, dtype=dtype):
        steps = throughput.make_steps(teacher, student, optimizer, batch, "sparse", None)
    names = ["dense_kd", "fused_kd", "hidden_cache_kd", "teacher_forward", "ce_step"]
    repeats, warmup = (1, 1) if dry_run else (10, 3)
    results = {}
    tokens = preset["batch"] * preset["length"]
    for name in names:
        try:
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for index in range(warmup + repeats):
                start = time.perf_counter()
                with torch.autocast(device_type=device, dtype=dtype):
                    steps[name]()
                if device == "cuda":
                    torch.cuda.synchronize()
                if index >= warmup:
                    times.append(time.perf_counter() - start)
            seconds = median(times)
            results[name] = {"median_s": round(seconds, 5), "steps_per_s": round(1 / seconds, 3),
                             "tokens_per_s": round(tokens / seconds, 1)}
            if device == "cuda":
                results[name]["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        except torch.OutOfMemoryError:
            results[name] = {"oom": True}
    limit = results.get("teacher_forward", {}).get("median_s", 0) + results.get("ce_step", {}).get("median_s", 0)
    for name in ("dense_kd", "fused_kd"):
        if "median_s" in results.get(name, {}) and limit:
            results[name]["ratio_to_limit"] = round(results[name]["median_s"] / limit, 3)
    return {"preset": preset, "precision": "bf16 autocast", "tokens_per_step": tokens, "steps": results,
            "ok": all("median_s" in results[n] for n in ("dense_kd", "fused_kd", "ce_step"))}


# ---- 4. FSDP2 on one GPU --------------------------------------------------------------------------------------------

def section_fsdp(device: str, dry_run: bool) -> dict:
    runner = ROOT / "benchmarks" / "gpu_fsdp_run.py"
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "fsdp.json"
        if dry_run:  # Accelerate runs no FSDP on CPU: run the same script in this process, unsharded
            from benchmarks import gpu_fsdp_run

            result = gpu_fsdp_run.main(["--output", str(out), "--cpu"])
        else:
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "1",
                       "--main_process_port", "29531", str(runner), "--output", str(out)]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
            if finished.returncode != 0:
                return {"ok": False, "returncode": finished.returncode, "stderr_tail": finished.stderr[-3000:]}
            import json

            result = json.loads(out.read_text())
    return result


# ---- driver -------------------------------------------------------------------------------------------------------

RUNNERS = {"trainer": section_trainer, "loss_memory": section_loss_memory, "kd_step": section_kd_step,
           "fsdp": section_fsdp}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every section on CPU at toy sizes (a test)")
    parser.add_argument("--only", default="", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run with --dry-run to check the script on CPU.")
    chosen = [s for s in (args.only.split(",") if args.only else SECTIONS) if s]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"gpu_check: unknown sections {unknown}; choose from {', '.join(SECTIONS)}.")
    report = {"machine": machine_info(), "dry_run": args.dry_run, "device": device, "sections": {}}
    started = time.perf_counter()
    for name in chosen:
        begin = time.perf_counter()
        try:
            result = RUNNERS[name](device, args.dry_run)
        except Exception as error:  # one broken section must not hide the others' figures
            result = {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        result["seconds"] = round(time.perf_counter() - begin, 1)
        report["sections"][name] = result
        print(f"gpu_check: {name}: {'ok' if result.get('ok') else 'FAILED'} in {result['seconds']} s", flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["ok"] = all(s.get("ok") for s in report["sections"].values())
    output = args.output or RESULTS_DIR / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")
    write_json(output, report)
    print(f"gpu_check: {'all ok' if report['ok'] else 'FAILURES'} in {report['seconds']} s -> {output}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
