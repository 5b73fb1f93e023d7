"""Feature-level distillation: hidden states and attention maps of chosen layers, between models that share a
tokenizer but may differ in family, depth, width and head count."""

from kd_llm.features.attention_maps import ATTENTION_LOSSES, UnsupportedAttentionError
from kd_llm.features.distiller import FeatureDistiller, FeatureTerms
from kd_llm.features.hidden_states import (
    HIDDEN_LOSSES,
    PROJECTION_INITS,
    PROJECTION_MODES,
    PROJECTIONS_FILE,
    HiddenStateProjections,
    hidden_state_loss,
)
from kd_llm.features.layer_maps import LAYER_MAP_KEYWORDS, LayerMapError, check_layer_map_syntax, resolve_layer_map

__all__ = [
    "ATTENTION_LOSSES", "HIDDEN_LOSSES", "LAYER_MAP_KEYWORDS", "PROJECTION_INITS", "PROJECTION_MODES",
    "PROJECTIONS_FILE", "FeatureDistiller", "FeatureTerms", "HiddenStateProjections", "LayerMapError",
    "UnsupportedAttentionError", "check_layer_map_syntax", "hidden_state_loss", "resolve_layer_map",
]
