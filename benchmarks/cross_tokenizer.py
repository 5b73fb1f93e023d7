"""Cross-tokenizer distillation measured on the real pair: Gemma-3-270M (teacher) into SmolLM2-135M-Instruct pruned
by layer importance (student), on human-written English, scored by bits per byte on held-out text.

Arms, same student initialisation, data, steps and seed: hard labels only; same-tokenizer KD from SmolLM2-135M-Instruct
(the student's own family); cross-tokenizer KD from Gemma-3-270M with each loss of kd_llm.cross_tokenizer; and
sequence-level KD (the student trained with alpha = 1 on Gemma-written continuations of the training prompts).

    python benchmarks/cross_tokenizer.py --steps 40              # a reduced run: minutes, not the issue's hour

Data: Debian's licence texts (base-files, /usr/share/common-licenses), read in place: training on GPL-2, GPL-3,
LGPL-2.1, GFDL-1.3 and MPL-1.1 cut into paragraphs; bits per byte on the held-out Apache-2.0 and MPL-2.0 texts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, machine_info
from kd_llm.cross_tokenizer.data import alignment_coverage, build_cross_tokenizer_dataset
from kd_llm.data.sources import build_dataset
from kd_llm.evaluation.bits_per_byte import bits_per_byte, debian_license_texts, load_bpb_text
from kd_llm.evaluation.generation import generate_greedy
from kd_llm.models.loading import load_model, load_tokenizer
from kd_llm.models.students import build_student, rank_layers_by_importance
from kd_llm.training import DistillationConfig, DistillationTrainer

TRAIN_TEXTS = ("GPL-2", "GPL-3", "LGPL-2.1", "GFDL-1.3", "MPL-1.1")
GEMMA, SMOLLM2 = "packaged:gemma3-270m", "packaged:smollm2-135m-instruct"


def paragraphs(text: str, chars: int) -> list[str]:
    """Consecutive paragraphs joined up to about ``chars`` characters each (whitespace normalised inside)."""
    out, current = [], ""
    for block in (" ".join(p.split()) for p in text.split("\n\n")):
        if not block:
            continue
        if current and len(current) + len(block) > chars:
            out.append(current)
            current = ""
        current = f"{current}\n\n{block}" if current else block
    if current:
        out.append(current)
    return out


def train_records(chars: int) -> list[dict]:
    texts = debian_license_texts(TRAIN_TEXTS)
    return [{"text": chunk} for name in TRAIN_TEXTS for chunk in paragraphs(texts[name], chars)]


def seq_kd_records(teacher, tokenizer, records: list[dict], prompt_chars: int, new_tokens: int) -> list[dict]:
    """Sequence-level KD: the teacher continues the first ``prompt_chars`` characters of each training text."""
    prompts = [r["text"][:prompt_chars].rsplit(" ", 1)[0] for r in records]
    encoded = [tokenizer(p + "\n", add_special_tokens=True)["input_ids"] for p in prompts]
    written = generate_greedy(teacher, tokenizer, encoded, max_new_tokens=new_tokens, batch_size=8)
    return [{"prompt": p, "completion": c.strip() or "."} for p, c in zip(prompts, written.completions)]


def config(output: Path, args, **overrides) -> DistillationConfig:
    values = dict(output_dir=str(output), max_steps=args.steps, per_device_train_batch_size=args.batch,
                  learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=max(1, args.steps // 4),
                  save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0, alpha=0.5,
                  temperature=args.temperature, fused_loss="false")
    values.update(overrides)
    return DistillationConfig(**values)


ARM_NAMES = {"hard": "hard labels only", "same_tokenizer": "same-tokenizer KD from SmolLM2-135M-Instruct",
             "hybrid": "cross-tokenizer KD from Gemma-3-270M, hybrid", "uld": "cross-tokenizer KD, ULD",
             "span": "cross-tokenizer KD, span likelihoods", "seq_kd": "sequence-level KD (Gemma-written text)"}


def markdown_table(result: dict) -> str:
    """The README's table: bits per byte on the held-out text for every model, then per arm its time and mass."""
    lines = ["| model | bits per byte | s / step | matched mass (student / teacher) |", "|---|---:|---:|---:|"]
    for name, bpb in result["bpb"].items():
        lines.append(f"| {name} | {bpb['bits_per_byte']:.4f} | – | – |")
    for arm, entry in result["arms"].items():
        mass = (f"{entry['student_matched_mass']:.3f} / {entry['teacher_matched_mass']:.3f}"
                if "student_matched_mass" in entry else "–")
        lines.append(f"| {ARM_NAMES.get(arm, arm)} | {entry['bpb']['bits_per_byte']:.4f} | "
                     f"{entry['seconds_per_step']:.2f} | {mass} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--student_layers", type=int, default=15)
    parser.add_argument("--chunk_chars", type=int, default=400)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--bpb_bytes", type=int, default=6000)
    parser.add_argument("--train_records", type=int, default=64, help="Training texts kept (every arm the same).")
    parser.add_argument("--seq_kd_tokens", type=int, default=48, help="Tokens Gemma writes per seq_kd prompt.")
    parser.add_argument("--arms", default="hard,same_tokenizer,hybrid,uld,span,seq_kd")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "cross_tokenizer.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    started = time.perf_counter()
    result = {"machine": machine_info(), "settings": vars(args) | {"output": str(args.output)}, "bpb": {},
              "arms": {}}
    held_out = load_bpb_text("debian-licenses", args.bpb_bytes)
    records = train_records(args.chunk_chars)[: args.train_records]
    gemma, gemma_tokenizer = load_model(GEMMA), load_tokenizer(GEMMA)
    smollm2, smollm2_tokenizer = load_model(SMOLLM2), load_tokenizer(SMOLLM2)
    for name, model, tokenizer in (("teacher Gemma-3-270M", gemma, gemma_tokenizer),
                                   ("SmolLM2-135M-Instruct (unpruned)", smollm2, smollm2_tokenizer)):
        result["bpb"][name] = bits_per_byte(model, tokenizer, held_out).as_dict()
    plain = build_dataset(records, smollm2_tokenizer, max_length=args.max_length)
    calibration = [r["text"] for r in records[:4]]
    ranking = rank_layers_by_importance(smollm2, calibration, tokenizer=smollm2_tokenizer)
    layers = sorted(index for index, _ in ranking[: args.student_layers])

    def new_student():
        return build_student("pruned", teacher=smollm2, layers=layers)

    result["bpb"]["pruned student, before training"] = bits_per_byte(new_student(), smollm2_tokenizer,
                                                                     held_out).as_dict()
    result["student_layers"] = layers
    arms = args.arms.split(",")
    cross = build_cross_tokenizer_dataset(records, smollm2_tokenizer, gemma_tokenizer, max_length=args.max_length)
    result["alignment"] = alignment_coverage(cross)
    out = Path("outputs") / "bench_cross_tokenizer"
    for arm in arms:
        teacher, teacher_tokenizer, dataset, overrides = None, None, plain, {}
        if arm == "hard":
            overrides = {"alpha": 1.0}
        elif arm == "same_tokenizer":
            teacher = smollm2
        elif arm in ("hybrid", "uld", "span"):
            teacher, teacher_tokenizer, dataset = gemma, gemma_tokenizer, cross
            overrides = {"cross_tokenizer_loss": arm}
        elif arm == "seq_kd":
            generation_started = time.perf_counter()
            written = seq_kd_records(gemma, gemma_tokenizer, records, 160, args.seq_kd_tokens)
            result["seq_kd_generation_seconds"] = round(time.perf_counter() - generation_started, 1)
            dataset = build_dataset(written, smollm2_tokenizer, max_length=args.max_length,
                                    use_chat_template=False)
            overrides = {"alpha": 1.0}
        else:
            raise ValueError(f"unknown arm {arm!r}")
        student = new_student()
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config(out / arm, args, **overrides),
                                      train_dataset=dataset, processing_class=smollm2_tokenizer,
                                      teacher_tokenizer=teacher_tokenizer)
        arm_started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - arm_started
        logs = [e for e in trainer.state.log_history if "kd_loss" in e]
        entry = {"seconds_per_step": round(seconds / args.steps, 3),
                 "bpb": bits_per_byte(student, smollm2_tokenizer, held_out).as_dict(),
                 "last_ce_loss": logs[-1]["ce_loss"] if logs else None,
                 "ce_loss_curve": [e["ce_loss"] for e in logs]}
        for side in ("student_matched_mass", "teacher_matched_mass"):
            values = [e[side] for e in logs if side in e]
            if values:
                entry[side] = round(sum(values) / len(values), 4)
        result["arms"][arm] = entry
        print(arm, json.dumps(entry), flush=True)
        del trainer, student
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(markdown_table(result))
    return result


if __name__ == "__main__":
    main()
