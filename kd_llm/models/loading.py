"""Loading teachers and students: local folders, ``.gguf`` files, offline packaged models and Hub ids.

A model *spec* is one of

- a local folder saved with ``save_pretrained`` (safetensors weights),
- a path to a ``.gguf`` file (dequantized once to a safetensors folder in kd_llm's cache, see :mod:`.packaged`),
- ``packaged:<name>``, a pretrained model that ships offline as a pip package (:data:`.packaged.PACKAGED_MODELS`),
- ``embedded:<name>``, a small model that ships inside kd_llm itself (:data:`EMBEDDED_MODELS`),
- a Hugging Face Hub id ``org/name`` (needs network access, or the Hub cache with ``HF_HUB_OFFLINE=1``).

Weights are only ever read from safetensors (``use_safetensors=True``), never from pickles, and remote code only runs
when ``trust_remote_code=True`` is passed explicitly.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from .packaged import gguf_cache_dir, packaged_model_dir
from .weight_files import check_weight_files

__all__ = [
    "EMBEDDED_MODELS",
    "EMBEDDED_PREFIX",
    "PACKAGED_PREFIX",
    "embedded_model_dir",
    "freeze_teacher",
    "load_model",
    "load_peft_teacher",
    "load_tokenizer",
    "resolve_model_source",
]

PACKAGED_PREFIX = "packaged:"
EMBEDDED_PREFIX = "embedded:"
# Models inside the kd_llm package: name -> folder under kd_llm/assets.
EMBEDDED_MODELS = {"date-teacher": "date_teacher"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_PATH_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json")
_PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


def _looks_like_path(spec: str) -> bool:
    return (
        spec in (".", "..")
        or spec.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or os.path.isabs(spec)
        or "\\" in spec
        or spec.lower().endswith(_PATH_SUFFIXES)
        or spec.count("/") >= 2
        or not _HUB_ID.match(spec)
    )


def embedded_model_dir(name: str) -> Path:
    """The folder of a model that ships inside kd_llm (``embedded:<name>``)."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; kd_llm ships: {', '.join(sorted(EMBEDDED_MODELS))}")
    folder = Path(__file__).resolve().parent.parent / "assets" / EMBEDDED_MODELS[name]
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"embedded model {name!r} is missing from {folder}; reinstall kd_llm")
    return folder


def resolve_model_source(spec: str | os.PathLike) -> tuple[str, str | None]:
    """Map a model spec to ``(path_or_hub_id, gguf_file_name_or_None)`` without loading anything.

    - existing folder -> ``(absolute folder, None)``; a folder holding no ``config.json`` but exactly one ``.gguf``
      file resolves like that file;
    - existing ``.gguf`` file -> ``(its folder, its file name)`` (the loaders convert it through the cache);
    - ``packaged:<name>`` -> ``(converted folder, None)``; this converts the packaged model on first use (once);
    - ``org/name`` that is not a local path -> ``(spec, None)``, a Hub id.

    Raises ``FileNotFoundError`` for a spec that looks like a local path (absolute, ``./``, ``~``, a file suffix,
    several ``/``, or anything that is not of the Hub form ``org/name``) but does not exist.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec must be a non-empty string or path, got {spec!r}")
    spec = spec.strip()
    if spec.startswith(PACKAGED_PREFIX):
        return str(packaged_model_dir(spec[len(PACKAGED_PREFIX) :])), None
    if spec.startswith(EMBEDDED_PREFIX):
        return str(embedded_model_dir(spec[len(EMBEDDED_PREFIX) :])), None
    path = Path(spec).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ValueError(
                    f"model spec {spec!r} is a file but not a .gguf file; pass the folder that holds config.json and "
                    f"the safetensors weights instead"
                )
            return str(path.parent), path.name
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(path), ggufs[0].name
        return str(path), None
    if _looks_like_path(spec):
        raise FileNotFoundError(
            f"model path {spec!r} does not exist (resolved to {path.absolute()}). Pass an existing model folder, a "
            f"path to a .gguf file, 'packaged:<name>' for an offline packaged model, or a Hugging Face Hub id of the "
            f"form 'org/name'."
        )
    return spec, None


def _check_local_folder(folder: Path, spec: str) -> None:
    if (folder / "adapter_config.json").exists() and not (folder / "config.json").exists():
        raise ValueError(
            f"{folder} (from {spec!r}) is a PEFT adapter folder, not a full model; load it with "
            f"load_peft_teacher(base_spec, {str(folder)!r}), which merges it into its base model"
        )
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").exists():
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"model folder {folder} (from {spec!r}) has safetensors weights but no config.json")
        check_weight_files(folder)  # a truncated or corrupt file is named now, not deep inside from_pretrained
        return
    pickles = sorted({p.name for pattern in _PICKLE_PATTERNS for p in folder.glob(pattern)})
    if pickles:
        raise ValueError(
            f"model folder {folder} (from {spec!r}) only has pickled PyTorch weights ({', '.join(pickles[:3])}); "
            f"kd_llm loads safetensors only, because unpickling can run arbitrary code. If you trust the file, "
            f"convert it once: `python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{folder}', use_safetensors=False).save_pretrained('{folder}-safetensors')\"` "
            f"(and copy the tokenizer files), then use the new folder."
        )
    raise FileNotFoundError(
        f"model folder {folder} (from {spec!r}) has no model weights (no *.safetensors and no .gguf file)"
    )


def _local_or_converted(spec: str | os.PathLike, revision: str | None, *, weights: bool) -> tuple[str, bool]:
    """(folder or Hub id to give ``from_pretrained``, whether it is a Hub id)."""
    source, gguf_file = resolve_model_source(spec)
    is_hub = not Path(source).is_absolute()
    if revision is not None and not is_hub:
        raise ValueError(f"revision={revision!r} only applies to Hugging Face Hub ids, and {spec!r} is local")
    if gguf_file is not None:
        return str(gguf_cache_dir(Path(source) / gguf_file)), False
    if not is_hub and weights:
        _check_local_folder(Path(source), str(spec))
    return source, is_hub


def _hub_error(spec, error: Exception) -> OSError:
    return OSError(
        f"could not load {spec!r}: there is nothing at {Path(str(spec)).absolute()}, so it was taken for a Hugging "
        f"Face Hub id, and loading it from the Hub failed ({type(error).__name__}: {error}). Offline, use a local "
        f"folder, a .gguf file or 'packaged:<name>'."
    )


def load_model(
    spec: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = False,
    revision: str | None = None,
    **from_pretrained_kwargs,
):
    """``AutoModelForCausalLM`` from a model spec (see :func:`resolve_model_source`), safetensors weights only.

    Extra keyword arguments (``attn_implementation=``, ``device_map=`` ...) go to ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM

    source, is_hub = _local_or_converted(spec, revision, weights=True)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **from_pretrained_kwargs)
    if revision is not None:
        kwargs["revision"] = revision
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        if is_hub:
            raise _hub_error(spec, error) from error
        raise


def load_tokenizer(
    spec: str | os.PathLike, *, trust_remote_code: bool = False, revision: str | None = None, **from_pretrained_kwargs
):
    """``AutoTokenizer`` from a model spec (a ``.gguf`` file's tokenizer comes from its converted folder)."""
    from transformers import AutoTokenizer

    source, is_hub = _local_or_converted(spec, revision, weights=False)
    kwargs = dict(trust_remote_code=trust_remote_code, **from_pretrained_kwargs)
    if revision is not None:
        kwargs["revision"] = revision
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as error:
        if is_hub:
            raise _hub_error(spec, error) from error
        raise


def _zero_config_dropout(config) -> None:
    if config is None:
        return
    for key, value in list(config.to_dict().items()):
        lowered = key.lower()
        if (
            ("dropout" in lowered or lowered.endswith("_pdrop") or lowered == "layerdrop")
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
            and value != 0
        ):
            try:
                setattr(config, key, 0.0)
            except (AttributeError, TypeError):  # a read-only alias
                pass
    for sub_key in getattr(config, "sub_configs", {}) or {}:
        _zero_config_dropout(getattr(config, sub_key, None))


def freeze_teacher(model: nn.Module) -> nn.Module:
    """Make ``model`` a frozen, deterministic teacher, in place (also returned).

    No parameter requires a gradient, the model is in eval mode, every ``nn.Dropout`` has ``p=0``, float attributes
    named ``*dropout*`` on modules (e.g. attention modules' ``attention_dropout``, read in their forward) are 0, and so
    are the dropout fields of the config, so the teacher's outputs stay deterministic even if a wrapper later switches
    it back to train mode.
    """
    model.requires_grad_(False)
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name.lower() and isinstance(value, float) and value != 0:
                setattr(module, name, 0.0)
    _zero_config_dropout(getattr(model, "config", None))
    return model


def load_peft_teacher(
    base_spec: str | os.PathLike | None,
    adapter_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """Base model plus a PEFT (LoRA) adapter folder, merged into plain weights (``merge_and_unload``) and frozen.

    ``base_spec=None`` takes the base model from the adapter's ``adapter_config.json`` (``base_model_name_or_path``).
    """
    from peft import PeftModel

    adapter = Path(adapter_dir).expanduser()
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"adapter folder {str(adapter_dir)!r} does not exist or has no adapter_config.json"
            if not adapter.is_dir()
            else f"{adapter} has no adapter_config.json, so it is not a PEFT adapter folder"
        )
    if base_spec is None:
        base_spec = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base_spec:
            raise ValueError(f"{adapter}/adapter_config.json names no base_model_name_or_path; pass base_spec")
    resolve_model_source(base_spec)  # fail on a missing base path before loading anything
    base = load_model(base_spec, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision)
    peft_model = PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
    merged = peft_model.merge_and_unload()
    return freeze_teacher(merged)
