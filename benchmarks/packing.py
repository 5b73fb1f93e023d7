"""Throughput on a realistic length mix: padded, length-grouped and packed batches, and the on-policy generation
buffer, through ``DistillationTrainer`` at SmolLM2-135M shapes.

The length mix ("date + docs"): verbose date-arithmetic problems (``prompt_style=verbose``, with their scratchpad
completions: ~60-90 SmolLM2 tokens) mixed 3:1 with longer real text, paragraphs of this repository's README and
model cards as completions of a one-line prompt (~100-400 tokens), chat-formatted by the SmolLM2-135M-Instruct
tokenizer. Models: SmolLM2-135M's shape (30 layers) as the teacher and a 15-layer student, random weights
(benchmarks/run.py's ``build_model``): the step's cost depends on the shapes, not on the weights.

1. ``batching``: the same examples per optimizer step (``--batch`` x ``--accumulation``) for ``padded`` (Trainer's random
   order, padded to the micro-batch's longest), ``grouped`` (``length_grouping=step``) and ``packed``
   (``packing=True``): tokens computed per supervised token (rows x columns of the micro-batches, what student and
   teacher both run over) and the wall / CPU time of a full KD step (teacher forward, fused loss, student backward,
   AdamW), interleaved step by step, medians.
2. ``on_policy``: lmbda = 0.5 (batch 2 x 4 accumulation, 32 new tokens), ``generation_buffer=1`` (one generate call
   per micro-batch) against ``0`` (one call per step): the generation share of the step and the step time, from the
   trainer's logs. A random-weight student rarely samples EOS, so completions run to the 32-token limit: the
   generation-heavy end.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/packing.py              # a few minutes
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/packing.py --tiny       # seconds (tests/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import RESULTS_DIR, machine_info, median, write_json  # noqa: E402

MODES = {"padded": dict(), "grouped": dict(length_grouping="step"), "packed": dict(packing=True)}


def real_text_records(count: int, seed: int = 0) -> list[dict]:
    """Paragraphs of the README and model cards (natural English, 300-1,500 characters) as completions."""
    paragraphs = []
    for path in [ROOT / "README.md", *sorted((ROOT / "model_cards").glob("*.md"))]:
        for block in path.read_text().split("\n\n"):
            block = block.strip()
            if 300 <= len(block) <= 1500 and not block.startswith(("|", "```", "@")):
                paragraphs.append(block)
    rng = random.Random(seed)
    return [{"prompt": "Continue the kd_llm documentation.", "completion": rng.choice(paragraphs)}
            for _ in range(count)]


def length_mix(tokenizer, size: int, seed: int = 0, max_length: int = 512):
    """The "date + docs" mix; examples longer than ``max_length`` tokens are truncated (their supervised tokens
    with them)."""
    from kd_llm.data.sources import build_dataset, load_records

    dates = load_records("date_arithmetic", size=size - size // 4, seed=seed, prompt_style="verbose")
    records = dates + real_text_records(size // 4, seed)
    random.Random(seed).shuffle(records)
    for record in records:
        record.pop("category", None)
        record.pop("answer", None)
    return build_dataset(records, tokenizer, max_length=max_length)


def build_models(tiny: bool):
    from benchmarks import run as throughput

    preset = dict(throughput.PRESETS["tiny" if tiny else "smollm2"])
    preset["vocab_size"] = 49_152
    teacher = throughput.build_model(preset, preset["teacher_layers"], seed=1)
    student = throughput.build_model(preset, preset["student_layers"], seed=2)
    return teacher, student


def make_trainer(teacher, student, tokenizer, dataset, folder: str, **settings):
    from kd_llm import DistillationConfig, DistillationTrainer

    config = DistillationConfig(output_dir=folder, use_cpu=True, report_to="none", disable_tqdm=True,
                                save_strategy="no", seed=0, alpha=0.5, temperature=2.0, learning_rate=1e-5,
                                logging_steps=1, **settings)
    return DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                               processing_class=tokenizer)


def bench_batching(teacher, student, tokenizer, dataset, steps: int, batch: int, accumulation: int) -> dict:
    """Per mode: tokens computed / supervised tokens, and KD step times, interleaved mode by mode each step."""
    with tempfile.TemporaryDirectory() as folder:
        trainers = {mode: make_trainer(teacher, student, tokenizer, dataset, folder, per_device_train_batch_size=batch,
                                       gradient_accumulation_steps=accumulation, fused_loss="true", **extra)
                    for mode, extra in MODES.items()}
        micro = {mode: iter(t.get_train_dataloader()) for mode, t in trainers.items()}
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
        start_state = {k: v.clone() for k, v in student.state_dict().items()}
        results = {mode: {"computed": 0, "supervised": 0, "wall": [], "cpu": []} for mode in MODES}
        for step in range(steps + 1):  # step 0 warms up
            for mode, trainer in trainers.items():
                batches = [next(micro[mode]) for _ in range(accumulation)]
                num_items = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
                student.load_state_dict(start_state)  # every mode steps from the same weights
                wall, cpu = time.perf_counter(), time.process_time()
                student.train()
                for inputs in batches:
                    trainer.compute_loss(student, dict(inputs), num_items_in_batch=num_items).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if step == 0:
                    continue
                record = results[mode]
                record["computed"] += sum(b["input_ids"].numel() for b in batches)
                record["supervised"] += int(num_items)
                record["wall"].append(wall)
                record["cpu"].append(cpu)
    out = {}
    for mode, record in results.items():
        per_step = record["supervised"] / steps
        out[mode] = {"tokens_computed_per_supervised": round(record["computed"] / record["supervised"], 3),
                     "supervised_tokens_per_step": round(per_step, 1),
                     "step_wall_s": round(median(record["wall"]), 3), "step_cpu_s": round(median(record["cpu"]), 3),
                     "supervised_tokens_per_wall_s": round(per_step / median(record["wall"]), 1)}
    for mode in ("grouped", "packed"):
        out[mode]["speedup_over_padded_wall"] = round(out[mode]["supervised_tokens_per_wall_s"]
                                                      / out["padded"]["supervised_tokens_per_wall_s"], 3)
        out[mode]["speedup_over_padded_cpu"] = round(out["padded"]["step_cpu_s"] / out[mode]["step_cpu_s"], 3)
    return out


def token_ratios(tokenizer, dataset, batch: int, accumulation: int, steps: int = 16) -> dict:
    """Tokens computed per supervised token of each batching over ``steps`` optimizer steps (no model runs: the
    trainers' dataloaders only), e.g. where length grouping has several micro-batches per step to sort into."""
    teacher, student = build_models(tiny=True)
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        modes = {**MODES, "packed_512": dict(packing=True, packing_max_length=512)}  # rows of the data's longest
        for mode, extra in modes.items():
            trainer = make_trainer(teacher, student, tokenizer, dataset, folder, per_device_train_batch_size=batch,
                                   gradient_accumulation_steps=accumulation, **extra)
            computed = supervised = 0
            for index, inputs in enumerate(trainer.get_train_dataloader()):
                if index == steps * accumulation:
                    break
                computed += inputs["input_ids"].numel()
                supervised += int((inputs["labels"][:, 1:] != -100).sum())
            out[mode] = round(computed / supervised, 3)
    return out


def bench_on_policy(teacher, student, tokenizer, dataset, steps: int, batch: int, accumulation: int,
                    new_tokens: int) -> dict:
    out = {}
    start_state = {k: v.clone() for k, v in student.state_dict().items()}
    with tempfile.TemporaryDirectory() as folder:
        for name, buffer in (("per_micro_batch", 1), ("buffer", 0)):
            student.load_state_dict(start_state)
            trainer = make_trainer(teacher, student, tokenizer, dataset, folder, per_device_train_batch_size=batch,
                                   gradient_accumulation_steps=accumulation, lmbda=0.5, max_steps=steps + 1,
                                   generation_max_new_tokens=new_tokens, generation_buffer=buffer, fused_loss="true")
            stamps = []
            trainer.add_callback(_step_clock(stamps))
            trainer.train()
            logs = [e for e in trainer.state.log_history if "generation_share" in e][1:]  # step 1 warms up
            durations = [b - a for a, b in zip(stamps, stamps[1:])]
            out[name] = {"generation_share": round(median([e["generation_share"] for e in logs]), 3),
                         "generation_s_per_step": round(median([e["generation_seconds"] for e in logs]), 3),
                         "generate_calls_per_step": round(median([e["generate_calls"] for e in logs]), 2),
                         "on_policy_fraction": round(sum(e["on_policy_fraction"] for e in logs) / len(logs), 3),
                         "step_wall_s": round(median(durations), 3)}
    out["buffer"]["step_speedup"] = round(out["per_micro_batch"]["step_wall_s"] / out["buffer"]["step_wall_s"], 3)
    return out


def _step_clock(stamps: list):
    """A callback recording the wall time at the end of every optimizer step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    return StepClock()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes, for a smoke test")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per mode (after one warm-up)")
    parser.add_argument("--batch", type=int, default=8, help="batching: examples per micro-batch")
    parser.add_argument("--accumulation", type=int, default=1, help="batching: micro-batches per step")
    parser.add_argument("--on-policy-batch", type=int, default=2)
    parser.add_argument("--on-policy-accumulation", type=int, default=4)
    parser.add_argument("--tokens-only", default="", help="only tokens computed per supervised token, for each "
                        "comma-separated BATCHxACCUMULATION (e.g. 8x1,2x4); no timing")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    from kd_llm.models.packaged import packaged_tokenizer_dir
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(packaged_tokenizer_dir("smollm2-135m-instruct"))
    dataset = length_mix(tokenizer, 64 if args.tiny else 256)
    lengths = sorted(dataset["length"])
    if args.tokens_only:
        shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.tokens_only.split(",")]
        result = {"length_mix_examples": len(lengths),
                  "tokens_computed_per_supervised": {f"{b}x{a}": token_ratios(tokenizer, dataset, b, a)
                                                     for b, a in shapes}}
        write_json(args.output or RESULTS_DIR / "packing_token_ratios.json", result)
        return result
    teacher, student = build_models(args.tiny)
    steps = 1 if args.tiny else args.steps
    result = {
        "machine": machine_info(),
        "length_mix": {"name": "date + docs: verbose date problems 3 : 1 README/model-card paragraphs, SmolLM2 chat "
                               "template", "examples": len(lengths), "min": lengths[0],
                       "median": lengths[len(lengths) // 2], "max": lengths[-1]},
        "batching": bench_batching(teacher, student, tokenizer, dataset, steps, batch=args.batch,
                                   accumulation=args.accumulation),
        "on_policy": bench_on_policy(teacher, student, tokenizer, dataset, max(steps, 2),
                                     batch=args.on_policy_batch, accumulation=args.on_policy_accumulation,
                                     new_tokens=8 if args.tiny else 32),
    }
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.output or RESULTS_DIR / ("packing_tiny.json" if args.tiny else "packing_smollm2.json"), result)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2))
