"""Bits per byte: against a naive per-token loop, a uniform model's closed form, windows that count every byte once
(the report and model card that show it: tests/test_report.py)."""

import math

import pytest
import torch

from kd_llm.evaluation.bits_per_byte import bits_per_byte, debian_license_texts, load_bpb_text, text_windows
from kd_llm.models.char_tokenizer import build_char_tokenizer
from tests.conftest import tiny_llama
from tests.helpers.tokenizers import REAL_TEXTS, needs_gemma, needs_smollm2, packaged_tokenizer

TEXTS = ["the cat sat on the mat.", "a b c\n\nd e f", "x"]


def naive_bits(model, tokenizer, text):
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    bits = 0.0
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    for position in range(1, len(ids)):
        bits -= torch.log_softmax(logits[position - 1].double(), -1)[ids[position]].item() / math.log(2)
    return bits


def test_matches_a_naive_per_token_sum_in_bits_over_utf8_bytes():
    tokenizer = build_char_tokenizer()
    model = tiny_llama(len(tokenizer), seed=3)
    measured = bits_per_byte(model, tokenizer, TEXTS, batch_size=2)
    expected_bits = sum(naive_bits(model, tokenizer, text) for text in TEXTS)
    assert measured.bits == pytest.approx(expected_bits, rel=1e-5)
    assert measured.bytes == sum(len(t.encode()) for t in TEXTS)
    assert measured.tokens == sum(len(t) for t in TEXTS)  # one token per character, every one scored
    assert measured.bits_per_byte == pytest.approx(expected_bits / measured.bytes, rel=1e-5)
    assert model.training  # put back as found


def test_a_uniform_model_costs_log2_v_bits_per_token():
    tokenizer = build_char_tokenizer()
    model = tiny_llama(len(tokenizer), seed=0)
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: the uniform distribution over V
    measured = bits_per_byte(model, tokenizer, TEXTS, max_tokens=4)  # windows do not matter to a uniform model
    assert measured.bits_per_byte == pytest.approx(math.log2(len(tokenizer)) * measured.tokens / measured.bytes)


@needs_gemma
@needs_smollm2
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
@pytest.mark.parametrize("max_tokens", [3, 7, 512])
def test_windows_count_every_byte_exactly_once_with_real_tokenizers(name, max_tokens):
    tokenizer = packaged_tokenizer(name)
    for text in REAL_TEXTS:
        windows = text_windows(tokenizer, text, max_tokens)
        assert sum(size for _, size in windows) == len(text.encode("utf-8"))
        assert [t for ids, _ in windows for t in ids] == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert all(0 < len(ids) <= max_tokens - 1 for ids, _ in windows)
        # Each window decodes to whole characters (no byte piece cut off from its character).
        assert "".join(tokenizer.decode(ids) for ids, _ in windows) == text


def test_text_that_does_not_round_trip_is_refused():
    with pytest.raises(ValueError, match="does not reproduce this text"):
        text_windows(build_char_tokenizer(), "café", 16)


def test_debian_licences_are_the_held_out_text_and_cut_at_a_line_break():
    texts = debian_license_texts(("Apache-2.0", "MPL-2.0"))
    assert texts["Apache-2.0"].lstrip().startswith("Apache License") and len(texts["MPL-2.0"]) > 10_000
    cut = load_bpb_text("debian-licenses", 1000)
    assert len(cut.encode()) <= 1000 and cut.endswith("\n") and cut.startswith(texts["Apache-2.0"][:50])
    with pytest.raises(FileNotFoundError, match="neither debian-licenses nor a text file"):
        load_bpb_text("/nonexistent.txt")
