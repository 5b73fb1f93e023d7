"""Distillation modes beyond one frozen teacher, for ``scripts/distill_llm.py`` (YAML or command line).

=================  =========================================================================================
``offline``        the default: frozen teacher(s); several with ``extra_teachers`` (+ ``teacher_weights``,
                   ``ensemble_mixture``): :mod:`kd_llm.training.ensemble`
``born_again``     self-distillation from a previous generation: ``teacher`` is a checkpoint of the student's
                   architecture and the student a fresh model of that architecture
``ema``            self-distillation from an EMA of the student (``ema_decay``); ``teacher`` then only supplies the
                   tokenizer and the architecture the student is built from
``online``         deep mutual learning: ``teacher`` trains with the student (``teacher_learning_rate``); both are
                   saved (``mutual_teacher/`` next to the student) and both resume
=================  =========================================================================================

Orthogonal to the mode: ``peft_config`` makes the student a LoRA model (``merge_peft_on_save`` merges it into plain
weights when saving), and ``teacher_adapter`` gives the teacher as base model + LoRA adapter folder, merged and
frozen (:func:`kd_llm.models.loading.load_peft_teacher`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from kd_llm.models.loading import load_model, load_peft_teacher, load_tokenizer, resolve_model_source
from kd_llm.models.peft_student import apply_lora, is_peft_model, parse_lora_settings, save_student
from kd_llm.training import DistillationTrainer
from kd_llm.training.ensemble import EnsembleDistillationTrainer
from kd_llm.training.online import MUTUAL_TEACHER_FOLDER, MutualDistillationTrainer
from kd_llm.training.self_distillation import EMADistillationTrainer, born_again_student, check_same_architecture
from kd_llm.training.teachers import ENSEMBLE_MIXTURES, TeacherEnsemble, validate_ensemble_weights

__all__ = ["DISTILLATION_MODES", "DistillationModeArguments", "TeacherSetup", "build_trainer", "check_mode_config",
           "load_teachers",
           "mode_rows", "mode_summary", "save_distilled", "student_factory"]

DISTILLATION_MODES = ("offline", "born_again", "ema", "online")
EMA_TEACHER_FOLDER = "ema_teacher"
_STUDENT_SIZE_FIELDS = ("student_num_layers", "student_layers", "student_hidden_size", "student_num_attention_heads",
                        "student_num_key_value_heads", "student_intermediate_size")


@dataclass
class DistillationModeArguments:
    distillation_mode: str = field(
        default="offline",
        metadata={"help": "offline (frozen teacher or ensemble), born_again (teacher = a checkpoint of the student's "
                          "architecture, student = a fresh copy of it), ema (teacher = moving average of the "
                          "student) or online (teacher and student train together, deep mutual learning)."},
    )
    extra_teachers: list[str] | None = field(
        default=None,
        metadata={"help": "Offline ensemble: more teacher specs, on the teacher's tokenizer, distilled together "
                          "with `teacher` as one mixture. Live, all are held at once; with "
                          "precompute_teacher_logits they are loaded one after another."},
    )
    teacher_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Ensemble weights, one per teacher (`teacher` first), positive and summing to 1. "
                          "Default: equal."},
    )
    ensemble_mixture: str = field(
        default="probs",
        metadata={"help": "How the ensemble's tempered distributions mix: probs (weighted mean of probabilities) or "
                          "log_probs (weighted mean of log-probabilities, renormalised)."},
    )
    teacher_adapter: str | None = field(
        default=None,
        metadata={"help": "A PEFT (LoRA) adapter folder for `teacher`, the base model: merged into it for "
                          "inference and frozen (offline modes)."},
    )
    ema_decay: float = field(
        default=0.999,
        metadata={"help": "distillation_mode=ema: after each optimizer step teacher = ema_decay * teacher + "
                          "(1 - ema_decay) * student. In [0, 1)."},
    )
    teacher_learning_rate: float | None = field(
        default=None,
        metadata={"help": "distillation_mode=online: the teacher's peak learning rate (its own optimizer, the "
                          "student's schedule kind). Default: learning_rate."},
    )
    peft_config: dict | str | None = field(
        default=None,
        metadata={"help": "Make the student a LoRA model: a mapping (YAML) or JSON object with r, lora_alpha, "
                          "target_modules ('all-linear' or a list of module names), lora_dropout."},
    )
    merge_peft_on_save: bool = field(
        default=False,
        metadata={"help": "With peft_config: save the distilled student merged into plain weights "
                          "(merge_and_unload) instead of as an adapter."},
    )

    def __post_init__(self):
        problems = []
        mode = self.distillation_mode
        if mode not in DISTILLATION_MODES:
            problems.append(f"distillation_mode must be one of {', '.join(DISTILLATION_MODES)}, got {mode!r}")
        if self.extra_teachers is not None and mode != "offline":
            problems.append(f"extra_teachers form an ensemble of frozen teachers, which needs distillation_mode "
                            f"offline, not {mode!r}")
        if self.teacher_weights is not None:
            if not self.extra_teachers:
                problems.append("teacher_weights needs extra_teachers: one weight per teacher of an ensemble")
            else:
                try:
                    validate_ensemble_weights(self.teacher_weights, 1 + len(self.extra_teachers))
                except ValueError as error:
                    problems.append(f"{error} (`teacher` first, then extra_teachers)")
        if self.ensemble_mixture not in ENSEMBLE_MIXTURES:
            problems.append(f"ensemble_mixture must be one of {', '.join(ENSEMBLE_MIXTURES)}, got "
                            f"{self.ensemble_mixture!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.teacher_learning_rate is not None:
            if mode != "online":
                problems.append(f"teacher_learning_rate only applies to distillation_mode online, not {mode!r} "
                                "(the teacher does not train)")
            elif not self.teacher_learning_rate > 0:
                problems.append(f"teacher_learning_rate must be > 0, got {self.teacher_learning_rate}")
        if self.teacher_adapter is not None and not os.path.isfile(os.path.join(self.teacher_adapter,
                                                                                 "adapter_config.json")):
            problems.append(f"teacher_adapter {self.teacher_adapter!r} is not a PEFT adapter folder (no "
                            "adapter_config.json there)")
        if self.teacher_adapter is not None and mode == "ema":
            problems.append("teacher_adapter has no use with distillation_mode ema (the teacher is the student's "
                            "average)")
        try:
            self.peft_config = parse_lora_settings(self.peft_config)
        except ValueError as error:
            problems.append(str(error).rstrip("."))
        if self.merge_peft_on_save and self.peft_config is None:
            problems.append("merge_peft_on_save needs peft_config (there is no adapter to merge)")
        if mode == "born_again":
            student_init = getattr(self, "student_init", "scaled")
            sizes = [name for name in _STUDENT_SIZE_FIELDS if getattr(self, name, None) is not None]
            if student_init == "pruned" or sizes:
                problems.append("distillation_mode born_again trains a student of the teacher's own architecture: "
                                "leave student_init at scaled with no student_* sizes (a fresh copy of the "
                                "teacher's architecture), or give student_init checkpoint of that architecture"
                                + (f"; remove {', '.join(sizes)}" if sizes else ""))
        if problems:
            raise ValueError("Invalid distillation mode arguments: " + "; ".join(problems) + ".")


@dataclass
class TeacherSetup:
    teacher: object
    tokenizer: object
    extra_loaders: list
    extra_tokenizers: list


def load_teachers(args: DistillationModeArguments) -> TeacherSetup:
    """The main teacher (merged with ``teacher_adapter`` if given) and its tokenizer; for an ensemble, loaders and
    tokenizers of the extra teachers. Every extra teacher's path is resolved now, so a typo fails before any work."""
    trust = getattr(args, "trust_remote_code", False)
    if args.teacher_adapter is not None:
        teacher = load_peft_teacher(args.teacher, args.teacher_adapter, trust_remote_code=trust)
        if args.distillation_mode == "online":
            teacher.requires_grad_(True)  # merged, then trained with the student
    else:
        teacher = load_model(args.teacher, trust_remote_code=trust)
    tokenizer = load_tokenizer(args.teacher, trust_remote_code=trust)
    loaders, tokenizers = [], []
    for spec in args.extra_teachers or []:
        resolve_model_source(spec)
        loaders.append(lambda spec=spec: load_model(spec, trust_remote_code=trust))
        tokenizers.append(load_tokenizer(spec, trust_remote_code=trust))
    return TeacherSetup(teacher, tokenizer, loaders, tokenizers)


def student_factory(args: DistillationModeArguments, teacher, base_factory):
    """Wrap the experiment's student factory: born-again students copy the teacher's architecture, and with
    ``peft_config`` every student gets the same (seeded) LoRA adapters."""
    if args.distillation_mode == "born_again" and getattr(args, "student_init", "scaled") == "scaled":
        def build():
            return born_again_student(teacher, seed=0)
    else:
        build = base_factory
    if args.peft_config is None:
        return build
    return lambda: apply_lora(build(), args.peft_config, seed=0)


def check_mode_config(args: DistillationModeArguments, config) -> None:
    """The training settings the chosen mode cannot honour, refused before any model is loaded or trained (the
    trainer checks them again when it is built)."""
    if args.distillation_mode == "ema":
        EMADistillationTrainer.check_config(config)
    elif args.distillation_mode == "online":
        MutualDistillationTrainer.check_config(config)
    elif args.extra_teachers:
        EnsembleDistillationTrainer.check_config(config)


def build_trainer(args: DistillationModeArguments, teachers: TeacherSetup, *, model, config, train_dataset):
    """The trainer of the chosen mode, for the distilled student."""
    common = dict(args=config, train_dataset=train_dataset, processing_class=teachers.tokenizer)
    mode = args.distillation_mode
    if mode == "ema":
        return EMADistillationTrainer(model=model, ema_decay=args.ema_decay, **common)
    if mode == "online":
        return MutualDistillationTrainer(model=model, teacher_model=teachers.teacher,
                                         teacher_learning_rate=args.teacher_learning_rate, **common)
    if mode == "born_again":
        check_same_architecture(teachers.teacher, model.get_base_model() if is_peft_model(model) else model)
    if teachers.extra_loaders:
        ensemble = TeacherEnsemble([teachers.teacher, *teachers.extra_loaders], args.teacher_weights,
                                   mixture=args.ensemble_mixture, tokenizers=[None, *teachers.extra_tokenizers],
                                   names=[args.teacher, *args.extra_teachers])
        return EnsembleDistillationTrainer(model=model, teacher_model=ensemble, **common)
    return DistillationTrainer(model=model, teacher_model=teachers.teacher, **common)


def mode_rows(trainer) -> list[tuple[str, object]]:
    """Models besides the student that training produced, to evaluate: the trained online teacher, the EMA."""
    if isinstance(trainer, MutualDistillationTrainer):
        return [("teacher, after mutual training", trainer.teacher_unwrapped)]
    if isinstance(trainer, EMADistillationTrainer):
        return [("EMA teacher (self-distillation)", trainer.ema.model)]
    return []


def save_distilled(args: DistillationModeArguments, trainer, output_dir: str | os.PathLike) -> None:
    """Save the distilled student (merged if asked) and the teacher that training changed (online) or made (EMA),
    each as a folder that ``from_pretrained`` loads."""
    output_dir = Path(output_dir)
    if args.merge_peft_on_save:
        trainer.model = save_student(trainer.model, output_dir, merge=True)
        if isinstance(trainer, MutualDistillationTrainer):
            trainer.teacher_unwrapped.save_pretrained(output_dir / MUTUAL_TEACHER_FOLDER)
    else:
        trainer.save_model(str(output_dir))
    if isinstance(trainer, EMADistillationTrainer):
        save_student(trainer.ema.model, output_dir / EMA_TEACHER_FOLDER, merge=args.merge_peft_on_save)


def mode_summary(args: DistillationModeArguments) -> dict:
    summary = {"mode": args.distillation_mode, "peft_config": args.peft_config,
               "merge_peft_on_save": args.merge_peft_on_save, "teacher_adapter": args.teacher_adapter}
    if args.extra_teachers:
        summary.update(extra_teachers=args.extra_teachers, ensemble_mixture=args.ensemble_mixture,
                       teacher_weights=validate_ensemble_weights(args.teacher_weights,
                                                                 1 + len(args.extra_teachers)))
    if args.distillation_mode == "ema":
        summary["ema_decay"] = args.ema_decay
    if args.distillation_mode == "online":
        summary["teacher_learning_rate"] = args.teacher_learning_rate
    return summary
