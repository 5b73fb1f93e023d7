"""A served teacher (``teacher_url`` / ``teacher_routes``, :mod:`kd_llm.serving`) as a target: its top-k over HTTP
reaches the sparse loss, as a top-k cache's rows do (the tail per ``teacher_cache_tail_mode``). It scores every batch
(dataset, evaluation, the student's on-policy samples) but writes no completions (seq_kd)."""

from __future__ import annotations

from collections.abc import Callable

from kd_llm.losses import LossComponents
from kd_llm.losses.sparse import sparse_distillation_objective
from kd_llm.serving.protocol import ServedTeacherUnavailable, TeacherIdentityError
from kd_llm.training.targets.base import KDBatch, LossRequest, TeacherTarget, student_logits


class ServedTeacher(TeacherTarget):
    """``signal``: a :class:`kd_llm.serving.training.ServedTopK`. ``on_failure(error)``: called when the teacher
    failed for good (the trainer saves a checkpoint and stops during training); the error is raised after it."""

    name = "served teacher top-k (dense sparse loss)"
    fused = False
    scores_generated = True
    writes_completions = False

    def __init__(self, signal, tail_mode: str, on_failure: Callable[[Exception], None] | None = None):
        self.signal, self.tail_mode, self.on_failure = signal, tail_mode, on_failure

    def terms(self, student_outputs, batch: KDBatch, request: LossRequest) -> LossComponents:
        logits = student_logits(student_outputs)
        targets = None
        if request.alpha < 1:
            try:
                targets = self.signal.targets(batch.inputs["input_ids"], batch.inputs.get("attention_mask"),
                                              batch.shifted_labels, device=logits.device,
                                              example_ids=batch.packed_example_ids,
                                              position_ids=batch.inputs.get("position_ids"))
            except (ServedTeacherUnavailable, TeacherIdentityError) as error:
                if self.on_failure is not None:
                    self.on_failure(error)
                raise
        return sparse_distillation_objective(logits, targets, batch.shifted_labels, tail_mode=self.tail_mode,
                                             kd_vocab_size=request.kd_vocab_size, **request.objective_kwargs)
