"""The hidden-state teacher cache (``teacher_cache_format: hidden_states``, built by scripts/cache_teacher.py) as a
target: the teacher's stored final hidden states and its lm_head (``V x d`` and the soft cap; never its body) give its
exact logits, at any temperature and for any divergence. :class:`HiddenCacheFused` (the default) feeds them to the
fused, chunked loss (``kd_llm.losses.fused_hidden``): no ``[B, T, V]`` logits of either model; :class:`HiddenCache`
builds the teacher's logits at the supervised rows for the dense loss (when the fused loss is
ruled out: FSDP, a student head that is not a plain Linear). Both serve training batches of the dataset only.

:func:`open_hidden_training_cache` finds the head and opens the cache, checked against the run before any step.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_llm.losses import LossComponents, distillation_objective
from kd_llm.losses.fused import soft_cap
from kd_llm.losses.fused_hidden import fused_hidden_distillation_objective
from kd_llm.models.lm_head import TeacherHead
from kd_llm.models.vocab import tokenizer_vocab_size
from kd_llm.teacher_cache.hidden_cache import HiddenStateCache as StoredStates
from kd_llm.teacher_cache.metadata import TeacherCacheError
from kd_llm.training.targets.base import KDBatch, LossRequest, TeacherTarget, student_logits
from kd_llm.training.targets.heads import FUSED_FORWARD_KWARGS, output_head
from kd_llm.training.teacher_head import checked_teacher_head

NEEDS_HEAD = ("A hidden-state teacher cache needs the teacher's lm_head: pass teacher_model=load_teacher_head(<the "
              "teacher's folder>) (kd_llm.models.lm_head; reads that one tensor, not the body), the teacher model, or "
              "a TeacherProcess(..., hidden_states=True).")


def teacher_head_of(teacher_model) -> TeacherHead:
    """The head the cached states go through: given, sent by a side process, or read from the loaded teacher."""
    if isinstance(teacher_model, TeacherHead):
        return teacher_model
    if teacher_model is None:
        raise ValueError(NEEDS_HEAD)
    if hasattr(teacher_model, "ships_hidden_states"):  # a TeacherProcess: its head came at start-up, if asked for
        if teacher_model.head is None:
            raise ValueError("The side-process teacher was started without hidden_states=True, so it did not send "
                             "its lm_head, which the hidden-state cache needs: start it with "
                             "TeacherProcess(..., hidden_states=True).")
        return teacher_model.head
    return checked_teacher_head(teacher_model)


def open_hidden_training_cache(args, *, train_dataset, eval_dataset, student: nn.Module, teacher_model,
                               teacher_tokenizer, student_tokenizer, device=None) -> StoredStates | None:
    """Open ``args.teacher_cache`` (hidden states) with the teacher's head (``cache.head``, on ``device``) and check
    them against this run: the head's hash, tokenizer, data, teacher weights where known, the student's vocabulary."""
    if not args.teacher_cache or args.alpha >= 1:
        return None
    if student_tokenizer is None:
        raise ValueError("Pass processing_class=<the student's tokenizer>: the teacher cache is checked against it.")
    if train_dataset is None:
        raise ValueError("teacher_cache is set but there is no train_dataset: the cache serves training batches.")
    runs_teacher = teacher_model is not None and not isinstance(teacher_model, TeacherHead)
    if not runs_teacher and eval_dataset is not None:
        raise ValueError("Evaluating the distillation term needs the teacher on the evaluation data, which the cache "
                         "(training data only) does not hold: pass teacher_model=<the teacher> as well, or no "
                         "eval_dataset.")
    head = teacher_head_of(teacher_model)
    reported_hash = getattr(teacher_model, "weights_hash", None)  # a side process reports its weights' hash
    whole_teacher = teacher_model if runs_teacher and reported_hash is None else None
    cache = StoredStates.open(
        args.teacher_cache, head=head, dataset=train_dataset, teacher=whole_teacher, teacher_hash=reported_hash,
        tokenizer=teacher_tokenizer if teacher_tokenizer is not None else student_tokenizer)
    if tokenizer_vocab_size(student_tokenizer) != cache.vocab_size:
        raise TeacherCacheError(f"The teacher cache covers {cache.vocab_size} tokens but the student's tokenizer "
                                f"{tokenizer_vocab_size(student_tokenizer)}: a student with another vocabulary "
                                "cannot be distilled from it.")
    output = student.get_output_embeddings() if hasattr(student, "get_output_embeddings") else None
    rows = getattr(getattr(output, "weight", None), "shape", [None])[0]
    if rows is not None and rows < cache.vocab_size:
        raise TeacherCacheError(f"The student has {rows} output logits but the teacher cache covers "
                                f"{cache.vocab_size} tokens: resize its embeddings to the tokenizer's length.")
    cache.head = TeacherHead(head.weight.detach().to(device) if device is not None else head.weight.detach(),
                             head.softcap, head.tied)
    return cache


class HiddenCache(TeacherTarget):
    """Training batches read their examples' stored teacher states; the teacher's logits at the supervised rows,
    ``softcap(h W^T)``, and the student's logits reach the dense objective."""

    name = "hidden-state teacher cache (dense)"
    fused = False
    serves_evaluation = False  # the cache holds the training set only
    scores_generated = False  # generated completions are sequences no cache holds

    def __init__(self, cache: StoredStates):
        self.cache = cache

    def serves(self, batch: KDBatch, *, training: bool) -> bool:
        return super().serves(batch, training=training) and batch.example_index is not None

    def states(self, batch: KDBatch, request: LossRequest, device):
        return None if request.alpha >= 1 else self.cache.gather(batch.example_index, batch.shifted_labels,
                                                                 device=device,
                                                                 packed_example_ids=batch.packed_example_ids)

    def terms(self, student_outputs, batch: KDBatch, request: LossRequest) -> LossComponents:
        logits = student_logits(student_outputs)
        mask = batch.shifted_labels != -100
        states, teacher_logits = self.states(batch, request, logits.device), None
        if states is not None:
            head = self.cache.head
            with torch.no_grad():
                teacher_logits = soft_cap((states.to(head.weight.dtype) @ head.weight.T).float(), head.softcap)
        return distillation_objective(logits[mask], teacher_logits, batch.shifted_labels[mask],
                                      kd_vocab_size=self.cache.vocab_size, **request.objective_kwargs)


class HiddenCacheFused(HiddenCache):
    """As :class:`HiddenCache`, on the fused loss: the student's final hidden states and lm_head and the stored
    teacher states and head, a chunk of supervised rows at a time."""

    name = "hidden-state teacher cache (fused)"
    fused = True
    student_forward_kwargs = FUSED_FORWARD_KWARGS

    def __init__(self, cache: StoredStates, student: nn.Module):
        super().__init__(cache)
        self.student = student
        self.logits_twin = HiddenCache(cache)

    def terms(self, student_outputs, batch: KDBatch, request: LossRequest) -> LossComponents:
        head, teacher = output_head(self.student), self.cache.head
        hidden = student_outputs.hidden_states[-1][:, :-1]
        return fused_hidden_distillation_objective(
            hidden, head.weight, batch.shifted_labels, self.states(batch, request, hidden.device), teacher.weight,
            student_bias=head.bias, kd_vocab_size=self.cache.vocab_size, chunk_size=request.chunk_size,
            student_softcap=head.softcap, teacher_softcap=teacher.softcap, **request.objective_kwargs,
        )
