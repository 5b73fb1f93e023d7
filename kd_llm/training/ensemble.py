"""Offline distillation from an ensemble of frozen teachers that share the student's tokenizer.

The student learns the weighted mixture of the teachers' tempered distributions (:mod:`kd_llm.training.teachers`
says how the mixture reaches the loss exactly). Every teacher is checked against the student's tokenizer and
embeddings before any work. With ``precompute_teacher_logits`` the teachers are loaded one after another: each runs
over the training set, its share of the mixture is added to the cache, and it is freed before the next one loads, so
memory holds one teacher and the cache. Without it, every teacher is held at once and run on every batch.
"""

from __future__ import annotations

import gc

import torch

from kd_llm.models.loading import freeze_teacher
from kd_llm.models.vocab import reconcile_vocabularies
from kd_llm.training import rules
from kd_llm.training.config import DistillationConfig
from kd_llm.training.targets import PrecomputedTeacherLogits, TargetSources
from kd_llm.training.teachers import LogProbMixture, TeacherEnsemble
from kd_llm.training.trainer import DistillationTrainer

__all__ = ["EnsembleDistillationTrainer"]


class EnsembleDistillationTrainer(DistillationTrainer):
    """:class:`DistillationTrainer` whose teacher is a :class:`TeacherEnsemble` (frozen teachers, offline).

    Logged terms are those of :class:`DistillationTrainer`; ``kd_loss`` is the divergence from the mixture. Its
    target is the live mixture (:class:`~kd_llm.training.targets.EnsembleMixture`), behind the precomputed mixture
    with ``precompute_teacher_logits``.
    """

    distillation_mode = "ensemble"

    def __init__(self, model=None, teacher_model: TeacherEnsemble | None = None, args=None, **kwargs):
        if not isinstance(teacher_model, TeacherEnsemble):
            raise TypeError("EnsembleDistillationTrainer needs teacher_model=TeacherEnsemble([...], weights); for one "
                            f"teacher use DistillationTrainer (got {type(teacher_model).__name__}).")
        if kwargs.pop("teacher_tokenizer", None) is not None:
            raise ValueError("give the teachers' tokenizers to TeacherEnsemble(tokenizers=[...]), one per teacher")
        self.check_config(args)
        student_tokenizer = kwargs.get("processing_class")
        if student_tokenizer is None:
            raise ValueError("Pass processing_class=<the student's tokenizer>: every teacher is checked against it.")
        # Before any work: every teacher's tokenizer, and the embeddings of those already loaded.
        sizes = {self._check_member(teacher_model, i, student_tokenizer, model) for i in range(len(teacher_model))}
        if len(sizes) != 1:
            raise ValueError(f"the teachers' tokenizers address different numbers of tokens ({sorted(sizes)})")
        self.ensemble = teacher_model
        self._student_tokenizer = student_tokenizer
        super().__init__(model=model, teacher_model=teacher_model, args=args, **kwargs)
        self.kd_vocab_size = sizes.pop()

    @staticmethod
    def check_config(args) -> None:
        """Raise for settings an ensemble cannot honour (also called by the experiment before any work)."""
        if not isinstance(args, DistillationConfig):
            raise TypeError("EnsembleDistillationTrainer needs args=DistillationConfig(...).")
        for problem in rules.mode_problems(args, "ensemble"):
            raise problem.error()

    @staticmethod
    def _check_member(ensemble: TeacherEnsemble, index: int, student_tokenizer, student, model=None) -> int:
        tokenizer = ensemble.tokenizers[index]
        try:
            return reconcile_vocabularies(tokenizer if tokenizer is not None else student_tokenizer,
                                          student_tokenizer, model if model is not None else ensemble.models[index],
                                          student)
        except ValueError as error:
            raise type(error)(f"{ensemble.names[index]} of the ensemble: {error}") from error

    def _load_member(self, index: int):
        def prepare(model):
            self._check_member(self.ensemble, index, self._student_tokenizer, self.model, model)
            return self._prepare_teacher(freeze_teacher(model))

        return self.ensemble.load(index, prepare)

    def _setup_teacher(self, ensemble: TeacherEnsemble):
        # Teachers given as models are frozen and placed now; loaders wait for their turn (precompute) or first use.
        for index, member in enumerate(ensemble.models):
            if member is not None:
                ensemble.models[index] = self._prepare_teacher(freeze_teacher(member))
        if not self.args.precompute_teacher_logits:
            for index in range(len(ensemble)):
                self._load_member(index)
        return ensemble

    def _load_all_members(self) -> None:
        for index in range(len(self.ensemble)):
            self._load_member(index)

    def _target_sources(self) -> TargetSources:
        sources = super()._target_sources()
        sources.teacher_module = None  # not one model: the mixture reaches the loss as logits
        sources.load_ensemble = self._load_all_members  # evaluation after a precomputed target needs them back
        return sources

    def _precompute_teacher_logits(self) -> PrecomputedTeacherLogits:
        """One teacher at a time: run it over the training set, fold its rows into the mixture, free it."""
        args = self.args
        mixture, offsets = LogProbMixture(self.ensemble.mixture, args.temperature, self.kd_vocab_size), None
        for index, weight in enumerate(self.ensemble.weights):
            store = PrecomputedTeacherLogits.build(
                self._load_member(index), self.train_dataset, self._padded_collator(),
                batch_size=args.per_device_eval_batch_size, device=self.accelerator.device,
                disable_progress=args.disable_tqdm,
            )
            self.ensemble.release(index)
            mixture.add(store.values, weight)  # every supervised row at once: one [tokens, V] tensor per member
            offsets = store.offsets
            del store
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        # T * log p_mix: the loss's softmax(z / T) gives back p_mix (see kd_llm.training.teachers).
        return PrecomputedTeacherLogits(args.temperature * mixture.log_probs(), offsets)
