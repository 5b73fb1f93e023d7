"""``DistillationConfig``: ``TrainingArguments`` plus the distillation settings, validated in ``__post_init__``."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from kd_llm.losses import DIVERGENCES
from kd_llm.training.schedules import TEMPERATURE_SCHEDULES


@dataclass
class DistillationConfig(TrainingArguments):
    """Training arguments for :class:`kd_llm.DistillationTrainer`.

    The objective is ``alpha * CE(student, labels) + (1 - alpha) * T^2 * D(teacher_T || student_T)`` plus
    ``l2_weight * ||student weights||^2``, every term summed over supervised tokens and divided by the number of
    supervised tokens in the whole accumulated batch, so gradient accumulation does not change the result.
    """

    alpha: float = field(
        default=0.5,
        metadata={"help": "Weight of the hard-label cross-entropy; the distillation term gets 1 - alpha. In [0, 1]."},
    )
    temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature T of teacher and student in the distillation term (> 0)."}
    )
    final_temperature: float | None = field(
        default=None,
        metadata={"help": "Temperature at the last step for the linear/cosine schedules. Defaults to `temperature`."},
    )
    temperature_schedule: str = field(
        default="constant",
        metadata={"help": f"How T moves over training: one of {', '.join(TEMPERATURE_SCHEDULES)}."},
    )
    distillation_loss: str = field(
        default="forward_kl",
        metadata={"help": f"Per-token divergence between teacher and student: one of {', '.join(DIVERGENCES)}."},
    )
    beta: float = field(
        default=0.5, metadata={"help": "Interpolation weight of the generalised JSD (`jsd` loss), in (0, 1)."}
    )
    skew: float = field(
        default=0.1, metadata={"help": "Skew s of `skew_forward_kl` / `skew_reverse_kl`, in (0, 1)."}
    )
    l2_weight: float = field(
        default=0.0, metadata={"help": "Weight of an L2 penalty on the student's trainable weights (>= 0)."}
    )
    precompute_teacher_logits: bool = field(
        default=False,
        metadata={
            "help": "Run the teacher once over the training set before training and keep its logits in memory, "
            "so each step costs no teacher forward. Pays when the data is small and is seen for several epochs."
        },
    )
    # Extra columns (the cache index) must reach the collator; kd_llm's collator ignores the rest.
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Drop dataset columns the model's forward does not take. Off: kd_llm needs extra columns."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.final_temperature is None:
            self.final_temperature = self.temperature
        problems = []
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if not self.final_temperature > 0:
            problems.append(f"final_temperature must be > 0, got {self.final_temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"alpha must be in [0, 1], got {self.alpha}")
        if self.distillation_loss not in DIVERGENCES:
            problems.append(f"distillation_loss must be one of {sorted(DIVERGENCES)}, got {self.distillation_loss!r}")
        if not 0.0 < self.beta < 1.0:
            problems.append(f"beta must be in (0, 1), got {self.beta}")
        if not 0.0 < self.skew < 1.0:
            problems.append(f"skew must be in (0, 1), got {self.skew}")
        if self.temperature_schedule not in TEMPERATURE_SCHEDULES:
            problems.append(
                f"temperature_schedule must be one of {TEMPERATURE_SCHEDULES}, got {self.temperature_schedule!r}"
            )
        if self.l2_weight < 0:
            problems.append(f"l2_weight must be >= 0, got {self.l2_weight}")
        if problems:
            raise ValueError("Invalid DistillationConfig: " + "; ".join(problems) + ".")
