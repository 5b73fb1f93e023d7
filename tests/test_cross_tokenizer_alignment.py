"""Alignment of two tokenizations by character boundaries, on real text with the two real tokenizers."""

import pytest

from kd_llm.cross_tokenizer.alignment import align_sides
from kd_llm.cross_tokenizer.rendering import CrossTokenizerDataError, render_side
from kd_llm.data.formatting import format_record
from kd_llm.models.char_tokenizer import build_char_tokenizer
from tests.helpers.tokenizers import REAL_TEXTS, needs_gemma, needs_smollm2, packaged_tokenizer

pytestmark = [needs_gemma, needs_smollm2]


def spans_text(tokenizer, side, spans):
    """Each span's tokens decoded on their own (not through offsets): span id -> text."""
    grouped = {}
    for token, span in zip(side.input_ids, spans):
        if span >= 0:
            grouped.setdefault(span, []).append(token)
    return [tokenizer.decode(grouped[k], skip_special_tokens=True) for k in sorted(grouped)]


def records(text):
    return [{"prompt": "Please write it out:", "completion": text}, {"text": text}]


@pytest.mark.parametrize("text", REAL_TEXTS)
@pytest.mark.parametrize("shape", ["prompt_completion", "text"])
def test_every_supervised_character_is_in_exactly_one_span_on_each_side(text, shape):
    student_tokenizer, teacher_tokenizer = packaged_tokenizer("smollm2-135m-instruct"), packaged_tokenizer("gemma3-270m")
    record = records(text)[0 if shape == "prompt_completion" else 1]
    student = render_side(record, student_tokenizer, use_chat_template=True)
    teacher = render_side(record, teacher_tokenizer, use_chat_template=True)  # Gemma has none: plain text
    alignment = align_sides(student, teacher)
    student_pieces = spans_text(student_tokenizer, student, alignment.student_spans)
    teacher_pieces = spans_text(teacher_tokenizer, teacher, alignment.teacher_spans)
    assert len(student_pieces) == len(teacher_pieces) == alignment.num_spans
    # Span by span the same characters, and together the whole text once: a partition of it on both sides. The last
    # span is the end of the text: the stop tokens (and ChatML's newline after <|im_end|>), no text.
    assert student_pieces[:-1] == teacher_pieces[:-1]
    assert "".join(student_pieces[:-1]) == "".join(teacher_pieces[:-1]) == text
    assert student_pieces[-1] in ("", "\n") and teacher_pieces[-1] == ""
    assert alignment.unaligned_student_tokens == alignment.unaligned_teacher_tokens == 0
    # Every supervised token is in a span; span ids never decrease along the sequence.
    for side, spans in ((student, alignment.student_spans), (teacher, alignment.teacher_spans)):
        assert [s >= 0 for s in spans] == [label != -100 for label in side.labels]
        ids = [s for s in spans if s >= 0]
        assert ids == sorted(ids) and set(ids) == set(range(alignment.num_spans))
    if text == REAL_TEXTS[0]:  # "naïve", the emoji, the blank line: spans of several tokens on one side
        assert alignment.num_spans < max(sum(s >= 0 for s in alignment.student_spans),
                                         sum(s >= 0 for s in alignment.teacher_spans))


@pytest.mark.parametrize("text", REAL_TEXTS)
def test_each_side_trains_on_what_format_record_gives_and_round_trips(text):
    for name, chat in (("smollm2-135m-instruct", True), ("gemma3-270m", False)):
        tokenizer = packaged_tokenizer(name)
        record = records(text)[0]
        side = render_side(record, tokenizer, use_chat_template=chat)
        row = format_record(record, tokenizer, use_chat_template=chat)
        assert (side.input_ids, side.labels) == (row["input_ids"], row["labels"])
        text_ids = [t for t, c, label in zip(side.input_ids, side.cuts, side.labels)
                    if label != -100 and c != len(text) + 1 and t not in tokenizer.all_special_ids]
        decoded = tokenizer.decode(text_ids)
        assert decoded == text or (chat and decoded == text + "\n")  # ChatML's newline after <|im_end|>


def test_end_of_text_is_one_aligned_span_pairing_the_two_stop_tokens():
    student_tokenizer, teacher_tokenizer = packaged_tokenizer("smollm2-135m-instruct"), packaged_tokenizer("gemma3-270m")
    record = {"prompt": "Say hi.", "completion": "Hi there."}
    student = render_side(record, student_tokenizer, use_chat_template=True)
    teacher = render_side(record, teacher_tokenizer, use_chat_template=True)
    alignment = align_sides(student, teacher)
    last = alignment.num_spans - 1
    student_end = [t for t, s in zip(student.input_ids, alignment.student_spans) if s == last]
    teacher_end = [t for t, s in zip(teacher.input_ids, alignment.teacher_spans) if s == last]
    assert student_tokenizer.convert_ids_to_tokens(student_end) == ["<|im_end|>", "Ċ"]
    assert teacher_end == [teacher_tokenizer.eos_token_id]


def test_same_tokenizer_gives_one_token_per_span():
    tokenizer = packaged_tokenizer("gemma3-270m")
    side = render_side(records(REAL_TEXTS[0])[0], tokenizer, use_chat_template=False)
    alignment = align_sides(side, side)
    supervised = [label != -100 for label in side.labels]
    assert alignment.student_spans == alignment.teacher_spans
    assert [s for s in alignment.student_spans if s >= 0] == list(range(sum(supervised)))


def test_truncation_leaves_the_cut_tokens_unaligned():
    student_tokenizer, teacher_tokenizer = packaged_tokenizer("smollm2-135m-instruct"), packaged_tokenizer("gemma3-270m")
    record = {"text": REAL_TEXTS[3]}
    student = render_side(record, student_tokenizer, use_chat_template=False, max_length=8)
    teacher = render_side(record, teacher_tokenizer, use_chat_template=False)
    alignment = align_sides(student, teacher)
    assert alignment.unaligned_student_tokens == 0 and alignment.unaligned_teacher_tokens > 0
    pieces = spans_text(teacher_tokenizer, teacher, alignment.teacher_spans)
    assert pieces == spans_text(student_tokenizer, student, alignment.student_spans)
    assert REAL_TEXTS[3].startswith("".join(pieces))


def test_text_that_does_not_round_trip_is_refused():
    tokenizer = build_char_tokenizer()
    with pytest.raises(CrossTokenizerDataError, match="does not reproduce the supervised text"):
        render_side({"prompt": "a", "completion": "café"}, tokenizer, use_chat_template=False)


def test_a_chat_template_that_rewrites_the_completion_is_refused():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% else %}"
                               "{{ '\\n' }}{{ m['content'] | upper }}{{ eos_token }}{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}{{ '\\n' }}{% endif %}")
    with pytest.raises(CrossTokenizerDataError, match="does not render the assistant text verbatim"):
        render_side({"prompt": "a", "completion": "hello"}, tokenizer, use_chat_template=True)


def test_a_tokenizer_without_offsets_is_refused():
    class NoOffsets:
        def __init__(self, tokenizer):
            self._tokenizer = tokenizer

        def __getattr__(self, name):
            return getattr(self._tokenizer, name)

        def __call__(self, text, **kwargs):
            if kwargs.get("return_offsets_mapping"):
                raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
            return self._tokenizer(text, **kwargs)

    with pytest.raises(CrossTokenizerDataError, match="cannot report character offsets"):
        render_side({"prompt": "a", "completion": "hello"}, NoOffsets(build_char_tokenizer()),
                    use_chat_template=False)


def test_no_common_boundary_is_an_empty_alignment_error():
    tokenizer = build_char_tokenizer()
    record = {"prompt": "abc", "completion": "hello"}
    student = render_side(record, tokenizer, use_chat_template=False, max_length=4)  # prompt only: nothing supervised
    teacher = render_side(record, tokenizer, use_chat_template=False)
    with pytest.raises(CrossTokenizerDataError, match="empty alignment"):
        align_sides(student, teacher)
