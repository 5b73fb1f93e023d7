"""Batched greedy generation for evaluation: left padding, the KV cache, and a tokens-per-second measurement."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class GenerationResult:
    completions: list[str]
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def left_pad(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists so that every prompt ends at the last column, where generation starts."""
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.as_tensor(prompt)
        attention_mask[row, longest - len(prompt):] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def generate_greedy(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 64,
    progress: bool = False,
) -> GenerationResult:
    """Greedy completions of tokenized ``prompts``, decoded without special tokens.

    Prompts are sorted by length so batches waste little padding, then returned in the original order.
    """
    if not prompts:
        raise ValueError("generate_greedy needs at least one prompt.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    completions: list[str] = [""] * len(prompts)
    new_tokens = 0
    started = time.perf_counter()
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="generating", disable=not progress, leave=False):
        rows = order[start:start + batch_size]
        input_ids, attention_mask = left_pad([prompts[i] for i in rows], pad_id, device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        generated = output[:, input_ids.shape[1]:]
        for row, index in enumerate(rows):
            tokens = generated[row]
            if tokenizer.eos_token_id is not None:
                stops = (tokens == tokenizer.eos_token_id).nonzero()
                if len(stops):
                    tokens = tokens[: stops[0, 0] + 1]
            new_tokens += len(tokens)  # cut at the first EOS, so every token left was generated (pad id or not)
            completions[index] = tokenizer.decode(tokens, skip_special_tokens=True)
    seconds = time.perf_counter() - started
    model.train(was_training)
    return GenerationResult(completions, new_tokens, seconds)
