"""The main job: distil a teacher into a student, train the same student on hard labels alone as the baseline, and
compare teacher, untrained student, hard-label student and distilled student on the skill, at equal steps.

``scripts/distill_llm.py`` parses the arguments and calls :func:`run_distillation`; this module does the work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import importlib.util
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch

from kd_llm.cross_tokenizer.data import alignment_coverage, build_cross_tokenizer_dataset
from kd_llm.data.formatting import format_prompt
from kd_llm.data.sources import build_dataset, evaluation_records, load_records, supervised_token_count
from kd_llm.distillation_modes import (DistillationModeArguments, TeacherSetup, build_trainer, check_mode_config,
                                      load_teachers, mode_rows, mode_summary, save_distilled, student_factory)
from kd_llm.evaluation.bits_per_byte import bits_per_byte, load_bpb_text
from kd_llm.evaluation.generation import generate_greedy
from kd_llm.evaluation.skills import evaluate_skill
from kd_llm.features.distiller import FeatureDistiller
from kd_llm.hub import HubTarget, without_hub_push
from kd_llm.models.lm_head import TeacherHead, head_of_model
from kd_llm.models.loading import load_model, load_tokenizer
from kd_llm.models.students import build_student, decoder_layers, rank_layers_by_importance
from kd_llm.models.vocab import reconcile_vocabularies
from kd_llm.report.artifacts import BASELINE_DIR
from kd_llm.report.checks import check_run_teacher
from kd_llm.report.recipe import distillation_settings, training_settings
from kd_llm.secret_filter import redact_secrets
from kd_llm.serving.settings import is_teacher_url, served_script_problems
from kd_llm.teacher_cache.reader import check_cache_teacher
from kd_llm.teacher_cache.metadata import cache_summary
from kd_llm.training import DistillationConfig, DistillationTrainer
from kd_llm.training.checkpoints import check_output_dir, resolve_resume, resume_for_own_run
from kd_llm.training.memory_estimate import report_memory_estimate
from kd_llm.training.rules import MODES, RunShape, teacher_source
from kd_llm.training.teacher_process import TeacherProcess


@dataclass
class DistillationScriptArguments(DistillationModeArguments):
    """The experiment's options; the distillation mode's (ensemble, self-distillation, online, LoRA) come from
    :class:`kd_llm.distillation_modes.DistillationModeArguments`."""

    teacher: str = field(
        default="embedded:date-teacher",
        metadata={"help": "Teacher model: a local folder, a Hub id, a .gguf file, packaged:<name> (offline "
                          "pretrained models) or embedded:date-teacher (the specialist that ships with kd_llm)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the Hub."})
    student_init: str = field(
        default="scaled",
        metadata={"help": "How to build the student: scaled (smaller config of the teacher's architecture), "
                          "pruned (teacher layers removed) or checkpoint (an existing model)."},
    )
    student_checkpoint: str | None = field(default=None, metadata={"help": "With student_init=checkpoint."})
    student_model: str | None = field(
        default=None,
        metadata={"help": "With student_init pruned or scaled: the model (and tokenizer) the student is built from, "
                          "when it is not the teacher, e.g. teacher packaged:gemma3-270m and student_model "
                          "packaged:smollm2-135m-instruct. A tokenizer other than the teacher's needs "
                          "cross_tokenizer_loss (kd_llm.cross_tokenizer)."},
    )
    student_num_layers: int | None = field(default=None, metadata={"help": "Decoder layers of the student."})
    student_layers: list[int] | None = field(
        default=None, metadata={"help": "With student_init=pruned: the teacher layers to keep."}
    )
    prune_strategy: str = field(
        default="uniform", metadata={"help": "With student_init=pruned and no explicit layers: uniform or importance."}
    )
    calibration_size: int = field(
        default=4, metadata={"help": "With prune_strategy=importance: training texts the layer ranking is measured on."}
    )
    student_hidden_size: int | None = field(default=None, metadata={"help": "With scaled: hidden width."})
    student_num_attention_heads: int | None = field(default=None, metadata={"help": "With scaled: query heads."})
    student_num_key_value_heads: int | None = field(default=None, metadata={"help": "With scaled: KV heads."})
    student_intermediate_size: int | None = field(default=None, metadata={"help": "With scaled: MLP width."})
    dataset: str = field(
        default="date_arithmetic",
        metadata={"help": "Training data: date_arithmetic (generated), a JSONL file, a saved dataset folder or a "
                          "Hub dataset id. Records: prompt/completion, messages, or text."},
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={"help": "Held-out records for the skill evaluation (a JSONL file or dataset folder). Default: the "
                          "eval split of dataset; a single JSONL file or saved dataset has none, so give one."},
    )
    train_size: int = field(default=2000, metadata={"help": "Labelled training examples to generate or keep."})
    transfer_size: int = field(
        default=0,
        metadata={"help": "Unlabelled prompts (from the training split, answers dropped) whose completions the "
                          "teacher writes: Hinton et al.'s transfer set. Only the distilled student trains on them; "
                          "the hard-label student has no labels for them. Same step count for both."},
    )
    eval_size: int = field(default=500, metadata={"help": "Held-out problems for the skill evaluation."})
    problem_seed: int = field(default=0, metadata={"help": "Seed of the problem generator."})
    prompt_style: str = field(
        default="compact",
        metadata={"help": "date_arithmetic prompts: compact (few tokens, for small specialists) or verbose (plain "
                          "English questions, for pretrained chat models)."},
    )
    max_length: int = field(default=256, metadata={"help": "Longest tokenized training example."})
    use_chat_template: bool = field(default=True, metadata={"help": "Format chat records with the chat template."})
    compare_hard_labels: bool = field(
        default=True,
        metadata={"help": "Also train the same student on hard labels alone (same data, steps and seed) as the "
                          "baseline, and report both."},
    )
    evaluate_skills: bool = field(default=True, metadata={"help": "Score every model on the held-out skill problems."})
    max_new_tokens: int = field(default=160, metadata={"help": "Generation budget per answer in the evaluation."})
    bpb_source: str = field(
        default="auto",
        metadata={"help": "Held-out text every model's bits per byte (BPB, tokenizer-independent) is measured on: "
                          "debian-licenses (the Apache-2.0 and MPL-2.0 texts in Debian's /usr/share/common-licenses), "
                          "a UTF-8 text file, none, or auto: debian-licenses where the tokenizer can spell it and "
                          "the file exists, else recorded as skipped with the reason."},
    )
    bpb_max_bytes: int = field(default=4000, metadata={"help": "Bytes of bpb_source used (cut at a line break)."})
    generation_batch_size: int = field(default=100, metadata={"help": "Prompts generated together in evaluation."})
    # Capacity check and report (kd_llm.report).
    min_teacher_accuracy: float = field(
        default=0.1,
        metadata={"help": "Stop before training when the teacher's mean exact match on the eval split is below this "
                          "(in [0, 1]) or no better than the untrained student's: it has no skill to transfer. "
                          "--force trains anyway. Needs evaluate_skills."},
    )
    force: bool = field(default=False, metadata={"help": "Train even when the teacher check fails."})
    write_report: bool = field(
        default=True,
        metadata={"help": "At the end, measure teacher, hard-label baseline and student (skill, size, speed, memory) "
                          "and write report.md, report.json, plots/ and the model card README.md to output_dir. "
                          "Saves the hard-label student in output_dir/hard_label_baseline."},
    )
    benchmark_batch_size: int = field(default=16, metadata={"help": "Report: the larger batch of the speed test."})
    benchmark_new_tokens: int = field(default=32, metadata={"help": "Report: tokens generated per timed prompt."})
    measure_memory: bool = field(
        default=True, metadata={"help": "Report: measure peak inference memory (CPU: one subprocess per model)."}
    )
    card_license: str | None = field(
        default=None, metadata={"help": "Model card license; default: the teacher's when kd_llm knows it, else other."}
    )
    teacher_process_device: str | None = field(
        default=None,
        metadata={"help": "With teacher_cache and lmbda > 0 the KD run's teacher is loaded by a side process, which "
                          "scores the student's samples (kd_llm.training.teacher_process): the device it runs on "
                          "(cpu, cuda, cuda:1 ...). Default: cuda when training on a GPU, else cpu."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.student_init not in ("scaled", "pruned", "checkpoint"):
            raise ValueError(f"student_init must be scaled, pruned or checkpoint, got {self.student_init!r}.")
        scaled_sizes = [name for name in ("student_hidden_size", "student_num_attention_heads",
                                          "student_num_key_value_heads", "student_intermediate_size")
                        if getattr(self, name) is not None]
        if scaled_sizes and self.student_init != "scaled":
            raise ValueError(f"{', '.join(scaled_sizes)} size a scaled student, but student_init is "
                             f"{self.student_init!r}: remove them, or set student_init scaled.")
        if self.student_layers is not None and self.student_init != "pruned":
            raise ValueError(f"student_layers lists the teacher layers a pruned student keeps, but student_init is "
                             f"{self.student_init!r}: remove it, or set student_init pruned.")
        if self.student_model is not None and self.student_init == "checkpoint":
            raise ValueError("student_model is the model a pruned or scaled student is built from; with "
                             "student_init checkpoint use student_checkpoint instead.")
        if self.transfer_size < 0:
            raise ValueError(f"transfer_size must be >= 0, got {self.transfer_size}.")
        for name in ("train_size", "eval_size", "max_length", "max_new_tokens", "generation_batch_size",
                     "calibration_size", "bpb_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if not 0.0 <= self.min_teacher_accuracy <= 1.0:
            raise ValueError(f"min_teacher_accuracy must be in [0, 1] (a fraction, not a percentage), got "
                             f"{self.min_teacher_accuracy}.")
        if self.benchmark_batch_size < 1 or self.benchmark_new_tokens < 1:
            raise ValueError("benchmark_batch_size and benchmark_new_tokens must be at least 1.")
        if self.write_report and importlib.util.find_spec("matplotlib") is None:
            raise ValueError("write_report draws plots with matplotlib, which is not installed: "
                             "pip install 'kd_llm[report]', or pass --write_report false.")


def make_student_factory(args: DistillationScriptArguments, teacher, tokenizer, calibration_texts=None):
    """A function that builds a fresh student, identical on every call (same seed, same kept layers), so that the
    distilled and the hard-label students start from the same weights. Importance ranking runs once, here."""
    layers = args.student_layers
    if args.student_init == "pruned" and layers is None and args.prune_strategy == "importance":
        if args.student_num_layers is None:
            raise ValueError("prune_strategy=importance needs student_num_layers: how many teacher layers to keep.")
        teacher_layers = len(getattr(*decoder_layers(teacher)))
        if not 0 < args.student_num_layers <= teacher_layers:
            raise ValueError(f"student_num_layers={args.student_num_layers}, but a pruned student keeps between 1 and "
                             f"the teacher's {teacher_layers} layers.")
        ranking = rank_layers_by_importance(teacher, calibration_texts, tokenizer=tokenizer)
        layers = sorted(index for index, _ in ranking[: args.student_num_layers])

    def build():
        if args.student_init == "checkpoint":
            return build_student("checkpoint", checkpoint=args.student_checkpoint)
        if args.student_init == "pruned" and layers is not None:
            return build_student("pruned", teacher=teacher, layers=layers)
        if args.student_init == "pruned":
            return build_student("pruned", teacher=teacher, num_layers=args.student_num_layers,
                                 strategy=args.prune_strategy)
        return build_student("scaled", teacher=teacher, num_layers=args.student_num_layers,
                             hidden_size=args.student_hidden_size,
                             num_attention_heads=args.student_num_attention_heads,
                             num_key_value_heads=args.student_num_key_value_heads,
                             intermediate_size=args.student_intermediate_size, seed=0)
    return build


def check_checkpoint_student_tokenizer(args: DistillationScriptArguments, tokenizer, teacher, student) -> None:
    """A student checkpoint that ships its own tokenizer must share the teacher's: the run trains and saves the
    student with the teacher's tokenizer, and compares logits token by token (VocabularyMismatchError otherwise)."""
    if args.student_init != "checkpoint" or not args.student_checkpoint:
        return
    folder = Path(args.student_checkpoint)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return
    reconcile_vocabularies(tokenizer, load_tokenizer(str(folder), trust_remote_code=args.trust_remote_code),
                           teacher, student)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _bits_per_byte(model, tokenizer, args: DistillationScriptArguments) -> dict:
    """BPB on the held-out text; with ``auto``, a tokenizer that cannot spell the licence texts (the specialists'
    character tokenizer) gets ``{"skipped": why}``, shown as such in the report, instead of stopping the run."""
    source = "debian-licenses" if args.bpb_source == "auto" else args.bpb_source
    try:
        measured = bits_per_byte(model, tokenizer, load_bpb_text(source, args.bpb_max_bytes))
    except (ValueError, FileNotFoundError) as error:
        if args.bpb_source != "auto":
            raise
        return {"source": source, "skipped": str(error)}
    return {"source": source, **measured.as_dict()}


def _evaluate(name: str, model, tokenizer, args: DistillationScriptArguments, records, extra: dict,
              use_chat_template: bool | None = None) -> dict:
    row = {"model": name, "parameters": parameter_count(model), **extra}
    chat = args.use_chat_template if use_chat_template is None else use_chat_template
    if args.bpb_source != "none":
        row["bits_per_byte"] = _bits_per_byte(model, tokenizer, args)
    if args.evaluate_skills:
        scores = evaluate_skill(model, tokenizer, task=args.dataset, records=records,
                                max_new_tokens=args.max_new_tokens, batch_size=args.generation_batch_size,
                                use_chat_template=chat, progress=True)
        row.update(scores)
    return row


def _train(model, teacher, tokenizer, config: DistillationConfig, train_dataset,
           make_trainer=None) -> tuple[DistillationTrainer, float]:
    """Train and return the wall time, which includes precomputing the teacher's logits when that is on.
    ``make_trainer(model=, config=, train_dataset=)`` builds another mode's trainer (kd_llm.distillation_modes)."""
    started = time.perf_counter()
    if make_trainer is not None:
        trainer = make_trainer(model=model, config=config, train_dataset=train_dataset)
    else:
        trainer = DistillationTrainer(model=model, teacher_model=teacher, args=config, train_dataset=train_dataset,
                                      processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    return trainer, time.perf_counter() - started


def teacher_transfer_set(teacher, tokenizer, args: DistillationScriptArguments, task_options: dict):
    """Records whose completions the teacher wrote (greedy), for prompts drawn without their answers."""
    prompts = load_records(args.dataset, split="train", size=args.transfer_size, seed=args.problem_seed + 1,
                           **task_options)
    encoded = [format_prompt(r, tokenizer, use_chat_template=args.use_chat_template) for r in prompts]
    written = generate_greedy(teacher, tokenizer, encoded, max_new_tokens=args.max_new_tokens,
                              batch_size=args.generation_batch_size, progress=True)
    records = [{"prompt": r["prompt"], "completion": c.strip(), "category": r.get("category", "all")}
               for r, c in zip(prompts, written.completions) if c.strip()]
    return build_dataset(records, tokenizer, max_length=args.max_length, use_chat_template=args.use_chat_template,
                         source_name="teacher transfer set")


def kd_run_shape(args: DistillationScriptArguments, config: DistillationConfig) -> RunShape:
    """The KD training run's shape for the rule book: its mode, and where its teacher is (a teacher cache may serve
    everything, or everything but the on-policy samples, which a side process then scores)."""
    mode = "ensemble" if args.extra_teachers else args.distillation_mode
    teacher = teacher_source(config, mode)
    return RunShape(mode=mode if mode in MODES else "offline", teacher=teacher, processes=config.world_size)


def side_process_teacher(args: DistillationScriptArguments, config: DistillationConfig) -> TeacherProcess:
    """The run's teacher (merged with ``teacher_adapter``), loaded by a side process on ``teacher_process_device``."""
    device = args.teacher_process_device
    if device is None:
        device = "cpu" if config.use_cpu or not torch.cuda.is_available() else "cuda"
    # A hidden-state cache needs the head, which the process sends when it ships hidden states; these then take
    # the fused loss too (d numbers per position over the Pipe instead of V logits).
    return TeacherProcess(args.teacher, adapter=args.teacher_adapter, trust_remote_code=args.trust_remote_code,
                          device=device, hidden_states=config.teacher_cache_format == "hidden_states")


def load_student_model(args: DistillationScriptArguments, config: DistillationConfig, teachers):
    """``student_model``: the model the student is built from and its tokenizer (the student's from then on). With
    a tokenizer other than the teacher's the run is cross-tokenizer; what that does not support is refused now."""
    trust = args.trust_remote_code
    base, tokenizer = load_model(args.student_model, trust_remote_code=trust), load_tokenizer(args.student_model,
                                                                                              trust_remote_code=trust)
    if tokenizer.get_vocab() == teachers.tokenizer.get_vocab() and config.cross_tokenizer_loss is None:
        return base, tokenizer, None
    problems = []
    if config.cross_tokenizer_loss is None:
        problems.append("set cross_tokenizer_loss (hybrid, uld or span) to distil across the two tokenizers")
    if args.distillation_mode != "offline" or args.extra_teachers:
        problems.append(f"distillation_mode {args.distillation_mode}{' with extra_teachers' if args.extra_teachers else ''} "
                        "is not supported across tokenizers (offline only)")
    if args.transfer_size:
        problems.append("transfer_size (a teacher-written transfer set) is not supported across tokenizers yet")
    if args.write_report:
        problems.append("write_report measures every model on the same prompt token ids, which a teacher with "
                        "another tokenizer cannot read yet: pass --write_report false (results.json still has every "
                        "model's skill and bits per byte)")
    if problems:
        raise ValueError(f"student_model {args.student_model!r} has another tokenizer than the teacher "
                         f"{args.teacher!r}: " + "; ".join(problems) + ".")
    return base, tokenizer, teachers.tokenizer


def run_distillation(args: DistillationScriptArguments, config: DistillationConfig) -> dict:
    """Run the whole comparison and save the distilled student, its tokenizer and ``results.json`` in
    ``config.output_dir``. With ``push_to_hub``, that folder's allow-listed files are then pushed (kd_llm.hub)."""
    output_dir = Path(config.output_dir)
    check_output_dir(output_dir)  # a file, or read-only: say so now, not after training
    # A checkpoint the KD run cannot resume from is refused now, not after the baseline trained (the trainer checks
    # again, and names the incomplete checkpoints it skips).
    resolve_resume(config.resume_from_checkpoint, output_dir, print_fn=lambda line: None)
    # --push_to_hub: token, network and repository are checked now, before any work. The trainers never push (nor
    # keep the token in training_args.bin); the output folder is pushed once, at the end, through an allow-list,
    # by the main process only.
    hub_target = HubTarget.from_training_args(config) if config.push_to_hub and config.process_index == 0 else None
    config = without_hub_push(config)
    check_mode_config(args, config)  # settings the distillation mode cannot honour fail now, before any work
    shape = kd_run_shape(args, config)
    if shape.teacher == "side_process" and shape.processes > 1:
        raise ValueError("teacher_cache with lmbda > 0 scores the on-policy samples with a teacher in one side "
                         "process, which serves one training process: launch a single process (each rank would "
                         "need its own side process), or set lmbda 0.")
    served = is_teacher_url(args.teacher)  # teacher: http://host:port, a served teacher (kd_llm.serving)
    if served:
        problems = served_script_problems(args)
        if problems:
            raise ValueError(f"teacher={args.teacher} is a served teacher, so: " + "; ".join(problems) + ".")
        if not config.teacher_url and not config.teacher_routes:
            config = dataclasses.replace(config, teacher_url=args.teacher)
        teachers = TeacherSetup(None, load_tokenizer(args.student_checkpoint,
                                                     trust_remote_code=args.trust_remote_code), [], [])
    else:
        teachers = load_teachers(args)  # with teacher_adapter merged; ensemble members checked, loaded when needed
    teacher, tokenizer = teachers.teacher, teachers.tokenizer
    # student_model: the student is built from another model, with its own tokenizer (cross-tokenizer when the
    # tokenizers differ: teacher_tokenizer is then the teacher's, `tokenizer` the student's).
    student_base, teacher_tokenizer = teacher, None
    if args.student_model is not None:
        student_base, tokenizer, teacher_tokenizer = load_student_model(args, config, teachers)
    task_options = {"prompt_style": args.prompt_style} if args.dataset == "date_arithmetic" else {}
    train_records = load_records(args.dataset, split="train", size=args.train_size, seed=args.problem_seed,
                                 **task_options)
    train_dataset = build_dataset(train_records, tokenizer, max_length=args.max_length,
                                  use_chat_template=args.use_chat_template, source_name=args.dataset)
    cross_dataset = None
    if teacher_tokenizer is not None:  # every record aligned now: bad input stops the run before any training
        cross_dataset = build_cross_tokenizer_dataset(train_records, tokenizer, teacher_tokenizer,
                                                      max_length=args.max_length,
                                                      use_chat_template=args.use_chat_template,
                                                      source_name=args.dataset)
    eval_records = None
    if args.evaluate_skills:
        eval_records = evaluation_records(args.dataset, args.eval_dataset, size=args.eval_size,
                                          seed=args.problem_seed, **task_options)
    # Importance pruning ranks layers by the loss on a few training texts.
    calibration = tokenizer.batch_decode(train_dataset[: args.calibration_size]["input_ids"],
                                         skip_special_tokens=True) if args.prune_strategy == "importance" else None
    new_student = student_factory(args, teacher, make_student_factory(args, student_base, tokenizer, calibration))
    untrained_student = new_student()
    check_checkpoint_student_tokenizer(args, tokenizer, teacher, untrained_student)
    # Feature terms the two models cannot serve (attention maps of fused-QKV layers, layer maps out of range) are
    # refused now, before the baseline trains; the trainer builds its own distiller.
    FeatureDistiller.from_config(config, untrained_student, teacher)
    # Before any training: the memory one process will need, and a warning when its device is short.
    memory_teacher = None if shape.teacher != "live" else teacher  # a cache (and a side process) stand in for it
    report_memory_estimate(untrained_student, memory_teacher, config, train_dataset, shape=shape,
                           max_length=args.max_length if args.transfer_size else None)  # transfer set: not built yet

    # A served teacher is not evaluated here (it scores; the skill check needs it to generate). A teacher with
    # another tokenizer (student_model) is evaluated through its own tokenizer and chat template.
    teacher_chat = None if teacher_tokenizer is None else (args.use_chat_template
                                                            and bool(teacher_tokenizer.chat_template))
    rows = [] if served else [_evaluate("teacher", teacher, teacher_tokenizer or tokenizer, args, eval_records,
                                        {"train_seconds": None}, use_chat_template=teacher_chat)]
    rows.append(_evaluate("student, before training", untrained_student, tokenizer, args, eval_records,
                          {"train_seconds": 0.0}))
    teacher_check = check_run_teacher(args, rows)  # raises, before any training, unless --force
    baseline_trainer = None
    if args.compare_hard_labels:
        baseline_config = dataclasses.replace(
            config, alpha=1.0, precompute_teacher_logits=False, lmbda=0.0, seq_kd=False,
            hidden_weight=0.0, attention_weight=0.0,  # hard labels alone: no teacher features either
            output_dir=str(output_dir / "hard_label_baseline"),
            push_to_hub=False,
            # A resumed run: the baseline resumes from its own checkpoints, never from the distilled student's.
            resume_from_checkpoint=resume_for_own_run(config.resume_from_checkpoint,
                                                      output_dir / "hard_label_baseline", "hard-label baseline"),
        )
        baseline_trainer, seconds = _train(new_student(), None, tokenizer, baseline_config, train_dataset)
        rows.append(_evaluate("student, hard labels only", baseline_trainer.model, tokenizer, args, eval_records,
                              {"train_seconds": round(seconds, 1)}))
        if args.write_report:  # the report measures it from disk, like the other models
            baseline_trainer.save_model(str(output_dir / BASELINE_DIR))
            tokenizer.save_pretrained(str(output_dir / BASELINE_DIR))
    kd_dataset, transfer_seconds = cross_dataset or train_dataset, 0.0
    if args.transfer_size:
        started = time.perf_counter()
        transfer = teacher_transfer_set(teacher, tokenizer, args, task_options)
        kd_dataset = datasets.concatenate_datasets([train_dataset, transfer.cast(train_dataset.features)])
        transfer_seconds = time.perf_counter() - started
    kd_student = new_student()
    if shape.teacher != "live":
        # Offline teacher: the cache serves every dataset batch (and with lmbda > 0 a side process scores the
        # student's samples). Check now that this teacher made the cache, then free it for the training run (the
        # report loads it again from disk).
        check_cache_teacher(config.teacher_cache, teacher)
        # A hidden-state cache also needs the teacher's lm_head (V x d, the input embedding when tied): kept alone.
        head = head_of_model(teacher) if config.teacher_cache_format == "hidden_states" else None
        del new_student  # its closure holds the teacher
        teachers.teacher = teacher = head  # a hidden-state cache keeps the teacher's lm_head alone
        student_base = None  # the teacher, unless student_model is set
        gc.collect()
    with (side_process_teacher(args, config) if shape.teacher == "side_process"
          else contextlib.nullcontext()) as teacher_process:
        if teacher_process is not None:
            teachers.teacher = teacher_process  # stopped when training ends, before the report reloads the teacher
        make_trainer = functools.partial(build_trainer, args, teachers)
        if teacher_tokenizer is not None:
            def make_trainer(model, config, train_dataset):
                return DistillationTrainer(model=model, teacher_model=teachers.teacher, args=config,
                                           train_dataset=train_dataset, processing_class=tokenizer,
                                           teacher_tokenizer=teacher_tokenizer)
        trainer, seconds = _train(kd_student, teachers.teacher, tokenizer, config, kd_dataset,
                                  make_trainer=make_trainer)
    if teacher_process is not None or isinstance(teacher, TeacherHead):
        teachers.teacher = teacher = None
    if teacher is None and args.write_report:
        teacher = load_teachers(args).teacher
    seconds += transfer_seconds
    rows.append(_evaluate("student, distilled (KD)", trainer.model, tokenizer, args, eval_records,
                          {"train_seconds": round(seconds, 1)}))
    # Online: the teacher after training with the student; EMA: the average the student learnt from.
    rows.extend(_evaluate(name, model, tokenizer, args, eval_records, {"train_seconds": None})
                for name, model in mode_rows(trainer))

    save_distilled(args, trainer, output_dir)
    tokenizer.save_pretrained(str(output_dir))
    results = {
        "teacher": args.teacher,
        "steps": trainer.state.global_step,
        "train_examples": len(train_dataset),
        "transfer_examples": len(kd_dataset) - len(train_dataset),
        "student_init": args.student_init,
        "distillation_mode": mode_summary(args),
        "student_teacher_layers": getattr(trainer.model.config, "kd_llm_teacher_layers", None),
        "supervised_tokens": int(supervised_token_count(train_dataset)),
        "teacher_cache": cache_summary(config),  # k, temperature, codec, bytes/token, or None
        "student_model": args.student_model,
        "cross_tokenizer": None if cross_dataset is None else {"loss": config.cross_tokenizer_loss,
                                                               **alignment_coverage(cross_dataset)},
        "distillation": {k: getattr(config, k) for k in ("alpha", "temperature", "final_temperature",
                                                          "temperature_schedule", "distillation_loss", "beta", "skew",
                                                          "l2_weight", "precompute_teacher_logits", "lmbda",
                                                          "seq_kd", "seq_kd_decoding", "generation_max_new_tokens",
                                                          "generation_temperature", "hidden_weight", "hidden_loss",
                                                          "hidden_layer_map", "hidden_projection",
                                                          "hidden_projection_init", "attention_weight",
                                                          "attention_loss", "attention_layer_map", "relation_heads",
                                                          "attention_query_chunk")},
        # On-policy / seq_kd generation during KD training (kd_llm.training.on_policy), this process.
        "training_generation": (trainer.completion_generator.run_totals()
                                if getattr(trainer, "completion_generator", None) is not None else None),
        "models": rows,
        "kd_log_history": trainer.state.log_history,
        "baseline_log_history": baseline_trainer.state.log_history if baseline_trainer is not None else None,
        "teacher_check": teacher_check,
        "distillation_settings": distillation_settings(config),
        "training": training_settings(config),
        "script_arguments": dataclasses.asdict(args),
    }
    if baseline_trainer is not None and args.evaluate_skills:
        results["recovered_fraction"] = recovered_fraction(rows)
    (output_dir / "results.json").write_text(json.dumps(redact_secrets(results), indent=2, default=str))
    if args.write_report:
        from kd_llm.report.run import write_run_report  # matplotlib, only when reporting

        report = write_run_report(results, args=args, teacher=teacher, student=trainer.model,
                                  baseline=baseline_trainer.model if baseline_trainer is not None else None,
                                  tokenizer=tokenizer, eval_records=eval_records,
                                  prompt_records=eval_records or train_records, output_dir=output_dir,
                                  model_id=getattr(hub_target, "repo_id", None))
        results["report"] = {"files": report["files"], "comparison": report["comparison"]}
    if hub_target is not None:
        pushed = hub_target.push(output_dir)
        results["hub"] = {"repo_id": pushed.repo_id, "commit_url": pushed.commit_url, "files": list(pushed.files)}
    return results


def recovered_fraction(rows: list[dict]) -> float | None:
    """Share of the teacher's lead over the hard-label student that distillation recovers:
    (KD - hard) / (teacher - hard), on mean exact match. None when the teacher has no lead."""
    score = {row["model"]: row["mean_category_exact_match"] for row in rows}
    if "teacher" not in score:  # a served teacher, not evaluated here
        return None
    teacher, hard, kd = (score["teacher"], score["student, hard labels only"], score["student, distilled (KD)"])
    return None if teacher <= hard else (kd - hard) / (teacher - hard)


def format_table(results: dict) -> str:
    """One plain-text table: exact match per category, parameters, training time and generation speed."""
    rows = results["models"]
    categories = sorted({c for row in rows for c in row.get("per_category", {})})
    header = ["model", "params", *categories, "mean EM", "train s", "gen tok/s"]
    lines = []
    for row in rows:
        per = row.get("per_category", {})
        lines.append([
            row["model"], f"{row['parameters']:,}", *(f"{100 * per[c]:.1f}" if c in per else "-" for c in categories),
            f"{100 * row['mean_category_exact_match']:.1f}" if "mean_category_exact_match" in row else "-",
            "-" if row.get("train_seconds") is None else f"{row['train_seconds']:.0f}",
            f"{row['generation']['tokens_per_second']:.0f}" if "generation" in row else "-",
        ])
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    render = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                     for i, (c, w) in enumerate(zip(cells, widths)))
    out = [render(header), render(["-" * w for w in widths]), *map(render, lines)]
    if results.get("recovered_fraction") is not None:
        transfer = results.get("transfer_examples", 0)
        data = (f"same {results['train_examples']} labelled examples" +
                (f"; KD also on {transfer} teacher-written unlabelled prompts" if transfer else ""))
        out.append(f"KD recovers {100 * results['recovered_fraction']:.0f}% of the teacher's lead over the "
                   f"hard-label student (mean exact match, {results['steps']} steps each, {data}).")
    return "\n".join(out)
