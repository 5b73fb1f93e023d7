"""The tokens two vocabularies share: equal surface strings after undoing each tokenizer's own spelling of them.

A token's *surface* is the bytes it stands for in text: byte-level BPE (GPT-2, Llama 3, SmolLM2) spells byte ``b`` as
one printable character (``Ġ`` is a space), SentencePiece writes a space as ``▁`` and may fall back to ``<0xNN>``
tokens for single bytes. Those spellings are undone here, so ``Ġthe`` (SmolLM2) and ``▁the`` (Gemma) are both
``b" the"`` and match; a byte-fallback ``<0xE2>`` matches a byte-level token for the lone byte 0xE2. Special tokens
match by their literal content (``<pad>`` only with ``<pad>``), and the two end-of-sequence tokens are paired whatever
their names (``<|im_end|>`` with ``<eos>``): both mean "the text is over".

When one surface has several ids on a side, the lowest id is used and the others count as unmatched. With the same
tokenizer on both sides every id matches itself, which is what lets the hybrid loss reduce to plain KD.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["SharedVocabulary", "shared_vocabulary", "token_surfaces"]

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable character table (the inverse of ``bytes_to_unicode``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


def _decoder_kinds(tokenizer) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} is not a fast (tokenizers-backed) "
                         "tokenizer; the shared vocabulary reads its decoder. Load it with use_fast=True.")
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds, stack = set(), [decoder]
    while stack:
        node = stack.pop()
        kinds.add(node.get("type"))
        stack.extend(node.get("decoders") or [])
    return kinds


def token_surfaces(tokenizer) -> list[tuple[str, object] | None]:
    """Per id, a hashable surface: ``("special", content)``, ``("bytes", b"...")``, or None for an id with no
    token (a gap)."""
    kinds = _decoder_kinds(tokenizer)
    byte_level = "ByteLevel" in kinds
    byte_fallback = "ByteFallback" in kinds
    table = _byte_level_decoder()
    special_ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    added = {index: token for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
    surfaces: list[tuple[str, object] | None] = [None] * size
    for token, index in vocab.items():
        if index in special_ids or index in added:
            surfaces[index] = ("special", str(added.get(index, token)))
        elif byte_level and all(char in table for char in token):
            surfaces[index] = ("bytes", bytes(table[char] for char in token))
        elif byte_fallback and (match := _BYTE_FALLBACK.match(token)):
            surfaces[index] = ("bytes", bytes([int(match.group(1), 16)]))
        else:
            surfaces[index] = ("bytes", token.replace("\u2581", " ").encode("utf-8"))
    return surfaces


@dataclass(frozen=True)
class SharedVocabulary:
    """``student_ids[m]`` and ``teacher_ids[m]`` are the same token (``[M]`` long tensors); ``*_unmatched`` are the
    ids of each side that match nothing (``[V_side - M]``)."""

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    student_unmatched: torch.Tensor
    teacher_unmatched: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.student_ids.numel())

    def to(self, device) -> SharedVocabulary:
        return SharedVocabulary(*(getattr(self, name).to(device) for name in
                                  ("student_ids", "teacher_ids", "student_unmatched", "teacher_unmatched")))


def _first_ids(surfaces) -> dict:
    first = {}
    for index, surface in enumerate(surfaces):
        if surface is not None and surface not in first:
            first[surface] = index
    return first


def shared_vocabulary(student_tokenizer, teacher_tokenizer, *, student_rows: int | None = None,
                      teacher_rows: int | None = None) -> SharedVocabulary:
    """Match the two vocabularies (see the module doc). ``*_rows``: the models' logit widths, when the embedding is
    padded past the tokenizer (those padding columns match nothing)."""
    student_surfaces, teacher_surfaces = token_surfaces(student_tokenizer), token_surfaces(teacher_tokenizer)
    student_first, teacher_first = _first_ids(student_surfaces), _first_ids(teacher_surfaces)
    pairs = {surface: (index, teacher_first[surface]) for surface, index in student_first.items()
             if surface in teacher_first}
    student_eos, teacher_eos = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
    if student_eos is not None and teacher_eos is not None:
        pairs = {surface: pair for surface, pair in pairs.items() if student_eos not in pair[:1]
                 and teacher_eos not in pair[1:]}
        pairs[("eos",)] = (student_eos, teacher_eos)
    ordered = sorted(pairs.values())
    student_ids = torch.tensor([s for s, _ in ordered], dtype=torch.long)
    teacher_ids = torch.tensor([t for _, t in ordered], dtype=torch.long)
    student_width = student_rows if student_rows is not None else len(student_surfaces)
    teacher_width = teacher_rows if teacher_rows is not None else len(teacher_surfaces)
    if student_ids.numel() and int(student_ids.max()) >= student_width or (
            teacher_ids.numel() and int(teacher_ids.max()) >= teacher_width):
        raise ValueError(f"the tokenizers address more ids than the models have logits ({student_width} student, "
                         f"{teacher_width} teacher columns); resize the embeddings to the tokenizers.")
    return SharedVocabulary(student_ids=student_ids, teacher_ids=teacher_ids,
                            student_unmatched=_complement(student_ids, student_width),
                            teacher_unmatched=_complement(teacher_ids, teacher_width))


def _complement(ids: torch.Tensor, width: int) -> torch.Tensor:
    keep = torch.ones(width, dtype=torch.bool)
    keep[ids] = False
    return keep.nonzero().squeeze(-1)
