"""One record rendered by one model's tokenizer, with where each supervised token ends in the supervised text.

Cross-tokenizer distillation shows each model the same record through its own tokenizer and chat template (plain text
joined by ``PLAIN_SEPARATOR`` where a tokenizer has none, exactly as :func:`kd_llm.data.formatting.format_record`
does), so the ``input_ids`` and ``labels`` of a side are the ones that side would train on by itself. What this module
adds is the position of every supervised token in the *supervised text* (the completion, or the whole text of a
``text`` record), from the tokenizer's own character offsets: offsets are in the original string's coordinates, so
SentencePiece's ``▁``, byte-level BPE's ``Ġ`` and any normaliser (NFKC, lower-casing) are already undone by the
tokenizer. Only the *end* offset of a token is used (its start may be trimmed of whitespace), and a token whose end
equals the next token's end (byte pieces of one character: byte fallback, or a byte-level BPE split inside an emoji)
does not reach a character boundary.

Supervised tokens fall in three groups, told apart by their offsets:

* text tokens, ending inside the supervised text (``0 < end <= n``);
* leading markup, supervised but ending at or before the text's start (rare: a template that opens the answer with a
  marker); it never ends an aligned span, so it joins the first one;
* trailing markup, after the text: EOS, ``<|im_end|>``, the template's newline. The last of them ends the span
  ``END`` (= n + 1), the event "the text is over", which both sides predict at the same boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Hashable
from typing import Any

from kd_llm.data.formatting import (IGNORE_INDEX, PLAIN_SEPARATOR, DataFormatError, _as_messages, format_record,
                                    record_shape)

__all__ = ["CrossTokenizerDataError", "RenderedSide", "record_with_text", "render_side", "supervised_text"]


class CrossTokenizerDataError(DataFormatError):
    """A record (or tokenizer) that cannot be aligned across tokenizers; the message says why and how to fix it."""


@dataclass(frozen=True)
class RenderedSide:
    """One side of a record: what the model trains on and where its supervised tokens end.

    ``input_ids`` and ``labels`` are ``format_record``'s. ``cuts[i]`` is, for a supervised token ``i``, the boundary
    it reaches: the character boundary ``1..n`` of the supervised text, or ``n + 1`` for the last trailing-markup
    token (the end of the text); None for unsupervised positions. Tokens that end at no character boundary get a key
    that only the same token sequence reproduces: byte pieces before the last one of a character
    ``("inside", end, pieces so far)``, markup before the last ``("leading" | "trailing", tokens so far)``. Two
    tokenizations then share such a boundary only where they emitted the same tokens, so the same tokenizer on both
    sides gives one token per aligned span.
    """

    input_ids: list[int]
    labels: list[int]
    text: str
    cuts: list[Hashable | None]

    @property
    def end(self) -> int:
        return len(self.text) + 1


def supervised_text(record: dict[str, Any]) -> str:
    """The text both models are trained to produce: the completion, the single assistant turn, or the whole text."""
    shape = record_shape(record)
    if shape == "text":
        return record["text"]
    if shape == "prompt_completion":
        completion = record["completion"]
        if isinstance(completion, str):
            return completion
        turns = _as_messages(completion, "assistant")
    else:
        turns = [m for m in _as_messages(record["messages"], "user") if m["role"] == "assistant"]
        if record["messages"][-1].get("role") != "assistant":
            turns = []
    if len(turns) != 1 or not isinstance(turns[0]["content"], str):
        raise CrossTokenizerDataError(
            "cross-tokenizer distillation aligns one supervised text per record, but this record has "
            f"{len(turns)} assistant turns (or a non-string one) at its end. Use prompt/completion records, text "
            "records, or messages that end with exactly one assistant turn."
        )
    return turns[0]["content"]


def record_with_text(record: dict[str, Any], text: str) -> dict[str, Any]:
    """``record`` with its supervised text (:func:`supervised_text`) replaced by ``text``: a generated completion
    (the student's sample, the teacher's writing) in the shape of the record it answers, so that each model renders
    it with its own chat template exactly as it renders the dataset's completion."""
    supervised_text(record)  # the same checks: one supervised text per record
    shape = record_shape(record)
    if shape == "text":
        return {**record, "text": text}
    if shape == "prompt_completion":
        completion = record["completion"]
        new = text if isinstance(completion, str) else [{**completion[0], "content": text}]
        return {**record, "completion": new}
    messages = list(record["messages"])
    return {**record, "messages": messages[:-1] + [{**messages[-1], "content": text}]}


def _offsets(tokenizer, text: str, *, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    try:
        encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError) as error:
        raise CrossTokenizerDataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} ({type(tokenizer).__name__}) cannot report "
            f"character offsets ({error}), which cross-tokenizer alignment needs. Load it with use_fast=True (a "
            "tokenizers-backed tokenizer)."
        ) from None
    return list(encoded["input_ids"]), [tuple(pair) for pair in encoded["offset_mapping"]]


def _check_round_trip(tokenizer, text: str) -> None:
    """The supervised text must survive tokenize -> decode, or offsets point into text the model never sees."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if decoded != text:
        first = next((i for i, (a, b) in enumerate(zip(decoded, text)) if a != b), min(len(decoded), len(text)))
        raise CrossTokenizerDataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} does not reproduce the supervised text: it "
            f"decodes {text[max(0, first - 10):first + 10]!r} as {decoded[max(0, first - 10):first + 10]!r} (first "
            f"difference at character {first}; unknown characters, or a normaliser that rewrites them). Clean the "
            "text (e.g. unicodedata.normalize('NFKC', text) before building the dataset) or drop the record."
        )


def _render_chat(record: dict, tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]], int]:
    """Token ids and offsets of the rendered conversation, and where the supervised text starts in it."""
    if record_shape(record) == "prompt_completion":
        messages = _as_messages(record["prompt"], "user") + _as_messages(record["completion"], "assistant")
    else:
        messages = _as_messages(record["messages"], "user")
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    before = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    start = rendered.find(text, len(before)) if rendered.startswith(before) else -1
    if start < 0:
        raise CrossTokenizerDataError(
            f"the chat template of {getattr(tokenizer, 'name_or_path', '')!r} does not render the assistant text "
            "verbatim after the generation prompt (it moves, strips or rewrites it), so its tokens cannot be aligned "
            "with the other model's. Use a template that copies the completion as is, or use_chat_template=False."
        )
    ids, offsets = _offsets(tokenizer, rendered, add_special_tokens=False)
    return ids, offsets, start


def _render_plain(record: dict, tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]], int]:
    if record_shape(record) == "text":
        ids, offsets = _offsets(tokenizer, text, add_special_tokens=True)
        return ids, offsets, 0
    prompt_ids = tokenizer(record["prompt"] + PLAIN_SEPARATOR, add_special_tokens=True)["input_ids"]
    ids, offsets = _offsets(tokenizer, text, add_special_tokens=False)
    # The completion is tokenized on its own (format_record does the same), so its offsets are already relative.
    return list(prompt_ids) + ids, [(-1, -1)] * len(prompt_ids) + offsets, 0


def _cuts(labels: list[int], offsets: list[tuple[int, int]], start: int, n: int, special: set[int],
          input_ids: list[int], tokens: list[str]) -> list[Hashable | None]:
    """Each supervised position's boundary key (see :class:`RenderedSide`)."""
    ends: dict[int, int] = {}
    markup = []
    for i, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        end = offsets[i][1] - start if i < len(offsets) else None  # an appended EOS has no offsets
        if end is None or input_ids[i] in special or not 0 < end <= n:
            markup.append(i)
        else:
            ends[i] = end
    cuts: list[Hashable | None] = [None] * len(labels)
    text_positions = sorted(ends)
    run: list[str] = []  # tokens so far that end inside the same character (byte pieces)
    for index, i in enumerate(text_positions):
        following = ends[text_positions[index + 1]] if index + 1 < len(text_positions) else None
        if following is not None and following < ends[i]:
            raise CrossTokenizerDataError(f"token offsets go backwards at position {i} ({ends[i]} then {following}); "
                                          "the tokenizer's offset mapping cannot be used for alignment.")
        if following is None or following > ends[i]:
            cuts[i], run = ends[i], []
        else:
            run.append(tokens[i])
            cuts[i] = ("inside", ends[i], tuple(run))
    first, last = (text_positions[0], text_positions[-1]) if text_positions else (len(labels), -1)
    if any(first < i < last for i in markup):
        raise CrossTokenizerDataError("a special or markup token sits inside the supervised text; cross-tokenizer "
                                      "alignment needs the text's tokens contiguous (markup only before or after).")
    for where, group in (("leading", [i for i in markup if i < first]), ("trailing", [i for i in markup if i > last])):
        for count, i in enumerate(group):
            cuts[i] = (where, tuple(tokens[j] for j in group[: count + 1]))
    if any(i > last for i in markup):
        cuts[max(markup)] = n + 1
    return cuts


def render_side(record: dict[str, Any], tokenizer, *, use_chat_template: bool,
                max_length: int | None = None, allow_empty: bool = False) -> RenderedSide:
    """Render ``record`` for ``tokenizer`` (its chat template if ``use_chat_template`` and it has one, else plain
    text) and locate its supervised tokens in the supervised text. Raises :class:`CrossTokenizerDataError`.
    ``allow_empty``: an empty supervised text is allowed (a generated completion that stops at once: only its end
    markup is supervised); a dataset's record must have text."""
    text = supervised_text(record)
    if not text and not allow_empty:
        raise CrossTokenizerDataError("the supervised text is empty, so there is nothing to align.")
    _check_round_trip(tokenizer, text)
    chat = use_chat_template and bool(getattr(tokenizer, "chat_template", None)) and record_shape(record) != "text"
    row = format_record(record, tokenizer, max_length=None, use_chat_template=chat)
    ids, offsets, start = (_render_chat if chat else _render_plain)(record, tokenizer, text)
    if ids != row["input_ids"][: len(ids)]:
        raise CrossTokenizerDataError("re-tokenizing the rendered record for its offsets gave other token ids than "
                                      "format_record; the tokenizer is not deterministic on this text.")
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    cuts = _cuts(row["labels"], offsets, start, len(text), special, row["input_ids"],
                 tokenizer.convert_ids_to_tokens(row["input_ids"]))
    input_ids, labels = row["input_ids"], row["labels"]
    if max_length is not None:
        input_ids, labels, cuts = input_ids[:max_length], labels[:max_length], cuts[:max_length]
    return RenderedSide(input_ids=input_ids, labels=labels, text=text, cuts=cuts)
