"""Self-distillation: the teacher has the student's own architecture.

- **Born-again** (Furlanello et al. 2018): the teacher is a trained checkpoint of the student's architecture (a
  previous generation), and a freshly initialised student of the same architecture learns from it. This is offline
  distillation with a frozen teacher (:class:`kd_llm.DistillationTrainer`); :func:`born_again_student` builds the
  new generation and :func:`check_same_architecture` refuses a teacher of another shape.
- **EMA teacher** (mean teacher, Tarvainen & Valpola 2017): the teacher is an exponential moving average of the
  student, updated after every optimizer step (:class:`EMADistillationTrainer`). It never receives gradients, but it
  is not constant: it is saved in every checkpoint (``ema_teacher.safetensors``) and restored on resume.
"""

from __future__ import annotations

import copy
import os

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoModelForCausalLM, TrainerCallback

from kd_llm.training import rules
from kd_llm.training.config import DistillationConfig
from kd_llm.training.teachers import EMATeacher
from kd_llm.training.trainer import DistillationTrainer

__all__ = ["EMA_TEACHER_FILE", "EMADistillationTrainer", "born_again_student", "check_same_architecture"]

EMA_TEACHER_FILE = "ema_teacher.safetensors"
# Config fields that fix the shape of a causal LM; a born-again teacher must match the student on all it has.
_ARCHITECTURE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "intermediate_size", "head_dim", "tie_word_embeddings")


def _text_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def check_same_architecture(teacher, student) -> None:
    """Raise ``ValueError`` naming the differing config fields unless teacher and student share an architecture."""
    teacher_config, student_config = _text_config(teacher), _text_config(student)
    differing = [f"{name}: teacher {getattr(teacher_config, name, None)!r} vs student "
                 f"{getattr(student_config, name, None)!r}" for name in _ARCHITECTURE_FIELDS
                 if getattr(teacher_config, name, None) != getattr(student_config, name, None)]
    if differing:
        raise ValueError("self-distillation needs a teacher of the student's architecture, but "
                         + "; ".join(differing) + ". Born-again: give the previous generation's checkpoint as the "
                         "teacher and build the student from its config (born_again_student).")


def born_again_student(teacher: nn.Module, seed: int = 0) -> nn.Module:
    """A new generation: the teacher's architecture (same config), freshly initialised from ``seed``."""
    config = copy.deepcopy(teacher.config)
    dtype = next(teacher.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    student.requires_grad_(True)
    student.train()
    return student


class _UpdateEMATeacher(TrainerCallback):
    def __init__(self, trainer: EMADistillationTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        # A step skipped by the fp16 loss scaler did not move the student, so the average must not move either.
        if not trainer.accelerator.optimizer_step_was_skipped:
            trainer.ema.update(trainer.accelerator.unwrap_model(trainer.model))


class EMADistillationTrainer(DistillationTrainer):
    """Distil an EMA copy of the student into the student: ``alpha * CE + (1 - alpha) * T^2 * KD(EMA || student)``.

    The teacher starts as a copy of the student (the KD term starts at 0) and after every optimizer step becomes
    ``ema_decay * teacher + (1 - ema_decay) * student``. It is frozen towards gradients (no ``requires_grad``, eval
    mode, dropout off, run under ``no_grad``) and lives outside the student, so the student's checkpoint holds the
    student alone; the teacher's weights go next to it, in ``ema_teacher.safetensors``, and come back on resume.

    Args:
        model: the student (a plain or PEFT model).
        args: a :class:`DistillationConfig`; ``precompute_teacher_logits`` is refused (the teacher moves).
        ema_decay: in [0, 1).
        **kwargs: as for :class:`DistillationTrainer`, without ``teacher_model`` (the teacher is built here).
    """

    distillation_mode = "ema"

    def __init__(self, model=None, args: DistillationConfig | None = None, *, ema_decay: float = 0.999, **kwargs):
        if kwargs.get("teacher_model") is not None:
            raise ValueError("EMADistillationTrainer builds its teacher from the student: pass no teacher_model.")
        kwargs.pop("teacher_model", None)
        if model is None:
            raise ValueError("EMADistillationTrainer needs model=<the student>: the teacher is its moving average.")
        self.check_config(args)
        self.ema = EMATeacher(model, ema_decay)
        super().__init__(model=model, teacher_model=self.ema.model, args=args, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise NotImplementedError("an EMA teacher under FSDP or DeepSpeed is not supported: use DDP or one "
                                      "process.")
        self.ema.model = self.accelerator.unwrap_model(self.teacher)
        self.add_callback(_UpdateEMATeacher(self))

    @staticmethod
    def check_config(args) -> None:
        """Raise for settings an EMA teacher cannot honour (also called by the experiment before any work)."""
        if not isinstance(args, DistillationConfig):
            raise TypeError("EMADistillationTrainer needs args=DistillationConfig(...).")
        for problem in rules.mode_problems(args, "ema"):
            raise problem.error()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            folder = output_dir if output_dir is not None else self.args.output_dir
            os.makedirs(folder, exist_ok=True)
            # A flat file, not a model folder: Trainer would take a subfolder with adapter weights for an adapter
            # of a PEFT student on resume.
            save_model(self.ema.model, os.path.join(folder, EMA_TEACHER_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, EMA_TEACHER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{resume_from_checkpoint} has no {EMA_TEACHER_FILE}: it was not written by an "
                                    "EMA self-distillation run, so the teacher's average cannot be restored.")
        load_model(self.ema.model, path, device=str(next(self.ema.model.parameters()).device))
