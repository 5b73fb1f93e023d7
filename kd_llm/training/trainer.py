"""``DistillationTrainer``: a ``transformers.Trainer`` that distils a frozen teacher into the student it trains."""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import nested_gather

from kd_llm.cross_tokenizer.data import CrossTokenizerCollator, CrossTokenizerPackingCollator
from kd_llm.cross_tokenizer.generated import CrossTokenizerRows, generation_problem
from kd_llm.cross_tokenizer.teacher import cross_tokenizer_settings
from kd_llm.data.collator import CausalLMCollator
from kd_llm.data.packing import PackingCollator, packing_attention_problem
from kd_llm.data.sampling import StepShuffledLengthSampler
from kd_llm.hub import HubPushMixin
from kd_llm.losses import l2_penalty
from kd_llm.models.lm_head import TeacherHead
from kd_llm.models.loading import freeze_teacher
from kd_llm.models.vocab import reconcile_vocabularies
from kd_llm.serving.training import open_served_teacher, save_and_stop
from kd_llm.training import rules
from kd_llm.training.checkpoints import AtomicCheckpointMixin
from kd_llm.training.config import DistillationConfig
from kd_llm.training.feature_distillation import FeatureDistillationMixin
from kd_llm.training.on_policy import STUDENT, CompletionGenerator
from kd_llm.training.precision import check_mixed_precision
from kd_llm.training.schedules import temperature_at
from kd_llm.training.targets import (
    EXAMPLE_INDEX_COLUMN,
    KDBatch,
    LossRequest,
    PrecomputedTeacherLogits,
    TargetSources,
    TeacherTarget,
    choose_target,
    open_hidden_training_cache,
    open_training_cache,
)
from kd_llm.training.teacher_placement import prepare_teacher
from kd_llm.training.teacher_process import TeacherProcess


# HubPushMixin: push_to_hub=True pushes an allow-list of files (kd_llm.hub), never the whole output folder.
# AtomicCheckpointMixin: checkpoint-N folders appear whole or not at all; resumes are checked (training.checkpoints).
class DistillationTrainer(AtomicCheckpointMixin, HubPushMixin, FeatureDistillationMixin, Trainer):
    """Train ``model`` (the student) on ``alpha * CE + (1 - alpha) * T^2 * KD(teacher || student)``.

    Offline distillation (this class): the teacher is frozen (no gradients, eval mode, dropout off), run under
    ``no_grad``, placed by Accelerate, and never part of a checkpoint: it is not a submodule of the student. The other
    modes change who the teacher is and scope these guarantees: an ensemble of frozen teachers
    (``kd_llm.training.ensemble``), an EMA copy of the student that moves after every step but never by gradients
    (``kd_llm.training.self_distillation``), and online mutual learning, where the teacher trains too and is saved
    with the student (``kd_llm.training.online``). Every term is summed over supervised tokens and
    divided by ``num_items_in_batch`` (the supervised tokens of the whole accumulated batch, across processes), so
    gradient accumulation and data parallelism give the same update as one large batch.

    Args:
        model: the student.
        teacher_model: the teacher (may be None when ``alpha == 1`` or a ``teacher_cache`` serves every batch), or a
            :class:`~kd_llm.training.teacher_process.TeacherProcess`: the teacher in a side process, which scores
            the batches a cache does not hold (on-policy samples, evaluation) on the dense loss (on the fused loss when
            started with ``hidden_states=True``); or, for a hidden-state ``teacher_cache``, the teacher's lm_head alone
            (a :class:`~kd_llm.models.lm_head.TeacherHead`, e.g. ``load_teacher_head(<teacher folder>)``).
        args: a :class:`DistillationConfig`.
        teacher_tokenizer: the teacher's tokenizer, checked against ``processing_class`` (the student's). Leave None
            when both use the same tokenizer object. With ``args.cross_tokenizer_loss`` it may differ: the training
            set then holds both renderings and their alignment (kd_llm.cross_tokenizer.data).
        **kwargs: passed to ``transformers.Trainer``.
    """

    # compute_loss normalises by num_items_in_batch itself: Trainer must not divide again by the accumulation steps.
    loss_is_scaled_for_ga = True
    # Declared, for the rule book (kd_llm.training.rules): which teacher this trainer distils from. Subclasses with
    # another kind of teacher (ensemble, EMA copy, online peer) say so here, not by which methods they override.
    distillation_mode = "offline"

    def __init__(self, model=None, teacher_model=None, args: DistillationConfig | None = None,
                 teacher_tokenizer=None, **kwargs):
        if not isinstance(args, DistillationConfig):
            raise TypeError("DistillationTrainer needs args=DistillationConfig(...), not plain TrainingArguments.")
        # A TeacherHead (kd_llm.models.lm_head) is the teacher's lm_head alone, for a hidden-state cache: it runs
        # nothing, so the run has no teacher to score or write batches.
        teacher_kind = ("none" if teacher_model is None or isinstance(teacher_model, TeacherHead)
                        else "side_process" if isinstance(teacher_model, TeacherProcess) else "live")
        if teacher_kind == "none":  # before any work (a side-process teacher is checked once Trainer is built)
            problems = rules.teacher_problems(args, rules.RunShape(mode=self.distillation_mode, teacher="none"))
            if problems:
                raise ValueError(problems[0])
        if (args.precompute_teacher_logits or args.teacher_cache) and kwargs.get("train_dataset") is not None:
            dataset = kwargs["train_dataset"]
            kwargs["train_dataset"] = dataset.add_column(EXAMPLE_INDEX_COLUMN, list(range(len(dataset))))
        tokenizer = kwargs.get("processing_class")
        if teacher_model is not None and tokenizer is None:
            raise ValueError("Pass processing_class=<the student's tokenizer>: it is checked against the teacher's "
                             "before training, and used to pad batches.")
        if args.packing and kwargs.get("data_collator") is not None and not isinstance(
                kwargs["data_collator"], (PackingCollator, CrossTokenizerPackingCollator)):
            raise ValueError("packing=True packs batches with kd_llm.data.packing.PackingCollator: leave "
                             "data_collator unset (or pass a PackingCollator), or set packing=False.")
        self.cross_tokenizer = None
        if args.cross_tokenizer_loss is not None and teacher_model is not None and (args.alpha < 1 or args.seq_kd):
            # Another tokenizer: checked (offsets, pads, shared vocabulary) now, before any work.
            self.cross_tokenizer = cross_tokenizer_settings(
                args.cross_tokenizer_loss, tokenizer, teacher_tokenizer if teacher_tokenizer is not None else tokenizer,
                model, teacher_model, uld_weight=args.uld_weight)
        if kwargs.get("data_collator") is None and tokenizer is not None:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            kwargs["data_collator"] = (
                PackingCollator(pad_id, max_length=args.packing_max_length, overlong=args.packing_overlong,
                                passthrough_keys=(EXAMPLE_INDEX_COLUMN,),
                                prompt_starts=args.lmbda > 0 or args.seq_kd) if args.packing
                else CausalLMCollator(pad_id, passthrough_keys=(EXAMPLE_INDEX_COLUMN,)))
            if self.cross_tokenizer is not None:  # packing: dataset batches only (the rules refuse generated ones)
                teacher_side = teacher_tokenizer if teacher_tokenizer is not None else tokenizer
                teacher_pad = (teacher_side.pad_token_id if teacher_side.pad_token_id is not None
                               else teacher_side.eos_token_id)
                kwargs["data_collator"] = (
                    CrossTokenizerPackingCollator(pad_id, teacher_pad, max_length=args.packing_max_length,
                                                  passthrough_keys=(EXAMPLE_INDEX_COLUMN,)) if args.packing
                    else CrossTokenizerCollator(pad_id, teacher_pad, passthrough_keys=(EXAMPLE_INDEX_COLUMN,)))
        if args.packing:
            self._check_packing(model, teacher_model, kwargs)
        self.kd_vocab_size = None
        if teacher_kind != "none" and self.cross_tokenizer is None:
            # Before any work: a vocabulary mismatch must not surface after an hour of training.
            self.kd_vocab_size = reconcile_vocabularies(
                teacher_tokenizer if teacher_tokenizer is not None else tokenizer, tokenizer, teacher_model, model
            )
        super().__init__(model=model, args=args, **kwargs)
        check_mixed_precision(self.accelerator)  # fp16 on CPU would silently train in float32
        # Our compute_loss takes num_items_in_batch whatever the student's forward signature says, and always
        # shifts labels (causal LM), so let Trainer count the supervised tokens that way.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.teacher = None
        # A teacher in a side process returns logits only: never frozen or placed here (it has no parameters, the
        # child froze its model), never saved, and the batches it scores take the dense loss.
        self.teacher_in_side_process = teacher_kind == "side_process"
        self.run_shape = rules.RunShape(mode=self.distillation_mode, teacher=teacher_kind,
                                        processes=self.accelerator.num_processes,
                                        sharded=bool(self.is_fsdp_enabled or self.is_deepspeed_enabled),
                                        teacher_ships_hidden=bool(getattr(teacher_model, "ships_hidden_states",
                                                                          False)))
        if self.teacher_in_side_process:
            problems = rules.teacher_problems(args, self.run_shape)
            if not teacher_model.is_alive():
                problems.append("its process is not running (closed, or it exited)")
            if problems:
                raise ValueError("teacher_model is a TeacherProcess (the teacher in a side process), which cannot "
                                 "serve this run: " + "; ".join(problems) + ".")
            self.teacher = teacher_model
        elif teacher_kind == "live":
            self.teacher = self._setup_teacher(teacher_model)
        # hidden_weight / attention_weight: layer maps and attention layouts are checked here (kd_llm.features).
        self._setup_feature_distillation(teacher_model)
        # teacher_cache: stored top-k targets or hidden states serve the training batches, no teacher forward
        # (kd_llm.teacher_cache); a hidden-state cache also needs the teacher's lm_head.
        hidden = args.teacher_cache_format == "hidden_states"
        self.teacher_cache = (open_hidden_training_cache if hidden else open_training_cache)(
            args, train_dataset=self.train_dataset, eval_dataset=self.eval_dataset,
            student=self.accelerator.unwrap_model(self.model), teacher_model=teacher_model,
            teacher_tokenizer=teacher_tokenizer, student_tokenizer=tokenizer,
            **({"device": self.accelerator.device} if hidden else {}))
        # teacher_url / teacher_routes: a served teacher's top-k serves every batch (kd_llm.serving.training).
        self.served_teacher = open_served_teacher(self, teacher_model=teacher_model, tokenizer=tokenizer,
                                                  custom_teacher_setup=self.distillation_mode != "offline")
        # precompute_teacher_logits: the teacher's logits on the training set, computed once and kept in memory.
        self.teacher_logits = None
        if args.precompute_teacher_logits and self.teacher is not None and self.train_dataset is not None:
            self.teacher_logits = self._precompute_teacher_logits()
        # lmbda / seq_kd: completions regenerated per micro-batch in get_batch_samples (kd_llm.training.on_policy).
        # Across tokenizers each completion is decoded and rendered again for both models (kd_llm.cross_tokenizer).
        rows = None
        if self.cross_tokenizer is not None and (args.lmbda > 0 or args.seq_kd):
            problem = generation_problem(self.train_dataset, student_samples=args.lmbda > 0,
                                         teacher_writes=args.seq_kd and args.lmbda < 1)
            if problem:
                raise ValueError(f"lmbda / seq_kd with cross_tokenizer_loss cannot use this training set: {problem}.")
            rows = CrossTokenizerRows(tokenizer, teacher_tokenizer if teacher_tokenizer is not None else tokenizer)
        self.completion_generator = CompletionGenerator.from_config(args, self.processing_class, self.kd_vocab_size,
                                                                    rows=rows)
        # The one target every batch goes through, chosen now (kd_llm.training.targets.choose).
        self.target: TeacherTarget = choose_target(self._target_sources())

    @property
    def fused_loss(self) -> bool:
        """Whether the training batches take the fused loss (hidden states and lm_heads, no [B, T, V] logits)."""
        return bool(self.target.fused)

    def _target_sources(self) -> TargetSources:
        """What this run's target is built from (subclasses with another kind of teacher add theirs)."""
        one_model = isinstance(self.teacher, torch.nn.Module)  # not a TeacherProcess or an ensemble
        return TargetSources(
            args=self.args, shape=self.run_shape, student=self.accelerator.unwrap_model(self.model),
            teacher=self.teacher, teacher_module=self.accelerator.unwrap_model(self.teacher) if one_model else None,
            cache=self.teacher_cache, precomputed=self.teacher_logits, served=self.served_teacher,
            on_served_failure=self._stop_on_served_failure, mixed_precision=self.accelerator.mixed_precision != "no",
            cross_tokenizer=self.cross_tokenizer,
        )

    def _stop_on_served_failure(self, error: Exception) -> None:
        """A served teacher failed for good: during training, save a checkpoint and stop (kd_llm.serving)."""
        if self.model.training:
            save_and_stop(self, error)

    @staticmethod
    def _check_packing(model, teacher_model, kwargs) -> None:
        """packing=True: both models must isolate packed examples, and nothing may read packed rows as examples."""
        # A TeacherProcess is sent the packed rows and position_ids; its config (reported by the child) says which
        # attention its model runs.
        problems = [problem for problem in (packing_attention_problem(model, "student"),
                                            None if teacher_model is None
                                            else packing_attention_problem(teacher_model, "teacher")) if problem]
        if kwargs.get("compute_metrics") is not None:
            problems.append("compute_metrics would read packed rows as examples (evaluate with packing=False)")
        if problems:
            raise ValueError("packing=True cannot run here: " + "; ".join(problems) + ".")

    def _get_train_sampler(self, train_dataset=None):
        if self.args.length_grouping != "step":
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset  # still holds the `length` column Trainer may strip from the copy it passes
        lengths = (dataset["length"] if "length" in dataset.column_names
                   else [len(ids) for ids in dataset["input_ids"]])
        step_size = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return StepShuffledLengthSampler(lengths, step_size, seed=self.args.seed)

    def _setup_teacher(self, teacher_model):
        """Offline distillation: freeze the teacher, then place it. Subclasses with a teacher that is not frozen
        (kd_llm.training.online) or not one model (kd_llm.training.ensemble) override this."""
        return self._prepare_teacher(freeze_teacher(teacher_model))

    def _padded_collator(self):
        """The collator stored targets are computed with: padded rows, one example each, even when training packs
        them (the targets are kept per example and re-laid into packed rows: kd_llm.data.packing)."""
        if isinstance(self.data_collator, PackingCollator):
            return CausalLMCollator(self.data_collator.pad_token_id, passthrough_keys=(EXAMPLE_INDEX_COLUMN,))
        return self.data_collator

    def _precompute_teacher_logits(self) -> PrecomputedTeacherLogits:
        args = self.args
        return PrecomputedTeacherLogits.build(
            self.teacher, self.train_dataset, self._padded_collator(), batch_size=args.per_device_eval_batch_size,
            device=self.accelerator.device, disable_progress=args.disable_tqdm,
        )

    def _prepare_teacher(self, teacher):
        # Single process / DDP: a whole copy per process; FSDP / DeepSpeed ZeRO-3: sharded for inference.
        return prepare_teacher(self.accelerator, teacher, per_device_batch_size=self.args.per_device_train_batch_size)

    @property
    def current_temperature(self) -> float:
        args = self.args
        total = self.state.max_steps or args.max_steps or 1
        return temperature_at(self.state.global_step, total, args.temperature, args.final_temperature,
                              args.temperature_schedule)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """Trainer's micro-batches of one optimizer step; with lmbda or seq_kd, their completions are regenerated
        (see kd_llm.training.on_policy) *before* the supervised tokens are counted for num_items_in_batch."""
        if getattr(self, "completion_generator", None) is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        teacher = self.teacher
        if teacher is not None and not self.teacher_in_side_process:  # a served teacher: None, it only scores
            teacher = self.accelerator.unwrap_model(teacher)
        batches = self.completion_generator.replace(
            batches, step=self.state.global_step, student=self.accelerator.unwrap_model(self.model),
            teacher=teacher, process_index=self.args.process_index,
            autocast=self.accelerator.autocast,
        )
        return batches, self._get_num_items_in_batch(batches, device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = KDBatch.pop_from(inputs)
        # Evaluation with compute_metrics reads the student's logits: a fused target hands over to its dense twin.
        target = self.target.for_batch(batch, training=model.training,
                                       needs_logits=return_outputs and self.compute_metrics is not None)
        with self._student_feature_capture(model) as student_features:
            outputs = model(**batch.inputs, use_cache=False, **target.student_forward_kwargs)
        # Feature terms (hidden_weight, attention_weight) run the live teacher once, with hooks; its logits are reused.
        batch.teacher_outputs, feature_terms = self._teacher_features(batch.inputs, student_features,
                                                                      num_items_in_batch, batch.packed_example_ids)
        request = self._loss_request(batch, num_items_in_batch)
        terms = target.terms(outputs, batch, request)
        loss = terms.total
        if batch.completion_source == STUDENT:
            loss = (1 - self.args.alpha) * loss  # the KD term keeps its weight (1 - alpha); only CE is dropped
        loss = loss + self._weighted_feature_loss(feature_terms)
        loss = loss + self._l2_share(model, batch.shifted_labels, num_items_in_batch)
        scale = self._process_scale(num_items_in_batch)
        loss = loss * scale
        self._record(terms, loss, request.temperature, scale)
        self._record_feature_terms(feature_terms, scale)
        return (loss, outputs) if return_outputs else loss

    def _loss_request(self, batch: KDBatch, num_items_in_batch) -> LossRequest:
        """This step's loss settings. On the student's own samples only the teacher's distribution teaches: no
        cross-entropy on them (generated batches: kd_llm.training.on_policy)."""
        args = self.args
        return LossRequest(
            alpha=0.0 if batch.completion_source == STUDENT else args.alpha, temperature=self.current_temperature,
            num_items_in_batch=num_items_in_batch, loss=args.distillation_loss, beta=args.beta, skew=args.skew,
            kd_vocab_size=self.kd_vocab_size, chunk_size=args.loss_chunk_size or None,
        )

    def _l2_share(self, model, shifted_labels: torch.Tensor, num_items_in_batch):
        """This micro-batch's share of ``l2_weight * ||w||^2`` (0 when off or evaluating): spread over the
        micro-batches in proportion to their tokens, it adds up to one penalty per optimizer step, whatever the
        accumulation."""
        if not (self.args.l2_weight > 0 and model.training):
            return 0.0
        tokens = (shifted_labels != -100).sum()
        share = tokens / (num_items_in_batch if num_items_in_batch is not None else tokens.clamp_min(1))
        return self.args.l2_weight * share * l2_penalty(p for p in model.parameters() if p.requires_grad)

    def _process_scale(self, num_items_in_batch) -> int:
        """Each process holds a share of the global token mean and DDP averages gradients, so the loss is scaled
        back up by the process count, as Trainer does for models that take num_items_in_batch."""
        args, processes = self.args, self.accelerator.num_processes
        return processes if (args.average_tokens_across_devices and num_items_in_batch is not None
                             and processes > 1) else 1

    def _record(self, terms, loss, temperature: float, scale: int) -> None:
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics["ce_loss"].append(terms.ce.detach() * scale)
        metrics["kd_loss"].append(terms.kd.detach() * scale)
        metrics["total_loss"].append(loss.detach())
        metrics["temperature"].append(temperature)
        metrics["step"].append(self.state.global_step)
        spans = getattr(terms, "spans", None)  # cross-tokenizer terms: aligned spans, the hybrid's matched mass
        if spans is not None:
            metrics["aligned_spans"].append(spans)
            if terms.student_matched_mass is not None:
                metrics["student_matched_mass"].append(terms.student_matched_mass.item())
                metrics["teacher_matched_mass"].append(terms.teacher_matched_mass.item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        metrics = self._metrics[mode]
        if metrics:
            prefix = "eval_" if mode == "eval" else ""
            # Train: micro-batch terms are shares of their optimizer step's mean, so sum them and average over
            # steps. Eval: each batch is its own mean. Then average over processes, as Trainer does for `loss`.
            steps = len(set(metrics["step"])) if mode == "train" else len(metrics["ce_loss"])
            for name in [key for key in metrics if key.endswith("_loss")]:  # ce, kd, total and any feature terms
                value = torch.stack(metrics[name]).sum() / steps
                logs[prefix + name] = round(nested_gather(value, self.args.parallel_mode).mean().item(), 6)
            if mode == "train":
                logs["temperature"] = round(metrics["temperature"][-1], 6)
            spans = sum(metrics.get("aligned_spans", []))
            for side in ("student", "teacher"):  # cross-tokenizer hybrid: mean share of mass on shared tokens
                if metrics.get(f"{side}_matched_mass") and spans:
                    logs[f"{side}_matched_mass"] = round(sum(metrics[f"{side}_matched_mass"]) / spans, 6)
            metrics.clear()
        if mode == "train" and getattr(self, "completion_generator", None) is not None:
            logs.update(self.completion_generator.pop_log_metrics(self._mean_over_processes))
        super().log(logs, start_time)

    def _mean_over_processes(self, values: torch.Tensor) -> torch.Tensor:
        gathered = nested_gather(values.to(self.args.device), self.args.parallel_mode)
        return gathered.reshape(-1, values.numel()).mean(0).cpu()
