"""Throughput of one distillation training step on each loss path, against what the step cannot go below.

Measured in one run, on the same machine, on the same batch, as interleaved repeats (every repeat runs every
variant once, in a shuffled order, so that a change in the machine's load hits all of them alike); medians reported:

- ``dense_kd``: teacher forward + student step, both models' ``[B, T, V]`` logits materialised, ``distillation_objective``;
- ``fused_kd``: the same step through ``kd_llm.losses.fused`` (hidden states + lm_head weights, chunked);
- ``cache_kd``: student step against precomputed teacher targets (no teacher forward). ``--cache decoded``
  (default) is the offline teacher cache (``kd_llm.teacher_cache``): the batch's top-k rows, encoded once with the
  cache's codec (``sqrt_uint8``, k = 64), are decoded in every step (``decode_rows``, what ``TeacherCache.gather``
  does after the shards are loaded at open) and scored by ``kd_llm.losses.sparse``; ``--cache sparse`` skips the
  decoding (targets already in memory); ``--cache logits`` keeps the teacher's full logits in memory
  (``precompute_teacher_logits``). Reading the shards from disk is not timed (the reader loads them once). To time
  another cache implementation, add a branch to :func:`cache_targets` and :func:`cache_step`.
- ``fused_cache_kd``: the cache path through the fused loss (``kd_llm.losses.fused_sparse``: student hidden states
  + lm_head weight, chunked), as ``DistillationTrainer`` runs it with ``fused_loss`` on;
- ``hidden_cache_kd``: student step against the hidden-state teacher cache (``kd_llm.teacher_cache.hidden_cache``):
  the batch's stored teacher states (float16, ``encode_hidden``) are decoded in every step and scored with the
  teacher's lm_head by ``kd_llm.losses.fused_hidden`` (exact, any T and divergence);
- the limits: ``teacher_forward`` (no grad, as the model's plain forward) and ``ce_step`` (a plain supervised
  fine-tuning step of the student: forward with ``labels``, Transformers' own cross-entropy, backward, AdamW).
  limit(dense/fused) = teacher_forward + ce_step; limit(cache) = ce_step; limit(hidden cache) = ce_step +
  ``teacher_head`` (the teacher lm_head's matmuls on the supervised rows, chunked as the fused loss does them:
  the work the stored states leave to do).

Every step ends with AdamW on the student. Times are the process's CPU time (``time.process_time``) and wall time;
on a machine shared with other jobs the CPU time is the steadier measure of the work a step does (it excludes the
time spent waiting for a core), so the ratios are given on both.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/run.py                       # SmolLM2-135M-shaped models
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/run.py --preset tiny --repeats 1   # seconds, for a smoke test
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS_DIR, machine_info, median, write_json  # noqa: E402
from kd_llm.losses import distillation_objective, fused_distillation_objective  # noqa: E402
from kd_llm.training.targets.heads import FUSED_FORWARD_KWARGS  # noqa: E402

# SmolLM2-135M's shape (the teacher); the student keeps 15 of its 30 layers, as configs/smollm2_pruned.yaml does.
PRESETS = {
    "smollm2": dict(vocab_size=49_152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                    num_key_value_heads=3, teacher_layers=30, student_layers=15, batch=4, length=256),
    "tiny": dict(vocab_size=2_048, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, teacher_layers=2, student_layers=1, batch=2, length=32),
}
ALPHA, TEMPERATURE, TOP_K, CACHE_CODEC = 0.5, 2.0, 64, "sqrt_uint8"
VARIANTS = ("dense_kd", "fused_kd", "cache_kd", "fused_cache_kd", "hidden_cache_kd", "teacher_forward", "ce_step",
            "teacher_head")
KD_PATHS = ("dense_kd", "fused_kd", "cache_kd", "fused_cache_kd", "hidden_cache_kd")
LIMITS = ("teacher_forward", "ce_step", "teacher_head")
HIDDEN_DTYPE = "float16"


def limit_of(name: str) -> str:
    """The limit a KD path is measured against (the key in the summary's limit_s)."""
    if name == "hidden_cache_kd":
        return "hidden cache (ce_step + teacher_head)"
    return "cache (ce_step)" if "cache" in name else "kd (teacher_forward + ce_step)"


def build_model(preset: dict, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=preset["vocab_size"], hidden_size=preset["hidden_size"],
                         intermediate_size=preset["intermediate_size"], num_hidden_layers=layers,
                         num_attention_heads=preset["num_attention_heads"],
                         num_key_value_heads=preset["num_key_value_heads"], max_position_embeddings=2048,
                         tie_word_embeddings=True, rope_theta=100_000.0)
    return LlamaForCausalLM(config)


def make_batch(preset: dict, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, preset["vocab_size"], (preset["batch"], preset["length"]), generator=generator)
    labels = ids.clone()
    labels[:, : preset["length"] // 4] = -100  # the prompt quarter of every row is not supervised
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def cache_targets(kind: str, teacher, batch: dict):
    """What the cache path reads instead of running the teacher (built once, outside the timing)."""
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    if kind == "logits":
        return logits.float().contiguous()
    from kd_llm.losses.sparse import SparseTargets  # the offline teacher cache's targets
    from kd_llm.teacher_cache.codec import encode_rows, top_k_rows

    valid = batch["labels"][:, 1:] != -100
    ids, log_probs, log_tail = top_k_rows(logits[valid], k=TOP_K, temperature=TEMPERATURE,
                                          vocab_size=logits.shape[-1])
    if kind == "decoded":
        return encode_rows(ids, log_probs, log_tail, vocab_size=logits.shape[-1], codec=CACHE_CODEC)
    return SparseTargets(ids, log_probs, log_tail, TEMPERATURE)


def cache_step(kind: str, student, targets, batch: dict, num_items: int, *, fused: bool = False,
               chunk_size: int | None = None):
    """The cache path's loss; ``fused``: from the student's hidden states (``kd_llm.losses.fused_sparse``)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"][:, 1:]
    if fused:
        student_hidden = student(**inputs, **FUSED_FORWARD_KWARGS).hidden_states[-1][:, :-1]
    else:
        student_logits = student(**inputs).logits[:, :-1]
    if kind == "logits":
        if fused:
            raise ValueError("--cache logits has no fused variant (it keeps the teacher's full logits).")
        return distillation_objective(student_logits, targets, labels, alpha=ALPHA, temperature=TEMPERATURE,
                                      num_items_in_batch=num_items).total
    from kd_llm.losses.fused_sparse import fused_sparse_distillation_objective
    from kd_llm.losses.sparse import SparseTargets, sparse_distillation_objective
    from kd_llm.teacher_cache.codec import decode_rows

    if kind == "decoded":
        targets = SparseTargets(*decode_rows(targets["gaps"], targets["values"], targets["log_tail"],
                                             codec=CACHE_CODEC), TEMPERATURE)
    options = dict(alpha=ALPHA, temperature=TEMPERATURE, tail_mode="tail_bucket", num_items_in_batch=num_items)
    if fused:
        return fused_sparse_distillation_objective(student_hidden, student.lm_head.weight, labels, targets,
                                                   chunk_size=chunk_size, **options).total
    return sparse_distillation_objective(student_logits, targets, labels, **options).total


def make_steps(teacher, student, optimizer, batch: dict, cache_kind: str, chunk_size: int | None) -> dict:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"][:, 1:]
    num_items = int((labels != -100).sum())
    targets = cache_targets(cache_kind, teacher, batch)

    def finish(loss):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def dense_kd():
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits[:, :-1]
        student_logits = student(**inputs).logits[:, :-1]
        finish(distillation_objective(student_logits, teacher_logits, labels, alpha=ALPHA, temperature=TEMPERATURE,
                                      num_items_in_batch=num_items).total)

    def fused_kd():
        with torch.no_grad():
            teacher_hidden = teacher(**inputs, **FUSED_FORWARD_KWARGS).hidden_states[-1][:, :-1]
        student_hidden = student(**inputs, **FUSED_FORWARD_KWARGS).hidden_states[-1][:, :-1]
        finish(fused_distillation_objective(
            student_hidden, student.lm_head.weight, labels, teacher_hidden, teacher.lm_head.weight, alpha=ALPHA,
            temperature=TEMPERATURE, num_items_in_batch=num_items, chunk_size=chunk_size).total)

    def cache_kd():
        finish(cache_step(cache_kind, student, targets, batch, num_items))

    from kd_llm.losses.fused import default_chunk_rows
    from kd_llm.losses.fused_hidden import fused_hidden_distillation_objective
    from kd_llm.teacher_cache.hidden_codec import decode_hidden, encode_hidden

    valid = labels != -100
    with torch.no_grad():
        stored = encode_hidden(teacher(**inputs, **FUSED_FORWARD_KWARGS).hidden_states[-1][:, :-1][valid],
                               HIDDEN_DTYPE)
    rows = chunk_size or default_chunk_rows(teacher.lm_head.weight.shape[0])

    def hidden_cache_kd():
        states = decode_hidden(stored["hidden"], stored.get("scale"), HIDDEN_DTYPE)
        student_hidden = student(**inputs, **FUSED_FORWARD_KWARGS).hidden_states[-1][:, :-1]
        finish(fused_hidden_distillation_objective(
            student_hidden, student.lm_head.weight, labels, states, teacher.lm_head.weight, alpha=ALPHA,
            temperature=TEMPERATURE, num_items_in_batch=num_items, chunk_size=chunk_size).total)

    def teacher_head():
        states = decode_hidden(stored["hidden"], stored.get("scale"), HIDDEN_DTYPE)
        with torch.no_grad():
            for start in range(0, states.shape[0], rows):
                states[start:start + rows] @ teacher.lm_head.weight.T

    def fused_cache_kd():
        finish(cache_step(cache_kind, student, targets, batch, num_items, fused=True, chunk_size=chunk_size))

    def teacher_forward():
        with torch.no_grad():
            teacher(**inputs)

    def ce_step():
        finish(student(**inputs, labels=batch["labels"]).loss)

    steps = {"dense_kd": dense_kd, "fused_kd": fused_kd, "cache_kd": cache_kd, "fused_cache_kd": fused_cache_kd,
             "hidden_cache_kd": hidden_cache_kd, "teacher_forward": teacher_forward, "ce_step": ce_step,
             "teacher_head": teacher_head}
    if cache_kind == "logits":
        del steps["fused_cache_kd"]
    return steps


def timed(step) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


def summarise(times: dict, tokens: int) -> dict:
    out = {}
    for clock in ("cpu", "wall"):
        med = {name: median([t[clock] for t in runs]) for name, runs in times.items()}
        limits = {"kd (teacher_forward + ce_step)": med.get("teacher_forward", 0.0) + med["ce_step"],
                  "cache (ce_step)": med["ce_step"],
                  "hidden cache (ce_step + teacher_head)": med["ce_step"] + med.get("teacher_head", 0.0)}
        paths = [name for name in KD_PATHS if name in med]
        out[clock] = {
            "median_s": {name: round(value, 4) for name, value in med.items()},
            "steps_per_s": {name: round(1 / med[name], 4) for name in paths + ["ce_step"]},
            "tokens_per_s": {name: round(tokens / med[name], 1) for name in paths + ["ce_step"]},
            "limit_s": {key: round(value, 4) for key, value in limits.items()},
            "ratio_to_limit": {name: round(med[name] / limits[limit_of(name)], 3) for name in paths},
        }
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds (after one warm-up round)")
    parser.add_argument("--cache", choices=("decoded", "sparse", "logits"), default="decoded",
                        help="what the cache path reads: the offline cache's encoded top-k rows (decoded every step), "
                             "top-k targets already decoded, or the teacher's full logits")
    parser.add_argument("--chunk-size", type=int, default=0, help="fused loss rows per chunk (0: the default)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated variants to time (default: all); the limits "
                                                     "they are compared with are always timed")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    teacher = build_model(preset, preset["teacher_layers"], seed=1).eval().requires_grad_(False)
    student = build_model(preset, preset["student_layers"], seed=2).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    batch = make_batch(preset, args.seed)
    steps = make_steps(teacher, student, optimizer, batch, args.cache, args.chunk_size or None)
    if args.only:
        wanted = set(args.only.split(",")) | set(LIMITS)
        unknown = wanted - set(steps)
        if unknown:
            raise SystemExit(f"--only: unknown variants {sorted(unknown)}; choose from {', '.join(steps)}")
        steps = {name: step for name, step in steps.items() if name in wanted}
    tokens = batch["input_ids"].numel()
    times = {name: [] for name in steps}
    loads = []
    order = list(steps)
    shuffle = random.Random(args.seed)
    for repeat in range(args.repeats + 1):  # round 0 warms up (allocator, lazy init) and is not recorded
        shuffle.shuffle(order)
        loads.append(round(os.getloadavg()[0], 2))
        for name in order:
            wall, cpu = timed(steps[name])
            if repeat > 0:
                times[name].append({"wall": wall, "cpu": cpu})
        print(f"round {repeat}/{args.repeats}: " + ", ".join(
            f"{n} {times[n][-1]['cpu']:.2f}s cpu" for n in steps if times[n] and repeat > 0), flush=True)
    loads.append(round(os.getloadavg()[0], 2))
    result = {
        "benchmark": "throughput",
        "machine": machine_info() | {"load_average_1min_per_round": loads},
        "settings": {"preset": args.preset, **preset, "tokens_per_step": tokens, "alpha": ALPHA,
                     "temperature": TEMPERATURE, "distillation_loss": "forward_kl", "cache": args.cache,
                     "top_k": TOP_K if args.cache != "logits" else None,
                     "cache_codec": CACHE_CODEC if args.cache == "decoded" else None, "repeats": args.repeats,
                     "fused_chunk_rows": args.chunk_size or "default", "threads": args.threads,
                     "optimizer": "AdamW"},
        "times": {name: [{k: round(v, 4) for k, v in t.items()} for t in runs] for name, runs in times.items()},
        "summary": summarise(times, tokens),
    }
    output = args.output or RESULTS_DIR / f"throughput_{args.preset}.json"
    write_json(output, result)
    print(f"wrote {output}")
    for clock in ("cpu", "wall"):
        print(clock, result["summary"][clock]["ratio_to_limit"], result["summary"][clock]["tokens_per_s"])
    return result


if __name__ == "__main__":
    main()
