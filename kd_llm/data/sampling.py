"""A training sampler that keeps optimizer steps i.i.d. while keeping padding low.

Grouping a whole dataset by length (``LengthGroupedSampler``) wastes little padding, but when the length tells the
kind of example apart (date-arithmetic categories differ in length), each optimizer step then sees one kind only,
and a small model learns much more slowly from such correlated steps. Here the data is shuffled, cut into chunks of
one optimizer step (``batch_size * gradient_accumulation_steps`` examples), and only *within* a chunk sorted by
length: each micro-batch is padded tightly, and each step still sees a random mix.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class StepShuffledLengthSampler(Sampler[int]):
    def __init__(self, lengths: list[int], step_size: int, seed: int = 0):
        if step_size < 1:
            raise ValueError(f"step_size must be at least 1, got {step_size}.")
        self.lengths = list(lengths)
        self.step_size = step_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Trainer each epoch; the order depends on (seed, epoch) only, so a resumed run replays it."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        for start in range(0, len(order), self.step_size):
            chunk = order[start:start + self.step_size]
            yield from sorted(chunk, key=lambda index: self.lengths[index])
