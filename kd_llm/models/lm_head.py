"""A teacher's output head alone: the ``[V, d]`` lm_head weight and Gemma's final soft cap, which turn the teacher's
final (post-norm) hidden state ``h`` into its logits ``softcap(W h)``: what a hidden-state teacher cache or a
side-process teacher shipping hidden states needs besides ``h``.

:func:`head_of_model` reads it from a loaded model; :func:`load_teacher_head` reads it from a model folder's
safetensors without loading the body (only the one ``[V, d]`` tensor is read). Both refuse a model whose logits are
something else than ``softcap(lm_head(h))``: an lm_head with a bias, or one of the logit post-processings the
installed transformers' causal LMs apply (listed in :data:`LOGIT_POSTPROCESSING`, from a scan of
``transformers/models/*/modeling_*.py``: Cohere's ``logit_scale``, Granite's and HyperCLOVAX's ``logits_scaling``,
MiniCPM3's hidden-state scaling, Falcon-H1's ``lm_head_multiplier``, RecurrentGemma's and xLSTM's differently named
soft caps, Inkling's unpadded-vocabulary slicing). A loaded model is also probed numerically by the callers
(``probe_head``), which catches what a config does not say.

The head's fingerprint, :func:`head_sha256`, hashes the weight's *values* (upcast to float32, which is exact from
bfloat16 / float16) and the soft cap: a head read from the folder and the same head of the model loaded in float32
hash equal, and a cache built from one teacher refuses another teacher's head.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

# Config attribute -> what the model does with it; a value other than the neutral one means the logits are not
# softcap(lm_head(h)) with the final_logit_softcapping soft cap. (Found in transformers 5.23's causal LMs.)
LOGIT_POSTPROCESSING = {
    "logit_scale": (1.0, "multiplies its logits by logit_scale (Cohere)"),
    "logits_scaling": (1.0, "scales its logits or final hidden states by logits_scaling (Granite, HyperCLOVAX, "
                            "MiniCPM3)"),
    "lm_head_multiplier": (1.0, "multiplies its logits by lm_head_multiplier (Falcon-H1)"),
    "logits_soft_cap": (None, "soft-caps its logits with logits_soft_cap (RecurrentGemma), not "
                              "final_logit_softcapping"),
    "output_logit_soft_cap": (None, "soft-caps its logits with output_logit_soft_cap (xLSTM)"),
    "unpadded_vocab_size": (None, "cuts its logits to unpadded_vocab_size columns (Inkling)"),
}


class TeacherHeadError(ValueError):
    """A teacher whose logits cannot be rebuilt as softcap(lm_head(h)), or a head that is not the expected one."""


@dataclass
class TeacherHead:
    """``logits = soft_cap(hidden @ weight.T, softcap)``; ``weight`` is a constant (no gradient)."""

    weight: Tensor  # [V, d]
    softcap: float | None
    tied: bool  # the weight is the input embedding's (recorded; it does not change the logits)

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    @property
    def sha256(self) -> str:
        return head_sha256(self.weight, self.softcap)

    def as_linear(self) -> nn.Linear:
        """A bias-free ``nn.Linear`` holding the weight (frozen), for code that reads ``get_output_embeddings()``."""
        linear = nn.Linear(self.hidden_size, self.vocab_size, bias=False, device="meta")
        linear.weight = nn.Parameter(self.weight, requires_grad=False)
        return linear


def head_sha256(weight: Tensor, softcap: float | None) -> str:
    digest = hashlib.sha256()
    values = weight.detach().to("cpu", torch.float32).contiguous()
    digest.update(f"lm_head|{tuple(values.shape)}|softcap={softcap!r}|".encode())
    digest.update(values.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _configs(config) -> list:
    configs = [config]
    if hasattr(config, "get_text_config"):
        text = config.get_text_config()
        if text is not config:
            configs.append(text)
    return configs


def _get(config, name):
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def logit_postprocessing_problem(config) -> str | None:
    """Why a model with this config (a transformers config or its ``config.json`` dict) does not compute its logits
    as ``softcap(lm_head(h))``, or None."""
    configs = [config, *(config.get(key) for key in ("text_config",) if isinstance(config, dict)
                         and isinstance(config.get(key), dict))] if isinstance(config, dict) else _configs(config)
    for candidate in configs:
        for name, (neutral, what) in LOGIT_POSTPROCESSING.items():
            value = _get(candidate, name)
            if value is not None and value != neutral:
                model_type = _get(candidate, "model_type")
                return f"the model ({model_type}) {what} = {value}"
    return None


def final_softcap(config) -> float | None:
    """``final_logit_softcapping`` of a config (or its text config), None when absent or 0."""
    configs = _configs(config) if not isinstance(config, dict) else [config, config.get("text_config") or {}]
    for candidate in configs:
        cap = _get(candidate, "final_logit_softcapping")
        if cap:
            return float(cap)
    return None


def _refuse(where: str, reason: str) -> TeacherHeadError:
    return TeacherHeadError(
        f"{where}: its logits are not softcap(lm_head(final hidden state)), so its hidden states cannot stand in "
        f"for its logits ({reason}). Use the top-k teacher cache (cache_format: top_k) or a live teacher instead.")


def head_of_model(model: nn.Module) -> TeacherHead:
    """The head of a loaded (unwrapped) causal LM, refused with the reason when its logits are not
    ``softcap(lm_head(h))``. Callers with the whole model also run the numerical probe (``probe_head``)."""
    name = type(model).__name__
    problem = logit_postprocessing_problem(getattr(model, "config", None) or {})
    if problem is not None:
        raise _refuse(name, problem)
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear:
        raise _refuse(name, "its output embeddings are " + ("missing" if head is None else
                                                            f"a {type(head).__name__}, not a plain torch.nn.Linear"))
    if head.bias is not None:
        raise _refuse(name, "its lm_head has a bias")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = embeddings is not None and getattr(embeddings, "weight", None) is head.weight
    return TeacherHead(head.weight.detach(), final_softcap(model.config), tied)


def _weight_names(folder: Path, config) -> tuple[str, str | None, bool]:
    """(name of the lm_head weight, of the tied input embedding or None, whether a bias exists) in the checkpoint,
    found by building the model on the meta device (no memory) and asking it for its output embeddings."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    if type(head) is not nn.Linear:
        raise _refuse(str(folder), "its output embeddings are " + ("missing" if head is None else
                                                                    f"a {type(head).__name__}, not a nn.Linear"))
    head_names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight]
    tied = embeddings is not None and embeddings.weight is head.weight
    embedding_name = names.get(id(embeddings.weight)) if embeddings is not None else None
    return head_names[0], embedding_name if tied else None, head.bias is not None


def _tensor_files(folder: Path) -> dict[str, str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    files = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            files.update({key: path.name for key in handle.keys()})
    return files


def load_teacher_head(spec: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                      trust_remote_code: bool = False) -> TeacherHead:
    """The teacher's head from its folder's safetensors (any spec of :func:`kd_llm.models.loading.load_model` that
    resolves to a local folder: a folder, ``packaged:``, ``embedded:``, a ``.gguf`` file through the conversion
    cache). Reads ``config.json`` and the one ``[V, d]`` tensor, never the body's weights."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from kd_llm.models.loading import _local_or_converted

    source, is_hub = _local_or_converted(spec, None, weights=True)
    if is_hub:
        raise TeacherHeadError(f"{spec!r} is a Hub id; the teacher's head is read from a local folder. Download the "
                               "model to a folder and pass that.")
    folder = Path(source)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    problem = logit_postprocessing_problem(config)
    if problem is not None:
        raise _refuse(str(spec), problem)
    head_name, embedding_name, has_bias = _weight_names(folder, config)
    files = _tensor_files(folder)
    if has_bias or head_name.replace(".weight", ".bias") in files:
        raise _refuse(str(spec), "its lm_head has a bias")
    name = head_name if head_name in files else embedding_name
    if name not in files:
        raise TeacherHeadError(f"{folder} holds no {head_name}" + (f" or {embedding_name}" if embedding_name else "")
                               + " tensor in its safetensors: is it a complete model folder?")
    with safe_open(str(folder / files[name]), framework="pt") as handle:
        weight = handle.get_tensor(name).to(dtype)
    return TeacherHead(weight, final_softcap(config), tied=embedding_name is not None)


# Forward keyword arguments that make a transformers 5.x causal LM return its final (post-norm) hidden state without
# computing [B, T, V] logits: logits for the last position only, and the last hidden state alone.
HIDDEN_STATE_FORWARD_KWARGS = {"logits_to_keep": 1, "output_hidden_states": -1}


@torch.no_grad()
def final_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """``[B, T, d]``: the states ``model``'s lm_head reads, computed without the ``[B, T, V]`` logits."""
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                    **HIDDEN_STATE_FORWARD_KWARGS)
    return outputs.hidden_states[-1]
