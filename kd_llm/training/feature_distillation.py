"""The trainer's side of feature-level distillation (hidden states and attention maps, :mod:`kd_llm.features`).

:class:`FeatureDistillationMixin` sits under ``DistillationTrainer`` and adds what the terms need from a Trainer:

- the hidden-state projections train with the student: they join the optimizer (their own parameter group), the
  gradient clipping, and (with several processes) are averaged across processes like DDP averages the student;
- they are never inside the student's model files: ``distillation_projections.safetensors`` is written beside them in
  every checkpoint folder and in the final output folder, and read back on resume (a missing file is an error);
- the feature terms are normalised by the valid tokens (``attention_mask``) of the whole accumulated batch, counted
  with Trainer's own supervised-token count (``num_items_in_batch``), so gradient accumulation does not change them.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from kd_llm.data.packing import PACKED_EXAMPLE_KEY, model_inputs, token_segments, valid_tokens
from kd_llm.features import FeatureDistiller, FeatureTerms


class _ClearProjectionGradients(TrainerCallback):
    """Trainer clears only the student's gradients after each optimizer step (``model.zero_grad()``); the projections
    live outside the student, so clear theirs at the same moment, or they would pile up across steps."""

    def __init__(self, projections: torch.nn.Module):
        self.projections = projections

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.projections.zero_grad(set_to_none=True)


class FeatureDistillationMixin:
    feature_distiller: FeatureDistiller | None = None
    _feature_tokens_in_batch = None

    # ---- set-up -----------------------------------------------------------------------------------------------------

    def _setup_feature_distillation(self, teacher_model) -> None:
        """Build the distiller (checks layer maps and attention layouts now, before any training)."""
        self.feature_distiller = FeatureDistiller.from_config(
            self.args, self.accelerator.unwrap_model(self.model), teacher_model
        )
        if self.feature_distiller is not None and self.feature_distiller.projections is not None:
            self.feature_distiller.projections.to(self.accelerator.device)
            self.add_callback(_ClearProjectionGradients(self.feature_distiller.projections))

    def _projection_parameters(self) -> list[torch.nn.Parameter]:
        distiller = self.feature_distiller
        if distiller is None or distiller.projections is None:
            return []
        return list(distiller.projections.parameters())

    # ---- per step -----------------------------------------------------------------------------------------------------

    def _get_num_items_in_batch(self, batch_samples: list, device):
        """Trainer's supervised-token count, plus (with feature terms) the valid-token count of the same batches,
        summed across processes exactly when Trainer sums its own count."""
        num_items = super()._get_num_items_in_batch(batch_samples, device)
        if self.feature_distiller is not None and batch_samples:
            count = sum(valid_tokens(batch, batch.get(PACKED_EXAMPLE_KEY)).sum() for batch in batch_samples)
            count = count.to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                count = self.accelerator.gather(count).sum()
            self._feature_tokens_in_batch = count
        return num_items

    def _student_feature_capture(self, model):
        """Hooks recording the student's mapped layers during its forward (a no-op without feature terms)."""
        if self.feature_distiller is None:
            return contextlib.nullcontext(None)
        return self.feature_distiller.capture(self.accelerator.unwrap_model(model), "student")

    def _teacher_features(self, inputs: dict, student_features, num_items_in_batch, packed_example_ids=None):
        """Run the live teacher with its hooks and score the feature terms: ``(teacher outputs, FeatureTerms)``, or
        ``(None, FeatureTerms())`` without feature terms. The teacher's logits are reused for the logit term.
        ``packed_example_ids`` (packed batches, kd_llm.data.packing): attention maps are taken per example."""
        if self.feature_distiller is None:
            return None, FeatureTerms()
        attention_mask = valid_tokens(inputs, packed_example_ids).long()
        teacher = self.accelerator.unwrap_model(self.teacher)
        with self.feature_distiller.capture(teacher, "teacher") as teacher_features, torch.no_grad():
            teacher_outputs = self.teacher(**model_inputs(inputs), use_cache=False)
        # The accumulated batch's count when Trainer passed one (training and evaluation both count their batches).
        if num_items_in_batch is not None and self._feature_tokens_in_batch is not None:
            normaliser = self._feature_tokens_in_batch.to(attention_mask.device, torch.float32).clamp_min(1.0)
        else:
            normaliser = attention_mask.sum().float().clamp_min(1.0)
        terms = self.feature_distiller.terms(student_features, teacher_features, attention_mask, normaliser,
                                             expect_grad=self.model.training,
                                             segments=token_segments(inputs, packed_example_ids))
        return teacher_outputs, terms

    def _weighted_feature_loss(self, terms: FeatureTerms):
        loss = 0.0
        if terms.hidden is not None:
            loss = loss + self.args.hidden_weight * terms.hidden
        if terms.attention is not None:
            loss = loss + self.args.attention_weight * terms.attention
        return loss

    def _record_feature_terms(self, terms: FeatureTerms, scale: int) -> None:
        """Log each feature term on its own (unweighted, like ce_loss and kd_loss)."""
        metrics = self._metrics["train" if self.model.training else "eval"]
        for name, value in (("hidden_loss", terms.hidden), ("attention_loss", terms.attention)):
            if value is not None:
                metrics[name].append(value.detach() * scale)

    # ---- optimizer, gradients --------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        projections = self._projection_parameters()
        known = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [p for p in projections if id(p) not in known]
        if missing:
            self.optimizer.add_param_group({"params": missing, "weight_decay": self.args.weight_decay})
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        projections = self._projection_parameters()
        # DDP averages the student's gradients at the last micro-batch; do the same for the projections, which live
        # outside the wrapped student.
        if projections and self.accelerator.sync_gradients and self.accelerator.num_processes > 1 and \
                dist.is_available() and dist.is_initialized():
            for parameter in projections:
                if parameter.grad is not None:
                    dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
                    parameter.grad /= self.accelerator.num_processes
        return loss

    def _clip_grad_norm(self, model):
        projections = self._projection_parameters()
        if not projections or self._has_mixed_mesh_grads(model):
            return super()._clip_grad_norm(model)
        # One norm over student and projections together, as if the projections were part of the model.
        return self.accelerator.clip_grad_norm_(itertools.chain(model.parameters(), projections),
                                                self.args.max_grad_norm)

    # ---- saving and resuming -------------------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        distiller = self.feature_distiller
        if distiller is not None and distiller.projections is not None and self.args.should_save:
            distiller.projections.save(output_dir if output_dir is not None else self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        distiller = self.feature_distiller
        if distiller is not None and distiller.projections is not None:
            distiller.projections.load(resume_from_checkpoint)
