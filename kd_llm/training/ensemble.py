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
from kd_llm.training.config import DistillationConfig
from kd_llm.training.teacher_logits import InMemoryTeacherLogits
from kd_llm.training.teachers import LogProbMixture, TeacherEnsemble
from kd_llm.training.trainer import DistillationTrainer

__all__ = ["EnsembleDistillationTrainer"]


class EnsembleDistillationTrainer(DistillationTrainer):
    """:class:`DistillationTrainer` whose teacher is a :class:`TeacherEnsemble` (frozen teachers, offline).

    Logged terms are those of :class:`DistillationTrainer`; ``kd_loss`` is the divergence from the mixture.
    """

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
        if args.alpha >= 1:
            raise ValueError("alpha=1 trains on hard labels alone: an ensemble of teachers would never be used.")
        if getattr(args, "lmbda", 0) > 0 or getattr(args, "seq_kd", False):
            raise NotImplementedError("on-policy distillation (lmbda > 0, seq_kd) from a teacher ensemble is not "
                                      "supported: use one teacher")
        if getattr(args, "hidden_weight", 0) > 0 or getattr(args, "attention_weight", 0) > 0:
            raise NotImplementedError("hidden-state / attention distillation from a teacher ensemble is not "
                                      "supported (whose hidden states?): set hidden_weight and attention_weight to 0")
        if (args.precompute_teacher_logits and args.temperature_schedule != "constant"
                and args.final_temperature != args.temperature):
            raise ValueError(
                "a precomputed ensemble target is the mixture at one temperature, but the temperature schedule moves "
                f"from {args.temperature} to {args.final_temperature}: use a constant temperature, or "
                "precompute_teacher_logits=False to mix the teachers live at each step's temperature."
            )

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

    def _build_teacher_logits_cache(self) -> InMemoryTeacherLogits:
        """One teacher at a time: run it over the training set, fold its rows into the mixture, free it."""
        args = self.args
        mixtures = None
        for index, weight in enumerate(self.ensemble.weights):
            rows = InMemoryTeacherLogits.build(
                self._load_member(index), self.train_dataset, self.data_collator,
                batch_size=args.per_device_eval_batch_size, device=self.accelerator.device,
                disable_progress=args.disable_tqdm,
            ).rows
            self.ensemble.release(index)
            if mixtures is None:
                mixtures = [LogProbMixture(self.ensemble.mixture, args.temperature, self.kd_vocab_size)
                            for _ in rows]
            for mixture, row in zip(mixtures, rows):
                mixture.add(row, weight)
            del rows
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        # T * log p_mix: the loss's softmax(z / T) gives back p_mix (see kd_llm.training.teachers).
        return InMemoryTeacherLogits([args.temperature * mixture.log_probs() for mixture in mixtures])

    def _teacher_logits_for(self, inputs: dict, cache_index, shifted_labels, student_logits,
                            teacher_outputs=None) -> torch.Tensor:
        # teacher_outputs (one teacher's forward for feature terms) never comes: feature terms are refused above.
        if self.teacher_logits is not None and cache_index is not None and self.model.training:
            return self.teacher_logits.gather(cache_index, shifted_labels, like=student_logits)
        # Evaluation with a precomputed target still needs the live teachers: load them all (once).
        for index in range(len(self.ensemble)):
            self._load_member(index)
        logits = self.ensemble.target_logits(inputs["input_ids"], inputs.get("attention_mask"),
                                             temperature=self.current_temperature, vocab_size=self.kd_vocab_size,
                                             position_ids=inputs.get("position_ids"))
        return logits[:, :-1]
