"""The one base class of kd_llm's own errors, and the families the scripts report.

Every error kd_llm raises on purpose, for a problem the user can fix (a setting, a file, a checkpoint, a model that
does not fit), derives from :class:`KdLlmError`. The scripts catch it at their boundary (``kd_llm.boundary``) and
print ``<script>: <message>`` as their last line, without a traceback. The families also keep the builtin class the
error always had (``ValueError``, ``FileNotFoundError`` ...), so callers of the Python API that catch those still do.
"""

from __future__ import annotations


class KdLlmError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it."""


class ConfigError(KdLlmError, ValueError):
    """A setting (YAML file, command line, dataclass field) that cannot be used."""


class DataError(KdLlmError, ValueError):
    """A dataset, data file or record that cannot be used."""


class ModelFileError(KdLlmError, ValueError):
    """A model folder or weight file that cannot be loaded (missing, truncated, corrupt)."""


class CheckpointError(KdLlmError, ValueError):
    """A training checkpoint that cannot be resumed from (missing, incomplete, corrupt)."""


class OutputError(KdLlmError, OSError):
    """An output folder or file that cannot be written (not a folder, read-only, disk full)."""


class MissingPathError(KdLlmError, FileNotFoundError):
    """A file or folder the user named that does not exist."""
