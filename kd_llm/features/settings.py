"""Validation of the feature-distillation fields of ``DistillationConfig`` (kept here, next to the features, so the
config's ``__post_init__`` stays one line for them)."""

from __future__ import annotations

from kd_llm.features.attention_maps import ATTENTION_LOSSES
from kd_llm.features.hidden_states import HIDDEN_LOSSES, PROJECTION_INITS, PROJECTION_MODES
from kd_llm.features.layer_maps import LayerMapError, check_layer_map_syntax


def feature_config_problems(config) -> list[str]:
    """One message per invalid feature setting of ``config`` (empty when all are fine)."""
    problems = []
    for name in ("hidden_weight", "attention_weight"):
        if not getattr(config, name) >= 0:
            problems.append(f"{name} must be >= 0, got {getattr(config, name)}")
    for name, allowed in (("hidden_loss", HIDDEN_LOSSES), ("hidden_projection", PROJECTION_MODES),
                          ("hidden_projection_init", PROJECTION_INITS), ("attention_loss", ATTENTION_LOSSES)):
        if getattr(config, name) not in allowed:
            problems.append(f"{name} must be one of {', '.join(allowed)}, got {getattr(config, name)!r}")
    for name in ("hidden_layer_map", "attention_layer_map"):
        try:
            check_layer_map_syntax(getattr(config, name), name)
        except LayerMapError as error:
            problems.append(str(error).rstrip("."))
    if config.relation_heads < 0:
        problems.append(f"relation_heads must be >= 0 (0: automatic), got {config.relation_heads}")
    if config.attention_query_chunk < 1:
        problems.append(f"attention_query_chunk must be >= 1, got {config.attention_query_chunk}")
    if config.precompute_teacher_logits and (config.hidden_weight > 0 or config.attention_weight > 0):
        problems.append(
            "precompute_teacher_logits keeps only the teacher's logits, but hidden_weight/attention_weight need its "
            "hidden states or attention from a live forward pass every step, so the cache would save nothing: set "
            "precompute_teacher_logits=False"
        )
    return problems
