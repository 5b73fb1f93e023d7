"""Checks of weight files before anything reads or sends them: a ``.safetensors`` file whose header does not parse,
or whose size is not what its header promises (a half-written or truncated file), is named in one clear line."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from kd_llm.errors import ModelFileError

# safetensors caps the JSON header at 100 MB; a larger length means the first 8 bytes are not a header length.
MAX_HEADER_BYTES = 100_000_000


def safetensors_problem(path: str | Path) -> str | None:
    """What is wrong with the ``.safetensors`` file at ``path`` (None when it is whole): a header that does not
    parse, or a size that differs from the end of its last tensor (truncated, or bytes appended)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return f"{size} bytes: too short for a safetensors header (truncated or empty)"
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                return f"its header claims {length:,} bytes but the file has {size:,} (truncated or not safetensors)"
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"its header cannot be read ({type(error).__name__}: {error})"
    if not isinstance(header, dict):
        return "its header is not a mapping of tensors"
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        return (f"{size:,} bytes, but its header describes {expected:,}: "
                + ("truncated (a half-written file?)" if size < expected else "extra bytes after the last tensor"))
    return None


def check_weight_files(folder: str | Path, what: str = "Model folder") -> None:
    """Raise :class:`ModelFileError` naming the first broken ``.safetensors`` file under ``folder``."""
    for path in sorted(Path(folder).rglob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem is not None:
            raise ModelFileError(f"{what} {str(folder)!r}: weight file {str(path)!r} is damaged: {problem}. "
                                 "Save or copy the model again.")
