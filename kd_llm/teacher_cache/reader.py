"""Open a teacher cache, check it belongs to this run, and serve sparse targets batch by batch.

Opening checks everything before any training step: the metadata's format and completeness, every shard's sha256,
and, when given, the tokenizer, the dataset and the teacher it must match. Then all shards are held in memory in
their compact form (about ``3 * k`` bytes per supervised token for uint16 ids and uint8 values; 190 MB per million
tokens at k = 64) and decoded per batch, so a training step reads no file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch

from kd_llm.data.packing import supervised_order
from kd_llm.losses.sparse import SparseTargets
from kd_llm.teacher_cache.codec import decode_rows
from kd_llm.teacher_cache.metadata import (
    PAYLOAD_HIDDEN,
    PAYLOAD_TOP_K,
    CacheMetadata,
    TeacherCacheError,
    dataset_fingerprint,
    read_metadata,
    state_dict_sha256,
    tokenizer_sha256,
)

REBUILD = "Rebuild it with `python scripts/cache_teacher.py` using this run's teacher, tokenizer and data settings."


def _short(digest: str) -> str:
    return digest[:12]


def _check_teacher(path: Path, metadata: CacheMetadata, teacher_hash: str) -> None:
    if teacher_hash != metadata.teacher_hash:
        raise TeacherCacheError(
            f"The teacher cache in {path} was made by another teacher ({metadata.teacher}, weights hash "
            f"{_short(metadata.teacher_hash)}; this run's teacher hashes to {_short(teacher_hash)}). {REBUILD}"
        )


def check_cache_teacher(path: str | os.PathLike, teacher) -> None:
    """Refuse the cache in ``path`` unless ``teacher``'s weights made it. Reads the metadata only, so a script can
    check the teacher it loaded and then free it before training from the cache."""
    _check_teacher(Path(path), read_metadata(path), state_dict_sha256(teacher))


def check_payload(path: Path, metadata: CacheMetadata, expected: str) -> None:
    if metadata.payload != expected:
        readers = {PAYLOAD_TOP_K: "kd_llm.teacher_cache.TeacherCache",
                   PAYLOAD_HIDDEN: "kd_llm.teacher_cache.hidden_cache.HiddenStateCache"}
        raise TeacherCacheError(f"The teacher cache in {path} holds {metadata.payload} rows, not {expected}: open it "
                                f"with {readers.get(metadata.payload, 'a newer kd_llm')}.")


def check_complete(path: Path, metadata: CacheMetadata) -> None:
    if not metadata.complete:
        raise TeacherCacheError(
            f"The teacher cache in {path} is incomplete ({len(metadata.shards)} of {metadata.num_shards} shards): "
            "its build was interrupted. Run the same `scripts/cache_teacher.py` command again to resume it."
        )


def check_tokenizer_and_data(path: Path, metadata: CacheMetadata, tokenizer, dataset) -> None:
    """Refuse a cache made with another tokenizer (other token ids) or over other data (other rows)."""
    if tokenizer is not None and tokenizer_sha256(tokenizer) != metadata.tokenizer_hash:
        raise TeacherCacheError(
            f"The teacher cache in {path} was made with another tokenizer (hash {_short(metadata.tokenizer_hash)}"
            f", this run's is {_short(tokenizer_sha256(tokenizer))}), so its token ids mean other tokens. {REBUILD}"
        )
    if dataset is not None:
        fingerprint = dataset_fingerprint(dataset)
        if fingerprint != metadata.dataset_fingerprint:
            raise TeacherCacheError(
                f"The teacher cache in {path} covers other data ({metadata.num_examples} examples, fingerprint "
                f"{_short(metadata.dataset_fingerprint)}) than this run's training set ({len(dataset)} examples, "
                f"{_short(fingerprint)}). The examples, their order, max_length, prompt style and chat template "
                f"must all be the same. {REBUILD}"
            )


def read_verified_shard(path: Path, record) -> pa.Table:
    """A shard's table, after checking its sha256 against the one recorded when it was written."""
    shard = path / record.file
    if not shard.is_file():
        raise TeacherCacheError(f"Teacher cache shard {shard} is missing. Run the same "
                                "`scripts/cache_teacher.py` command again to rebuild it.")
    data = shard.read_bytes()
    if hashlib.sha256(data).hexdigest() != record.sha256:
        raise TeacherCacheError(
            f"Teacher cache shard {shard} is corrupt: its sha256 differs from the one recorded when it was "
            "written. Delete the file and run the same `scripts/cache_teacher.py` command again to rebuild it."
        )
    return ipc.open_file(pa.BufferReader(data)).read_all()


def example_offsets(path: Path, metadata: CacheMetadata, example_columns: list) -> np.ndarray:
    """Row offsets per example (rows of example i: ``offsets[i]:offsets[i + 1]``) from the shards' example columns."""
    examples = np.concatenate(example_columns).astype(np.int64) if example_columns else np.zeros(0, np.int64)
    if len(examples) and np.any(np.diff(examples) < 0):
        raise TeacherCacheError(f"The teacher cache in {path} has rows out of example order; rebuild it.")
    counts = np.bincount(examples, minlength=metadata.num_examples)
    return np.concatenate(([0], np.cumsum(counts)))


def check_batch_positions(offsets: np.ndarray, metadata: CacheMetadata, examples: list[int],
                          counts: list[int]) -> None:
    """Refuse a batch whose examples are not in the cache or whose supervised positions (``counts``, per example)
    differ from it."""
    for index, count in zip(examples, counts):
        if not 0 <= index < metadata.num_examples:
            raise TeacherCacheError(f"Example {index} is not in the teacher cache ({metadata.num_examples} "
                                    "examples).")
        held = int(offsets[index + 1] - offsets[index])
        if held != count:
            raise TeacherCacheError(
                f"The teacher cache holds {held} positions for example {index} but the batch has "
                f"{count}: the dataset changed after the cache was built. {REBUILD}"
            )


def rows_of(offsets: np.ndarray, examples: list[int]) -> np.ndarray:
    """Row numbers of ``examples``, concatenated in that order."""
    if not examples:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in examples])


class TeacherCache:
    """The stored top-k targets of one teacher over one dataset; see :meth:`open`."""

    def __init__(self, path: Path, metadata: CacheMetadata, gaps: np.ndarray, values: np.ndarray,
                 log_tail: np.ndarray, offsets: np.ndarray):
        self.path, self.metadata = path, metadata
        self.gaps, self.values, self.log_tail = gaps, values, log_tail
        self.offsets = offsets  # rows of example i: offsets[i]:offsets[i + 1]

    @property
    def temperature(self) -> float:
        return self.metadata.temperature

    @property
    def vocab_size(self) -> int:
        return self.metadata.vocab_size

    @classmethod
    def open(cls, path: str | os.PathLike, *, tokenizer=None, dataset=None, teacher=None,
             teacher_hash: str | None = None) -> "TeacherCache":
        """Load and verify the cache in ``path``.

        Args:
            tokenizer: if given, must be the tokenizer the cache was made with (vocabulary and special tokens).
            dataset: if given, must hold exactly the cached examples (same ``input_ids`` and ``labels``, same order).
            teacher: a module whose weights must be the cached teacher's (hashed here), or ``teacher_hash``.
        Raises:
            TeacherCacheError: with what differs and how to fix it.
        """
        path = Path(path)
        metadata = read_metadata(path)
        check_payload(path, metadata, PAYLOAD_TOP_K)
        check_complete(path, metadata)
        if teacher is not None or teacher_hash is not None:
            _check_teacher(path, metadata, teacher_hash or state_dict_sha256(teacher))
        check_tokenizer_and_data(path, metadata, tokenizer, dataset)
        return cls._load(path, metadata)

    @classmethod
    def _load(cls, path: Path, metadata: CacheMetadata) -> "TeacherCache":
        parts = {"gaps": [], "values": [], "log_tail": [], "example": []}
        for record in metadata.shards:
            table = read_verified_shard(path, record)
            for name in ("gaps", "values"):
                column = table.column(name).combine_chunks()
                parts[name].append(column.flatten().to_numpy().reshape(len(column), metadata.k))
            parts["log_tail"].append(table.column("log_tail").to_numpy())
            parts["example"].append(table.column("example").to_numpy())
        offsets = example_offsets(path, metadata, parts["example"])
        return cls(path, metadata, np.concatenate(parts["gaps"]), np.concatenate(parts["values"]),
                   np.concatenate(parts["log_tail"]), offsets)

    def positions(self, example: int) -> int:
        return int(self.offsets[example + 1] - self.offsets[example])

    def targets_for(self, examples: list[int], *, device=None) -> SparseTargets:
        """Rows of ``examples`` concatenated in that order (each example's positions in order)."""
        rows = rows_of(self.offsets, examples)
        ids, log_probs, log_tail = decode_rows(self.gaps[rows], self.values[rows], self.log_tail[rows],
                                               codec=self.metadata.value_codec)
        targets = SparseTargets(ids, log_probs, log_tail, self.temperature)
        return targets if device is None else targets.to(device)

    def gather(self, cache_index: torch.Tensor, shifted_labels: torch.Tensor, *, device=None,
               packed_example_ids: torch.Tensor | None = None) -> SparseTargets:
        """Targets for a batch: rows of the examples ``cache_index`` in the order the losses select valid positions
        (row-major over ``shifted_labels != -100``), in a padded batch or, with ``packed_example_ids``, a packed one
        (:func:`kd_llm.data.packing.supervised_order`). A count that differs from the cache is an error."""
        examples, counts = supervised_order(cache_index, shifted_labels, packed_example_ids)
        check_batch_positions(self.offsets, self.metadata, examples, counts)
        return self.targets_for(examples, device=device)
