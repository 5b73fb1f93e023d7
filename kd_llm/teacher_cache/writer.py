"""Run a teacher once over a dataset and store its top-k distribution at every supervised position, in shards.

Each shard is an Arrow IPC file (zstd-compressed buffers) holding the rows of ``shard_size`` consecutive examples,
in example order and, within an example, in the order ``labels[1:] != -100`` selects positions (the order the
losses select rows in). Columns: ``example`` (int32, the dataset index of each row), ``gaps`` (delta-coded sorted
ids, fixed-size lists of k), ``values`` (quantised probabilities, fixed-size lists of k), ``log_tail`` (float16);
see :mod:`.codec`.

Writing is atomic and resumable: a shard is written to a temporary file and renamed into place, then recorded with
its sha256 in ``metadata.json`` (itself replaced atomically). An interrupted run leaves whole shards and a metadata
file that lists them; running the same build again verifies and skips them and removes stray temporary files. A
build into a folder that holds another teacher's, tokenizer's or dataset's cache is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch
from tqdm.auto import tqdm

from kd_llm.data.formatting import IGNORE_INDEX
from kd_llm.teacher_cache.codec import check_value_codec, encode_rows, index_dtype, top_k_rows
from kd_llm.teacher_cache.metadata import (
    METADATA_FILE,
    CacheMetadata,
    ShardRecord,
    TeacherCacheError,
    dataset_fingerprint,
    file_sha256,
    read_metadata,
    write_atomically,
    write_metadata,
)

logger = logging.getLogger(__name__)

ZSTD_LEVEL = 19  # shards are written once and read many times: spend the CPU on size
# (input_ids [B, L], attention_mask [B, L]) -> logits or log-probabilities [B, L, >= vocab_size]
TeacherFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def module_teacher_fn(model: torch.nn.Module) -> TeacherFn:
    """Wrap a causal LM (or anything returning ``.logits``) as a :data:`TeacherFn`."""
    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return outputs.logits if hasattr(outputs, "logits") else outputs
    return run


def shard_file_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def _fixed_size_list(values: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def top_k_columns(encoded: dict[str, np.ndarray]) -> dict[str, pa.Array]:
    return {"gaps": _fixed_size_list(encoded["gaps"]), "values": _fixed_size_list(encoded["values"]),
            "log_tail": pa.array(encoded["log_tail"])}


def shard_bytes(examples: np.ndarray, columns: dict[str, pa.Array], *, shard_index: int) -> bytes:
    """One shard's Arrow IPC file: the ``example`` column, then the payload's columns."""
    table = pa.table({"example": pa.array(examples.astype(np.int32)), **columns}).replace_schema_metadata(
        {"kd_llm_shard": str(shard_index)})
    sink = pa.BufferOutputStream()
    options = ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=ZSTD_LEVEL))
    with ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


class TeacherCacheWriter:
    """Build (or resume) a cache in ``output_dir``; see :func:`write_teacher_cache` for the arguments."""

    def __init__(self, output_dir: str | os.PathLike, dataset, collator, *, teacher: str, teacher_hash: str,
                 tokenizer_hash: str, vocab_size: int, k: int = 64, temperature: float = 1.0,
                 value_codec: str = "sqrt_uint8", shard_size: int = 1024, teacher_dtype: str = ""):
        check_value_codec(value_codec)
        problems = []
        if not k >= 1:
            problems.append(f"k must be >= 1, got {k}")
        if not temperature > 0:
            problems.append(f"temperature must be > 0, got {temperature}")
        if not shard_size >= 1:
            problems.append(f"shard_size must be >= 1, got {shard_size}")
        if not vocab_size >= 1:
            problems.append(f"vocab_size must be >= 1, got {vocab_size}")
        if problems:
            raise ValueError("Invalid teacher cache settings: " + "; ".join(problems) + ".")
        if len(dataset) == 0:
            raise ValueError("The dataset to cache is empty.")
        self.output_dir = Path(output_dir)
        self.dataset, self.collator = dataset, collator
        self.metadata = CacheMetadata(
            teacher=teacher, teacher_hash=teacher_hash, tokenizer_hash=tokenizer_hash,
            dataset_fingerprint=dataset_fingerprint(dataset), num_examples=len(dataset), vocab_size=vocab_size,
            k=min(k, vocab_size), temperature=float(temperature), value_codec=value_codec,
            index_dtype=index_dtype(vocab_size).name, shard_size=shard_size, teacher_dtype=teacher_dtype,
        )

    def _resume(self) -> set[int]:
        """Shards already done (verified). Refuses a folder that holds something else."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for stray in self.output_dir.glob("*.tmp-*"):
            stray.unlink()  # a half-written file from an interrupted run: never valid
        if not (self.output_dir / METADATA_FILE).exists():
            others = [p.name for p in self.output_dir.iterdir()]
            if others:
                raise TeacherCacheError(
                    f"{self.output_dir} is not empty ({', '.join(sorted(others)[:5])}) and holds no teacher cache. "
                    "Pass an empty or new folder as the cache path."
                )
            return set()
        existing = read_metadata(self.output_dir)
        mine, theirs = self.metadata.identity(), existing.identity()
        differing = [f"{name}: cache {theirs[name]!r} vs now {mine[name]!r}" for name in mine if mine[name] != theirs[name]]
        if differing:
            raise TeacherCacheError(
                f"{self.output_dir} holds a teacher cache built with other settings ({'; '.join(differing)}). "
                "Pass a new folder, or delete this one to rebuild it."
            )
        done = set()
        for record in existing.shards:
            path = self.output_dir / record.file
            if path.is_file() and file_sha256(path) == record.sha256:
                done.add(record.first_example // self.metadata.shard_size)
                self.metadata.shards.append(record)
            else:
                logger.warning("Teacher cache shard %s is missing or corrupt: computing it again.", record.file)
        return done

    def _example_rows(self, output: torch.Tensor, valid: torch.Tensor):
        """What is stored for one example: ``output [L - 1, ...]`` (the teacher's output at the positions that
        predict a token) restricted to its supervised positions ``valid [L - 1]``."""
        if output.shape[-1] < self.metadata.vocab_size:
            raise TeacherCacheError(f"The teacher produced {output.shape[-1]} logits per position but the "
                                    f"tokenizer has {self.metadata.vocab_size} tokens.")
        return top_k_rows(output[valid], k=self.metadata.k, temperature=self.metadata.temperature,
                          vocab_size=self.metadata.vocab_size)

    def _columns(self, rows: list) -> dict:
        """Arrow columns of a shard's rows (the examples' :meth:`_example_rows`, in example order)."""
        ids, log_probs, log_tail = (torch.cat([row[part] for row in rows]) for part in range(3))
        return top_k_columns(encode_rows(ids, log_probs, log_tail, vocab_size=self.metadata.vocab_size,
                                         codec=self.metadata.value_codec))

    @staticmethod
    def _row_count(rows) -> int:
        return rows[0].shape[0]

    @torch.no_grad()
    def _shard_rows(self, teacher_fn: TeacherFn, first: int, stop: int, *, batch_size: int, device):
        """``(examples, columns)`` of examples ``[first, stop)``, in example order."""
        shard = self.dataset.select(range(first, stop)).select_columns(["input_ids", "labels"])
        lengths = [len(ids) for ids in shard["input_ids"]]
        order = sorted(range(first, stop), key=lambda i: lengths[i - first])  # tight padding
        rows: dict[int, tuple] = {}
        for start in range(0, len(order), batch_size):
            indices = order[start:start + batch_size]
            batch = self.collator([shard[i - first] for i in indices])
            output = teacher_fn(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            valid = (batch["labels"][:, 1:] != IGNORE_INDEX).to(output.device)
            for row, index in enumerate(indices):
                rows[index] = self._example_rows(output[row, :-1], valid[row])
        examples = np.concatenate([np.full(self._row_count(rows[i]), i) for i in range(first, stop)])
        return examples, self._columns([rows[i] for i in range(first, stop)])

    def run(self, teacher_fn: TeacherFn, *, batch_size: int = 16, device="cpu",
            progress: bool = True) -> CacheMetadata:
        done = self._resume()
        size = self.metadata.shard_size
        todo = [i for i in range(self.metadata.num_shards) if i not in done]
        if done:
            logger.info("Teacher cache %s: %d of %d shards already done, resuming.", self.output_dir, len(done),
                        self.metadata.num_shards)
        for index in tqdm(todo, desc="teacher cache shards", disable=not progress):
            first, stop = index * size, min((index + 1) * size, self.metadata.num_examples)
            examples, columns = self._shard_rows(teacher_fn, first, stop, batch_size=batch_size, device=device)
            path = self.output_dir / shard_file_name(index)
            data = shard_bytes(examples, columns, shard_index=index)
            write_atomically(path, data)
            # Hashed and sized from the bytes just written: no second read of the shard.
            self.metadata.shards.append(ShardRecord(file=path.name, sha256=hashlib.sha256(data).hexdigest(),
                                                    first_example=first, num_examples=stop - first,
                                                    positions=len(examples), bytes=len(data)))
            self.metadata.shards.sort(key=lambda record: record.first_example)
            write_metadata(self.output_dir, self.metadata)  # after the shard: it only ever lists whole shards
        self.metadata.complete = True
        write_metadata(self.output_dir, self.metadata)
        return self.metadata


def write_teacher_cache(teacher_fn: TeacherFn, dataset, output_dir: str | os.PathLike, *, collator, teacher: str,
                        teacher_hash: str, tokenizer_hash: str, vocab_size: int, k: int = 64,
                        temperature: float = 1.0, value_codec: str = "sqrt_uint8", shard_size: int = 1024,
                        batch_size: int = 16, device="cpu", progress: bool = True,
                        teacher_dtype: str = "") -> CacheMetadata:
    """Cache ``teacher_fn``'s top-k distribution over every supervised position of ``dataset``.

    Args:
        teacher_fn: ``(input_ids, attention_mask) -> [B, L, >= vocab_size]`` logits or log-probabilities (any
            callable: a model via :func:`module_teacher_fn`, an ensemble's averaged log-probs ...). Called under
            ``no_grad``; its values at position ``t`` predict token ``t + 1``.
        dataset: tokenized examples with ``input_ids`` and ``labels`` (prompt positions at -100).
        collator: pads a list of examples into a batch (``input_ids``, ``attention_mask``, ``labels``).
        teacher, teacher_hash: a readable identity and a content hash (:func:`.metadata.state_dict_sha256`).
        tokenizer_hash: :func:`.metadata.tokenizer_sha256` of the tokenizer that made ``dataset``.
        vocab_size: the tokenizer's length; logits past it (embedding padding) are ignored.
        k, temperature, value_codec: what is stored (see :mod:`.codec`).
        shard_size: examples per shard (the unit of atomic writing and of resuming).
        teacher_dtype: the dtype the teacher ran in, recorded for the reader (e.g. ``torch.float32``).

    Run it in one process: shards are not coordinated between processes.
    """
    writer = TeacherCacheWriter(output_dir, dataset, collator, teacher=teacher, teacher_hash=teacher_hash,
                                tokenizer_hash=tokenizer_hash, vocab_size=vocab_size, k=k, temperature=temperature,
                                value_codec=value_codec, shard_size=shard_size, teacher_dtype=teacher_dtype)
    return writer.run(teacher_fn, batch_size=batch_size, device=device, progress=progress)
