"""A live teacher with its own tokenizer, scored on its own rendering of each batch: the loss terms and settings.

What the trainer needs besides the pure losses: the settings it checks once (:class:`CrossTokenizerSettings`,
built by :func:`cross_tokenizer_settings` before training), the teacher's forward on its own token ids, and the
statistics worth logging (aligned spans, the share of each side's mass the hybrid matched).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kd_llm.cross_tokenizer.data import (STUDENT_SPANS, TEACHER_ATTENTION_MASK, TEACHER_INPUT_IDS,
                                         TEACHER_POSITION_IDS, TEACHER_SPANS)
from kd_llm.cross_tokenizer.losses import CROSS_TOKENIZER_LOSSES
from kd_llm.cross_tokenizer.objective import CrossTokenizerTerms, cross_tokenizer_objective
from kd_llm.cross_tokenizer.shared_vocab import SharedVocabulary, shared_vocabulary

__all__ = ["CROSS_TOKENIZER_KEYS", "CrossTokenizerSettings", "cross_tokenizer_settings", "live_teacher_terms",
           "pop_cross_tokenizer_inputs"]

CROSS_TOKENIZER_KEYS = (TEACHER_INPUT_IDS, TEACHER_ATTENTION_MASK, STUDENT_SPANS, TEACHER_SPANS)
# Packed batches (CrossTokenizerPackingCollator) carry the teacher's position_ids instead of its attention mask.
PACKED_CROSS_TOKENIZER_KEYS = (TEACHER_INPUT_IDS, TEACHER_POSITION_IDS, STUDENT_SPANS, TEACHER_SPANS)


@dataclass(frozen=True)
class CrossTokenizerSettings:
    method: str
    shared: SharedVocabulary | None
    uld_weight: float

    def describe(self) -> str:
        shared = f", {self.shared.size:,} shared tokens" if self.shared is not None else ""
        return f"{self.method}{shared}"


def _logit_rows(model) -> int | None:
    embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def cross_tokenizer_settings(method: str, student_tokenizer, teacher_tokenizer, student_model, teacher_model, *,
                             uld_weight: float = 1.0) -> CrossTokenizerSettings:
    """Check the tokenizers once, before training, and build what the loss needs (the shared vocabulary for the
    hybrid). Raises ValueError with the fix."""
    if method not in CROSS_TOKENIZER_LOSSES:
        raise ValueError(f"cross_tokenizer_loss must be one of {', '.join(CROSS_TOKENIZER_LOSSES)}, got {method!r}.")
    for who, tokenizer in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"the {who}'s tokenizer ({type(tokenizer).__name__}) cannot report character offsets, "
                             "which cross-tokenizer alignment needs: load it with use_fast=True.")
    if teacher_tokenizer.pad_token_id is None and teacher_tokenizer.eos_token_id is None:
        raise ValueError("the teacher's tokenizer has neither a pad nor an EOS token to pad its batches with.")
    shared = None
    if method == "hybrid":
        shared = shared_vocabulary(student_tokenizer, teacher_tokenizer, student_rows=_logit_rows(student_model),
                                   teacher_rows=_logit_rows(teacher_model))
    return CrossTokenizerSettings(method=method, shared=shared, uld_weight=uld_weight)


def pop_cross_tokenizer_inputs(inputs: dict) -> dict:
    """Take the teacher-side columns out of a batch (so the student's forward never sees them)."""
    keys = PACKED_CROSS_TOKENIZER_KEYS if TEACHER_POSITION_IDS in inputs else CROSS_TOKENIZER_KEYS
    popped = {key: inputs.pop(key) for key in keys if key in inputs}
    if len(popped) != len(keys):
        missing = sorted(set(keys) - set(popped))
        raise KeyError(f"a cross-tokenizer batch lacks {', '.join(missing)}: build the training set with "
                       "kd_llm.cross_tokenizer.data.build_cross_tokenizer_dataset and collate it with "
                       "CrossTokenizerCollator (DistillationTrainer does both when given a teacher_tokenizer and "
                       "cross_tokenizer_loss).")
    return popped


def live_teacher_terms(teacher, student_logits: torch.Tensor, shifted_labels: torch.Tensor, teacher_inputs: dict,
                       settings: CrossTokenizerSettings, *, alpha: float, temperature: float, loss: str,
                       beta: float, skew: float, num_items_in_batch) -> CrossTokenizerTerms:
    """Run the teacher (no grad) on its own rendering of the batch and return the cross-tokenizer objective;
    every tensor is shifted here like the student's labels (position ``i`` predicts token ``i + 1``)."""
    teacher_ids = teacher_inputs[TEACHER_INPUT_IDS]
    teacher_logits = None
    if alpha < 1:
        with torch.no_grad():
            if TEACHER_POSITION_IDS in teacher_inputs:  # packed: no 2-D mask, or examples would attend across
                rendering = {"position_ids": teacher_inputs[TEACHER_POSITION_IDS]}
            else:
                rendering = {"attention_mask": teacher_inputs[TEACHER_ATTENTION_MASK]}
            teacher_logits = teacher(input_ids=teacher_ids, **rendering, use_cache=False).logits[:, :-1]
    return cross_tokenizer_objective(
        student_logits, teacher_logits, shifted_labels, teacher_inputs[STUDENT_SPANS][:, 1:],
        teacher_inputs[TEACHER_SPANS][:, 1:], teacher_ids[:, 1:], alpha=alpha, method=settings.method, loss=loss,
        temperature=temperature, beta=beta, skew=skew, shared=settings.shared, uld_weight=settings.uld_weight,
        num_items_in_batch=num_items_in_batch)
