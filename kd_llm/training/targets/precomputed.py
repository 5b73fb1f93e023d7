"""Teacher logits computed once, before training, and kept in memory (``precompute_teacher_logits``).

On a small dataset seen for several epochs the teacher's forward pass is the same every epoch; computing it once
makes a distillation step cost what a plain fine-tuning step costs. Only supervised positions are stored, in the
order ``labels[:, 1:] != -100`` selects them, so a batch's teacher logits are found again from its example indices.

Memory: all rows live in ONE preallocated ``[supervised tokens, V]`` float32 tensor, with per-example offsets. The
earlier layout, one small tensor per example (9,000 tensors of ~17 KB on the demo), cost about twice its size in
resident memory: each row was allocated from glibc's heap between the teacher's freed per-batch buffers, which the
heap could then neither reuse whole nor return to the system (see benchmarks/README.md, "Precomputed logits").
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from kd_llm.data.formatting import IGNORE_INDEX
from kd_llm.data.packing import supervised_order
from kd_llm.losses import LossComponents, distillation_objective
from kd_llm.training.targets.base import EXAMPLE_INDEX_COLUMN, KDBatch, LossRequest, TeacherTarget, student_logits

MAX_PRECOMPUTED_BYTES = 4 * 1024**3


def supervised_counts(dataset) -> list[int]:
    """Per example: positions a causal LM is trained on (labels after the first that are not -100)."""
    return [sum(label != IGNORE_INDEX for label in labels[1:]) for labels in dataset["labels"]]


class PrecomputedTeacherLogits:
    """The teacher's float32 logits at every supervised position of a training set: ``values[offsets[i]:
    offsets[i + 1]]`` are example ``i``'s rows."""

    def __init__(self, values: torch.Tensor, offsets: torch.Tensor):
        if offsets.shape[0] < 1 or int(offsets[-1]) != values.shape[0]:
            raise ValueError(f"offsets end at {int(offsets[-1])} but there are {values.shape[0]} rows")
        self.values, self.offsets = values, offsets

    @staticmethod
    def offsets_for(counts: list[int]) -> torch.Tensor:
        offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
        return offsets

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()

    def replace_values(self, values: torch.Tensor) -> PrecomputedTeacherLogits:
        """The same examples and positions with other rows (e.g. an ensemble's mixture)."""
        return type(self)(values, self.offsets)

    @classmethod
    @torch.no_grad()
    def build(cls, teacher, dataset, collator, *, batch_size: int, device, disable_progress: bool = False):
        """Run ``teacher`` over every example of ``dataset`` (which has an ``EXAMPLE_INDEX_COLUMN``)."""
        counts = supervised_counts(dataset)
        supervised = sum(counts)
        vocab = teacher.get_output_embeddings().weight.shape[0]
        needed = supervised * vocab * 4
        if needed > MAX_PRECOMPUTED_BYTES:
            raise MemoryError(
                f"Keeping the teacher's logits in memory would take {needed / 1024**3:.1f} GiB "
                f"({supervised:,} supervised tokens x {vocab:,} vocabulary). Set precompute_teacher_logits=False to "
                "run the teacher live, or use fewer examples."
            )
        offsets = cls.offsets_for(counts)
        values = torch.empty(supervised, vocab, dtype=torch.float32)  # allocated once, before any teacher buffer
        was_training = teacher.training
        teacher.eval()
        lengths = dataset["length"] if "length" in dataset.column_names else [len(x) for x in dataset["input_ids"]]
        order = sorted(range(len(dataset)), key=lengths.__getitem__)
        for start in tqdm(range(0, len(order), batch_size), desc="teacher logits", disable=disable_progress):
            batch = collator([dataset[i] for i in order[start:start + batch_size]])
            logits = teacher(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device), use_cache=False).logits[:, :-1]
            valid = (batch["labels"][:, 1:] != IGNORE_INDEX).to(logits.device)
            for row, index in enumerate(batch[EXAMPLE_INDEX_COLUMN].tolist()):
                values[int(offsets[index]):int(offsets[index + 1])].copy_(logits[row][valid[row]])
            del logits
        teacher.train(was_training)
        return cls(values, offsets)

    def gather(self, example_index: torch.Tensor, shifted_labels: torch.Tensor, like: torch.Tensor,
               packed_example_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher logits shaped like ``like`` ``[B, T-1, V]``: stored rows at supervised positions, zeros elsewhere
        (never read: the loss selects supervised positions only); a padded batch or, with ``packed_example_ids``,
        a packed one (:func:`kd_llm.data.packing.supervised_order`)."""
        out = torch.zeros(like.shape[:-1] + (self.values.shape[-1],), dtype=torch.float32, device=like.device)
        valid = shifted_labels != IGNORE_INDEX
        pieces = []
        for index, count in zip(*supervised_order(example_index, shifted_labels, packed_example_ids)):
            start, end = int(self.offsets[index]), int(self.offsets[index + 1])
            if end - start != count:
                raise RuntimeError(
                    f"Precomputed teacher logits of example {index} cover {end - start} positions but the batch has "
                    f"{count}: the dataset changed after they were computed."
                )
            pieces.append(self.values[start:end])
        if pieces:
            out[valid] = torch.cat(pieces).to(like.device)  # row-major, as the per-row selections concatenated
        return out


class PrecomputedLogits(TeacherTarget):
    """Training batches of the dataset read their teacher logits from a :class:`PrecomputedTeacherLogits` (dense
    loss). Evaluation and generated batches need another target (:class:`~kd_llm.training.targets.routed.Routed`)."""

    name = "precomputed teacher logits in memory (dense)"
    fused = False
    serves_evaluation = False
    scores_generated = False

    def __init__(self, store: PrecomputedTeacherLogits):
        self.store = store

    def terms(self, student_outputs, batch: KDBatch, request: LossRequest) -> LossComponents:
        logits = student_logits(student_outputs)
        teacher = None if request.alpha >= 1 else self.store.gather(batch.example_index, batch.shifted_labels, logits,
                                                                    batch.packed_example_ids)
        return distillation_objective(logits, teacher, batch.shifted_labels, kd_vocab_size=request.kd_vocab_size,
                                      **request.objective_kwargs)

    def serves(self, batch: KDBatch, *, training: bool) -> bool:
        return super().serves(batch, training=training) and batch.example_index is not None
