"""A teacher in a side process (:class:`~kd_llm.training.teacher_process.TeacherProcess`) as a target: it returns
float32 logits for a batch, which reach the dense loss. It scores any batch (dataset, generated, evaluation) but
cannot write completions (seq_kd): the proxy has no ``generate``."""

from __future__ import annotations

import torch

from kd_llm.data.packing import model_inputs
from kd_llm.losses import LossComponents, distillation_objective
from kd_llm.training.targets.base import KDBatch, LossRequest, TeacherTarget, student_logits


class SideProcess(TeacherTarget):
    name = "side-process teacher logits (dense)"
    fused = False
    scores_generated = True
    writes_completions = False

    def __init__(self, teacher):
        self.teacher = teacher  # a TeacherProcess (or anything called like one that returns .logits)

    def terms(self, student_outputs, batch: KDBatch, request: LossRequest) -> LossComponents:
        teacher_logits = None
        if request.alpha < 1:
            with torch.no_grad():
                outputs = self.teacher(**model_inputs(batch.inputs), use_cache=False)  # packed: position_ids
            teacher_logits = outputs.logits[:, :-1]
        return distillation_objective(student_logits(student_outputs), teacher_logits, batch.shifted_labels,
                                      kd_vocab_size=request.kd_vocab_size, **request.objective_kwargs)
