"""A live teacher with another tokenizer than the student's: :class:`CrossTokenizer`.

The batch carries the teacher's own rendering of each record and both sides' aligned span ids
(:mod:`kd_llm.cross_tokenizer.data`, in ``batch.side_inputs``); the teacher runs on its ids and the loss compares
the two models span by span (:mod:`kd_llm.cross_tokenizer.objective`: hybrid, ULD or span likelihoods). Dense
logits only. It serves dataset, evaluation and generated batches alike: the student's on-policy samples and the
teacher's seq_kd completions arrive with the same columns, each completion's text rendered again for both models and
aligned (:mod:`kd_llm.cross_tokenizer.generated`), and the teacher it holds writes the seq_kd completions.
"""

from __future__ import annotations

from kd_llm.cross_tokenizer.objective import CrossTokenizerTerms
from kd_llm.cross_tokenizer.teacher import CrossTokenizerSettings, live_teacher_terms, pop_cross_tokenizer_inputs
from kd_llm.training.targets.base import KDBatch, LossRequest, TeacherTarget, student_logits


class CrossTokenizer(TeacherTarget):
    fused = False
    scores_generated = True
    writes_completions = True

    def __init__(self, teacher, settings: CrossTokenizerSettings):
        self.teacher, self.settings = teacher, settings
        self.name = f"live teacher with another tokenizer ({settings.describe()})"

    def terms(self, student_outputs, batch: KDBatch, request: LossRequest) -> CrossTokenizerTerms:
        teacher_inputs = pop_cross_tokenizer_inputs(dict(batch.side_inputs))
        return live_teacher_terms(self.teacher, student_logits(student_outputs), batch.shifted_labels,
                                  teacher_inputs, self.settings, **request.objective_kwargs)
