"""What a teacher cache is: its ``metadata.json`` (teacher, tokenizer, data, k, temperature, codec, shards) and the
fingerprints that tie it to one teacher, one tokenizer and one dataset.

A cache is only valid for the exact teacher weights, tokenizer and tokenized dataset it was made from: the rows are
found again by example index and position, so a different dataset (other problems, order, max_length or chat
template) would silently pair examples with another example's targets. Every fingerprint is a sha256 of content,
not of names: renaming a folder does not invalidate a cache, changing one weight does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kd_llm.errors import KdLlmError

FORMAT = "kd_llm-teacher-cache"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
PAYLOAD_TOP_K, PAYLOAD_HIDDEN = "top_k", "hidden_states"
PAYLOADS = (PAYLOAD_TOP_K, PAYLOAD_HIDDEN)


class TeacherCacheError(KdLlmError, ValueError):
    """A teacher cache that cannot be used as asked; the message says what differs and how to fix it."""


@dataclass
class ShardRecord:
    file: str
    sha256: str
    first_example: int
    num_examples: int
    positions: int
    bytes: int


@dataclass
class CacheMetadata:
    teacher: str
    teacher_hash: str
    tokenizer_hash: str
    dataset_fingerprint: str
    num_examples: int
    vocab_size: int
    k: int
    temperature: float
    value_codec: str
    index_dtype: str
    shard_size: int
    teacher_dtype: str = ""  # what the teacher computed in (its weights hash covers it too)
    # What a row holds: "top_k" (ids, values, tail; kd_llm.teacher_cache.codec) or "hidden_states" (the teacher's
    # final post-norm hidden state; kd_llm.teacher_cache.hidden_codec), whose logits are softcap(lm_head(h)) with the
    # head recorded below. For hidden states k = 0, temperature = 0 and value_codec = "": they hold at every T.
    payload: str = PAYLOAD_TOP_K
    hidden_dtype: str = ""  # hidden_states: how each value is stored (float32, float16, bfloat16, int8)
    hidden_size: int = 0
    head_hash: str = ""  # kd_llm.models.lm_head.head_sha256 of the teacher's lm_head weight and soft cap
    head_tied: bool | None = None  # the lm_head weight is the input embedding
    head_softcap: float | None = None  # the teacher's final_logit_softcapping (None: none)
    shards: list[ShardRecord] = field(default_factory=list)
    complete: bool = False
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def num_shards(self) -> int:
        return -(-self.num_examples // self.shard_size)

    @property
    def supervised_tokens(self) -> int:
        return sum(shard.positions for shard in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(shard.bytes for shard in self.shards)

    def identity(self) -> dict:
        """Everything that must match for a resumed build to continue this cache."""
        return {name: getattr(self, name) for name in (
            "teacher_hash", "tokenizer_hash", "dataset_fingerprint", "num_examples", "vocab_size", "k",
            "temperature", "value_codec", "index_dtype", "shard_size", "format_version", "payload", "hidden_dtype",
            "hidden_size", "head_hash")}

    def settings_hash(self) -> str:
        """sha256 of every field, stored as ``metadata_sha256``: an edited ``metadata.json`` (k, temperature,
        value_codec ...) no longer matches it, as an edited shard no longer matches its own hash."""
        canonical = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_json(self) -> str:
        values = dataclasses.asdict(self)
        values["metadata_sha256"] = self.settings_hash()
        values["supervised_tokens"] = self.supervised_tokens
        values["bytes_per_supervised_token"] = (round(self.total_bytes / self.supervised_tokens, 2)
                                                if self.supervised_tokens else None)
        return json.dumps(values, indent=2)

    @classmethod
    def from_json(cls, text: str, where: str) -> "CacheMetadata":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise TeacherCacheError(f"{where} is not valid JSON ({error.msg}); the cache is damaged. Rebuild it "
                                    "with scripts/cache_teacher.py.") from error
        if values.get("format") != FORMAT:
            raise TeacherCacheError(f"{where} is not a kd_llm teacher cache (format {values.get('format')!r}).")
        if values.get("format_version") != FORMAT_VERSION:
            raise TeacherCacheError(
                f"{where} has format version {values.get('format_version')}, this kd_llm reads version "
                f"{FORMAT_VERSION}. Rebuild the cache with this version's scripts/cache_teacher.py."
            )
        values.pop("supervised_tokens", None)
        values.pop("bytes_per_supervised_token", None)
        stored_hash = values.pop("metadata_sha256", None)
        values["shards"] = [ShardRecord(**shard) for shard in values.get("shards", [])]
        names = {f.name for f in dataclasses.fields(cls)}
        metadata = cls(**{name: value for name, value in values.items() if name in names})
        if stored_hash != metadata.settings_hash():
            raise TeacherCacheError(
                f"{where} does not match its metadata_sha256: it was edited by hand (or damaged), so its k, "
                "temperature, value_codec and shard list cannot be trusted. Rebuild the cache with "
                "scripts/cache_teacher.py (a cache's settings are changed by building it again, not by editing).")
        return metadata


def read_metadata(cache_dir: str | os.PathLike) -> CacheMetadata:
    path = Path(cache_dir) / METADATA_FILE
    if not path.is_file():
        raise TeacherCacheError(
            f"{cache_dir} is not a teacher cache: it has no {METADATA_FILE}. Build one with "
            "`python scripts/cache_teacher.py --config <your distillation config>`."
        )
    return CacheMetadata.from_json(path.read_text(), str(path))


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a part: a temporary file
    in the same folder, flushed to disk, then renamed over the target (``os.replace`` is atomic on POSIX/NTFS)."""
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_metadata(cache_dir: str | os.PathLike, metadata: CacheMetadata) -> None:
    write_atomically(Path(cache_dir) / METADATA_FILE, metadata.to_json().encode())


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over a model's parameters and buffers (names, dtypes, shapes, values), in name order.

    Independent of where the weights came from (a safetensors folder, a converted GGUF, an ensemble of modules):
    two teachers with equal tensors hash equal, and any changed weight or dtype changes the hash.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # Through uint8 so that every dtype (bfloat16 included) gives its raw bytes.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of what decides token ids: the vocabulary (token -> id), its length and the special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    special = {role: str(getattr(tokenizer, f"{role}_token", None)) for role in ("bos", "eos", "pad", "unk")}
    payload = json.dumps({"vocab": vocab, "length": len(tokenizer), "special": special}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def dataset_fingerprint(dataset) -> str:
    """sha256 of every example's ``input_ids`` and ``labels``, in order: the cache finds its rows by example index
    and supervised position, so exactly these must be equal (other columns, e.g. ``category``, may differ)."""
    digest = hashlib.sha256()
    digest.update(f"{len(dataset)}|".encode())
    for batch in dataset.select_columns(["input_ids", "labels"]).iter(batch_size=1024):
        for input_ids, labels in zip(batch["input_ids"], batch["labels"]):
            digest.update(np.asarray(input_ids, dtype=np.int64).tobytes())
            digest.update(b"|")
            digest.update(np.asarray(labels, dtype=np.int64).tobytes())
            digest.update(b"#")
    return digest.hexdigest()


def cache_summary(config) -> dict | None:
    """What a run's results record about its teacher cache (None without one)."""
    if not getattr(config, "teacher_cache", None):
        return None
    metadata = read_metadata(config.teacher_cache)
    summary = {"path": str(config.teacher_cache), "format": metadata.payload, "teacher": metadata.teacher,
               "teacher_hash": metadata.teacher_hash, "supervised_tokens": metadata.supervised_tokens,
               "bytes_per_supervised_token": round(metadata.total_bytes / max(metadata.supervised_tokens, 1), 2)}
    if metadata.payload == PAYLOAD_HIDDEN:
        return summary | {"hidden_dtype": metadata.hidden_dtype, "hidden_size": metadata.hidden_size,
                          "head_hash": metadata.head_hash, "head_softcap": metadata.head_softcap}
    return summary | {"tail_mode": config.teacher_cache_tail_mode, "k": metadata.k,
                      "temperature": metadata.temperature, "value_codec": metadata.value_codec}
