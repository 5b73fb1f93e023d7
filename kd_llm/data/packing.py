"""Padding-free packing: a micro-batch's examples concatenated into a few rows, each example still attending only to
itself.

A packed batch (what :class:`PackingCollator` returns) holds

- ``input_ids`` and ``labels`` ``[R, L]``: each row a best-fit bin of whole examples, padded at its end;
  ``labels`` are -100 on padding *and on the first token of every example*, so the shifted labels never score one
  example's last position onto the next example's first token (that label is dropped by the shift when unpacked);
- ``position_ids`` ``[R, L]``: restarting at 0 at every example (and at the row's padding, its own segment);
- no ``attention_mask``: transformers (5.x ``masking_utils``) builds a block-causal mask from restarting
  ``position_ids`` for sdpa, eager and flex attention *only when the 2-D attention mask is None*; any 2-D mask, even
  all ones, turns that detection off and lets examples attend across each other. Flash-attention detects packing
  only in a single flattened row (batch size 1), so rows of several examples are refused there
  (:func:`packing_attention_problem`);
- ``packed_example_ids`` (:data:`PACKED_EXAMPLE_KEY`) ``[R, L]``: which example (0..N-1, in the order the
  collator received them) each token belongs to, -1 on padding. The trainer pops it before any forward; it gives
  the valid-token mask, the per-example attention blocks of the feature terms, and the re-layout of per-example
  teacher targets (:func:`pack_shifted`). A pass-through key such as the cache index stays ``[N]`` in that order,
  so ``example_index[packed_example_ids]`` is each token's row of the training set (-1 aside);
- stored teacher targets (precomputed logits, the top-k and hidden-state caches) keep each example's rows
  contiguous, in position order; :func:`supervised_order` says in which order of examples, and with how many rows
  each, they lay into a padded or packed batch's supervised positions;
- with ``prompt_starts=True`` (on-policy and seq_kd runs), ``kd_prompt_starts`` (:data:`PROMPT_START_KEY`) ``[N]``:
  where each example's first supervised label is (its prompt's length), which the packed labels no longer tell when
  an example is supervised from its first token (that label is masked). The generator reads it
  (``kd_llm.training.on_policy.packed_prompts``); the trainer pops it with the other ``kd_*`` keys.

Every model (student and teacher) is called with :func:`model_inputs`, so both see the same rows and positions.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from kd_llm.data.formatting import IGNORE_INDEX

logger = logging.getLogger(__name__)
PACKED_EXAMPLE_KEY = "packed_example_ids"
PROMPT_START_KEY = "kd_prompt_starts"
OVERLONG_CHOICES = ("error", "truncate")
# Attention implementations whose masks transformers builds from packed position_ids (see the module docstring).
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention")


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: indices of ``lengths`` grouped into bins of total ``<= capacity``.

    Longest first, each into the open bin with the least room that still fits it (else a new bin); every length
    must be ``<= capacity``. Deterministic (ties keep the input order)."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"best_fit: a length exceeds the capacity {capacity}: {max(lengths)}.")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free space, bin number)
    for index in order:
        n = lengths[index]
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            free, number = room.pop(at)
        else:
            free, number = capacity, len(bins)
            bins.append([])
        bins[number].append(index)
        bisect.insort(room, (free - n, number))
    return bins


@dataclass
class PackingCollator:
    """Packs tokenized examples (``input_ids``, ``labels``) into rows of at most ``max_length`` tokens.

    ``max_length=0``: rows as long as the micro-batch's longest example, so a packed batch never holds more tokens
    than the padded one. An example longer than ``max_length`` is an error (``overlong="error"``) or cut to
    ``max_length`` tokens (``"truncate"``, counted in ``truncated``); it is never split across rows.
    Integer features named in ``passthrough_keys`` become ``[N]`` tensors in example order; other columns are dropped.
    ``prompt_starts``: also return each example's first supervised position (:data:`PROMPT_START_KEY`).
    """

    pad_token_id: int
    max_length: int = 0
    overlong: str = "error"
    passthrough_keys: tuple[str, ...] = ()
    pad_to_multiple_of: int | None = None
    prompt_starts: bool = False

    def __post_init__(self):
        if self.overlong not in OVERLONG_CHOICES:
            raise ValueError(f"overlong must be one of {OVERLONG_CHOICES}, got {self.overlong!r}.")
        if self.max_length < 0:
            raise ValueError(f"max_length must be >= 0 (0: the longest example), got {self.max_length}.")
        self.truncated = 0

    def __call__(self, features: list[dict]) -> dict[str, Tensor]:
        ids = [list(f["input_ids"]) for f in features]
        labels = [list(f["labels"]) for f in features]
        capacity = self.max_length or max(len(x) for x in ids)
        for i, tokens in enumerate(ids):
            if len(tokens) > capacity:
                if self.overlong == "error":
                    raise ValueError(
                        f"packing: an example has {len(tokens)} tokens, more than packing_max_length={capacity}. "
                        "Raise packing_max_length, cut examples when building the dataset (max_length), or set "
                        "packing_overlong=truncate.")
                ids[i], labels[i] = tokens[:capacity], labels[i][:capacity]
                if self.truncated == 0:  # said once, then counted in `truncated`
                    logger.warning("packing_overlong=truncate: an example of %d tokens was cut to "
                                   "packing_max_length=%d (further cuts are counted, not logged).",
                                   len(tokens), capacity)
                self.truncated += 1
        rows = best_fit([len(x) for x in ids], capacity)
        width = max(sum(len(ids[i]) for i in row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        packed_labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        example_ids = torch.full(shape, -1, dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                n = len(ids[i])
                input_ids[r, start:start + n] = torch.as_tensor(ids[i])
                packed_labels[r, start:start + n] = torch.as_tensor(labels[i])
                packed_labels[r, start] = IGNORE_INDEX  # the previous example's last position must not predict it
                position_ids[r, start:start + n] = torch.arange(n)
                example_ids[r, start:start + n] = i
                start += n
            position_ids[r, start:] = torch.arange(width - start)  # padding: a segment of its own
        batch = {"input_ids": input_ids, "labels": packed_labels, "position_ids": position_ids,
                 PACKED_EXAMPLE_KEY: example_ids}
        for key in self.passthrough_keys:
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features])
        if self.prompt_starts:
            batch[PROMPT_START_KEY] = torch.tensor([next((p for p, label in enumerate(row) if label != IGNORE_INDEX),
                                                         len(row)) for row in labels], dtype=torch.long)
        return batch


def model_inputs(inputs: dict) -> dict:
    """The keys a causal LM's forward takes from a (packed or padded) batch: ``input_ids`` plus ``attention_mask``
    and ``position_ids`` when present. Call the teacher with these, never with a made-up mask of ones."""
    return {key: inputs[key] for key in ("input_ids", "attention_mask", "position_ids") if inputs.get(key) is not None}


def valid_tokens(inputs: dict, example_ids: Tensor | None = None) -> Tensor:
    """``[B, T]`` bool: real tokens (not padding) of a packed (``example_ids``) or padded batch."""
    if example_ids is not None:
        return example_ids >= 0
    if inputs.get("attention_mask") is not None:
        return inputs["attention_mask"].bool()
    return torch.ones_like(inputs["input_ids"], dtype=torch.bool)


def token_segments(inputs: dict, example_ids: Tensor | None = None) -> Tensor:
    """``[B, T]`` long: the example each token attends within (-1 on padding); one segment per row when unpacked."""
    if example_ids is not None:
        return example_ids
    return valid_tokens(inputs).long() - 1


def pack_shifted(per_example: Tensor, example_ids: Tensor, position_ids: Tensor, fill: float = 0.0) -> Tensor:
    """Re-lay per-example targets aligned with each example's shifted labels into a packed batch's shifted layout.

    ``per_example`` ``[N, T_max - 1, ...]`` (row ``e``, position ``p``: the target for predicting token ``p + 1`` of
    example ``e``); returns ``[R, L - 1, ...]``, ``fill`` where the shifted label is masked by packing (example
    boundaries and padding)."""
    current, following = example_ids[:, :-1], example_ids[:, 1:]
    inside = (current >= 0) & (current == following)
    rows = current.clamp_min(0)
    positions = position_ids[:, :-1].clamp(0, per_example.shape[1] - 1)
    out = per_example[rows, positions]
    mask = inside.reshape(*inside.shape, *([1] * (per_example.dim() - 2)))
    return torch.where(mask, out, torch.as_tensor(fill, dtype=out.dtype, device=out.device))


def supervised_order(example_index: Tensor, shifted_labels: Tensor,
                     example_ids: Tensor | None = None) -> tuple[list[int], list[int]]:
    """The batch's examples (their ``example_index`` entries: rows of the training set) in the order a loss meets
    their supervised positions (row-major over ``shifted_labels != -100``), and how many each has in the batch.

    Stored teacher targets hold each example's supervised positions contiguously and in order, so concatenating
    them example by example in this order lays them onto the batch's supervised positions: padded (``example_ids``
    None: one example per row), or packed (each row holds whole examples, one after the other, and every
    supervised position lies inside one example: the label on an example's first token is masked)."""
    supervised = shifted_labels != IGNORE_INDEX
    if example_ids is None:
        return example_index.tolist(), supervised.sum(-1).tolist()
    count = example_index.shape[0]
    flat = example_ids.reshape(-1)
    real = flat >= 0
    first = torch.full((count,), flat.numel(), dtype=torch.long, device=flat.device)
    first.scatter_reduce_(0, flat[real], torch.arange(flat.numel(), device=flat.device)[real], "amin")
    order = torch.argsort(first).cpu()
    # A shifted label is supervised only inside one example (boundaries are masked): it belongs to its position's.
    counts = torch.bincount(example_ids[:, :-1][supervised].cpu(), minlength=count)
    return example_index.cpu()[order].tolist(), counts[order].tolist()


def unpack(packed: Tensor, example_ids: Tensor, count: int | None = None) -> list[Tensor]:
    """The per-token values ``[R, L, ...]`` of each example of a packed batch, in example order (``[T_i, ...]``)."""
    count = int(example_ids.max()) + 1 if count is None else count
    return [packed[example_ids == e] for e in range(count)]


def packing_attention_problem(model, role: str) -> str | None:
    """Why ``model``'s attention implementation cannot isolate packed examples in rows (None when it can)."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager"
    if implementation in PACKING_ATTENTION:
        return None
    return (f"the {role} uses attn_implementation={implementation!r}, which isolates packed examples only in one "
            f"flattened row (flash-attention varlen); kd_llm packs rows of several examples, isolated by the "
            f"position_ids mask of {', '.join(PACKING_ATTENTION)}: load it with attn_implementation='sdpa' or "
            "set packing=False")
