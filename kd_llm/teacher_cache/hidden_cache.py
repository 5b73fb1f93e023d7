"""The hidden-state teacher cache: per supervised position, the teacher's final (post-norm) hidden state ``h``, from
which its lm_head ``W`` (and Gemma's final soft cap) gives back the *exact* full-vocabulary logits
``softcap(W h)``, at any temperature and for any divergence, reverse KL and JSD included.

Against the top-k cache (:mod:`.writer`, :mod:`.reader`): ``2 d`` bytes per supervised token in float16 (1,152 at
d = 576, SmolLM2-135M) instead of ~10-80 for k = 64, but no error from the tokens outside the top k, which at a 49k
vocabulary is 2.3% of the forward KL at T = 1 and a third of it at T = 2. Training needs the teacher's lm_head
(``V x d``, :func:`kd_llm.models.lm_head.load_teacher_head` reads it alone from the teacher's folder) and takes the
fused, chunked loss (:mod:`kd_llm.losses.fused_hidden`): no ``[N, V]`` logits.

Same shards as the top-k cache (Arrow IPC, zstd, one per ``shard_size`` examples, written atomically, recorded with
their sha256, resumable); the ``hidden`` column holds ``[rows, d]`` in the metadata's ``hidden_dtype``
(:mod:`.hidden_codec`), and the metadata records the head's hash, whether it is tied, its soft cap and the vocabulary
size, which :meth:`HiddenStateCache.open` checks against the head and student of the run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from kd_llm.data.packing import supervised_order
from kd_llm.models.lm_head import TeacherHead, final_hidden_states
from kd_llm.teacher_cache.hidden_codec import (
    DEFAULT_HIDDEN_DTYPE,
    check_hidden_dtype,
    decode_hidden,
    encode_hidden,
    hidden_columns,
)
from kd_llm.teacher_cache.metadata import PAYLOAD_HIDDEN, CacheMetadata, TeacherCacheError, read_metadata
from kd_llm.teacher_cache.reader import (
    REBUILD,
    _check_teacher,
    _short,
    check_batch_positions,
    check_complete,
    check_payload,
    check_tokenizer_and_data,
    example_offsets,
    read_verified_shard,
    rows_of,
)
from kd_llm.teacher_cache.writer import TeacherCacheWriter, TeacherFn


def module_hidden_fn(model: torch.nn.Module) -> TeacherFn:
    """A causal LM as ``(input_ids, attention_mask) -> [B, L, d]`` final hidden states (no ``[B, L, V]`` logits)."""
    return lambda input_ids, attention_mask: final_hidden_states(model, input_ids, attention_mask)


class HiddenStateCacheWriter(TeacherCacheWriter):
    """Build (or resume) a hidden-state cache; see :func:`write_hidden_state_cache` for the arguments."""

    def __init__(self, output_dir, dataset, collator, *, head: TeacherHead, hidden_dtype: str = DEFAULT_HIDDEN_DTYPE,
                 **identity):
        check_hidden_dtype(hidden_dtype)
        super().__init__(output_dir, dataset, collator, vocab_size=head.vocab_size, **identity)
        m = self.metadata
        # Nothing of the top-k settings applies: the states hold at every temperature.
        m.k, m.temperature, m.value_codec, m.index_dtype = 0, 0.0, "", ""
        m.payload, m.hidden_dtype, m.hidden_size = PAYLOAD_HIDDEN, hidden_dtype, head.hidden_size
        m.head_hash, m.head_tied, m.head_softcap = head.sha256, head.tied, head.softcap

    def _example_rows(self, output: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if output.shape[-1] != self.metadata.hidden_size:
            raise TeacherCacheError(f"The teacher returned hidden states of size {output.shape[-1]} but its lm_head "
                                    f"reads {self.metadata.hidden_size}: pass the teacher's final hidden states.")
        return output[valid].float().cpu()

    def _columns(self, rows: list) -> dict:
        return hidden_columns(encode_hidden(torch.cat(rows), self.metadata.hidden_dtype))

    @staticmethod
    def _row_count(rows) -> int:
        return rows.shape[0]


def write_hidden_state_cache(hidden_fn: TeacherFn, dataset, output_dir: str | os.PathLike, *, collator,
                             head: TeacherHead, teacher: str, teacher_hash: str, tokenizer_hash: str,
                             hidden_dtype: str = DEFAULT_HIDDEN_DTYPE, shard_size: int = 1024, batch_size: int = 16,
                             device="cpu", progress: bool = True, teacher_dtype: str = "") -> CacheMetadata:
    """Cache the teacher's final hidden state at every supervised position of ``dataset``.

    Args:
        hidden_fn: ``(input_ids, attention_mask) -> [B, L, d]`` final post-norm hidden states (a model through
            :func:`module_hidden_fn`); its state at position ``t`` is what the lm_head turns into the logits that
            predict token ``t + 1``. The caller has checked that the logits are ``softcap(head(h))``.
        head: the teacher's :class:`~kd_llm.models.lm_head.TeacherHead` (its hash, tie, soft cap and vocabulary
            size go into the metadata).
        hidden_dtype: one of :data:`kd_llm.teacher_cache.hidden_codec.HIDDEN_DTYPES`.
        Others: as in :func:`kd_llm.teacher_cache.write_teacher_cache`.
    """
    writer = HiddenStateCacheWriter(output_dir, dataset, collator, head=head, hidden_dtype=hidden_dtype,
                                    teacher=teacher, teacher_hash=teacher_hash, tokenizer_hash=tokenizer_hash,
                                    shard_size=shard_size, teacher_dtype=teacher_dtype)
    return writer.run(hidden_fn, batch_size=batch_size, device=device, progress=progress)


def check_head(path: Path, metadata: CacheMetadata, head: TeacherHead) -> None:
    """Refuse a head other than the one the cache's states were made for (another teacher's, or the same one with
    another soft cap or vocabulary)."""
    if head.sha256 != metadata.head_hash:
        raise TeacherCacheError(
            f"The hidden-state cache in {path} was made for another teacher lm_head ({metadata.teacher}: head hash "
            f"{_short(metadata.head_hash)}, {metadata.vocab_size} x {metadata.hidden_size}, soft cap "
            f"{metadata.head_softcap}; this run's head hashes to {_short(head.sha256)}, {head.vocab_size} x "
            f"{head.hidden_size}, soft cap {head.softcap}). Pass the teacher the cache was built from. {REBUILD}")


class HiddenStateCache:
    """The stored final hidden states of one teacher over one dataset; see :meth:`open`."""

    def __init__(self, path: Path, metadata: CacheMetadata, hidden: np.ndarray, scale: np.ndarray | None,
                 offsets: np.ndarray):
        self.path, self.metadata = path, metadata
        self.hidden, self.scale = hidden, scale  # [rows, d] in the storage dtype; [rows] float32 for int8
        self.offsets = offsets
        self.head: TeacherHead | None = None  # the teacher's head, set by open(head=...)

    @property
    def vocab_size(self) -> int:
        return self.metadata.vocab_size

    @classmethod
    def open(cls, path: str | os.PathLike, *, head: TeacherHead | None = None, tokenizer=None, dataset=None,
             teacher=None, teacher_hash: str | None = None) -> HiddenStateCache:
        """Load and verify the cache in ``path``: complete, every shard's sha256, and, when given, the teacher's head
        (hash: weight values and soft cap), the tokenizer, the dataset and the teacher's whole weights."""
        path = Path(path)
        metadata = read_metadata(path)
        check_payload(path, metadata, PAYLOAD_HIDDEN)
        check_complete(path, metadata)
        if head is not None:
            check_head(path, metadata, head)
        if teacher is not None or teacher_hash is not None:
            from kd_llm.teacher_cache.metadata import state_dict_sha256

            _check_teacher(path, metadata, teacher_hash or state_dict_sha256(teacher))
        check_tokenizer_and_data(path, metadata, tokenizer, dataset)
        hidden, scale, examples = [], [], []
        for record in metadata.shards:
            table = read_verified_shard(path, record)
            column = table.column("hidden").combine_chunks()
            hidden.append(column.flatten().to_numpy().reshape(len(column), metadata.hidden_size))
            if metadata.hidden_dtype == "int8":
                scale.append(table.column("scale").to_numpy())
            examples.append(table.column("example").to_numpy())
        offsets = example_offsets(path, metadata, examples)
        cache = cls(path, metadata, np.concatenate(hidden), np.concatenate(scale) if scale else None, offsets)
        cache.head = head
        return cache

    def states_for(self, examples: list[int], *, device=None) -> torch.Tensor:
        """``[rows, d]`` float32: the examples' states, concatenated in that order (each example's positions in
        order)."""
        rows = rows_of(self.offsets, examples)
        states = decode_hidden(self.hidden[rows], None if self.scale is None else self.scale[rows],
                               self.metadata.hidden_dtype)
        return states if device is None else states.to(device)

    def gather(self, example_index: torch.Tensor, shifted_labels: torch.Tensor, *, device=None,
               packed_example_ids: torch.Tensor | None = None) -> torch.Tensor:
        """States for a batch: rows of the examples ``example_index`` in the order the fused loss selects valid
        positions (row-major over ``shifted_labels != -100``), in a padded batch or, with ``packed_example_ids``, a
        packed one (:func:`kd_llm.data.packing.supervised_order`). A count that differs from the cache is an
        error."""
        examples, counts = supervised_order(example_index, shifted_labels, packed_example_ids)
        check_batch_positions(self.offsets, self.metadata, examples, counts)
        return self.states_for(examples, device=device)
