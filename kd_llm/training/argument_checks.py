"""Checks of plain ``TrainingArguments`` settings that transformers accepts but that cannot train anything sensible,
shared by :class:`~kd_llm.training.DistillationConfig` and ``scripts/train_specialist.py``."""

from __future__ import annotations

from kd_llm.errors import ConfigError


def training_arguments_problems(args) -> list[str]:
    """What is wrong with the budget and batch settings of ``args`` (empty when nothing is)."""
    problems = []
    if args.learning_rate < 0:
        problems.append(f"learning_rate must be >= 0, got {args.learning_rate} (a negative rate climbs the loss)")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(args, name)
        if value < 1:
            problems.append(f"{name} must be at least 1, got {value}")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        # Trainer would run zero steps and the script would save the untrained student as if it were trained.
        problems.append(f"max_steps={args.max_steps} and num_train_epochs={args.num_train_epochs} train nothing: "
                        "set max_steps >= 1 or num_train_epochs > 0")
    return problems


def check_training_arguments(args) -> None:
    problems = training_arguments_problems(args)
    if problems:
        raise ConfigError("Invalid training arguments: " + "; ".join(problems) + ".")
