"""A character-level tokenizer for the small specialist models that kd_llm ships and trains from scratch.

It is an ordinary ``PreTrainedTokenizerFast`` (a ``tokenizers`` BPE model with no merges, so every character is one
token), saved and reloaded with ``AutoTokenizer`` like any other, and it carries a chat template. That lets the
specialist teacher and its students go through exactly the same data, training and evaluation code as a pretrained
LLM.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
DEFAULT_CHARACTERS = string.digits + string.ascii_letters + " \n,.:;+-=<>?!()'/~#_|*%"

# The user turn opens with BOS; the assistant turn follows a newline (the generation prompt) and ends with EOS.
# {% generation %} marks the assistant tokens for return_assistant_tokens_mask.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token }}{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\\n' }}{% generation %}{{ message['content'] }}{{ eos_token }}"
    "{% endgeneration %}"
    "{% elif message['role'] == 'system' %}{{ message['content'] }}{{ '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n' }}{% endif %}"
)


def build_char_tokenizer(characters: str = DEFAULT_CHARACTERS) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per character of ``characters`` plus ``<pad> <s> </s> <unk>`` (ids 0-3).

    The pad token is distinct from EOS on purpose, but kd_llm's collator never relies on that: labels come from the
    formatting step, not from comparing ids with the pad id.
    """
    if len(set(characters)) != len(characters):
        raise ValueError("characters must not repeat")
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for char in characters:
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
