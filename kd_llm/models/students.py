"""Building a student model: an existing checkpoint, a scaled-down copy of the teacher's architecture, or a pruned
teacher.

``build_student`` dispatches on ``method``:

- ``"checkpoint"``: load an existing model folder / spec (:func:`.loading.load_model`);
- ``"scaled"``: the teacher's architecture with fewer/narrower layers (:func:`scaled_down_config`), randomly
  initialised from ``seed``; same vocabulary, special token ids and embedding tying as the teacher;
- ``"pruned"``: the teacher with some decoder layers removed, weights copied (:func:`prune_layers`). Which layers to
  keep: an explicit ``layers=[...]`` list, ``strategy="uniform"`` (evenly spaced, first and last always kept, see
  :func:`uniform_layer_indices`) or ``strategy="importance"`` (:func:`rank_layers_by_importance` on calibration data,
  keeping the ``num_layers`` layers whose individual removal hurts the language-modelling loss most).

Pruned students record the teacher layers they kept in ``config.kd_llm_teacher_layers`` (student layer ``i`` is
teacher layer ``kd_llm_teacher_layers[i]``), which hidden-state distillation uses to pair layers.

Measured once (not a unit test: about 40 s on 2 CPU cores) on SmolLM2-135M-Instruct
(``packaged:smollm2-135m-instruct``, 30 layers, float32), calibrating on three paragraphs of ordinary English prose
(174 tokens, a village and its market) and measuring the LM loss on three other paragraphs (150 tokens, cooking):

=================================================  ===================
model                                              LM loss, nats/token
=================================================  ===================
teacher, 30 layers                                  3.26
15 layers, importance-ranked                        5.73
15 layers, uniform (0, 2, 4, ..., 12, 15, ..., 29)  13.97
15 layers, every other (0, 2, ..., 28)              12.38
20 layers, importance / uniform                     4.45 / 11.21
24 layers, importance / uniform                     3.90 / 5.65
=================================================  ===================

Removing layer 0 alone costs +9.0 nats and layer 1 +3.3 (then 11, 29, 8, 28 at +1.1 to +1.9; most others +0.1 to
+0.3), and uniform spacing drops layer 1, which is why importance ranking is a much better starting point for
distillation than taking every other layer.
"""

from __future__ import annotations

import copy
import math
import operator
import os
from collections.abc import Sequence

import torch
from torch import nn

from .loading import load_model

__all__ = [
    "STUDENT_METHODS",
    "PRUNING_STRATEGIES",
    "build_student",
    "decoder_layers",
    "prune_layers",
    "rank_layers_by_importance",
    "scaled_down_config",
    "uniform_layer_indices",
]

STUDENT_METHODS = ("checkpoint", "scaled", "pruned")
PRUNING_STRATEGIES = ("uniform", "importance")
# Config fields holding one entry per decoder layer, subset together with the layers.
_PER_LAYER_CONFIG_FIELDS = ("layer_types", "no_rope_layers")
# (parent attribute path, list attribute) where common causal LM architectures keep their decoder layers.
_LAYER_LOCATIONS = (
    ("model", "layers"),  # Llama, Mistral, Qwen2/3, Gemma/2/3, Phi3, SmolLM3, ...
    ("model.language_model", "layers"),
    ("model.decoder", "layers"),  # OPT
    ("transformer", "h"),  # GPT-2, GPT-J, Falcon, Bloom
    ("gpt_neox", "layers"),
)


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def decoder_layers(model: nn.Module) -> tuple[nn.Module, str]:
    """``(parent, attribute)`` such that ``getattr(parent, attribute)`` is the model's ``nn.ModuleList`` of layers."""
    for parent_path, attribute in _LAYER_LOCATIONS:
        parent = model
        for part in parent_path.split("."):
            parent = getattr(parent, part, None)
            if parent is None:
                break
        if parent is not None and isinstance(getattr(parent, attribute, None), nn.ModuleList):
            return parent, attribute
    raise ValueError(
        f"cannot find the decoder layers of a {type(model).__name__} (looked for "
        f"{', '.join(f'{p}.{a}' for p, a in _LAYER_LOCATIONS)}); pass an unwrapped *ForCausalLM model"
    )


# --------------------------------------------------------------------------------------------------------------------
# scaled


def scaled_down_config(
    teacher_config,
    *,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    intermediate_size: int | None = None,
):
    """A copy of the teacher's config with the given sizes; everything else (vocabulary, special token ids,
    ``tie_word_embeddings``, activation, rope ...) is kept.

    - ``head_dim`` (where the config has one) becomes ``hidden_size // num_attention_heads`` when either is changed,
      and stays as it is otherwise (Gemma 3, for one, has ``head_dim != hidden_size // heads``); a
      ``query_pre_attn_scalar`` equal to the old ``head_dim`` follows it.
    - ``num_key_value_heads`` defaults to the teacher's when it still divides the new head count (or to the new head
      count for a multi-head-attention teacher), else to the greatest common divisor of the two.
    - ``layer_types`` (sliding/full attention per layer) is taken from the teacher's layers at
      :func:`uniform_layer_indices`, so the mix of attention types and the last layer's type are kept.
    """
    config = copy.deepcopy(teacher_config)
    text = _text_config(config)
    teacher_layers = text.num_hidden_layers
    teacher_heads = text.num_attention_heads
    teacher_kv = getattr(text, "num_key_value_heads", None) or teacher_heads

    layers = _positive_int(num_layers, "num_layers") if num_layers is not None else teacher_layers
    hidden = _positive_int(hidden_size, "hidden_size") if hidden_size is not None else text.hidden_size
    heads = teacher_heads
    if num_attention_heads is not None:
        heads = _positive_int(num_attention_heads, "num_attention_heads")
    if num_key_value_heads is not None:
        kv = _positive_int(num_key_value_heads, "num_key_value_heads")
    elif teacher_kv == teacher_heads:
        kv = heads
    elif heads % teacher_kv == 0:
        kv = teacher_kv
    else:
        kv = math.gcd(heads, teacher_kv)
    if hidden % heads:
        raise ValueError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    if heads % kv:
        raise ValueError(f"num_attention_heads {heads} is not divisible by num_key_value_heads {kv}")

    text.num_hidden_layers = layers
    text.hidden_size = hidden
    text.num_attention_heads = heads
    if hasattr(text, "num_key_value_heads"):
        text.num_key_value_heads = kv
    elif kv != heads:
        raise ValueError(f"{type(text).__name__} has no num_key_value_heads; it must equal num_attention_heads")
    if intermediate_size is not None:
        text.intermediate_size = _positive_int(intermediate_size, "intermediate_size")
    old_head_dim = getattr(text, "head_dim", None)
    if old_head_dim is not None and (hidden_size is not None or num_attention_heads is not None):
        text.head_dim = hidden // heads
        if getattr(text, "query_pre_attn_scalar", None) == old_head_dim:
            text.query_pre_attn_scalar = text.head_dim
    for field in _PER_LAYER_CONFIG_FIELDS:
        values = getattr(text, field, None)
        if isinstance(values, (list, tuple)) and len(values) == teacher_layers and layers != teacher_layers:
            if layers <= teacher_layers:
                setattr(text, field, [values[i] for i in uniform_layer_indices(teacher_layers, layers)])
            else:
                setattr(text, field, [values[i % teacher_layers] for i in range(layers)])
    for attribute in ("kd_llm_teacher_layers",):  # a pruned teacher's provenance does not carry over
        if hasattr(config, attribute):
            delattr(config, attribute)
    return config


def _build_scaled(teacher, seed: int, **sizes):
    from transformers import AutoModelForCausalLM, PretrainedConfig

    if isinstance(teacher, PretrainedConfig):
        teacher_config, dtype = teacher, torch.float32
    elif hasattr(teacher, "config"):
        teacher_config = teacher.config
        dtype = next(teacher.parameters()).dtype
    else:
        raise TypeError(f"method='scaled' needs the teacher model or its config, got {type(teacher).__name__}")
    config = scaled_down_config(teacher_config, **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return student


# --------------------------------------------------------------------------------------------------------------------
# pruned


def uniform_layer_indices(num_teacher_layers: int, num_layers: int) -> list[int]:
    """``num_layers`` evenly spaced indices out of ``range(num_teacher_layers)``, always including the first and the
    last layer (``round(i * (L - 1) / (n - 1))``); a single layer keeps layer 0."""
    _positive_int(num_teacher_layers, "number of teacher layers")
    _positive_int(num_layers, "num_layers")
    if num_layers > num_teacher_layers:
        raise ValueError(f"num_layers {num_layers} is more than the teacher's {num_teacher_layers} layers")
    if num_layers == 1:
        return [0]
    step = (num_teacher_layers - 1) / (num_layers - 1)
    return [int(math.floor(i * step + 0.5)) for i in range(num_layers)]


def _validate_layer_list(layers: Sequence[int], num_teacher_layers: int) -> list[int]:
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"layers must be a list of layer indices, got {layers!r}")
    layers = list(layers)
    if not layers:
        raise ValueError("layers must keep at least one layer")
    for position, index in enumerate(layers):
        try:
            if isinstance(index, bool):
                raise TypeError
            layers[position] = index = operator.index(index)
        except TypeError:
            raise TypeError(f"layer indices must be integers, got {index!r}") from None
        if not 0 <= index < num_teacher_layers:
            raise ValueError(f"layer index {index} is out of range: the teacher has layers 0..{num_teacher_layers - 1}")
    duplicates = sorted({index for index in layers if layers.count(index) > 1})
    if duplicates:
        raise ValueError(f"duplicate layer indices {duplicates} in layers={layers}")
    return sorted(layers)


def prune_layers(teacher: nn.Module, layers: Sequence[int]) -> nn.Module:
    """A copy of ``teacher`` keeping only the decoder layers ``layers`` (teacher indices, kept in teacher order).

    Weights are copied (the teacher is not modified, and dropped layers are never copied). The copy's
    ``config.num_hidden_layers``, per-layer config lists (``layer_types`` ...) and each layer's ``layer_idx`` are
    updated so the KV cache works, ``config.kd_llm_teacher_layers`` records ``layers``, and all parameters require
    gradients.
    """
    parent, attribute = decoder_layers(teacher)
    teacher_layers = getattr(parent, attribute)
    keep = _validate_layer_list(layers, len(teacher_layers))
    # Copy everything but the layer list, then only the kept layers, with one memo so shared tensors stay shared.
    memo = {id(teacher_layers): nn.ModuleList()}
    student = copy.deepcopy(teacher, memo)
    new_layers = nn.ModuleList(copy.deepcopy(teacher_layers[i], memo) for i in keep)
    student_parent, _ = decoder_layers(student)
    setattr(student_parent, attribute, new_layers)

    for new_index, layer in enumerate(new_layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    configs = {id(student.config): student.config}
    text = _text_config(student.config)
    configs[id(text)] = text
    for module in student.modules():  # sub-models may hold their own config object
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "num_hidden_layers"):
            configs.setdefault(id(config), config)
    teacher_count = len(teacher_layers)
    for config in configs.values():
        if getattr(config, "num_hidden_layers", None) != teacher_count:
            continue
        for field in _PER_LAYER_CONFIG_FIELDS:
            values = getattr(config, field, None)
            if isinstance(values, (list, tuple)) and len(values) == teacher_count:
                setattr(config, field, [values[i] for i in keep])
        config.num_hidden_layers = len(keep)
    student.config.kd_llm_teacher_layers = list(keep)
    student.requires_grad_(True)
    return student


def _calibration_batch(calibration_input_ids, attention_mask, tokenizer):
    if calibration_input_ids is None:
        raise ValueError(
            "strategy='importance' needs calibration data: pass calibration_input_ids (token ids, or text with the "
            "tokenizer)"
        )
    if isinstance(calibration_input_ids, str) or (
        isinstance(calibration_input_ids, (list, tuple)) and calibration_input_ids
        and all(isinstance(text, str) for text in calibration_input_ids)
    ):
        if tokenizer is None:
            raise ValueError("calibration text needs the tokenizer: pass tokenizer=")
        texts = [calibration_input_ids] if isinstance(calibration_input_ids, str) else list(calibration_input_ids)
        pad_added = tokenizer.pad_token is None
        if pad_added:
            tokenizer = copy.copy(tokenizer)
            tokenizer.pad_token = tokenizer.eos_token
        encoded = tokenizer(texts, return_tensors="pt", padding=True)
        return encoded["input_ids"], encoded["attention_mask"]
    input_ids = torch.as_tensor(calibration_input_ids, dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"calibration_input_ids must be (batch, length >= 2), got shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask).reshape(input_ids.shape)
    return input_ids, attention_mask


def _lm_loss(model, input_ids, attention_mask) -> float:
    labels = input_ids.clone()
    if attention_mask is not None:
        labels[attention_mask == 0] = -100
    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
    return float(output.loss)


def _skip_hook(module, args, kwargs, output):
    """Forward hook that makes a decoder layer the identity on its hidden states."""
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if hasattr(output, "last_hidden_state"):
        output.last_hidden_state = hidden
        return output
    return hidden


@torch.no_grad()
def rank_layers_by_importance(
    model: nn.Module, calibration_input_ids, *, attention_mask=None, tokenizer=None
) -> list[tuple[int, float]]:
    """Rank decoder layers by how much the LM loss on the calibration batch rises when that layer alone is skipped.

    Returns ``(layer index, loss increase in nats/token)`` pairs, most important first. The model is not modified
    (each layer is bypassed by a temporary forward hook; eval mode during the measurement, the previous mode
    restored). ``calibration_input_ids``: a ``(batch, length)`` tensor/list of token ids (with an optional
    ``attention_mask``), or a string / list of strings tokenized with ``tokenizer``.
    """
    input_ids, attention_mask = _calibration_batch(calibration_input_ids, attention_mask, tokenizer)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    parent, attribute = decoder_layers(model)
    layers = getattr(parent, attribute)
    was_training = model.training
    model.eval()
    try:
        baseline = _lm_loss(model, input_ids, attention_mask)
        increases = []
        for index, layer in enumerate(layers):
            handle = layer.register_forward_hook(_skip_hook, with_kwargs=True)
            try:
                increases.append((index, _lm_loss(model, input_ids, attention_mask) - baseline))
            finally:
                handle.remove()
    finally:
        model.train(was_training)
    return sorted(increases, key=lambda pair: (-pair[1], pair[0]))


# --------------------------------------------------------------------------------------------------------------------
# build_student


def build_student(
    method: str,
    *,
    teacher=None,
    tokenizer=None,
    checkpoint: str | os.PathLike | None = None,
    num_layers: int | None = None,
    layers: Sequence[int] | None = None,
    strategy: str = "uniform",
    hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    intermediate_size: int | None = None,
    calibration_input_ids=None,
    seed: int = 0,
):
    """Build a student model (see the module docstring for the three methods).

    - ``"checkpoint"``: needs ``checkpoint`` (a model spec for :func:`.loading.load_model`).
    - ``"scaled"``: needs ``teacher`` (a model or its config) and at least one of ``num_layers``, ``hidden_size``,
      ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``; random init from ``seed``.
    - ``"pruned"``: needs ``teacher`` (a model) and either ``layers`` (indices to keep) or ``num_layers`` with
      ``strategy`` ``"uniform"`` / ``"importance"``; importance needs ``calibration_input_ids`` (token ids, or text
      together with ``tokenizer``).

    Arguments that the chosen method does not use are rejected rather than silently ignored. The returned student
    is in train mode with all parameters requiring gradients.
    """
    if method not in STUDENT_METHODS:
        raise ValueError(f"unknown student method {method!r}; choose one of {', '.join(STUDENT_METHODS)}")
    sizes = dict(
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
    )
    given = {name for name, value in sizes.items() if value is not None}
    unused = []
    if method != "checkpoint" and checkpoint is not None:
        unused.append("checkpoint")
    if method != "scaled":
        unused += sorted(given)
    if method != "pruned":
        if layers is not None:
            unused.append("layers")
        if strategy != "uniform":
            unused.append("strategy")
        if calibration_input_ids is not None:
            unused.append("calibration_input_ids")
    if method == "checkpoint" and num_layers is not None:
        unused.append("num_layers")
    if unused:
        raise ValueError(f"method={method!r} does not use {', '.join(unused)}")

    if method == "checkpoint":
        if checkpoint is None:
            raise ValueError("method='checkpoint' needs checkpoint= (a model folder, .gguf file or packaged:<name>)")
        student = load_model(checkpoint)
    elif method == "scaled":
        if teacher is None:
            raise ValueError("method='scaled' needs teacher= (the teacher model or its config)")
        if num_layers is None and not given:
            raise ValueError("method='scaled' needs at least one size to change (num_layers, hidden_size, ...)")
        student = _build_scaled(teacher, seed, num_layers=num_layers, **sizes)
    else:
        if teacher is None or not isinstance(teacher, nn.Module):
            raise ValueError("method='pruned' needs teacher= (the teacher model, whose weights are copied)")
        teacher_count = len(getattr(*decoder_layers(teacher)))
        if layers is not None:
            if strategy != "uniform":
                raise ValueError("pass either layers= (explicit indices to keep) or strategy=, not both")
            keep = _validate_layer_list(layers, teacher_count)
            if num_layers is not None and num_layers != len(keep):
                raise ValueError(f"num_layers={num_layers} disagrees with the {len(keep)} indices in layers=")
            if calibration_input_ids is not None:
                raise ValueError("calibration_input_ids is only used by strategy='importance'")
        else:
            if strategy not in PRUNING_STRATEGIES:
                raise ValueError(
                    f"unknown pruning strategy {strategy!r}; choose one of {', '.join(PRUNING_STRATEGIES)} or pass "
                    f"layers= with the indices to keep"
                )
            if num_layers is None:
                raise ValueError(
                    f"strategy={strategy!r} needs num_layers= (how many of the {teacher_count} layers to keep)"
                )
            _positive_int(num_layers, "num_layers")
            if num_layers > teacher_count:
                raise ValueError(f"num_layers {num_layers} is more than the teacher's {teacher_count} layers")
            if strategy == "uniform":
                if calibration_input_ids is not None:
                    raise ValueError("calibration_input_ids is only used by strategy='importance'")
                keep = uniform_layer_indices(teacher_count, num_layers)
            else:
                ranking = rank_layers_by_importance(teacher, calibration_input_ids, tokenizer=tokenizer)
                keep = sorted(index for index, _ in ranking[:num_layers])
        student = prune_layers(teacher, keep)
    student.requires_grad_(True)
    student.train()
    return student
