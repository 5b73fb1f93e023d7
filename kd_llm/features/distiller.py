"""``FeatureDistiller``: the hidden-state and attention-map terms of the objective, for any two causal LMs that share a
tokenizer (they may differ in family, depth, width and head count).

The trainer captures the student's features during its forward pass and the teacher's during the teacher's (live)
forward pass, then asks for the terms::

    with distiller.capture(student, "student") as student_features:
        outputs = student(...)
    with distiller.capture(teacher, "teacher") as teacher_features, torch.no_grad():
        teacher_outputs = teacher(...)
    terms = distiller.terms(student_features, teacher_features, attention_mask, normaliser)

Both terms are sums over valid tokens (``attention_mask == 1``) divided by ``normaliser``, the number of valid tokens
in the whole accumulated batch, and averaged over the mapped layer pairs; so, like the logit terms, they give the same
update with or without gradient accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kd_llm.features.attention_maps import (
    check_relation_heads,
    default_relation_heads,
    head_mean_attention_kl,
    queries_and_keys,
    relation_attention_kl,
)
from kd_llm.features.capture import CapturedFeatures, FeatureCapture, hidden_width, layer_geometry, layer_list
from kd_llm.features.hidden_states import HiddenStateProjections, hidden_state_loss
from kd_llm.features.layer_maps import resolve_layer_map


@dataclass
class FeatureTerms:
    """Unweighted, normalised float32 scalars (None for a term that is off), attached to the graph."""

    hidden: Tensor | None = None
    attention: Tensor | None = None


class FeatureDistiller:
    """Resolves the layer maps and checks both models once, at construction (before any training); holds the
    hidden-state projections (``self.projections``, an ``nn.Module`` or None) that the trainer optimises and saves.

    Args mirror the ``DistillationConfig`` fields of the same names; a term whose weight is 0 is off.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, hidden_weight: float = 0.0,
                 hidden_loss: str = "mse", hidden_layer_map: str = "uniform", hidden_projection: str = "auto",
                 hidden_projection_init: str = "xavier", attention_weight: float = 0.0,
                 attention_loss: str = "head_mean", attention_layer_map: str = "last", relation_heads: int = 0,
                 attention_query_chunk: int = 256):
        self.hidden_weight, self.hidden_loss = hidden_weight, hidden_loss
        self.attention_weight, self.attention_loss = attention_weight, attention_loss
        self.query_chunk = attention_query_chunk
        depths = len(layer_list(student)), len(layer_list(teacher))
        recorded = getattr(getattr(student, "config", None), "kd_llm_teacher_layers", None)
        self.hidden_pairs = resolve_layer_map(hidden_layer_map, *depths, student_teacher_layers=recorded,
                                              name="hidden_layer_map") if hidden_weight > 0 else []
        self.attention_pairs = resolve_layer_map(attention_layer_map, *depths, student_teacher_layers=recorded,
                                                 name="attention_layer_map") if attention_weight > 0 else []
        self.projections = None
        if self.hidden_pairs:
            self.projections = HiddenStateProjections(self.hidden_pairs, hidden_width(student), hidden_width(teacher),
                                                      mode=hidden_projection, init=hidden_projection_init)
        # Check every mapped attention layer now: an unsupported layout must not surface after hours of training.
        self.relation_heads = {}
        for s, t in self.attention_pairs:
            student_geometry = layer_geometry(student, s, "student")
            teacher_geometry = layer_geometry(teacher, t, "teacher")
            if attention_loss == "relation":
                cap = min(student_geometry.num_heads, teacher_geometry.num_heads)
                heads = relation_heads or default_relation_heads(student_geometry.widths, teacher_geometry.widths, cap)
                check_relation_heads(heads, {"student": student_geometry.widths, "teacher": teacher_geometry.widths},
                                     f"student layer {s} / teacher layer {t}")
                self.relation_heads[(s, t)] = heads

    @classmethod
    def from_config(cls, config, student: nn.Module, teacher: nn.Module | None) -> FeatureDistiller | None:
        """The distiller a ``DistillationConfig`` asks for, or None when both feature weights are 0."""
        if config.hidden_weight == 0 and config.attention_weight == 0:
            return None
        if teacher is None:
            raise ValueError("hidden_weight/attention_weight > 0 distil the teacher's features: a teacher_model is "
                             "required.")
        names = ("hidden_weight", "hidden_loss", "hidden_layer_map", "hidden_projection", "hidden_projection_init",
                 "attention_weight", "attention_loss", "attention_layer_map", "relation_heads",
                 "attention_query_chunk")
        return cls(student, teacher, **{name: getattr(config, name) for name in names})

    def capture(self, model: nn.Module, role: str) -> FeatureCapture:
        """Hooks recording the mapped layers of ``model`` (``role`` is ``"student"`` or ``"teacher"``)."""
        index = 0 if role == "student" else 1
        return FeatureCapture(model, hidden_layers=[pair[index] for pair in self.hidden_pairs],
                              attention_layers=[pair[index] for pair in self.attention_pairs], role=role)

    def terms(self, student: CapturedFeatures, teacher: CapturedFeatures, attention_mask: Tensor,
              normaliser: Tensor | float, *, expect_grad: bool = False,
              segments: Tensor | None = None) -> FeatureTerms:
        """The hidden-state and attention terms for one batch.

        Args:
            student / teacher: what :meth:`capture` recorded during each model's forward on the same input ids.
            attention_mask: ``[B, T]``, 1 for real tokens.
            normaliser: valid tokens of the whole accumulated batch (>= 1).
            expect_grad: the student is training; its captured features must then carry gradients.
            segments: ``[B, T]`` long, which example each token attends within (-1: padding) for packed rows
                (kd_llm.data.packing); None: one example per row.
        """
        valid = attention_mask.bool()
        terms = FeatureTerms()
        if self.hidden_pairs:
            parts = []
            for s, t in self.hidden_pairs:
                student_states = self._get(student.hidden, s, "student", expect_grad)[valid]
                teacher_states = self._get(teacher.hidden, t, "teacher")[valid]
                projected = self.projections(student_states, s, t)
                parts.append(hidden_state_loss(projected, teacher_states, self.hidden_loss).sum())
            terms.hidden = torch.stack(parts).mean() / normaliser
        if self.attention_pairs:
            parts = []
            for s, t in self.attention_pairs:
                s_in = self._get(student.attention, s, "student", expect_grad)
                t_in = self._get(teacher.attention, t, "teacher")
                if self.attention_loss == "relation":
                    parts.append(relation_attention_kl((s_in.query, s_in.key, s_in.value),
                                                       (t_in.query, t_in.key, t_in.value), attention_mask,
                                                       self.relation_heads[(s, t)], self.query_chunk,
                                                       segments=segments))
                else:
                    s_qk = queries_and_keys(s_in.query, s_in.key, s_in.geometry, s_in.position_embeddings,
                                            f"student layer {s}")
                    t_qk = queries_and_keys(t_in.query, t_in.key, t_in.geometry, t_in.position_embeddings,
                                            f"teacher layer {t}")
                    parts.append(head_mean_attention_kl(s_qk, t_qk, s_in.geometry, t_in.geometry, attention_mask,
                                                        self.query_chunk, segments=segments))
            terms.attention = torch.stack(parts).mean() / normaliser
        return terms

    @staticmethod
    def _get(captured: dict, index: int, role: str, expect_grad: bool = False):
        if index not in captured or (hasattr(captured[index], "query") and captured[index].query is None):
            raise RuntimeError(f"the {role}'s layer {index} was not captured during its forward pass (did the "
                               "forward skip that layer?).")
        value = captured[index]
        tensor = value if isinstance(value, Tensor) else value.query
        if expect_grad and torch.is_grad_enabled() and not tensor.requires_grad:
            raise RuntimeError(
                f"the student's layer {index} features carry no gradient, so the feature terms could not train it. "
                "Gradient checkpointing with use_reentrant=True runs layers without autograd: set "
                "gradient_checkpointing_kwargs={'use_reentrant': False}."
            )
        return value
