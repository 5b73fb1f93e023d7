"""Produce a report: at the end of a distillation run (:func:`write_run_report`), or from checkpoints on disk
(:func:`report_on_checkpoints`, behind ``scripts/report.py``). Both measure every model the same way, on the same
prompts and the same device, then write ``report.json``, ``report.md``, the plots and the model card.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path

import torch

from kd_llm.data.formatting import format_prompt
from kd_llm.models.peft_student import is_peft_model
from kd_llm.report import artifacts
from kd_llm.report.build import build_report
from kd_llm.report.measure import (BenchmarkSettings, cpu_probe_request, cycled_batch, measure_model,
                                   parameter_count, peak_memory_cpu, probe_folder, weight_bytes)
from kd_llm.report.model_card import write_model_card
from kd_llm.report.writer import write_report

logger = logging.getLogger(__name__)
SKILL_KEYS = ("exact_match", "mean_category_exact_match", "per_category", "count", "generation", "examples")
# results.json entries that are not part of the run's recipe (rows, curves, outcomes written after training).
NOT_RUN_KEYS = ("models", "kd_log_history", "baseline_log_history", "recovered_fraction", "hub", "report")


def run_summary(results: dict) -> dict:
    """The run summary of a ``results.json`` (teacher, student initialisation, settings...), for the recipe."""
    return {k: v for k, v in results.items() if k not in NOT_RUN_KEYS}


def skill_of(row: dict | None) -> dict | None:
    """The skill scores of an evaluation row (None when the row has none)."""
    if not row or "mean_category_exact_match" not in row:
        return None
    return {key: row[key] for key in SKILL_KEYS if key in row}


def bpb_of(row: dict | None) -> dict | None:
    """The bits per byte of an evaluation row (None when it was not measured)."""
    return (row or {}).get("bits_per_byte")


def benchmark_prompts(records: list[dict], tokenizer, *, count: int, use_chat_template: bool) -> list[list[int]]:
    """Token ids of the first ``count`` prompts, formatted as at evaluation (a ``text`` record gives its first 32
    tokens)."""
    prompts = []
    for record in records[:count]:
        if "prompt" in record:
            prompts.append(format_prompt(record, tokenizer, use_chat_template=use_chat_template))
        elif "text" in record:
            prompts.append(tokenizer(record["text"])["input_ids"][:32])
        else:
            raise ValueError(f"Cannot make a benchmark prompt from a record with keys {sorted(record)}; the speed "
                             "measurement needs 'prompt' or 'text' records.")
    if not prompts:
        raise ValueError("The speed measurement needs at least one prompt; got no records.")
    return prompts


def fitting_new_tokens(models, prompts: list[list[int]], wanted: int) -> int:
    """``wanted``, or fewer when a model's context (``max_position_embeddings``) cannot hold the longest prompt plus
    that many tokens; the same count for every model, so that their timings compare."""
    room = min((getattr(m.config, "max_position_embeddings", None) or 10**9) for m in models)
    fitting = min(wanted, room - max(len(p) for p in prompts))
    if fitting < 1:
        raise ValueError(f"The benchmark prompts ({max(len(p) for p in prompts)} tokens) fill a model's context of "
                         f"{room} positions; use shorter prompts.")
    return fitting


def measure_entries(entries: list[dict], *, prompts: list[list[int]], tokenizer, settings: BenchmarkSettings,
                    device, trust_remote_code: bool = False) -> dict:
    """Measure every entry that holds a ``model`` (moved to ``device`` first) and merge the measurements in; return
    the benchmark description. Entries keep no reference to their model afterwards."""
    models = [e["model"] for e in entries if e.get("model") is not None]
    new_tokens = fitting_new_tokens(models, prompts, settings.new_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = dict(new_tokens=new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    probes = []  # (entry, model) whose CPU memory is probed after every timing is done
    for entry in entries:
        model = entry.pop("model", None)
        if model is None:
            continue
        model.to(device)
        logger.info("Measuring %s on %s", entry["name"], device)
        entry.update(measure_model(model, source=entry.get("source"), prompts=prompts, settings=settings,
                                   trust_remote_code=trust_remote_code, cpu_memory=False, **options))
        if settings.measure_memory and "memory" not in entry:
            probes.append((entry, model))
    if probes:
        batch = cycled_batch(prompts, settings.batch_size)
        with contextlib.ExitStack() as stack:
            requests = [cpu_probe_request(stack.enter_context(probe_folder(model, entry.get("source"))), batch,
                                          dtype=next(model.parameters()).dtype, trust_remote_code=trust_remote_code,
                                          **options) for entry, model in probes]
            for (entry, model), memory in zip(probes, peak_memory_cpu(requests)):
                entry["memory"] = {**memory, "weights_bytes": weight_bytes(model), "batch_size": settings.batch_size}
    return {**settings.to_dict(), "new_tokens": new_tokens, "prompts": len(prompts)}


def _finish(entries, *, output_dir, benchmark, eval_info, device, teacher_check, run, log_history,
            baseline_log_history, write_card: bool, model_id: str | None, license: str | None) -> dict:
    report = build_report(entries, device=device, benchmark=benchmark, eval_info=eval_info,
                          teacher_check=teacher_check, run=run)
    files = write_report(report, output_dir, log_history=log_history, baseline_log_history=baseline_log_history)
    if write_card:
        files.append(write_model_card(output_dir, model_id=model_id, license=license))
    comparison = report["comparisons"][0]
    return {"files": [str(f) for f in files], "comparison": comparison, "report": report}


def as_deployed(model, folder) -> tuple[object, str | None]:
    """The model as it would be served, and the folder to probe it from: a LoRA student is measured merged (a copy;
    adapters unmerged would add their own latency), from a saved copy, since its folder may hold the adapter only."""
    if is_peft_model(model):
        return copy.deepcopy(model).merge_and_unload(), None
    return model, str(folder)


def write_run_report(results: dict, *, args, teacher, student, baseline, tokenizer, eval_records, prompt_records,
                     output_dir, model_id: str | None = None) -> dict:
    """The report of a finished :func:`kd_llm.experiment.run_distillation`: skill scores from its evaluation rows,
    costs measured now for the teacher, the hard-label baseline (saved in ``output_dir/hard_label_baseline``) and the
    distilled student (saved in ``output_dir``)."""
    output_dir = Path(output_dir)
    rows = {row["model"]: row for row in results["models"]}
    # A teacher given as base + LoRA adapter is measured from a saved copy of the merged model.
    teacher_source = None if getattr(args, "teacher_adapter", None) else args.teacher
    entries = [{"name": "teacher", "role": "teacher", "source": teacher_source, "model": teacher,
                "skill": skill_of(rows.get("teacher")), "bits_per_byte": bpb_of(rows.get("teacher"))}]
    untrained = rows.get("student, before training")
    if untrained is not None:
        entries.append({"name": "untrained student", "role": "untrained", "source": None, "model": None,
                        "parameters": untrained["parameters"], "skill": skill_of(untrained),
                        "bits_per_byte": bpb_of(untrained)})
    if baseline is not None:
        model, source = as_deployed(baseline, output_dir / artifacts.BASELINE_DIR)
        entries.append({"name": "hard-label baseline", "role": "baseline", "source": source, "model": model,
                        "skill": skill_of(rows.get("student, hard labels only")),
                        "bits_per_byte": bpb_of(rows.get("student, hard labels only"))})
    model, source = as_deployed(student, output_dir)
    entries.append({"name": "distilled student", "role": "student", "source": source, "model": model,
                    "skill": skill_of(rows.get("student, distilled (KD)")),
                    "bits_per_byte": bpb_of(rows.get("student, distilled (KD)"))})
    settings = BenchmarkSettings(batch_size=args.benchmark_batch_size, new_tokens=args.benchmark_new_tokens,
                                 measure_memory=args.measure_memory)
    device = next(student.parameters()).device
    prompts = benchmark_prompts(prompt_records, tokenizer, count=settings.batch_size,
                                use_chat_template=args.use_chat_template)
    benchmark = measure_entries(entries, prompts=prompts, tokenizer=tokenizer, settings=settings, device=device,
                                trust_remote_code=args.trust_remote_code)
    run = run_summary(results)
    if baseline is not None:
        run["baseline"] = ("the same student, from the same initial weights, trained on the same labelled data for the "
                           "same steps and seed on hard labels alone (α = 1).")
    eval_info = {"task": args.dataset, "count": len(eval_records) if eval_records else 0,
                 "seed": args.problem_seed, "prompt_style": args.prompt_style}
    return _finish(entries, output_dir=output_dir, benchmark=benchmark, eval_info=eval_info, device=device,
                   teacher_check=results.get("teacher_check"), run=run, log_history=results.get("kd_log_history"),
                   baseline_log_history=results.get("baseline_log_history"), write_card=True, model_id=model_id,
                   license=getattr(args, "card_license", None))


def report_on_checkpoints(*, teacher: str, students: list[str], baseline: str | None, output_dir: str | Path,
                          task: str, eval_records: list[dict], max_new_tokens: int, batch_size: int,
                          use_chat_template: bool, settings: BenchmarkSettings, device: str | None = None,
                          trust_remote_code: bool = False, write_card: bool = True, model_id: str | None = None,
                          license: str | None = None, progress: bool = True) -> dict:
    """Load teacher, student folder(s) and an optional hard-label baseline folder, score them all on
    ``eval_records``, measure them on one device, and write the report (and the first student's card) to
    ``output_dir``. The first student's ``results.json`` (when it has one) supplies the recipe, the curves and the
    teacher check of its run."""
    from kd_llm.evaluation.skills import evaluate_skill
    from kd_llm.models.loading import load_model, load_tokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    specs = [("teacher", "teacher", teacher)]
    if baseline is not None:
        specs.append(("hard-label baseline", "baseline", baseline))
    names = [Path(s).name or str(s) for s in students]
    for name, spec in zip(names, students):
        label = "distilled student" if len(students) == 1 else f"student {name}"
        specs.append((label, "student", spec))
    entries, tokenizer = [], None
    for name, role, spec in specs:
        model = load_model(spec, trust_remote_code=trust_remote_code).to(device)
        model_tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code)
        tokenizer = tokenizer or model_tokenizer
        skill = evaluate_skill(model, model_tokenizer, task=task, records=eval_records, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, use_chat_template=use_chat_template, progress=progress)
        entries.append({"name": name, "role": role, "source": spec, "model": model, "skill": skill})
    prompts = benchmark_prompts(eval_records, tokenizer, count=settings.batch_size,
                                use_chat_template=use_chat_template)
    benchmark = measure_entries(entries, prompts=prompts, tokenizer=tokenizer, settings=settings, device=device,
                                trust_remote_code=trust_remote_code)
    results_file = Path(students[0]) / artifacts.RESULTS_JSON
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    run = run_summary(results) or None
    eval_info = {"task": task, "count": len(eval_records)}
    return _finish(entries, output_dir=output_dir, benchmark=benchmark, eval_info=eval_info, device=device,
                   teacher_check=results.get("teacher_check"), run=run, log_history=results.get("kd_log_history"),
                   baseline_log_history=results.get("baseline_log_history"), write_card=write_card,
                   model_id=model_id, license=license)


__all__ = ["benchmark_prompts", "fitting_new_tokens", "measure_entries", "parameter_count", "report_on_checkpoints",
           "skill_of", "bpb_of", "write_run_report"]
