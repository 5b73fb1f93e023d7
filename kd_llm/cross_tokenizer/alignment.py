"""Aligning two tokenizations of the same supervised text by character boundaries, not by position.

Where both tokenizations reach the same character boundary of the supervised text, the two models have read the same
text (prompt plus the text up to that boundary), so their next-token predictions are comparable. Those common
boundaries cut the text into **aligned spans**: span ``k`` is the text between common boundaries ``k - 1`` and ``k``,
covered by one or more whole tokens on each side. The end of the text (the EOS / end-of-turn markup, boundary
``n + 1``) is a boundary too when both sides supervise it.

Every supervised character belongs to exactly one aligned span on each side. Supervised tokens after the last common
boundary (a side cut short by ``max_length``) belong to none: span id -1, counted in :class:`Alignment`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kd_llm.cross_tokenizer.rendering import CrossTokenizerDataError, RenderedSide

__all__ = ["Alignment", "align_sides", "span_ids"]

UNALIGNED = -1


@dataclass(frozen=True)
class Alignment:
    """Span ids per token position of each side (-1: unsupervised or unaligned), and counts for logging.

    ``student_spans[i] == k`` means the student's token ``i`` lies in aligned span ``k``; the same ``k`` on the
    teacher's side covers the same characters. Span ids increase with position, from 0 to ``num_spans - 1``.
    """

    student_spans: list[int]
    teacher_spans: list[int]
    num_spans: int
    unaligned_student_tokens: int
    unaligned_teacher_tokens: int


def span_ids(cuts: list, common: set, supervised: list[bool]) -> tuple[list[int], int]:
    """Assign each supervised position the index of the first common boundary at or after it (both sides reach
    the common boundaries in the same order: character boundaries increase along the text, markup comes last).

    Returns ``(ids, unaligned)``: ``ids[i]`` is -1 for unsupervised positions and for supervised ones past the last
    common boundary (``unaligned`` counts those).
    """
    ids, span, unaligned = [], 0, 0
    for cut, is_supervised in zip(cuts, supervised):
        if not is_supervised:
            ids.append(UNALIGNED)
            continue
        if span >= len(common):
            ids.append(UNALIGNED)
            unaligned += 1
            continue
        ids.append(span)
        if cut is not None and cut in common:
            span += 1
    return ids, unaligned


def align_sides(student: RenderedSide, teacher: RenderedSide) -> Alignment:
    """Aligned spans of a record rendered for the student and for the teacher (:func:`render_side`).

    Raises :class:`CrossTokenizerDataError` if the two sides render different supervised texts or share no
    boundary at all (nothing could be compared).
    """
    if student.text != teacher.text:
        raise CrossTokenizerDataError("the student's and the teacher's renderings supervise different texts; both "
                                      "must be rendered from the same record.")
    student_cuts = {cut for cut in student.cuts if cut is not None}
    teacher_cuts = {cut for cut in teacher.cuts if cut is not None}
    common = student_cuts & teacher_cuts
    if not common:
        raise CrossTokenizerDataError(
            "the student's and the teacher's tokens share no boundary in the supervised text (empty alignment): "
            "nothing can be compared. Check that max_length leaves room for the completion on both sides and that "
            "both chat templates keep the completion after the prompt."
        )
    student_ids, student_unaligned = span_ids(student.cuts, common, [label != -100 for label in student.labels])
    teacher_ids, teacher_unaligned = span_ids(teacher.cuts, common, [label != -100 for label in teacher.labels])
    return Alignment(student_spans=student_ids, teacher_spans=teacher_ids, num_spans=len(common),
                     unaligned_student_tokens=student_unaligned, unaligned_teacher_tokens=teacher_unaligned)
