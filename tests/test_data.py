"""Tests for kd_llm.data (formatting, sources, collator) with the character tokenizer.

Expected token ids are built here by hand, token by token, from the tokenizer's vocabulary (one token per character
plus the special tokens), never from the formatting code, so a wrong mask or a missing EOS shows up as a mismatch.
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import processors

from kd_llm.data.collator import CausalLMCollator
from kd_llm.data.formatting import IGNORE_INDEX, DataFormatError, format_prompt, format_record
from kd_llm.data.sources import build_dataset, load_records, read_jsonl
from kd_llm.models.char_tokenizer import build_char_tokenizer

BOS, EOS = "<s>", "</s>"


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def expected(tokenizer, pieces) -> tuple[list[int], list[int]]:
    """``pieces``: (text or special token, supervised). Text is split into characters; special tokens stay whole."""
    input_ids, labels = [], []
    for piece, supervised in pieces:
        tokens = [piece] if piece in (BOS, EOS) else list(piece)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        assert tokenizer.unk_token_id not in ids, piece
        input_ids += ids
        labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def pad_is_eos_tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    return tokenizer


def bos_adding_tokenizer():
    """A char tokenizer whose plain encoding prepends BOS, like most pretrained LLM tokenizers."""
    tokenizer = build_char_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.bos_token_id)])
    assert tokenizer("ab")["input_ids"][0] == tokenizer.bos_token_id
    return tokenizer


PROMPT = "add:2023-12-15,20"
COMPLETION = "2023-12:31-15=16,20-16=04;2024-01:31-00=31,00+04=04>2024-01-04"


# ----------------------------------------------------------------------------------------------------------------------
# format_record: prompt/completion
# ----------------------------------------------------------------------------------------------------------------------


def test_prompt_completion_masks_exactly_the_prompt(tok):
    row = format_record({"prompt": PROMPT, "completion": COMPLETION}, tok)
    ids, labels = expected(tok, [(BOS, False), (PROMPT, False), ("\n", False), (COMPLETION, True), (EOS, True)])
    assert row == {"input_ids": ids, "labels": labels}
    # The generation prompt "\n" is masked, the first completion token and the final EOS are supervised.
    first = len(PROMPT) + 2
    assert row["labels"][first - 1] == IGNORE_INDEX and row["input_ids"][first - 1] == tok.convert_tokens_to_ids("\n")
    assert row["labels"][first] == row["input_ids"][first]
    assert row["labels"][-1] == tok.eos_token_id
    rendering = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": COMPLETION}], tokenize=False)
    assert tok.decode(row["input_ids"]) == rendering == f"{BOS}{PROMPT}\n{COMPLETION}{EOS}"


def test_format_prompt_is_the_masked_prefix(tok):
    record = {"prompt": PROMPT, "completion": COMPLETION}
    row = format_record(record, tok)
    masked = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
    assert format_prompt(record, tok) == row["input_ids"][:masked] == expected(tok, [(BOS, 0), (PROMPT, 0), ("\n", 0)])[0]


def test_prompt_completion_given_as_message_lists(tok):
    record = {
        "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "wd:2000-01-01"}],
        "completion": [{"role": "assistant", "content": "Saturday"}],
    }
    row = format_record(record, tok)
    ids, labels = expected(tok, [("be brief\n", False), (BOS, False), ("wd:2000-01-01\n", False), ("Saturday", True),
                                 (EOS, True)])
    assert row == {"input_ids": ids, "labels": labels}


def test_pad_equal_to_eos_keeps_the_final_eos_supervised():
    tokenizer = pad_is_eos_tokenizer()
    records = [{"prompt": "wd:2000-01-01", "completion": "Saturday"},
               {"prompt": "add:1999-12-31,1", "completion": "1999-12:31-31=00,01-00=01;2000-01:31-00=31,00+01=01>"
                                                            "2000-01-01"},
               {"prompt": "iso:1 May 2020", "completion": "2020-05-01"}]
    features = [format_record(r, tokenizer) for r in records]
    batch = CausalLMCollator(pad_token_id=tokenizer.pad_token_id)(features)
    lengths = [len(f["input_ids"]) for f in features]
    assert len(set(lengths)) == 3  # padding really happens
    eos = tokenizer.eos_token_id
    for row, (record, n) in enumerate(zip(records, lengths)):
        _, labels = expected(tokenizer, [(BOS, 0), (record["prompt"] + "\n", 0), (record["completion"], 1), (EOS, 1)])
        assert batch["labels"][row, :n].tolist() == labels
        # The final EOS has the pad id, and is still a target ...
        assert batch["input_ids"][row, n - 1] == eos == tokenizer.pad_token_id
        assert batch["labels"][row, n - 1] == eos
        # ... while the padding after it, the same id, is not.
        assert (batch["input_ids"][row, n:] == eos).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
    # Through build_dataset too.
    dataset = build_dataset(records, tokenizer)
    for row, n in enumerate(lengths):
        assert dataset[row]["labels"][n - 1] == eos


# ----------------------------------------------------------------------------------------------------------------------
# format_record: messages, text, no chat template
# ----------------------------------------------------------------------------------------------------------------------


def test_messages_supervise_only_assistant_turns(tok):
    messages = [
        {"role": "system", "content": "dates"},
        {"role": "user", "content": "wd:2000-01-01"},
        {"role": "assistant", "content": "5+0=5+0=5>Saturday"},
        {"role": "user", "content": "iso:Dec 3 2001"},
        {"role": "assistant", "content": "2001-12-03"},
    ]
    row = format_record({"messages": messages}, tok)
    ids, labels = expected(tok, [
        ("dates\n", False),
        (BOS, False), ("wd:2000-01-01", False), ("\n", False), ("5+0=5+0=5>Saturday", True), (EOS, True),
        (BOS, False), ("iso:Dec 3 2001", False), ("\n", False), ("2001-12-03", True), (EOS, True),
    ])
    assert row == {"input_ids": ids, "labels": labels}
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)
    supervised = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(supervised) == f"5+0=5+0=5>Saturday{EOS}2001-12-03{EOS}"


def test_messages_without_an_assistant_turn_are_rejected(tok):
    with pytest.raises(DataFormatError, match="assistant"):
        format_record({"messages": [{"role": "user", "content": "hi"}]}, tok)


def test_text_records_supervise_everything(tok):
    row = format_record({"text": "wd:2000-01-01 Saturday"}, tok)
    ids, labels = expected(tok, [("wd:2000-01-01 Saturday", True), (EOS, True)])
    assert row == {"input_ids": ids, "labels": labels}
    # A text that already ends with EOS does not get a second one.
    assert format_record({"text": f"ab{EOS}"}, tok)["input_ids"] == expected(tok, [("ab", 1), (EOS, 1)])[0]


def test_text_records_mask_only_a_leading_bos():
    tokenizer = bos_adding_tokenizer()
    row = format_record({"text": "ab c"}, tokenizer)
    ids, _ = expected(tokenizer, [(BOS, 0), ("ab c", 1), (EOS, 1)])
    assert row == {"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]}
    # Chat formatting with such a tokenizer does not double the BOS the template already writes.
    chat = format_record({"prompt": "x", "completion": "y"}, tokenizer)
    assert chat["input_ids"] == expected(tokenizer, [(BOS, 0), ("x\ny", 0), (EOS, 0)])[0]


@pytest.mark.parametrize("text", ["", None, 5])
def test_bad_text_is_rejected(tok, text):
    with pytest.raises(DataFormatError, match="text"):
        format_record({"text": text}, tok)


def test_plain_text_path_without_chat_template(tok):
    record = {"prompt": PROMPT, "completion": COMPLETION}
    row = format_record(record, tok, use_chat_template=False)
    # The separator ends the masked prompt, so the model can tell where the prompt stops.
    ids, labels = expected(tok, [(PROMPT + "\n", False), (COMPLETION, True), (EOS, True)])
    assert row == {"input_ids": ids, "labels": labels}
    assert format_prompt(record, tok, use_chat_template=False) == expected(tok, [(PROMPT + "\n", 0)])[0]
    # With a BOS-adding tokenizer the BOS belongs to the masked prompt.
    tokenizer = bos_adding_tokenizer()
    row = format_record(record, tokenizer, use_chat_template=False)
    ids, labels = expected(tokenizer, [(BOS, False), (PROMPT + "\n", False), (COMPLETION, True), (EOS, True)])
    assert row == {"input_ids": ids, "labels": labels}
    with pytest.raises(DataFormatError, match="chat template"):
        format_record({"messages": [{"role": "assistant", "content": "a"}]}, tok, use_chat_template=False)


def test_tokenizer_without_chat_template_gets_a_clear_error():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = None
    record = {"prompt": "p", "completion": "c"}
    for call in (lambda: format_record(record, tokenizer),
                 lambda: format_record({"messages": [{"role": "assistant", "content": "a"}]}, tokenizer),
                 lambda: format_prompt(record, tokenizer)):
        with pytest.raises(DataFormatError) as info:
            call()
        message = str(info.value)
        assert "chat template" in message
        assert "use_chat_template=False" in message and "tokenizer.chat_template" in message  # the fixes
    # The plain path named as the fix works with the same tokenizer.
    assert format_record(record, tokenizer, use_chat_template=False)["labels"][-1] == tokenizer.eos_token_id
    with pytest.raises(DataFormatError, match="record 1: .*chat template"):
        build_dataset([{"text": "ok"}, record], tokenizer)


@pytest.mark.parametrize("record", [["prompt", "completion"], "text", {"prompt": "p"}, {"question": "q"}])
def test_unknown_record_shapes_are_rejected(tok, record):
    with pytest.raises(DataFormatError, match="prompt"):
        format_record(record, tok)


def test_bad_message_parts_are_rejected(tok):
    with pytest.raises(DataFormatError, match="messages"):
        format_record({"prompt": [{"content": "no role"}], "completion": "c"}, tok)


def test_max_length_truncates_ids_and_labels_together(tok):
    record = {"prompt": PROMPT, "completion": COMPLETION}
    full = format_record(record, tok)
    cut = format_record(record, tok, max_length=25)
    assert cut == {"input_ids": full["input_ids"][:25], "labels": full["labels"][:25]}


# ----------------------------------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------------------------------


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_jsonl_reads_objects_and_skips_blank_lines(tmp_path):
    path = write_lines(tmp_path / "ok.jsonl", ['{"text": "a"}', "", '  ', '{"prompt": "p", "completion": "c"}'])
    assert read_jsonl(path) == [{"text": "a"}, {"prompt": "p", "completion": "c"}]


def test_read_jsonl_names_the_malformed_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ['{"text": "a"}', '{"text": "b"}', '{"text": "c",', '{"text": "d"}'])
    with pytest.raises(DataFormatError, match="line 3") as info:
        read_jsonl(path)
    assert "bad.jsonl" in str(info.value)
    # Blank lines count in the numbering.
    path = write_lines(tmp_path / "gap.jsonl", ['{"text": "a"}', "", "", "not json"])
    with pytest.raises(DataFormatError, match="line 4"):
        read_jsonl(path)


@pytest.mark.parametrize("line", ['[1, 2]', '"text"', "3"])
def test_read_jsonl_rejects_non_objects(tmp_path, line):
    path = write_lines(tmp_path / "list.jsonl", ['{"text": "a"}', line])
    with pytest.raises(DataFormatError, match=r"line 2 must be a JSON object"):
        read_jsonl(path)


def test_read_jsonl_empty_and_missing(tmp_path):
    for name, content in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n")):
        (tmp_path / name).write_text(content, encoding="utf-8")
        with pytest.raises(DataFormatError, match="no records"):
            read_jsonl(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_load_records_from_jsonl_and_builtin_task(tmp_path):
    records = [{"text": str(i)} for i in range(5)]
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(r) for r in records])
    assert load_records(str(path)) == records
    assert load_records(str(path), size=2) == records[:2]
    generated = load_records("date_arithmetic", split="eval", size=7, seed=3)
    assert len(generated) == 7
    assert all(set(r) == {"category", "prompt", "completion", "answer"} for r in generated)
    with pytest.raises(FileNotFoundError, match="neither a built-in task"):
        load_records("no_such_source")


def test_build_dataset_columns(tok):
    records = [{"category": "a", "prompt": "p", "completion": "cc"}, {"category": "b", "text": "xyz"}]
    dataset = build_dataset(records, tok)
    assert dataset["input_ids"] == [format_record(r, tok)["input_ids"] for r in records]
    assert dataset["labels"] == [format_record(r, tok)["labels"] for r in records]
    assert dataset["length"] == [len(ids) for ids in dataset["input_ids"]] == [1 + 1 + 1 + 2 + 1, 3 + 1]
    assert dataset["category"] == ["a", "b"]
    # A category column only when every record has one.
    assert "category" not in build_dataset([records[0], {"text": "xyz"}], tok).column_names


def test_build_dataset_errors(tok):
    with pytest.raises(DataFormatError, match="empty"):
        build_dataset([], tok, source_name="my.jsonl")
    with pytest.raises(DataFormatError, match=r"my\.jsonl, record 2: .*keys \['answer'\]"):
        build_dataset([{"text": "a"}, {"text": "b"}, {"answer": "c"}], tok, source_name="my.jsonl")


def test_build_dataset_rejects_records_whose_completion_is_cut_off(tok):
    short = {"prompt": "ab", "completion": "c"}  # 5 tokens: <s> a b \n | c </s>
    long = {"prompt": "a much longer prompt", "completion": "c"}
    assert len(build_dataset([short, short], tok, max_length=5)) == 2
    with pytest.raises(DataFormatError) as info:
        build_dataset([short, long, short, long], tok, max_length=6)
    message = str(info.value)
    assert "2 record(s)" in message and "first: record 1" in message
    assert "every label masked" in message and "max_length=6" in message


# ----------------------------------------------------------------------------------------------------------------------
# collator
# ----------------------------------------------------------------------------------------------------------------------


def features():
    return [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "index": 10, "category": "add", "length": 3},
        {"input_ids": [8], "labels": [8], "index": 11, "category": "sub", "length": 1},
        {"input_ids": [9, 9, 9, 9, 9], "labels": [-100, -100, 9, 9, 9], "index": 12, "category": "iso", "length": 5},
    ]


def test_collator_pads_right_with_minus_100_labels():
    batch = CausalLMCollator(pad_token_id=0)(features())
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # extra columns dropped
    assert all(t.dtype == torch.long and t.shape == (3, 5) for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [9, 9, 9, 9, 9]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [8, -100, -100, -100, -100], [-100, -100, 9, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_collator_pad_id_is_used_for_inputs_only():
    batch = CausalLMCollator(pad_token_id=8)(features())
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 8, 8]
    assert batch["labels"][1].tolist() == [8, -100, -100, -100, -100]  # the real token 8 stays a target


def test_collator_passthrough_keys_only():
    batch = CausalLMCollator(pad_token_id=0, passthrough_keys=("index",))(features())
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}
    assert batch["index"].tolist() == [10, 11, 12]
    # A named key that the features lack is simply absent.
    batch = CausalLMCollator(pad_token_id=0, passthrough_keys=("teacher_row",))(features())
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_collator_pad_to_multiple_of():
    batch = CausalLMCollator(pad_token_id=0, pad_to_multiple_of=4)(features())
    assert batch["input_ids"].shape == (3, 8)
    assert batch["labels"][2].tolist() == [-100, -100, 9, 9, 9, -100, -100, -100]
    assert batch["attention_mask"].sum(1).tolist() == [3, 1, 5]
