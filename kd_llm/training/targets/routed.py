"""Two targets as one: the ``primary`` serves the batches it can (a store of teacher outputs serves training batches
of the dataset), the ``fallback`` (a live, side-process or ensemble teacher) the rest (evaluation, generated
completions)."""

from __future__ import annotations

from kd_llm.training.targets.base import KDBatch, TargetCannotServe, TeacherTarget


class Routed(TeacherTarget):
    def __init__(self, primary: TeacherTarget, fallback: TeacherTarget):
        self.primary, self.fallback = primary, fallback
        self.name = f"{primary.name}, else {fallback.name}"
        self.fused = primary.fused
        self.student_forward_kwargs = primary.student_forward_kwargs
        self.serves_dataset = primary.serves_dataset or fallback.serves_dataset
        self.serves_evaluation = primary.serves_evaluation or fallback.serves_evaluation
        self.scores_generated = primary.scores_generated or fallback.scores_generated
        self.writes_completions = primary.writes_completions or fallback.writes_completions

    def serves(self, batch: KDBatch, *, training: bool) -> bool:
        return self.primary.serves(batch, training=training) or self.fallback.serves(batch, training=training)

    def for_batch(self, batch: KDBatch, *, training: bool, needs_logits: bool = False) -> TeacherTarget:
        for target in (self.primary, self.fallback):
            if target.serves(batch, training=training):
                return target.for_batch(batch, training=training, needs_logits=needs_logits)
        raise TargetCannotServe(f"neither {self.primary.name} nor {self.fallback.name} can serve this batch")

    def terms(self, student_outputs, batch, request):
        raise TypeError("Routed.terms: call for_batch first and use the target it returns")
