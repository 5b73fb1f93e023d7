"""Offline teacher cache: bytes per supervised token and the distillation-loss error it costs.

For each temperature T, k and value codec, the teacher's cache is written with ``write_teacher_cache`` (the real
shards: Arrow IPC, zstd) and read back with ``TeacherCache``; then on every supervised position the cached loss
(``kd_llm.losses.sparse``) is compared with the dense ``kd_loss`` between the same student and teacher logits:

- ``bytes/token``: shard bytes / supervised tokens (metadata.json, ~1 KB per cache, not counted);
- ``error``: (cached - dense) / dense, in %, for both tail modes;
- ``storage error``: the same cached loss against top-k targets kept exactly (float64, no codec), which isolates
  what the storage costs from what keeping only k tokens costs.

    python benchmarks/teacher_cache.py --teacher embedded:date-teacher --student outputs/date_demo --examples 200
    python benchmarks/teacher_cache.py --teacher packaged:smollm2-135m-instruct --student pruned:15 \
        --examples 32 --prompt_style verbose

``--student``: a model spec or folder, ``pruned:N`` (the teacher's N most important layers, ranked on the benchmark
texts) or ``noise:S`` (the teacher's logits plus Gaussian noise of standard deviation S).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from kd_llm.data.collator import CausalLMCollator
from kd_llm.data.sources import build_dataset, load_records
from kd_llm.losses import kd_loss
from kd_llm.losses.sparse import SparseTargets, sparse_token_divergence
from kd_llm.models.loading import load_model, load_tokenizer
from kd_llm.models.vocab import tokenizer_vocab_size
from kd_llm.teacher_cache import TeacherCache, write_teacher_cache
from kd_llm.teacher_cache.codec import top_k_rows

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def build_student(spec: str, teacher, tokenizer, texts):
    from kd_llm.models.students import build_student as build, rank_layers_by_importance

    if spec.startswith("pruned:"):
        count = int(spec.split(":", 1)[1])
        ranking = rank_layers_by_importance(teacher, texts[:4], tokenizer=tokenizer)
        return build("pruned", teacher=teacher, layers=sorted(i for i, _ in ranking[:count])).eval()
    return load_model(spec).eval()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="embedded:date-teacher")
    parser.add_argument("--student", default="noise:1")
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--prompt_style", default="compact")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--k", default="16,32,64")
    parser.add_argument("--codecs", default="sqrt_uint8,log_uint8,float16")
    parser.add_argument("--temperatures", default="1,2")
    parser.add_argument("--losses", default="forward_kl,reverse_kl")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    tokenizer, teacher = load_tokenizer(args.teacher), load_model(args.teacher).eval()
    vocab = tokenizer_vocab_size(tokenizer)
    dataset = build_dataset(load_records("date_arithmetic", size=args.examples, seed=args.seed,
                                         prompt_style=args.prompt_style), tokenizer)
    collator = CausalLMCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else
                                tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(dataset["input_ids"][:4], skip_special_tokens=True)
    student = None if args.student.startswith("noise:") else build_student(args.student, teacher, tokenizer, texts)

    # Teacher and student logits of every supervised position, in dataset order; the writer's calls are served
    # from a memo of the teacher's (the same inputs give the same logits), so each config costs no teacher forward.
    memo, teacher_rows, student_rows = {}, [], []
    with torch.no_grad():
        for start in range(0, len(dataset), 8):
            batch = collator([dataset[i] for i in range(start, min(start + 8, len(dataset)))])
            valid = batch["labels"][:, 1:] != -100
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :, :vocab]
            teacher_rows.append(logits[:, :-1][valid])
            if student is not None:
                student_rows.append(student(input_ids=batch["input_ids"],
                                            attention_mask=batch["attention_mask"]).logits[:, :-1, :vocab][valid])
    teacher_logits = torch.cat(teacher_rows)
    if student is None:
        sigma = float(args.student.split(":", 1)[1])
        student_logits = teacher_logits + sigma * torch.randn(teacher_logits.shape)
    else:
        student_logits = torch.cat(student_rows)
    labels = torch.zeros(len(teacher_logits), dtype=torch.long)

    def teacher_fn(input_ids, attention_mask):
        key = (input_ids.numpy().tobytes(), attention_mask.numpy().tobytes(), tuple(input_ids.shape))
        if key not in memo:
            with torch.no_grad():
                memo[key] = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        return memo[key]

    rows = []
    for temperature in map(float, args.temperatures.split(",")):
        dense = {loss: kd_loss(student_logits, teacher_logits, labels, loss=loss, temperature=temperature).item()
                 for loss in args.losses.split(",")}
        for k in map(int, args.k.split(",")):
            exact = SparseTargets(*top_k_rows(teacher_logits.double(), k=k, temperature=temperature,
                                              vocab_size=vocab), temperature)
            for codec in args.codecs.split(","):
                with tempfile.TemporaryDirectory() as folder:
                    started = time.perf_counter()
                    metadata = write_teacher_cache(
                        teacher_fn, dataset, folder, collator=collator, teacher=args.teacher, teacher_hash="-",
                        tokenizer_hash="-", vocab_size=vocab, k=k, temperature=temperature, value_codec=codec,
                        shard_size=len(dataset), progress=False)
                    write_seconds = time.perf_counter() - started
                    targets = TeacherCache.open(folder).targets_for(list(range(len(dataset))))
                row = {"temperature": temperature, "k": metadata.k, "codec": codec,
                       "bytes_per_token": round(metadata.total_bytes / metadata.supervised_tokens, 1),
                       "write_seconds": round(write_seconds, 2)}
                for loss, value in dense.items():
                    for mode in ("tail_bucket", "renormalise"):
                        cached = sparse_token_divergence(student_logits, targets, loss=loss, temperature=temperature,
                                                         tail_mode=mode).mean().item()
                        kept = sparse_token_divergence(student_logits, exact, loss=loss, temperature=temperature,
                                                       tail_mode=mode).mean().item()
                        row[f"{loss}/{mode}"] = {"dense": round(value, 6), "cached": round(cached, 6),
                                                 "error_pct": round(100 * (cached - value) / value, 3),
                                                 "storage_error_pct": round(100 * (cached - kept) / kept, 3)}
                rows.append(row)
                fkl = row["forward_kl/tail_bucket"]
                print(f"T={temperature:g} k={metadata.k:3d} {codec:10s} {row['bytes_per_token']:6.1f} B/token  "
                      f"forward KL tail_bucket {fkl['error_pct']:+.3f}% (storage {fkl['storage_error_pct']:+.3f}%)",
                      flush=True)
    result = {"teacher": args.teacher, "student": args.student, "examples": len(dataset),
              "supervised_tokens": len(teacher_logits), "vocab_size": vocab, "rows": rows,
              "machine": {"cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                          "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}}
    RESULTS_DIR.mkdir(exist_ok=True)
    name = args.teacher.replace(":", "_").replace("/", "_")
    (RESULTS_DIR / f"teacher_cache_{name}.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
