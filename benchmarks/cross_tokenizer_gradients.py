"""Why a distillation term helps or not, measured cheaply: on the pruned student before training, the cosine between
each training term's gradient and the gradient of the held-out text's NLL (the numerator of bits per byte).

A term whose gradient points along the held-out NLL's lowers held-out BPB faster, to first order, for the same step
size; a term at cosine ~0 moves the student in directions the held-out text does not care about. The terms: the
student's CE on the training batches (hard labels), and each KD term alone (alpha = 0): same-tokenizer KD from
SmolLM2-135M-Instruct, and the cross-tokenizer hybrid, ULD and span losses from Gemma-3-270M, each at every
``--temperatures``. Also reported: the share of each side's mass the hybrid matches at each temperature, and the
alignment's coverage of the batches. Side measurements for benchmarks/README.md, not a training run.

    OMP_NUM_THREADS=1 python benchmarks/cross_tokenizer_gradients.py --layers_from benchmarks/results/cross_tokenizer.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS_DIR, machine_info
from benchmarks.cross_tokenizer import GEMMA, SMOLLM2, interleaved, train_records
from kd_llm.cross_tokenizer.data import CrossTokenizerCollator, alignment_coverage, build_cross_tokenizer_dataset
from kd_llm.cross_tokenizer.teacher import cross_tokenizer_settings, live_teacher_terms, pop_cross_tokenizer_inputs
from kd_llm.evaluation.bits_per_byte import _start_token, load_bpb_text, text_windows
from kd_llm.losses.objective import distillation_objective
from kd_llm.models.loading import load_model, load_tokenizer
from kd_llm.models.students import build_student, rank_layers_by_importance


def flat_gradient(model, loss: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return torch.cat(grads)


def held_out_nll(model, tokenizer, text: str, max_tokens: int = 512) -> tuple[torch.Tensor, int]:
    """Summed NLL (nats, with grad) of ``text`` in windows as bits_per_byte scores it, and its bytes."""
    start, total, size = _start_token(tokenizer), 0.0, 0
    for ids, nbytes in text_windows(tokenizer, text, max_tokens):
        input_ids = torch.tensor([[start, *ids]])
        logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1]
        total = total + F.cross_entropy(logits.float(), input_ids[0, 1:], reduction="sum")
        size += nbytes
    return total, size


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers_from", type=Path, default=None,
                        help="The benchmark's JSON: reuse its student_layers (else ranked again, as it does).")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=112)
    parser.add_argument("--chunk_chars", type=int, default=400)
    parser.add_argument("--train_records", type=int, default=80)
    parser.add_argument("--student_layers", type=int, default=15)
    parser.add_argument("--bpb_bytes", type=int, default=8000)
    parser.add_argument("--temperatures", default="1,2")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "cross_tokenizer_gradients.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(0)
    held_out = load_bpb_text("debian-licenses", args.bpb_bytes)
    records = interleaved(train_records(args.chunk_chars), args.train_records)
    gemma, gemma_tokenizer = load_model(GEMMA), load_tokenizer(GEMMA)
    smollm2, smollm2_tokenizer = load_model(SMOLLM2), load_tokenizer(SMOLLM2)
    for teacher in (gemma, smollm2):
        teacher.eval().requires_grad_(False)
    if args.layers_from is not None:
        layers = json.loads(args.layers_from.read_text())["student_layers"]
    else:
        ranking = rank_layers_by_importance(smollm2, [r["text"] for r in records[:4]], tokenizer=smollm2_tokenizer)
        layers = sorted(index for index, _ in ranking[: args.student_layers])
    student = build_student("pruned", teacher=smollm2, layers=layers)
    student.eval()  # no dropout: gradients of the same function for every term
    used = records[: args.batches * args.batch]
    cross = build_cross_tokenizer_dataset(used, smollm2_tokenizer, gemma_tokenizer, max_length=args.max_length)
    collate = CrossTokenizerCollator(smollm2_tokenizer.pad_token_id, gemma_tokenizer.pad_token_id)
    batches = [collate([cross[i] for i in range(b * args.batch, (b + 1) * args.batch)]) for b in range(args.batches)]
    nll, size = held_out_nll(student, smollm2_tokenizer, held_out)
    reference = flat_gradient(student, nll / size)
    result = {"machine": machine_info(), "settings": vars(args) | {"output": str(args.output)},
              "student_layers": layers, "alignment": alignment_coverage(cross),
              "held_out_bpb_before": round(nll.item() / size / math.log(2), 5), "cosine_with_held_out": {},
              "cosine_with_hard_labels": {}, "matched_mass": {}}
    settings = {method: cross_tokenizer_settings(method, smollm2_tokenizer, gemma_tokenizer, student, gemma)
                for method in ("hybrid", "uld", "span")}

    def term_loss(term: str, temperature: float) -> tuple[torch.Tensor, dict]:
        total, extra = 0.0, {}
        for batch in batches:
            batch = dict(batch)
            side = pop_cross_tokenizer_inputs(batch)
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            if term in ("hard", "same_tokenizer"):
                teacher_logits = None
                if term == "same_tokenizer":
                    with torch.no_grad():
                        teacher_logits = smollm2(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"]).logits[:, :-1]
                terms = distillation_objective(logits, teacher_logits, labels, alpha=1.0 if term == "hard" else 0.0,
                                               temperature=temperature)
            else:
                terms = live_teacher_terms(gemma, logits, labels, side, settings[term], alpha=0.0,
                                           temperature=temperature, loss="forward_kl", beta=0.5, skew=0.1,
                                           num_items_in_batch=None)
                if terms.student_matched_mass is not None:
                    for key in ("student_matched_mass", "teacher_matched_mass", "spans"):
                        value = getattr(terms, key)
                        extra[key] = extra.get(key, 0.0) + float(value)
            total = total + terms.total / len(batches)
        return total, extra

    hard = flat_gradient(student, term_loss("hard", 1.0)[0])
    result["cosine_with_held_out"]["hard"] = round(F.cosine_similarity(hard, reference, dim=0).item(), 4)
    for temperature in (float(t) for t in args.temperatures.split(",")):
        for term in ("same_tokenizer", "hybrid", "uld", "span"):
            loss, extra = term_loss(term, temperature)
            gradient = flat_gradient(student, loss)
            name = f"{term} T={temperature:g}"
            result["cosine_with_held_out"][name] = round(F.cosine_similarity(gradient, reference, dim=0).item(), 4)
            result["cosine_with_hard_labels"][name] = round(F.cosine_similarity(gradient, hard, dim=0).item(), 4)
            if extra:
                result["matched_mass"][f"T={temperature:g}"] = {
                    side: round(extra[f"{side}_matched_mass"] / extra["spans"], 4) for side in ("student", "teacher")}
            print(name, result["cosine_with_held_out"][name], result["cosine_with_hard_labels"][name], flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
