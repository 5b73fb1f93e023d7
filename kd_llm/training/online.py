"""Online distillation: deep mutual learning (Zhang et al. 2018). Teacher and student train at the same time.

Each model is trained on its own hard-label cross-entropy plus distillation *from the other*, both at the same
temperature and alpha:

    student: alpha * CE(student) + (1 - alpha) * T^2 * D(teacher_T || student_T)
    teacher: alpha * CE(teacher) + (1 - alpha) * T^2 * D(student_T || teacher_T)

each target detached, so each model's gradient is that of its own objective. The teacher has its own optimizer (the
same kind as the student's, with ``teacher_learning_rate``), its own learning-rate schedule (the student's kind) and
its own gradient clipping, stepped right after the student's.

Here the teacher is **not** frozen: it runs in train mode with gradients while training, is placed like the student
(DDP-wrapped under data parallelism), and is saved with the student: in every checkpoint and in the final output,
``mutual_teacher/`` holds its weights (a ``save_pretrained`` folder) and, in checkpoints, its optimizer and scheduler
states, so both resume. The frozen-teacher guarantees of :class:`DistillationTrainer` apply to offline modes only.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.optimization import get_scheduler

from kd_llm.data.packing import PACKED_EXAMPLE_KEY
from kd_llm.losses import distillation_objective
from kd_llm.training import rules
from kd_llm.training.config import DistillationConfig
from kd_llm.training.targets import EXAMPLE_INDEX_COLUMN
from kd_llm.training.trainer import DistillationTrainer

__all__ = ["MUTUAL_TEACHER_FOLDER", "MutualDistillationTrainer"]

MUTUAL_TEACHER_FOLDER = "mutual_teacher"
_OPTIMIZER_FILE, _SCHEDULER_FILE = "optimizer.pt", "scheduler.pt"


class _StepTeacher(TrainerCallback):
    def __init__(self, trainer: MutualDistillationTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._teacher_optimizer_step()


class MutualDistillationTrainer(DistillationTrainer):
    """Train ``model`` (the student) and ``teacher_model`` together, each distilling from the other.

    Logs the student's ``ce_loss``, ``kd_loss``, ``total_loss`` and the teacher's ``teacher_ce_loss``,
    ``teacher_kd_loss``, ``teacher_total_loss`` and ``teacher_learning_rate``; Trainer's ``loss`` is the sum of the
    two totals (what is backpropagated). ``l2_weight`` applies to the student only.

    Args:
        model: the student.
        teacher_model: the teacher (the peer), trainable: plain ``*ForCausalLM`` model, not a PEFT model.
        args: a :class:`DistillationConfig` with ``alpha < 1``; ``precompute_teacher_logits`` is refused.
        teacher_learning_rate: the teacher's peak learning rate (default: ``args.learning_rate``).
        **kwargs: as for :class:`DistillationTrainer`.
    """

    distillation_mode = "online"

    def __init__(self, model=None, teacher_model=None, args: DistillationConfig | None = None, *,
                 teacher_learning_rate: float | None = None, **kwargs):
        self.check_config(args)
        if teacher_model is None:
            raise ValueError("online distillation needs teacher_model=<the peer that trains with the student>.")
        if hasattr(teacher_model, "peft_config"):
            raise NotImplementedError("a PEFT teacher cannot train online: merge it first (merge_and_unload).")
        if not any(p.requires_grad for p in teacher_model.parameters()):
            raise ValueError("the online teacher has no parameter that requires a gradient, so it cannot train: pass "
                             "an unfrozen model (freeze_teacher / load_peft_teacher freeze theirs).")
        if teacher_learning_rate is not None and not teacher_learning_rate > 0:
            raise ValueError(f"teacher_learning_rate must be > 0, got {teacher_learning_rate}.")
        self.teacher_learning_rate = args.learning_rate if teacher_learning_rate is None else teacher_learning_rate
        self.teacher_optimizer = None
        self.teacher_lr_scheduler = None
        super().__init__(model=model, teacher_model=teacher_model, args=args, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise NotImplementedError("online distillation under FSDP or DeepSpeed is not supported: use DDP or one "
                                      "process.")
        self.add_callback(_StepTeacher(self))

    @staticmethod
    def check_config(args) -> None:
        """Raise for settings online distillation cannot honour (also called by the experiment before any work)."""
        if not isinstance(args, DistillationConfig):
            raise TypeError("MutualDistillationTrainer needs args=DistillationConfig(...).")
        for problem in rules.mode_problems(args, "online"):
            raise problem.error()

    @property
    def teacher_unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.teacher)

    def _setup_teacher(self, teacher_model):
        # Trainable, so prepared like a trained model: placed, autocast, and DDP-wrapped when data-parallel.
        teacher_model.train()
        return self.accelerator.prepare_model(teacher_model)

    # ---- objective --------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs.pop(EXAMPLE_INDEX_COLUMN, None)
        inputs.pop(PACKED_EXAMPLE_KEY, None)  # packed rows: position_ids isolate the examples in both models
        labels = inputs.pop("labels")
        outputs = model(**inputs, use_cache=False)
        self.teacher.train(model.training)
        teacher_outputs = self.teacher(**inputs, use_cache=False)
        student_logits, teacher_logits = outputs.logits[:, :-1], teacher_outputs.logits[:, :-1]
        shifted_labels = labels[:, 1:]
        args = self.args
        temperature = self.current_temperature
        common = dict(alpha=args.alpha, loss=args.distillation_loss, temperature=temperature, beta=args.beta,
                      skew=args.skew, num_items_in_batch=num_items_in_batch, kd_vocab_size=self.kd_vocab_size)
        # Each learns from the other's current prediction, detached: its own objective only.
        student_terms = distillation_objective(student_logits, teacher_logits.detach(), shifted_labels, **common)
        teacher_terms = distillation_objective(teacher_logits, student_logits.detach(), shifted_labels, **common)
        student_loss = student_terms.total + self._l2_share(model, shifted_labels, num_items_in_batch)
        scale = self._process_scale(num_items_in_batch)
        self._record(student_terms, student_loss * scale, temperature, scale)
        metrics = self._metrics["train" if model.training else "eval"]
        metrics["teacher_ce_loss"].append(teacher_terms.ce.detach() * scale)
        metrics["teacher_kd_loss"].append(teacher_terms.kd.detach() * scale)
        metrics["teacher_total_loss"].append(teacher_terms.total.detach() * scale)
        loss = (student_loss + teacher_terms.total) * scale
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # The teacher's *_loss terms are averaged by DistillationTrainer.log along with the student's.
        training = not any(key.startswith("eval_") for key in logs)
        if training and self._metrics["train"].get("teacher_total_loss") and self.teacher_lr_scheduler is not None:
            logs["teacher_learning_rate"] = self.teacher_lr_scheduler.get_last_lr()[0]
        super().log(logs, start_time)

    # ---- the teacher's optimizer ------------------------------------------------------------------------------

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        creates_student_scheduler = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.teacher_optimizer is None:
            self.teacher_optimizer = self._create_teacher_optimizer()
        if creates_student_scheduler or self.teacher_lr_scheduler is None:
            args = self.args
            self.teacher_lr_scheduler = get_scheduler(
                args.lr_scheduler_type, optimizer=self.teacher_optimizer,
                num_warmup_steps=args.get_warmup_steps(num_training_steps), num_training_steps=num_training_steps,
                scheduler_specific_kwargs=args.lr_scheduler_kwargs,
            )
        return scheduler

    def _create_teacher_optimizer(self) -> torch.optim.Optimizer:
        """The student's kind of optimizer (``args.optim``), with the teacher's learning rate and the same
        weight-decay grouping."""
        teacher = self.teacher_unwrapped
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, teacher)
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)) or (
                {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)):
            raise NotImplementedError(f"optim={self.args.optim!r} builds its optimizer around one model; online "
                                      "distillation supports the plain torch optimizers (e.g. adamw_torch).")
        decay = set(self.get_decay_parameter_names(teacher))
        trainable = [(name, p) for name, p in teacher.named_parameters() if p.requires_grad]
        groups = [{"params": [p for name, p in trainable if name in decay], "weight_decay": self.args.weight_decay},
                  {"params": [p for name, p in trainable if name not in decay], "weight_decay": 0.0}]
        return optimizer_cls(groups, **{**optimizer_kwargs, "lr": self.teacher_learning_rate})

    def _teacher_optimizer_step(self) -> None:
        if self.args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.teacher_unwrapped.parameters(), self.args.max_grad_norm)
        self.teacher_optimizer.step()
        self.teacher_lr_scheduler.step()
        self.teacher_optimizer.zero_grad(set_to_none=True)

    # ---- saving and resuming both models ----------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            folder = os.path.join(output_dir if output_dir is not None else self.args.output_dir,
                                  MUTUAL_TEACHER_FOLDER)
            self.teacher_unwrapped.save_pretrained(folder)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(folder)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save and self.teacher_optimizer is not None:
            folder = os.path.join(output_dir, MUTUAL_TEACHER_FOLDER)
            os.makedirs(folder, exist_ok=True)
            torch.save(self.teacher_optimizer.state_dict(), os.path.join(folder, _OPTIMIZER_FILE))
            torch.save(self.teacher_lr_scheduler.state_dict(), os.path.join(folder, _SCHEDULER_FILE))

    def _teacher_checkpoint(self, checkpoint: str) -> str:
        folder = os.path.join(checkpoint, MUTUAL_TEACHER_FOLDER)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{checkpoint} has no {MUTUAL_TEACHER_FOLDER}/: it was not written by an online "
                                    "distillation run, so the teacher cannot resume from it.")
        return folder

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if model is None:  # the student's own resume, not a nested call for the teacher
            super()._load_from_checkpoint(self._teacher_checkpoint(resume_from_checkpoint),
                                          model=self.teacher_unwrapped)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        folder = self._teacher_checkpoint(checkpoint)
        for target, name in ((self.teacher_optimizer, _OPTIMIZER_FILE), (self.teacher_lr_scheduler, _SCHEDULER_FILE)):
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing: the teacher's optimizer cannot resume (was the "
                                        "checkpoint saved with save_only_model?).")
            target.load_state_dict(torch.load(path, map_location=self.args.device, weights_only=True))
