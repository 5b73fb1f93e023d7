"""The on-disk top-k teacher cache (``teacher_cache: <folder>``, built by scripts/cache_teacher.py) as a target:
:class:`TopKCache` on the dense sparse loss, :class:`TopKCacheFused` on the fused one (student hidden states and
lm_head, no ``[B, T, V]`` logits). Both serve training batches of the dataset only: what the cache does not hold
(evaluation, generated completions) needs a live or side-process teacher behind a
:class:`~kd_llm.training.targets.routed.Routed` target.

:func:`open_training_cache` opens the cache and checks it against the run before any training step.
"""

from __future__ import annotations

from torch import nn

from kd_llm.losses import LossComponents
from kd_llm.losses.fused_sparse import fused_sparse_distillation_objective
from kd_llm.losses.sparse import check_sparse_setup, sparse_distillation_objective
from kd_llm.models.vocab import tokenizer_vocab_size
from kd_llm.teacher_cache.metadata import TeacherCacheError
from kd_llm.teacher_cache.reader import TeacherCache
from kd_llm.training.targets.base import KDBatch, LossRequest, TeacherTarget, student_logits
from kd_llm.training.targets.heads import FUSED_FORWARD_KWARGS, output_head


def open_training_cache(args, *, train_dataset, eval_dataset, student: nn.Module, teacher_model,
                        teacher_tokenizer, student_tokenizer) -> TeacherCache | None:
    """Open ``args.teacher_cache`` and check it against this run (tokenizer, data, teacher, vocabulary,
    temperatures), before any training step. None when no cache is set or no distillation term reads it."""
    if not args.teacher_cache or args.alpha >= 1:
        return None  # alpha = 1 (e.g. the experiment's hard-label baseline) never reads a teacher
    if student_tokenizer is None:
        raise ValueError("Pass processing_class=<the student's tokenizer>: the teacher cache is checked against it.")
    if train_dataset is None:
        raise ValueError("teacher_cache is set but there is no train_dataset: the cache serves training batches.")
    if teacher_model is None and eval_dataset is not None:
        raise ValueError("Evaluating the distillation term needs the teacher on the evaluation data, which the cache "
                         "(training data only) does not hold: pass teacher_model=<the teacher> as well, or no "
                         "eval_dataset.")
    # A side-process teacher's weights are in the other process: it reported their hash at start-up.
    reported_hash = getattr(teacher_model, "weights_hash", None)
    cache = TeacherCache.open(
        args.teacher_cache, tokenizer=teacher_tokenizer if teacher_tokenizer is not None else student_tokenizer,
        dataset=train_dataset, teacher=None if reported_hash else teacher_model, teacher_hash=reported_hash,
    )
    if tokenizer_vocab_size(student_tokenizer) != cache.vocab_size:
        raise TeacherCacheError(f"The teacher cache covers {cache.vocab_size} tokens but the student's tokenizer "
                                f"{tokenizer_vocab_size(student_tokenizer)}.")
    output = student.get_output_embeddings() if hasattr(student, "get_output_embeddings") else None
    rows = getattr(getattr(output, "weight", None), "shape", [None])[0]
    if rows is not None and rows < cache.vocab_size:
        raise TeacherCacheError(f"The student has {rows} output logits but the teacher cache covers "
                                f"{cache.vocab_size} tokens: resize its embeddings to the tokenizer's length.")
    for name in ("temperature", "final_temperature"):
        check_sparse_setup(args.distillation_loss, args.teacher_cache_tail_mode, temperature=getattr(args, name),
                           cache_temperature=cache.temperature)
    return cache


class TopKCache(TeacherTarget):
    """Training batches read the cached top-k targets of their examples; the student's logits reach the sparse loss
    (:func:`kd_llm.losses.sparse.sparse_distillation_objective`)."""

    name = "top-k teacher cache (dense)"
    fused = False
    serves_evaluation = False
    scores_generated = False

    def __init__(self, cache: TeacherCache, tail_mode: str):
        self.cache, self.tail_mode = cache, tail_mode

    def serves(self, batch: KDBatch, *, training: bool) -> bool:
        return super().serves(batch, training=training) and batch.example_index is not None

    def gather(self, batch: KDBatch, request: LossRequest, device):
        return None if request.alpha >= 1 else self.cache.gather(batch.example_index, batch.shifted_labels,
                                                                 device=device,
                                                                 packed_example_ids=batch.packed_example_ids)

    def terms(self, student_outputs, batch: KDBatch, request: LossRequest) -> LossComponents:
        logits = student_logits(student_outputs)
        return sparse_distillation_objective(
            logits, self.gather(batch, request, logits.device), batch.shifted_labels, tail_mode=self.tail_mode,
            kd_vocab_size=self.cache.vocab_size, **request.objective_kwargs,
        )


class TopKCacheFused(TopKCache):
    """As :class:`TopKCache`, on the fused sparse loss (:mod:`kd_llm.losses.fused_sparse`): the student's final
    hidden states and lm_head, a chunk of tokens at a time."""

    name = "top-k teacher cache (fused)"
    fused = True
    student_forward_kwargs = FUSED_FORWARD_KWARGS

    def __init__(self, cache: TeacherCache, tail_mode: str, student: nn.Module):
        super().__init__(cache, tail_mode)
        self.student = student

    def terms(self, student_outputs, batch: KDBatch, request: LossRequest) -> LossComponents:
        head = output_head(self.student)
        hidden = student_outputs.hidden_states[-1][:, :-1]
        return fused_sparse_distillation_objective(
            hidden, head.weight, batch.shifted_labels, self.gather(batch, request, hidden.device),
            student_bias=head.bias, tail_mode=self.tail_mode, kd_vocab_size=self.cache.vocab_size,
            chunk_size=request.chunk_size, student_softcap=head.softcap, **request.objective_kwargs,
        )
