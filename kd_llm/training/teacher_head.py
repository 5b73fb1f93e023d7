"""A loaded teacher's head, checked before its final hidden states stand in for its logits (a hidden-state teacher
cache, a side-process teacher shipping hidden states): :func:`checked_teacher_head`."""

from __future__ import annotations

import torch
from torch import nn

from kd_llm.models.lm_head import TeacherHead, TeacherHeadError, head_of_model
from kd_llm.training.targets.heads import OutputHead, probe_head


def checked_teacher_head(model: nn.Module, vocab_size: int | None = None) -> TeacherHead:
    """The head of ``model`` (unwrapped), after checking that its logits are softcap(head(final hidden state)): by its
    config and lm_head (:func:`kd_llm.models.lm_head.head_of_model`: no bias, no known logit post-processing) and
    numerically, on a few tokens (:func:`kd_llm.training.targets.heads.probe_head`), which catches what a config does
    not say. ``vocab_size``: the tokenizer's length, which the head must cover."""
    head = head_of_model(model)
    problem = probe_head(model, OutputHead(head.weight, None, head.softcap),
                         half_precision=head.weight.dtype != torch.float32)
    if problem is not None:
        raise TeacherHeadError(f"The teacher's hidden states cannot stand in for its logits: {problem}. Use the "
                               "top-k teacher cache (cache_format: top_k) or the teacher's logits.")
    if vocab_size is not None and head.vocab_size < vocab_size:
        raise TeacherHeadError(f"The teacher's lm_head has {head.vocab_size} rows but its tokenizer {vocab_size} "
                               "tokens.")
    return head
