"""Turn records into ``input_ids`` and ``labels`` for causal-LM training.

Three record shapes are accepted:

* ``{"prompt": ..., "completion": ...}`` (strings, or lists of chat messages): the prompt is masked to -100;
* ``{"messages": [...]}``: only assistant turns are supervised;
* ``{"text": ...}``: every token is supervised.

Chat records go through the tokenizer's chat template. Labels are decided here, from the template, never later from
token ids: a tokenizer whose pad token equals its EOS token still has its final EOS supervised, so the student learns
to stop.
"""

from __future__ import annotations

from typing import Any

from kd_llm.errors import DataError

IGNORE_INDEX = -100
# Without a chat template, prompt and completion are joined by this, so the model can see where the prompt ends.
PLAIN_SEPARATOR = "\n"
RECORD_SHAPES = "{'prompt', 'completion'}, {'messages'} or {'text'}"


class DataFormatError(DataError):
    """A record that cannot be turned into training data; the message says which and why."""


def record_shape(record: dict[str, Any]) -> str:
    """``"prompt_completion"``, ``"messages"`` or ``"text"``; a clear error for anything else."""
    if not isinstance(record, dict):
        raise DataFormatError(f"Each record must be a JSON object with {RECORD_SHAPES}, got {type(record).__name__}.")
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "messages" in record:
        return "messages"
    if "text" in record:
        return "text"
    raise DataFormatError(f"Record has keys {sorted(record)}; expected {RECORD_SHAPES}.")


def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataFormatError(
            f"Tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template, so prompt/completion and "
            "messages records cannot be formatted. Use a tokenizer with a chat template (an instruct model), set "
            "tokenizer.chat_template, or pass use_chat_template=False to join prompt and completion as plain text."
        )


def _as_messages(value: Any, role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return list(value)
    raise DataFormatError(f"'{role}' part must be a string or a list of {{'role', 'content'}} messages, got {value!r}.")


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _supervise_turns(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Render the whole conversation once and unmask each assistant turn, found as the difference between the
    rendering up to that turn (with the generation prompt) and the rendering through it."""
    input_ids = _render(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(input_ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], add_generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if through[: len(before)] != before or input_ids[: len(through)] != through:
            raise DataFormatError(
                "The chat template does not render conversations as prefixes of each other, so the assistant turn "
                "cannot be located. Use a template whose rendering of a prefix of the messages is a prefix of the "
                "rendering of the whole."
            )
        labels[len(before) : len(through)] = through[len(before) :]
    return input_ids, labels


def format_record(
    record: dict[str, Any],
    tokenizer,
    *,
    max_length: int | None = None,
    use_chat_template: bool = True,
) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` for one record. Raises :class:`DataFormatError` with the reason."""
    shape = record_shape(record)
    if shape == "text":
        text = record["text"]
        if not isinstance(text, str) or not text:
            raise DataFormatError(f"'text' must be a non-empty string, got {text!r}.")
        input_ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not input_ids or input_ids[-1] != tokenizer.eos_token_id):
            input_ids = input_ids + [tokenizer.eos_token_id]
        labels = list(input_ids)
        if tokenizer.bos_token_id is not None and input_ids and input_ids[0] == tokenizer.bos_token_id:
            labels[0] = IGNORE_INDEX  # nothing predicts BOS
    elif not use_chat_template:
        if shape != "prompt_completion" or not all(isinstance(record[k], str) for k in ("prompt", "completion")):
            raise DataFormatError("Without a chat template only string prompt/completion or text records work.")
        if tokenizer.eos_token_id is None:
            raise DataFormatError("The tokenizer has no EOS token, so completions cannot end; set tokenizer.eos_token.")
        prompt_ids = tokenizer(record["prompt"] + PLAIN_SEPARATOR, add_special_tokens=True)["input_ids"]
        completion_ids = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        completion_ids = completion_ids + [tokenizer.eos_token_id]
        input_ids = prompt_ids + completion_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    else:
        require_chat_template(tokenizer)
        if shape == "prompt_completion":
            messages = _as_messages(record["prompt"], "user") + _as_messages(record["completion"], "assistant")
        else:
            messages = _as_messages(record["messages"], "user")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataFormatError("A chat record needs at least one assistant message to supervise.")
        input_ids, labels = _supervise_turns(tokenizer, messages)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def format_prompt(record: dict[str, Any], tokenizer, *, use_chat_template: bool = True) -> list[int]:
    """The token ids a model is given at generation time: the prompt with the chat template's generation prompt."""
    prompt = record["prompt"]
    if not use_chat_template:
        return tokenizer(prompt + PLAIN_SEPARATOR, add_special_tokens=True)["input_ids"]
    require_chat_template(tokenizer)
    return _render(tokenizer, _as_messages(prompt, "user"), add_generation_prompt=True)


def supervised_token_count(dataset) -> int:
    """Positions a causal LM is trained on: labels after the first (shifted) that are not -100. (Here, not in
    ``sources``, so that training imports no ``datasets``: a GPU machine may not have it.)"""
    return sum(sum(label != IGNORE_INDEX for label in labels[1:]) for labels in dataset["labels"])
