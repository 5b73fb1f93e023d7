"""A live teacher in this process: its logits on the dense loss (:class:`LiveLogits`), or its final hidden states and
lm_head on the fused, chunked loss (:class:`LiveHead`), which never builds ``[B, T, V]`` logits."""

from __future__ import annotations

import torch
from torch import nn

from kd_llm.data.packing import model_inputs
from kd_llm.losses import LossComponents, distillation_objective
from kd_llm.losses.fused import fused_distillation_objective
from kd_llm.training.targets.base import KDBatch, LossRequest, TeacherTarget, student_logits
from kd_llm.training.targets.heads import FUSED_FORWARD_KWARGS, output_head


class LiveLogits(TeacherTarget):
    """The teacher (a model, placed and frozen by the trainer) runs on every batch; its logits reach the dense loss.
    With ``teacher=None`` only the hard-label term can be computed (``alpha == 1``)."""

    fused = False
    student_forward_kwargs: dict = {}

    def __init__(self, teacher: nn.Module | None):
        self.teacher = teacher
        self.writes_completions = teacher is not None
        self.scores_generated = teacher is not None
        self.name = "live teacher logits (dense)" if teacher is not None else "hard labels only (dense)"

    def teacher_logits(self, batch: KDBatch, request: LossRequest):
        if request.alpha >= 1:
            return None
        if batch.teacher_outputs is not None:  # the feature terms already ran the teacher on this batch
            return batch.teacher_outputs.logits[:, :-1]
        with torch.no_grad():
            outputs = self.teacher(**model_inputs(batch.inputs), use_cache=False)
        return outputs.logits[:, :-1]

    def terms(self, student_outputs, batch: KDBatch, request: LossRequest) -> LossComponents:
        return distillation_objective(student_logits(student_outputs), self.teacher_logits(batch, request),
                                      batch.shifted_labels, kd_vocab_size=request.kd_vocab_size,
                                      **request.objective_kwargs)


class LiveHead(TeacherTarget):
    """The fused path with a live teacher: both models' final hidden states and lm_head weights go to
    :func:`kd_llm.losses.fused.fused_distillation_objective`, a chunk of tokens at a time.

    ``student`` and ``teacher_module`` are the unwrapped models (their heads are read at each step, so a moving
    teacher such as an EMA copy is read as it is now); ``teacher`` is what runs the forward (placed, maybe wrapped)."""

    fused = True
    student_forward_kwargs = FUSED_FORWARD_KWARGS

    def __init__(self, student: nn.Module, teacher: nn.Module | None, teacher_module: nn.Module | None = None):
        self.student = student
        self.teacher = teacher
        self.teacher_module = teacher_module if teacher_module is not None else teacher
        self.writes_completions = teacher is not None
        self.scores_generated = teacher is not None
        self.name = "live teacher lm_head (fused)" if teacher is not None else "hard labels only (fused)"
        self.logits_twin = LiveLogits(teacher)

    def terms(self, student_outputs, batch: KDBatch, request: LossRequest) -> LossComponents:
        student_head = output_head(self.student)
        student_hidden = student_outputs.hidden_states[-1][:, :-1]
        teacher_hidden = teacher_weight = teacher_bias = teacher_softcap = None
        if request.alpha < 1:
            teacher_head = output_head(self.teacher_module)
            with torch.no_grad():
                teacher_outputs = self.teacher(**model_inputs(batch.inputs), use_cache=False, **FUSED_FORWARD_KWARGS)
            teacher_hidden = teacher_outputs.hidden_states[-1][:, :-1]
            teacher_weight, teacher_bias, teacher_softcap = teacher_head.weight, teacher_head.bias, teacher_head.softcap
        return fused_distillation_objective(
            student_hidden, student_head.weight, batch.shifted_labels, teacher_hidden, teacher_weight,
            student_bias=student_head.bias, teacher_bias=teacher_bias, kd_vocab_size=request.kd_vocab_size,
            chunk_size=request.chunk_size, student_softcap=student_head.softcap, teacher_softcap=teacher_softcap,
            **request.objective_kwargs,
        )
