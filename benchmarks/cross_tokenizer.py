"""Cross-tokenizer distillation measured on the real pair: Gemma-3-270M (teacher) into SmolLM2-135M-Instruct pruned
by layer importance (student), on human-written English, scored by bits per byte on held-out text.

Arms, same student initialisation, data, steps and seed: hard labels only; same-tokenizer KD from SmolLM2-135M-Instruct
(the student's own family); cross-tokenizer KD from Gemma-3-270M with each loss of kd_llm.cross_tokenizer; and
sequence-level KD (the student trained with alpha = 1 on Gemma-written continuations of the training prompts).

    OMP_NUM_THREADS=1 python benchmarks/cross_tokenizer.py          # the full run: ~32 min on one loaded core
    python benchmarks/cross_tokenizer.py --table benchmarks/results/cross_tokenizer.json   # its table again

Data: Debian's licence texts (base-files, /usr/share/common-licenses), read in place: training on GPL-2, GPL-3,
LGPL-2.1, GFDL-1.3 and MPL-1.1 cut into paragraphs; bits per byte on the held-out Apache-2.0 and MPL-2.0 texts,
before training, at ``--curve_points`` points during training (how far from converged) and at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

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
ARMS = ("hard", "same_tokenizer", "hybrid", "uld", "span", "seq_kd")


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


def interleaved(records: list[dict], count: int) -> list[dict]:
    """``count`` records spread evenly over all the licences (not the first ``count``, which would be GPL-2 only)."""
    if count >= len(records):
        return records
    return [records[index * len(records) // count] for index in range(count)]


def seq_kd_records(teacher, tokenizer, records: list[dict], prompt_chars: int, new_tokens: int) -> list[dict]:
    """Sequence-level KD: the teacher continues the first ``prompt_chars`` characters of each training text."""
    prompts = [r["text"][:prompt_chars].rsplit(" ", 1)[0] for r in records]
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    written = generate_greedy(teacher, tokenizer, encoded, max_new_tokens=new_tokens, batch_size=8)
    return [{"prompt": p, "completion": c.rstrip() or "."} for p, c in zip(prompts, written.completions)]


def copied_share(records: list[dict], written: list[dict], chars: int = 80) -> float:
    """Share of teacher continuations whose first ``chars`` characters are the real text's (memorised licences)."""
    hits = 0
    for record, row in zip(records, written):
        head = " ".join(row["completion"].split())[:chars]
        hits += bool(head) and head in " ".join(record["text"].split())
    return round(hits / max(len(records), 1), 3)


def supervised_tokens(dataset) -> int:
    return sum(sum(label != -100 for label in labels) for labels in dataset["labels"])


def config(output: Path, args, **overrides) -> DistillationConfig:
    values = dict(output_dir=str(output), max_steps=args.steps, per_device_train_batch_size=args.batch,
                  learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=max(1, args.steps // 8),
                  save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0, alpha=args.alpha,
                  temperature=args.temperature, fused_loss="false", warmup_steps=0)
    values.update(overrides)
    return DistillationConfig(**values)


class StepClock(TrainerCallback):
    """Wall time of every optimizer step, and held-out BPB at the chosen steps (its time kept out of the steps')."""

    def __init__(self, evaluate, at_steps: set[int]):
        self.evaluate, self.at_steps = evaluate, at_steps
        self.step_seconds, self.step_cpu_seconds, self.curve, self._started = [], [], [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.perf_counter() - self._started[0])
        self.step_cpu_seconds.append(time.process_time() - self._started[1])  # this process's CPU time
        if state.global_step in self.at_steps:
            self.curve.append({"step": state.global_step, "bits_per_byte": self.evaluate()})


ARM_NAMES = {"hard": "hard labels only", "same_tokenizer": "same-tokenizer KD from SmolLM2-135M-Instruct",
             "hybrid": "cross-tokenizer KD from Gemma-3-270M, hybrid", "uld": "cross-tokenizer KD from Gemma-3-270M, ULD",
             "span": "cross-tokenizer KD from Gemma-3-270M, span likelihoods",
             "seq_kd": "sequence-level KD (Gemma-written text, alpha = 1)"}


def markdown_table(result: dict) -> str:
    """The README's table: held-out BPB of every model; per arm its BPB curve, time per step and matched mass."""
    points = sorted({p["step"] for entry in result["arms"].values() for p in entry.get("bpb_curve", [])})
    steps = result["settings"]["steps"]
    head = " | ".join(f"BPB @ {p}" for p in points)
    lines = [f"| model | BPB @ {steps} (final) | {head + ' | ' if head else ''}s / step | "
             "matched mass (student / teacher) |",
             "|---|---:|" + "---:|" * len(points) + "---:|---:|"]
    blank = " – |" * len(points)
    for name, bpb in result["bpb"].items():
        lines.append(f"| {name} | {bpb['bits_per_byte']:.4f} |{blank} – | – |")
    for arm, entry in result["arms"].items():
        mass = (f"{entry['student_matched_mass']:.3f} / {entry['teacher_matched_mass']:.3f}"
                if "student_matched_mass" in entry else "–")
        curve = {p["step"]: p["bits_per_byte"] for p in entry.get("bpb_curve", [])}
        cells = "".join(f" {curve[p]:.4f} |" if p in curve else " – |" for p in points)
        lines.append(f"| {ARM_NAMES.get(arm, arm)} | {entry['bpb']['bits_per_byte']:.4f} |{cells} "
                     f"{entry['seconds_per_step']:.2f} | {mass} |")
    return "\n".join(lines)


def write(result: dict, output: Path, started: float) -> None:
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=GEMMA, help="The cross-tokenizer teacher (also writes the seq_kd text).")
    parser.add_argument("--student", default=SMOLLM2,
                        help="The model the student is pruned from; also the same-tokenizer teacher.")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--alpha", type=float, default=0.5, help="CE weight of the KD arms (hard, seq_kd: 1).")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--student_layers", type=int, default=15)
    parser.add_argument("--chunk_chars", type=int, default=400)
    parser.add_argument("--max_length", type=int, default=112)
    parser.add_argument("--bpb_bytes", type=int, default=8000)
    parser.add_argument("--train_records", type=int, default=80,
                        help="Training texts kept, spread over all the licences (every arm the same).")
    parser.add_argument("--seq_kd_prompt_chars", type=int, default=160)
    parser.add_argument("--seq_kd_tokens", type=int, default=80, help="Tokens Gemma writes per seq_kd prompt.")
    parser.add_argument("--curve_points", type=int, default=3,
                        help="Held-out BPB this many times during training (evenly spaced), besides the end.")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "cross_tokenizer.json")
    parser.add_argument("--table", type=Path, default=None,
                        help="Print the markdown table of an earlier run's JSON and exit (runs nothing).")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.arms.split(",")) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}.")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.table is not None:
        result = json.loads(args.table.read_text())
        print(markdown_table(result))
        return result
    torch.manual_seed(0)
    started = time.perf_counter()

    def note(what: str) -> None:  # progress in the log, with the time since the start
        print(f"[{time.perf_counter() - started:7.1f} s] {what}", flush=True)

    result = {"machine": machine_info() | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                                           "nice": os.nice(0)},
              "settings": vars(args) | {"output": str(args.output), "table": None}, "bpb": {}, "arms": {}}
    held_out = load_bpb_text("debian-licenses", args.bpb_bytes)
    records = interleaved(train_records(args.chunk_chars), args.train_records)
    gemma, gemma_tokenizer = load_model(args.teacher), load_tokenizer(args.teacher)
    smollm2, smollm2_tokenizer = load_model(args.student), load_tokenizer(args.student)
    result["loading_seconds"] = round(time.perf_counter() - started, 1)
    for name, model, tokenizer in ((f"teacher {args.teacher}", gemma, gemma_tokenizer),
                                   (f"{args.student} (unpruned; the same-tokenizer teacher)", smollm2,
                                    smollm2_tokenizer)):
        result["bpb"][name] = bits_per_byte(model, tokenizer, held_out).as_dict()
        note(f"BPB {name}: {result['bpb'][name]['bits_per_byte']}")
    plain = build_dataset(records, smollm2_tokenizer, max_length=args.max_length)
    calibration = [r["text"] for r in records[:4]]
    ranking = rank_layers_by_importance(smollm2, calibration, tokenizer=smollm2_tokenizer)
    layers = sorted(index for index, _ in ranking[: args.student_layers])

    def new_student():
        return build_student("pruned", teacher=smollm2, layers=layers)

    result["bpb"]["pruned student, before training"] = bits_per_byte(new_student(), smollm2_tokenizer,
                                                                     held_out).as_dict()
    result["student_layers"] = layers
    result["data"] = {"train_records": len(records), "train_chars": sum(len(r["text"]) for r in records),
                      "supervised_student_tokens": supervised_tokens(plain),
                      "tokens_per_step_at_most": args.batch * args.max_length,
                      "held_out_bytes": len(held_out.encode("utf-8"))}
    arms = args.arms.split(",")
    cross = None
    if any(arm in ("hybrid", "uld", "span") for arm in arms):
        cross = build_cross_tokenizer_dataset(records, smollm2_tokenizer, gemma_tokenizer,
                                              max_length=args.max_length)
        result["alignment"] = alignment_coverage(cross)
    points = max(0, args.curve_points)
    at_steps = {round(args.steps * i / (points + 1)) for i in range(1, points + 1)} - {0, args.steps}
    out = Path("outputs") / "bench_cross_tokenizer"
    for arm in arms:
        teacher, teacher_tokenizer, dataset, overrides, entry = None, None, plain, {}, {}
        if arm == "hard":
            overrides = {"alpha": 1.0}
        elif arm == "same_tokenizer":
            teacher = smollm2
        elif arm in ("hybrid", "uld", "span"):
            teacher, teacher_tokenizer, dataset = gemma, gemma_tokenizer, cross
            overrides = {"cross_tokenizer_loss": arm}
        elif arm == "seq_kd":
            generation_started = time.perf_counter()
            written = seq_kd_records(gemma, gemma_tokenizer, records, args.seq_kd_prompt_chars, args.seq_kd_tokens)
            entry["generation_seconds"] = round(time.perf_counter() - generation_started, 1)
            entry["teacher_copies_real_text"] = copied_share(records, written)
            entry["example"] = written[0]
            dataset = build_dataset(written, smollm2_tokenizer, max_length=args.max_length,
                                    use_chat_template=False)
            overrides = {"alpha": 1.0}
        student = new_student()
        note(f"arm {arm}: training")

        def evaluate(model=student):
            return bits_per_byte(model, smollm2_tokenizer, held_out).as_dict()["bits_per_byte"]

        clock = StepClock(evaluate, at_steps)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config(out / arm, args, **overrides),
                                      train_dataset=dataset, processing_class=smollm2_tokenizer,
                                      teacher_tokenizer=teacher_tokenizer, callbacks=[clock])
        arm_started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - arm_started
        logs = [e for e in trainer.state.log_history if "kd_loss" in e]
        steps = clock.step_seconds
        entry |= {"seconds_per_step": round(sum(steps) / max(len(steps), 1), 3),
                  "load_average_after": [round(x, 2) for x in os.getloadavg()],
                  "cpu_seconds_per_step": round(sum(clock.step_cpu_seconds) / max(len(steps), 1), 3),
                  "first_step_seconds": round(steps[0], 3) if steps else None,
                  "train_seconds_with_curve_evals": round(seconds, 1),
                  "supervised_student_tokens": supervised_tokens(dataset),
                  "bpb": bits_per_byte(student, smollm2_tokenizer, held_out).as_dict(),
                  "bpb_curve": clock.curve,
                  "ce_loss_curve": [e["ce_loss"] for e in logs], "kd_loss_curve": [e["kd_loss"] for e in logs]}
        for side in ("student_matched_mass", "teacher_matched_mass"):
            values = [e[side] for e in logs if side in e]
            if values:
                entry[side] = round(sum(values) / len(values), 4)
        result["arms"][arm] = entry
        note(f"arm {arm}: {json.dumps(entry)}")
        del trainer, student
        write(result, args.output, started)  # after every arm: a run cut short keeps what it measured
    write(result, args.output, started)
    table = markdown_table(result)
    args.output.with_suffix(".md").write_text(table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
