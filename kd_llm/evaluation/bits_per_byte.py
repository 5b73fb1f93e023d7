"""Bits per byte (BPB): a language model's loss on text that does not depend on its tokenizer.

Per-token losses cannot be compared between models with different tokenizers (a token is a different amount of
text for each), but the total negative log-likelihood of the same text can: BPB is that total, in bits, divided by
the text's UTF-8 bytes. Lower is better; ``2 ** -BPB`` is the model's geometric-mean probability per byte.

Every byte is predicted: each window of text starts with the tokenizer's BOS (EOS when it has none) as the only
context, so the text's first token is scored too. Long texts are cut into windows of at most ``max_tokens`` tokens
(cut where a token ends at a character boundary, so each byte is counted in exactly one window); a window's first
tokens see no earlier text, which raises BPB a little, more for shorter windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["BPB_SOURCES", "DEBIAN_LICENSES", "BitsPerByte", "bits_per_byte", "debian_license_texts", "load_bpb_text",
           "text_windows"]

# Human-written English that every Debian system has (package base-files, Essential): the licence texts in
# /usr/share/common-licenses. About 177 kB in all; read in place, never copied into the repository.
DEBIAN_LICENSES = Path("/usr/share/common-licenses")
LICENSE_NAMES = ("GPL-2", "GPL-3", "LGPL-2.1", "LGPL-3", "GFDL-1.3", "Apache-2.0", "MPL-2.0", "MPL-1.1", "Artistic",
                 "CC0-1.0")


def debian_license_texts(names: tuple[str, ...] = LICENSE_NAMES, root: Path = DEBIAN_LICENSES) -> dict[str, str]:
    """The named licence texts of Debian's base-files; a clear error if this is not a Debian-like system."""
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(str(root / name) for name in missing)} not found: these texts come with "
                                "Debian's base-files package; on another system pass your own texts.")
    return {name: (root / name).read_text(encoding="utf-8") for name in names}


# The experiment's default held-out text: two licences no training data of kd_llm's built-in tasks resembles.
BPB_SOURCES = {"debian-licenses": ("Apache-2.0", "MPL-2.0")}


def load_bpb_text(source: str, max_bytes: int | None = None) -> str:
    """The text a run measures BPB on: ``debian-licenses`` (:data:`BPB_SOURCES`) or a UTF-8 file, cut to at most
    ``max_bytes`` bytes at the last line break before the limit."""
    if source in BPB_SOURCES:
        text = "\n\n".join(debian_license_texts(BPB_SOURCES[source]).values())
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"bpb_source {source!r} is neither {', '.join(BPB_SOURCES)} nor a text file; "
                                    "pass a UTF-8 text file, or none to skip bits per byte.")
        text = path.read_text(encoding="utf-8")
    if max_bytes is not None and len(text.encode("utf-8")) > max_bytes:
        text = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
        text = text[: text.rfind("\n") + 1] or text
    if not text.strip():
        raise ValueError(f"bpb_source {source!r} holds no text.")
    return text


@dataclass(frozen=True)
class BitsPerByte:
    bits: float
    bytes: int
    tokens: int

    @property
    def bits_per_byte(self) -> float:
        return self.bits / self.bytes if self.bytes else math.nan

    def as_dict(self) -> dict:
        return {"bits_per_byte": round(self.bits_per_byte, 5), "bytes": self.bytes, "tokens": self.tokens,
                "bytes_per_token": round(self.bytes / self.tokens, 3) if self.tokens else None}


def _start_token(tokenizer) -> int:
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("bits_per_byte needs a BOS or EOS token to start each window from; the tokenizer has "
                         "neither (set tokenizer.bos_token).")
    return start


def text_windows(tokenizer, text: str, max_tokens: int) -> list[tuple[list[int], int]]:
    """``(token ids, UTF-8 bytes they cover)`` per window; the bytes of all windows add up to the text's."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}.")
    # verbose=False: a long text is cut into windows below, so the "longer than model_max_length" warning is moot.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, ends = list(encoded["input_ids"]), [end for _, end in encoded["offset_mapping"]]
    if tokenizer.decode(ids, clean_up_tokenization_spaces=False) != text:
        raise ValueError("the tokenizer does not reproduce this text (unknown characters or a normaliser), so its "
                         "likelihood of the text cannot be measured; clean the text first.")
    windows, first, covered = [], 0, 0
    while first < len(ids):
        last = min(first + max_tokens - 1, len(ids))  # one slot for the start token
        # Do not cut between byte pieces of one character: back off to a token that ends a character.
        while last < len(ids) and last - 1 > first and ends[last] == ends[last - 1]:
            last -= 1
        end = ends[last - 1] if last < len(ids) else len(text)
        windows.append((ids[first:last], len(text[covered:end].encode("utf-8"))))
        covered, first = end, last
    return windows


@torch.no_grad()
def bits_per_byte(model, tokenizer, texts, *, max_tokens: int = 512, batch_size: int = 1) -> BitsPerByte:
    """Total NLL of ``texts`` under ``model`` in bits, their UTF-8 bytes and the tokens scored (see module doc)."""
    if isinstance(texts, str):
        texts = [texts]
    start = _start_token(tokenizer)
    windows = [window for text in texts if text for window in text_windows(tokenizer, text, max_tokens)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nats, tokens = 0.0, 0
    try:
        for index in range(0, len(windows), batch_size):
            chunk = windows[index:index + batch_size]
            width = 1 + max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), start, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, (ids, _) in enumerate(chunk):
                input_ids[row, 1:1 + len(ids)] = torch.tensor(ids)
                mask[row, :1 + len(ids)] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            for row, (ids, _) in enumerate(chunk):  # row by row: no second [B, T, V] copy (262k vocabularies)
                nats += F.cross_entropy(logits[row, :len(ids)].float(), input_ids[row, 1:1 + len(ids)],
                                        reduction="sum").item()
                tokens += len(ids)
    finally:
        model.train(was_training)
    return BitsPerByte(bits=nats / math.log(2), bytes=sum(size for _, size in windows), tokens=tokens)
