"""Generated completions across tokenizers: the student's samples (on-policy, ``lmbda``) and the teacher's writing
(``seq_kd``), rendered again for both models and aligned, so a generated batch has the columns of a dataset batch.

With one tokenizer a generated batch is the prompt plus the generated ids (:mod:`kd_llm.training.on_policy`). Across
tokenizers the ids of one model mean nothing to the other, so each completion goes through text:

* **on-policy**: the student trains on its own prompt ids and its sample, exactly as the same-tokenizer path builds
  them (same seeds, same samples); the sample is decoded to text and the teacher reads that text in its own
  rendering of the record (:func:`~kd_llm.cross_tokenizer.rendering.record_with_text` and ``render_side``: its chat
  template or plain text, its end markup), as TRL's GOLD does. Where each sampled token ends in the text comes from
  decoding the sample's prefixes: a token whose prefix does not decode to a prefix of the text (a byte piece of a
  character) reaches no boundary, and joins the span of the tokens after it.
* **seq_kd**: the teacher writes from its own rendering of the prompt, with its own tokenizer; the text is rendered
  for the student (what it trains on, cross-entropy included) and for the teacher again (what the teacher scores: its
  own tokens of that text, which need not be the ids it generated).

Both sides are then aligned by characters (:mod:`kd_llm.cross_tokenizer.alignment`); the supervised span is the
generated completion. A completion that stopped without its EOS (``generation_max_new_tokens``) supervises no end
markup on either side, as with one tokenizer.

A sample that cannot be aligned contributes nothing and is counted, never a crash mid-run: a special token inside
its text, bytes that are not UTF-8 text, text a tokenizer does not reproduce, a chat template that rewrites it, or
no common boundary. Its row is one masked pad token on each side (no loss, no ``num_items_in_batch``); the count is
logged (``xtok_dropped_samples``; by reason in the run totals) and each new reason once as a warning.
"""

from __future__ import annotations

import logging
from collections import Counter

from kd_llm.cross_tokenizer.data import (RECORD, STUDENT_SPANS, TEACHER_INPUT_IDS, TEACHER_LABELS, TEACHER_SPANS,
                                         CrossTokenizerCollator, read_record, side_row)
from kd_llm.cross_tokenizer.rendering import RenderedSide, record_with_text, render_side
from kd_llm.data.formatting import IGNORE_INDEX, DataFormatError

__all__ = ["CrossTokenizerRows", "UnalignedSample", "decoded_text", "generation_problem", "sampled_side",
           "without_end"]

logger = logging.getLogger(__name__)

# The generating roles of kd_llm.training.on_policy (not imported: kd_llm.training imports this package).
STUDENT, TEACHER = "student", "teacher"


class UnalignedSample(DataFormatError):
    """A generated completion that cannot be compared across tokenizers; ``reason`` is a short key for counting."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def decoded_text(tokenizer, completion: list[int], eos_ids: list[int]) -> tuple[list[int], str]:
    """The text ids of a generated ``completion`` (its final EOS removed) and their text. Raises
    :class:`UnalignedSample` for a special token among them or bytes that do not decode to text."""
    text_ids = list(completion[:-1] if completion and completion[-1] in eos_ids else completion)
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    if any(token in special for token in text_ids):
        raise UnalignedSample("special token", "the completion holds a special token inside its text, which the other "
                                               "tokenizer would read as plain characters")
    text = _decode(tokenizer, text_ids)
    if "\ufffd" in text:
        raise UnalignedSample("not UTF-8", "the completion's bytes are not UTF-8 text (a byte piece of a character "
                                           "without the rest)")
    return text_ids, text


def sampled_side(prompt: list[int], completion: list[int], tokenizer, eos_ids: list[int]) -> RenderedSide:
    """The student's side of an on-policy row: its prompt and sampled ids as they are (every sampled id supervised,
    the EOS included), and the boundary each one reaches in the decoded text (see :class:`RenderedSide`)."""
    text_ids, text = decoded_text(tokenizer, completion, eos_ids)
    tokens = tokenizer.convert_ids_to_tokens(text_ids)
    cuts: list = [None] * len(prompt)
    previous, pending = 0, []  # pending: text indices of the byte pieces before the next boundary

    def inside(end: int) -> None:  # keyed as render_side keys them: only the same tokens on the other side match
        for count, index in enumerate(pending):
            cuts[len(prompt) + index] = ("inside", end, tuple(tokens[i] for i in pending[: count + 1]))

    for index in range(len(text_ids)):
        prefix = text if index == len(text_ids) - 1 else _decode(tokenizer, text_ids[: index + 1])
        cuts.append(None)
        if len(prefix) > previous and text.startswith(prefix):
            inside(len(prefix))
            previous, pending = len(prefix), []
            cuts[-1] = previous
        else:
            pending.append(index)
    inside(len(text))  # pieces that no later token completed (a final token that decodes to nothing)
    if len(text_ids) < len(completion):  # the final EOS: the end of the text
        cuts.append(len(text) + 1)
    return RenderedSide(input_ids=list(prompt) + list(completion),
                        labels=[IGNORE_INDEX] * len(prompt) + list(completion), text=text, cuts=cuts)


def without_end(side: RenderedSide) -> RenderedSide:
    """``side`` cut before its end markup: a completion that ran out of tokens did not end, so nothing after its
    text is supervised (or read)."""
    end = len(side.text) + 1
    stop = next((i for i, cut in enumerate(side.cuts)
                 if (isinstance(cut, int) and cut == end) or (isinstance(cut, tuple) and cut[0] == "trailing")),
                len(side.cuts))
    return RenderedSide(side.input_ids[:stop], side.labels[:stop], side.text, side.cuts[:stop])


def generation_problem(dataset, *, student_samples: bool, teacher_writes: bool) -> str | None:
    """Why a cross-tokenizer training set cannot serve generated completions (None: it can), checked before
    training: each record must be there to render again, and each generating model needs a prompt to write from
    (a row supervised from its first token has none)."""
    if dataset is None or not hasattr(dataset, "column_names"):
        return None
    if RECORD not in dataset.column_names:
        return (f"the training set has no {RECORD} column, which on-policy / seq_kd batches across tokenizers render "
                "again: build it with kd_llm.cross_tokenizer.data.build_cross_tokenizer_dataset")
    for role, on, column in ((STUDENT, student_samples, "labels"), (TEACHER, teacher_writes, TEACHER_LABELS)):
        if not on:
            continue
        for index, labels in enumerate(dataset[column]):
            if not labels or labels[0] != IGNORE_INDEX:
                return (f"record {index} has no prompt in the {role}'s rendering (it is supervised from its first "
                        f"token), so the {role} has nothing to {'sample' if role == STUDENT else 'write'} from: "
                        "lmbda / seq_kd need prompt/completion or chat records")
    return None


class CrossTokenizerRows:
    """The generated rows of :class:`~kd_llm.training.on_policy.CompletionGenerator` when the teacher has another
    tokenizer: which columns hold each model's prompt, how each model generates (its pad id, tokenizer and
    vocabulary), and the rows of a generated batch (see the module doc), with the count of dropped samples."""

    def __init__(self, student_tokenizer, teacher_tokenizer):
        self.tokenizers = {STUDENT: student_tokenizer, TEACHER: teacher_tokenizer}
        self.pads = {role: tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
                     for role, tokenizer in self.tokenizers.items()}
        self.collate = CrossTokenizerCollator(self.pads[STUDENT], self.pads[TEACHER])
        self.window_dropped = 0
        self.dropped: Counter = Counter()  # the whole run, by reason

    def prompt_columns(self, role: str) -> tuple[str, str]:
        """The batch columns (ids, labels) a model's prompts are read from: each model generates from its own
        rendering of the prompt."""
        return ("input_ids", "labels") if role == STUDENT else (TEACHER_INPUT_IDS, TEACHER_LABELS)

    def generation_side(self, role: str) -> tuple[int, object, int]:
        """``(pad_token_id, tokenizer, vocab_size)`` of the generating model. Sampling stays within the tokenizer's
        ids: a padded embedding's spare rows decode to nothing."""
        tokenizer = self.tokenizers[role]
        return self.pads[role], tokenizer, len(tokenizer)

    def build(self, batch: dict, prompts: list[list[int]], completions: list[list[int]], role: str,
              eos_ids: list[int]) -> dict:
        """The generated batch (CPU tensors, the columns of :class:`CrossTokenizerCollator`) for ``batch``'s rows,
        ``completions`` written by ``role`` from ``prompts`` (that model's ids) and ending at one of ``eos_ids``."""
        records = batch.get(RECORD)
        if records is None:
            raise KeyError(f"generated batches across tokenizers re-render each record, but the batch has no {RECORD} "
                           "column: build the training set with kd_llm.cross_tokenizer.data."
                           "build_cross_tokenizer_dataset.")
        features = []
        for record_value, prompt, completion in zip(records, prompts, completions):
            try:
                features.append(self._row(record_value, prompt, completion, role, eos_ids))
            except DataFormatError as error:  # UnalignedSample, CrossTokenizerDataError, a template's DataFormatError
                features.append(self._dropped(error))
        return self.collate(features)

    def _row(self, record_value: str, prompt: list[int], completion: list[int], role: str, eos_ids: list[int]):
        record, chat = read_record(record_value)
        ended = bool(completion) and completion[-1] in eos_ids
        if role == STUDENT:
            student = sampled_side(prompt, completion, self.tokenizers[STUDENT], eos_ids)
            text = student.text
        else:
            _, text = decoded_text(self.tokenizers[TEACHER], completion, eos_ids)
            student = self._render(record, text, STUDENT, chat, ended)
        return side_row(student, self._render(record, text, TEACHER, chat, ended))

    def _render(self, record: dict, text: str, role: str, chat: bool, ended: bool) -> RenderedSide:
        side = render_side(record_with_text(record, text), self.tokenizers[role], use_chat_template=chat,
                           allow_empty=True)
        return side if ended else without_end(side)

    def _dropped(self, error: Exception) -> dict:
        reason = getattr(error, "reason", "rendering")
        if reason not in self.dropped:
            logger.warning("kd_llm cross-tokenizer: a generated sample contributes nothing (%s: %s); such samples "
                           "are counted in xtok_dropped_samples, and this warning is shown once per reason.",
                           reason, str(error).rstrip("."))
        self.dropped[reason] += 1
        self.window_dropped += 1
        student_pad, teacher_pad = self.pads[STUDENT], self.pads[TEACHER]
        return {"input_ids": [student_pad], "labels": [IGNORE_INDEX], TEACHER_INPUT_IDS: [teacher_pad],
                TEACHER_LABELS: [IGNORE_INDEX], STUDENT_SPANS: [-1], TEACHER_SPANS: [-1]}

    def pop_log_metrics(self) -> dict:
        """Dropped samples since the last call (logged with the generation metrics)."""
        dropped, self.window_dropped = self.window_dropped, 0
        return {"xtok_dropped_samples": dropped}

    def run_totals(self) -> dict:
        return {"xtok_dropped_samples": sum(self.dropped.values()), "xtok_dropped_by_reason": dict(self.dropped)}
