"""Record a model's intermediate features during its ordinary forward pass, through hooks that live only as long as
a ``with`` block.

- hidden states: the output of chosen decoder layers (a forward hook on the layer), ``[B, T, hidden]``;
- attention inputs: the outputs of ``self_attn.q_proj``/``k_proj``/``v_proj`` (forward hooks) and the rotary
  ``position_embeddings`` that ``self_attn`` receives (a forward pre-hook with kwargs), enough for
  :mod:`kd_llm.features.attention_maps` to rebuild the attention maps without eager attention.

Captured student tensors stay in the autograd graph, so losses on them train the student. Only the mapped layers are
hooked; nothing is kept after the ``with`` block but what the caller holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from kd_llm.features.attention_maps import AttentionGeometry, UnsupportedAttentionError, attention_geometry
from kd_llm.models.students import decoder_layers


def layer_list(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of ``model`` (an unwrapped ``*ForCausalLM``, or a PEFT model around one)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    parent, attribute = decoder_layers(model)
    return getattr(parent, attribute)


def hidden_width(model: nn.Module) -> int:
    """Width of the residual stream, read from the input embedding (robust across configs and sub-configs)."""
    return model.get_input_embeddings().weight.shape[-1]


def self_attention(model: nn.Module, index: int, role: str) -> nn.Module:
    layer = layer_list(model)[index]
    attention = getattr(layer, "self_attn", None)
    if attention is None:
        raise UnsupportedAttentionError(
            f"{role} layer {index} ({type(layer).__name__}) has no self_attn module with separate q/k/v projections "
            "(GPT-2-style blocks fuse them), so its attention maps cannot be rebuilt. Use hidden-state distillation "
            "(hidden_weight) for this model, or attention distillation with a Llama/Qwen/Mistral/Gemma-style model."
        )
    return attention


def layer_geometry(model: nn.Module, index: int, role: str) -> AttentionGeometry:
    return attention_geometry(self_attention(model, index, role), f"{role} layer {index}")


@dataclass
class AttentionInputs:
    """What one layer's attention received: raw projections ``[B, T, width]`` and the rotary (cos, sin)."""

    query: Tensor | None = None
    key: Tensor | None = None
    value: Tensor | None = None
    position_embeddings: tuple[Tensor, Tensor] | None = None
    geometry: AttentionGeometry | None = None


@dataclass
class CapturedFeatures:
    hidden: dict[int, Tensor] = field(default_factory=dict)
    attention: dict[int, AttentionInputs] = field(default_factory=dict)


class FeatureCapture:
    """``with FeatureCapture(model, hidden_layers=[...], attention_layers=[...]) as features: model(...)``."""

    def __init__(self, model: nn.Module, hidden_layers=(), attention_layers=(), role: str = "model"):
        self.model, self.role = model, role
        self.hidden_layers = sorted(set(hidden_layers))
        self.attention_layers = sorted(set(attention_layers))
        self.features = CapturedFeatures()
        self._handles = []

    def __enter__(self) -> CapturedFeatures:
        self.features = CapturedFeatures()
        layers = layer_list(self.model)
        try:
            for index in self.hidden_layers:
                self._handles.append(layers[index].register_forward_hook(self._hidden_hook(index)))
            for index in self.attention_layers:
                attention = self_attention(self.model, index, self.role)
                inputs = self.features.attention.setdefault(
                    index, AttentionInputs(geometry=attention_geometry(attention, f"{self.role} layer {index}")))
                self._handles.append(attention.register_forward_pre_hook(self._rope_hook(inputs), with_kwargs=True))
                for name in ("query", "key", "value"):
                    projection = getattr(attention, f"{name[0]}_proj")
                    self._handles.append(projection.register_forward_hook(self._projection_hook(inputs, name)))
        except BaseException:
            self._remove()
            raise
        return self.features

    def __exit__(self, *exc_info) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hidden_hook(self, index: int):
        def hook(module, args, output):
            # Decoder layers return a tensor in Transformers 5; older layouts return a tuple led by it.
            self.features.hidden[index] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    @staticmethod
    def _rope_hook(inputs: AttentionInputs):
        def hook(module, args, kwargs):
            inputs.position_embeddings = kwargs.get("position_embeddings")
        return hook

    @staticmethod
    def _projection_hook(inputs: AttentionInputs, name: str):
        def hook(module, args, output):
            setattr(inputs, name, output)
        return hook
