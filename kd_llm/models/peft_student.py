"""A LoRA student: the student's weights stay frozen and low-rank adapters (PEFT) learn the teacher.

``peft_config`` settings (a mapping, from YAML or as a JSON string on the command line):

- ``r``: rank of the adapters (positive integer, default 8);
- ``lora_alpha``: scale numerator, the update is ``(lora_alpha / r) * B A`` (> 0, default ``2 * r``);
- ``target_modules``: module names to adapt (e.g. ``[q_proj, v_proj]``) or ``"all-linear"`` (default);
- ``lora_dropout``: dropout on the adapters' input, in [0, 1) (default 0).

Checkpoints during training hold the adapter only (Trainer saves and resumes PEFT models natively). At the end,
:func:`save_student` writes the adapter, or with ``merge=True`` folds it into the weights (``merge_and_unload``) and
writes a plain model that loads without PEFT.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["LORA_SETTINGS", "apply_lora", "is_peft_model", "merge_lora", "parse_lora_settings", "save_student"]

LORA_SETTINGS = ("r", "lora_alpha", "target_modules", "lora_dropout")


def parse_lora_settings(settings: dict | str | None) -> dict | None:
    """Validated LoRA settings with defaults filled in, or None for no LoRA. Raises ``ValueError`` naming every
    problem."""
    if settings is None:
        return None
    if isinstance(settings, str):
        try:
            settings = json.loads(settings)
        except json.JSONDecodeError as error:
            raise ValueError(f"peft_config must be a mapping or a JSON object string, got {settings!r}: {error}") \
                from error
    if not isinstance(settings, dict):
        raise ValueError(f"peft_config must be a mapping of LoRA settings, got {type(settings).__name__}")
    problems = []
    unknown = sorted(set(settings) - set(LORA_SETTINGS))
    if unknown:
        problems.append(f"unknown key(s) {unknown} (known: {', '.join(LORA_SETTINGS)})")
    r = settings.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        problems.append(f"r must be a positive integer, got {r!r}")
        r = 8
    alpha = settings.get("lora_alpha", 2 * r)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        problems.append(f"lora_alpha must be > 0, got {alpha!r}")
    targets = settings.get("target_modules", "all-linear")
    if isinstance(targets, str):
        if not targets:
            problems.append("target_modules must not be empty")
    elif not (isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets)):
        problems.append(f"target_modules must be 'all-linear' or a non-empty list of module names, got {targets!r}")
    else:
        targets = list(targets)
    dropout = settings.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        problems.append(f"lora_dropout must be in [0, 1), got {dropout!r}")
    if problems:
        raise ValueError("Invalid peft_config: " + "; ".join(problems) + ".")
    return {"r": r, "lora_alpha": alpha, "target_modules": targets, "lora_dropout": float(dropout)}


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def apply_lora(model: nn.Module, settings: dict | str, *, seed: int = 0):
    """Wrap ``model`` in LoRA adapters (PEFT); only the adapters train. The adapters' random init comes from
    ``seed``, so two students built alike (KD run and hard-label baseline) start equal."""
    from peft import LoraConfig, get_peft_model

    settings = parse_lora_settings(settings)
    if is_peft_model(model):
        raise ValueError("the student already has PEFT adapters; give peft_config for a plain model only")
    config = LoraConfig(task_type="CAUSAL_LM", **settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, config)
        except ValueError as error:  # e.g. no module matches target_modules
            raise ValueError(f"peft_config {settings} does not fit a {type(model).__name__}: {error}") from error


def merge_lora(model):
    """Fold the adapters into the weights and drop PEFT (in place: ``model`` must not be used afterwards)."""
    if not is_peft_model(model):
        raise ValueError(f"merge_lora needs a PEFT model, got a {type(model).__name__}")
    return model.merge_and_unload()


def save_student(model, output_dir: str | os.PathLike, *, merge: bool = False, tokenizer=None):
    """Save the student in ``output_dir``; a LoRA student as its adapter, or merged into a plain model with
    ``merge=True`` (then the merged model is returned, and the PEFT ``model`` must not be used any more)."""
    output_dir = Path(output_dir)
    if merge and is_peft_model(model):
        model = merge_lora(model)
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return model
