"""Training data for cross-tokenizer distillation: each record rendered for both models, and their alignment.

A row holds what the student trains on (``input_ids``, ``labels``: exactly what it would train on alone) plus the
teacher's rendering of the same record (its ids and labels) and the aligned span id of every token on both sides, in
columns named ``kd_teacher_*`` / ``kd_*_spans`` (:data:`CROSS_TOKENIZER_COLUMNS`), and the record itself with how it
was rendered (``kd_record``, JSON), from which a generated completion is rendered again for both models
(:mod:`kd_llm.cross_tokenizer.generated`). :class:`CrossTokenizerCollator` pads them;
:class:`CrossTokenizerPackingCollator` packs them (``packing: true``), both sides with the same examples per row.
Every record is aligned when the dataset is built, so bad input (no offsets, text that does not round-trip, an empty
alignment) stops the run before training, naming the record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import json

import torch

from kd_llm.cross_tokenizer.alignment import align_sides
from kd_llm.cross_tokenizer.rendering import CrossTokenizerDataError, RenderedSide, render_side
from kd_llm.data.collator import CausalLMCollator
from kd_llm.data.formatting import IGNORE_INDEX
from kd_llm.data.packing import PACKED_EXAMPLE_KEY, PackingCollator

__all__ = ["CROSS_TOKENIZER_COLUMNS", "CrossTokenizerCollator", "CrossTokenizerPackingCollator",
           "alignment_coverage", "build_cross_tokenizer_dataset", "cross_tokenizer_row", "read_record",
           "record_column", "side_row"]

TEACHER_INPUT_IDS = "kd_teacher_input_ids"
TEACHER_ATTENTION_MASK = "kd_teacher_attention_mask"
TEACHER_POSITION_IDS = "kd_teacher_position_ids"  # packed batches: restarting per example (no attention mask)
TEACHER_LABELS = "kd_teacher_labels"  # the teacher's own labels: where its prompt ends (seq_kd writes from there)
STUDENT_SPANS = "kd_student_spans"
TEACHER_SPANS = "kd_teacher_spans"
RECORD = "kd_record"  # {"record": ..., "use_chat_template": ...} as JSON: what generated completions answer
CROSS_TOKENIZER_COLUMNS = (TEACHER_INPUT_IDS, TEACHER_LABELS, STUDENT_SPANS, TEACHER_SPANS)


def record_column(record: dict[str, Any], *, use_chat_template: bool) -> str:
    """The ``kd_record`` value of a row (see :func:`read_record`)."""
    return json.dumps({"record": record, "use_chat_template": bool(use_chat_template)}, ensure_ascii=False)


def read_record(value: str) -> tuple[dict[str, Any], bool]:
    """``(record, use_chat_template)`` of a ``kd_record`` value."""
    stored = json.loads(value)
    return stored["record"], stored["use_chat_template"]


def cross_tokenizer_row(record: dict[str, Any], student_tokenizer, teacher_tokenizer, *, use_chat_template: bool,
                        max_length: int | None = None) -> dict[str, list[int]]:
    """One dataset row (see module doc); each side uses its chat template if it has one and ``use_chat_template``."""
    student = render_side(record, student_tokenizer, use_chat_template=use_chat_template, max_length=max_length)
    teacher = render_side(record, teacher_tokenizer, use_chat_template=use_chat_template, max_length=max_length)
    return side_row(student, teacher) | {RECORD: record_column(record, use_chat_template=use_chat_template)}


def side_row(student: RenderedSide, teacher: RenderedSide) -> dict[str, list[int]]:
    """The columns of one row from its two renderings (aligned here; raises :class:`CrossTokenizerDataError`)."""
    alignment = align_sides(student, teacher)
    return {"input_ids": student.input_ids, "labels": student.labels, TEACHER_INPUT_IDS: teacher.input_ids,
            TEACHER_LABELS: teacher.labels, STUDENT_SPANS: alignment.student_spans,
            TEACHER_SPANS: alignment.teacher_spans}


def build_cross_tokenizer_dataset(records: list[dict[str, Any]], student_tokenizer, teacher_tokenizer, *,
                                  max_length: int | None = None, use_chat_template: bool = True,
                                  source_name: str = "dataset"):
    """A ``datasets.Dataset`` of :func:`cross_tokenizer_row` rows plus ``length``; each record's error names its
    index."""
    import datasets  # here, not at the top: the trainer imports this module, and may run where datasets is absent
    if not records:
        raise CrossTokenizerDataError(f"{source_name} is empty: there is nothing to train on.")
    rows = []
    for index, record in enumerate(records):
        try:
            rows.append(cross_tokenizer_row(record, student_tokenizer, teacher_tokenizer,
                                            use_chat_template=use_chat_template, max_length=max_length))
        except CrossTokenizerDataError as error:
            raise CrossTokenizerDataError(f"{source_name}, record {index}: {error}") from error
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    columns["length"] = [len(ids) for ids in columns["input_ids"]]
    return datasets.Dataset.from_dict(columns)


def alignment_coverage(dataset) -> dict:
    """How much of the supervised text the alignment compares: aligned spans per student and per teacher token."""
    spans = student_tokens = teacher_tokens = 0
    for student, teacher in zip(dataset[STUDENT_SPANS], dataset[TEACHER_SPANS]):
        spans += max(student, default=-1) + 1
        student_tokens += sum(s >= 0 for s in student)
        teacher_tokens += sum(t >= 0 for t in teacher)
    return {"aligned_spans": spans, "student_tokens": student_tokens, "teacher_tokens": teacher_tokens,
            "spans_per_student_token": round(spans / max(student_tokens, 1), 4),
            "spans_per_teacher_token": round(spans / max(teacher_tokens, 1), 4)}


def _check_columns(features: list[dict]) -> None:
    missing = [key for key in CROSS_TOKENIZER_COLUMNS if key not in features[0]]
    if missing:
        raise KeyError(f"cross-tokenizer batches need the columns {', '.join(missing)}: build the dataset with "
                       "kd_llm.cross_tokenizer.data.build_cross_tokenizer_dataset.")


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for index, row in enumerate(rows):
        out[index, :len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


@dataclass
class CrossTokenizerCollator:
    """The student's batch (:class:`CausalLMCollator`) plus the teacher's ids (right-padded with its pad id), its
    attention mask and labels (-100), both sides' span ids (padded with -1), and the rows' ``kd_record`` strings
    when the rows have them (a list, for re-rendering generated completions)."""

    pad_token_id: int
    teacher_pad_token_id: int
    passthrough_keys: tuple[str, ...] = ()
    student: CausalLMCollator = field(init=False)

    def __post_init__(self):
        self.student = CausalLMCollator(self.pad_token_id, passthrough_keys=self.passthrough_keys)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        _check_columns(features)
        batch = self.student(features)
        teacher_ids = [f[TEACHER_INPUT_IDS] for f in features]
        batch[TEACHER_INPUT_IDS] = _pad(teacher_ids, self.teacher_pad_token_id)
        batch[TEACHER_ATTENTION_MASK] = _pad([[1] * len(ids) for ids in teacher_ids], 0)
        batch[TEACHER_LABELS] = _pad([f[TEACHER_LABELS] for f in features], -100)
        batch[STUDENT_SPANS] = _pad([f[STUDENT_SPANS] for f in features], -1)
        batch[TEACHER_SPANS] = _pad([f[TEACHER_SPANS] for f in features], -1)
        if RECORD in features[0]:
            batch[RECORD] = [f[RECORD] for f in features]
        return batch


@dataclass
class CrossTokenizerPackingCollator:
    """Packed cross-tokenizer batches: the student's side exactly as :class:`PackingCollator` packs it (best-fit
    by the student's lengths, ``position_ids``, ``packed_example_ids``, every example's first label masked), and the
    teacher's rendering laid with the same examples in the same order in each row, in a row of its own width (right-
    padded with its pad id), with ``kd_teacher_position_ids`` restarting per example (and no teacher attention mask:
    the position_ids isolate the examples, as on the student's side).

    Span ids are renumbered per packed row (each example's ids shifted by the spans of the earlier examples in its
    row), so row-major order still pairs them; each example's first token gets span id -1 and teacher label -100 on
    both sides: unpacked, the shift drops it, and packed, the previous example's last position would predict it.
    Examples are never cut (``overlong="truncate"`` is refused by the rules: the teacher's rendering and the
    alignment cover whole examples)."""

    pad_token_id: int
    teacher_pad_token_id: int
    max_length: int = 0
    passthrough_keys: tuple[str, ...] = ()
    pad_to_multiple_of: int | None = None
    student: PackingCollator = field(init=False)

    def __post_init__(self):
        self.student = PackingCollator(self.pad_token_id, max_length=self.max_length, overlong="error",
                                       passthrough_keys=self.passthrough_keys,
                                       pad_to_multiple_of=self.pad_to_multiple_of)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        _check_columns(features)
        batch = self.student(features)
        example_ids = batch[PACKED_EXAMPLE_KEY]
        rows = [torch.unique_consecutive(row[row >= 0]).tolist() for row in example_ids]
        width = max(sum(len(features[i][TEACHER_INPUT_IDS]) for i in row) for row in rows)
        shape = (len(rows), width)
        teacher_ids = torch.full(shape, self.teacher_pad_token_id, dtype=torch.long)
        teacher_labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        teacher_positions = torch.zeros(shape, dtype=torch.long)
        teacher_spans = torch.full(shape, -1, dtype=torch.long)
        student_spans = torch.full(example_ids.shape, -1, dtype=torch.long)
        for r, row in enumerate(rows):
            start = student_start = offset = 0
            for i in row:
                feature = features[i]
                n, m = len(feature[TEACHER_INPUT_IDS]), len(feature["input_ids"])
                own_student = torch.as_tensor(feature[STUDENT_SPANS], dtype=torch.long)
                own_teacher = torch.as_tensor(feature[TEACHER_SPANS], dtype=torch.long)
                count = int(torch.cat((own_student, own_teacher, own_student.new_full((1,), -1))).max()) + 1
                shifted_student = torch.where(own_student >= 0, own_student + offset, own_student)
                shifted_teacher = torch.where(own_teacher >= 0, own_teacher + offset, own_teacher)
                shifted_student[0] = shifted_teacher[0] = -1  # the first token: no position of this example predicts it
                teacher_ids[r, start:start + n] = torch.as_tensor(feature[TEACHER_INPUT_IDS], dtype=torch.long)
                teacher_labels[r, start:start + n] = torch.as_tensor(feature[TEACHER_LABELS], dtype=torch.long)
                teacher_labels[r, start] = IGNORE_INDEX
                teacher_positions[r, start:start + n] = torch.arange(n)
                teacher_spans[r, start:start + n] = shifted_teacher
                student_spans[r, student_start:student_start + m] = shifted_student
                start, student_start, offset = start + n, student_start + m, offset + count
            teacher_positions[r, start:] = torch.arange(width - start)  # padding: a segment of its own
        batch[TEACHER_INPUT_IDS] = teacher_ids
        batch[TEACHER_POSITION_IDS] = teacher_positions
        batch[TEACHER_LABELS] = teacher_labels
        batch[STUDENT_SPANS] = student_spans
        batch[TEACHER_SPANS] = teacher_spans
        return batch
