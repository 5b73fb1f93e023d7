"""Checking that teacher and student logits can be compared column by column.

Token-level distillation compares the teacher's and the student's distributions over the same vocabulary, so both
must use the same tokenizer. Their embedding matrices may still differ in size, as long as the difference is only
padding rows past the tokenizer's length: e.g. Qwen2.5-0.5B has 151936 output rows and Qwen2.5-7B 152064, with a
tokenizer of 151665 tokens. Those padding columns are never produced by the tokenizer, so the losses only compare
the first :func:`reconcile_vocabularies` columns.
"""

from __future__ import annotations

from kd_llm.errors import KdLlmError

__all__ = ["SPECIAL_TOKEN_ROLES", "VocabularyMismatchError", "reconcile_vocabularies", "tokenizer_vocab_size"]

SPECIAL_TOKEN_ROLES = ("bos", "eos", "pad", "unk")
_SHOW = 5
_FIX = (
    "Fix: give the student the teacher's tokenizer (build or load the student with it and save them together), or "
    "resize the embeddings with model.resize_token_embeddings(len(tokenizer)); or distil across the two tokenizers "
    "with cross_tokenizer_loss (hybrid, uld or span; kd_llm.cross_tokenizer)."
)


class VocabularyMismatchError(KdLlmError, ValueError):
    """Teacher and student cannot be distilled token by token: their vocabularies differ."""


def tokenizer_vocab_size(tokenizer) -> int:
    """Number of logit columns the tokenizer can address: ``len(tokenizer)``, or the largest id + 1 if ids have gaps."""
    vocab = tokenizer.get_vocab()
    return max(len(tokenizer), max(vocab.values(), default=-1) + 1)


def _token_str(token) -> str | None:
    return None if token is None else str(token)


def _rows(model, which: str) -> int | None:
    # A teacher in a side process (kd_llm.training.teacher_process) reports its sizes; its weights are not here.
    reported = getattr(model, "reported_embedding_rows", None)
    if isinstance(reported, dict):
        return reported.get(which)
    getter = getattr(model, f"get_{which}_embeddings", None)
    module = getter() if getter is not None else None
    weight = getattr(module, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    if which == "output":
        config = getattr(model, "config", None)
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        return getattr(text, "vocab_size", None)
    return None


def _describe_vocab_difference(teacher_vocab: dict, student_vocab: dict) -> str:
    only_teacher = sorted(set(teacher_vocab) - set(student_vocab), key=teacher_vocab.get)
    only_student = sorted(set(student_vocab) - set(teacher_vocab), key=student_vocab.get)
    moved = sorted(
        (token for token in set(teacher_vocab) & set(student_vocab) if teacher_vocab[token] != student_vocab[token]),
        key=teacher_vocab.get,
    )
    parts = [f"teacher tokenizer has {len(teacher_vocab)} tokens, student tokenizer {len(student_vocab)}"]
    if only_teacher:
        parts.append(f"{len(only_teacher)} only in the teacher's (e.g. {only_teacher[:_SHOW]})")
    if only_student:
        parts.append(f"{len(only_student)} only in the student's (e.g. {only_student[:_SHOW]})")
    if moved:
        examples = ", ".join(f"{t!r}: {teacher_vocab[t]} vs {student_vocab[t]}" for t in moved[:_SHOW])
        parts.append(f"{len(moved)} tokens with different ids (teacher vs student: {examples})")
    return "; ".join(parts)


def reconcile_vocabularies(teacher_tokenizer, student_tokenizer, teacher_model, student_model) -> int:
    """Check teacher and student share a vocabulary; return how many logit columns to compare.

    Requirements, checked before any training:

    - the tokenizers map the same tokens to the same ids (``get_vocab()`` equal) and agree on the bos/eos/pad/unk
      special tokens;
    - each model's input and output embeddings have at least as many rows as the tokenizer addresses; rows beyond that
      are padding and may differ between teacher and student.

    Returns the shared tokenizer length (``len(tokenizer)``, or the largest id + 1 for a tokenizer with gaps in its
    ids), the number of leading logit columns the distillation losses compare. Raises
    :class:`VocabularyMismatchError` saying what differs and how to fix it.
    """
    if teacher_tokenizer is not student_tokenizer:
        teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
        if teacher_vocab != student_vocab:
            raise VocabularyMismatchError(
                "teacher and student tokenizers differ, so their logits cannot be compared token by token: "
                f"{_describe_vocab_difference(teacher_vocab, student_vocab)}. {_FIX}"
            )
        differing = []
        for role in SPECIAL_TOKEN_ROLES:
            teacher_token = _token_str(getattr(teacher_tokenizer, f"{role}_token", None))
            student_token = _token_str(getattr(student_tokenizer, f"{role}_token", None))
            if teacher_token != student_token:
                differing.append(f"{role}_token: teacher {teacher_token!r} vs student {student_token!r}")
        if differing:
            raise VocabularyMismatchError(
                "teacher and student tokenizers have the same vocabulary but different special tokens ("
                + "; ".join(differing)
                + "). Fix: use the teacher's tokenizer for the student, or set the student tokenizer's special "
                "tokens to the teacher's."
            )
    size = tokenizer_vocab_size(teacher_tokenizer)
    problems = []
    for who, model in (("teacher", teacher_model), ("student", student_model)):
        for which in ("input", "output"):
            rows = _rows(model, which)
            if rows is not None and rows < size:
                problems.append(f"the {who}'s {which} embedding has {rows} rows")
    if problems:
        raise VocabularyMismatchError(
            f"the tokenizer has {size} tokens but {' and '.join(problems)}, so some token ids have no logit column. "
            f"{_FIX}"
        )
    return size
