"""Teacher logits computed once, before training, and kept in memory.

On a small dataset seen for several epochs the teacher's forward pass is the same every epoch; computing it once
makes a distillation step cost what a plain fine-tuning step costs. Only supervised positions are stored, in the
order ``labels[:, 1:] != -100`` selects them, so a batch's teacher logits are found again from its example indices.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from kd_llm.data.formatting import supervised_token_count

CACHE_INDEX_COLUMN = "kd_example_index"
MAX_CACHE_BYTES = 4 * 1024**3


class InMemoryTeacherLogits:
    def __init__(self, rows: list[torch.Tensor]):
        self.rows = rows  # rows[i]: [supervised positions of example i, V] float32

    @classmethod
    @torch.no_grad()
    def build(cls, teacher, dataset, collator, *, batch_size: int, device, disable_progress: bool = False):
        """Run ``teacher`` over every example of ``dataset`` (which has a ``CACHE_INDEX_COLUMN``)."""
        supervised = supervised_token_count(dataset)
        vocab = teacher.get_output_embeddings().weight.shape[0]
        needed = supervised * vocab * 4
        if needed > MAX_CACHE_BYTES:
            raise MemoryError(
                f"Keeping the teacher's logits in memory would take {needed / 1024**3:.1f} GiB "
                f"({supervised:,} supervised tokens x {vocab:,} vocabulary). Set precompute_teacher_logits=False to "
                "run the teacher live, or use fewer examples."
            )
        rows: list[torch.Tensor | None] = [None] * len(dataset)
        was_training = teacher.training
        teacher.eval()
        lengths = dataset["length"] if "length" in dataset.column_names else [len(x) for x in dataset["input_ids"]]
        order = sorted(range(len(dataset)), key=lengths.__getitem__)
        for start in tqdm(range(0, len(order), batch_size), desc="teacher logits", disable=disable_progress):
            batch = collator([dataset[i] for i in order[start:start + batch_size]])
            logits = teacher(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device), use_cache=False).logits[:, :-1]
            valid = batch["labels"][:, 1:] != -100
            for row, index in enumerate(batch[CACHE_INDEX_COLUMN].tolist()):
                rows[index] = logits[row][valid[row].to(logits.device)].float().cpu()
        teacher.train(was_training)
        return cls(rows)

    def gather(self, cache_index: torch.Tensor, shifted_labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Teacher logits shaped like ``like`` ``[B, T-1, V]``: cached rows at supervised positions, zeros elsewhere
        (never read: the loss selects supervised positions only)."""
        out = torch.zeros(like.shape[:-1] + (self.rows[0].shape[-1],), dtype=torch.float32, device=like.device)
        valid = shifted_labels != -100
        for row, index in enumerate(cache_index.tolist()):
            cached = self.rows[index]
            if cached.shape[0] != int(valid[row].sum()):
                raise RuntimeError(
                    f"Cached teacher logits of example {index} cover {cached.shape[0]} positions but the batch has "
                    f"{int(valid[row].sum())}: the dataset changed after the cache was built."
                )
            out[row][valid[row]] = cached.to(like.device)
        return out
