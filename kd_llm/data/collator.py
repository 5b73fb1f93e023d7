"""Pad formatted examples into a batch. Labels are padded with -100 and never derived from the pad id."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kd_llm.data.formatting import IGNORE_INDEX


@dataclass
class CausalLMCollator:
    """Right-pads ``input_ids`` with ``pad_token_id`` and ``labels`` with -100; builds the attention mask.

    Integer features named in ``passthrough_keys`` (e.g. an index into a teacher cache) become 1-D tensors; every
    other extra column (``category``, ``length``) is dropped, so it never reaches the model's forward.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    passthrough_keys: tuple[str, ...] = ()

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.as_tensor(feature["input_ids"])
            labels[row, :n] = torch.as_tensor(feature["labels"])
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for key in self.passthrough_keys:
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features])
        return batch
