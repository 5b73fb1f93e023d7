"""How a hidden-state teacher cache stores the teacher's final (post-norm) hidden states: ``[N, d]`` rows, one per
supervised position, in one of :data:`HIDDEN_DTYPES`.

- ``float32``: exact (4 d bytes per token); what the exactness tests use.
- ``float16`` (default): 2 d bytes; 11 significant bits, 8 times finer than bfloat16's 8. Post-norm hidden states are
  O(1-100), far inside float16's range (65,504); a value outside it is refused at write time (use ``bfloat16``).
  The loss errors of each choice are measured in benchmarks/README.md ("Hidden-state teacher cache").
- ``bfloat16``: 2 d bytes, float32's range, coarser; stored as its raw 16-bit pattern (Arrow has no bfloat16).
- ``int8``: d + 4 bytes: ``round(127 h / max|h|)`` per row with the row's float32 scale. Measured, not offered by
  scripts/cache_teacher.py: post-norm states carry a few outlier dimensions that set the scale, so the rest get few
  levels, and on SmolLM2-135M it misses the 0.1% bar (+0.05% forward KL at T = 1, +0.23% at T = 2, +0.58% reverse
  KL at T = 2); the writer still takes it, for experiments.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

HIDDEN_DTYPES = ("float16", "bfloat16", "float32", "int8")
OFFERED_HIDDEN_DTYPES = ("float16", "bfloat16", "float32")  # within 0.1% of the dense loss (benchmarks/README.md)
DEFAULT_HIDDEN_DTYPE = "float16"  # the smallest measured error of the 2-byte formats
FLOAT16_MAX = 65504.0


def check_hidden_dtype(dtype: str) -> None:
    if dtype not in HIDDEN_DTYPES:
        raise ValueError(f"Unknown hidden-state dtype {dtype!r}; valid ones are: {', '.join(HIDDEN_DTYPES)}.")


def encode_hidden(hidden: Tensor, dtype: str) -> dict[str, np.ndarray]:
    """Arrays to store for ``hidden [N, d]``: ``hidden`` (``[N, d]`` in the storage dtype) and, for int8, ``scale``."""
    check_hidden_dtype(dtype)
    hidden = hidden.detach().to("cpu", torch.float32)
    if not torch.isfinite(hidden).all():
        raise ValueError("The teacher's hidden states hold inf or NaN values: check the teacher (its dtype, its "
                         "weights) before caching it.")
    if dtype == "float32":
        return {"hidden": hidden.numpy()}
    if dtype == "float16":
        largest = float(hidden.abs().max()) if hidden.numel() else 0.0
        if largest > FLOAT16_MAX:
            raise ValueError(f"A teacher hidden state reaches {largest:.4g}, beyond float16's range ({FLOAT16_MAX:g}): "
                             "use cache_hidden_dtype=bfloat16 (or float32).")
        return {"hidden": hidden.numpy().astype(np.float16)}
    if dtype == "bfloat16":
        return {"hidden": hidden.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)}
    scale = hidden.abs().amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    quantised = torch.round(hidden / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return {"hidden": quantised.numpy(), "scale": scale.numpy()}


def decode_hidden(hidden: np.ndarray, scale: np.ndarray | None, dtype: str) -> Tensor:
    """Inverse of :func:`encode_hidden`: ``[N, d]`` float32."""
    check_hidden_dtype(dtype)
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(hidden).view(np.int16)).view(torch.bfloat16).float()
    values = torch.from_numpy(np.ascontiguousarray(hidden)).float()
    if dtype == "int8":
        values = values * torch.from_numpy(np.ascontiguousarray(scale)).float().unsqueeze(-1)
    return values


def hidden_columns(encoded: dict[str, np.ndarray]) -> dict[str, pa.Array]:
    """Arrow columns of encoded rows: ``hidden`` (fixed-size lists of d) and, for int8, ``scale``."""
    values = encoded["hidden"]
    columns = {"hidden": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])}
    if "scale" in encoded:
        columns["scale"] = pa.array(encoded["scale"])
    return columns
