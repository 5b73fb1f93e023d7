"""The scripts' boundary: a problem the user can fix ends the script with one line, ``<script>: <message>``, as the
last thing printed, and a non-zero exit status; the traceback only on request (``--debug`` or ``KD_LLM_DEBUG=1``).

What counts as such a problem: every :class:`~kd_llm.errors.KdLlmError`; a ``ValueError``, ``TypeError``,
``LookupError``, ``OSError``, ``RuntimeError`` or ``ImportError`` raised by a ``raise`` statement of kd_llm itself
(its checks, which predate the base class); and the library errors :func:`translate` knows (full disk, permission
denied, damaged safetensors file, out of memory, Ctrl-C). Anything else is a bug, and keeps its traceback.

Under ``accelerate launch`` the script runs as a child process, and accelerate adds its own traceback after the
child's exit unless launched with ``-q`` (``--quiet``): ``accelerate launch -q scripts/distill_llm.py ...`` keeps
kd_llm's line the last one.
"""

from __future__ import annotations

import errno
import linecache
import os
import sys
import traceback
from pathlib import Path

from kd_llm.errors import KdLlmError

DEBUG_ENV = "KD_LLM_DEBUG"
DEBUG_FLAG = "--debug"
_PACKAGE = str(Path(__file__).resolve().parent)
_OWN_TYPES = (ValueError, TypeError, LookupError, OSError, RuntimeError, ImportError)
DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _raised_by_kd_llm(error: BaseException) -> bool:
    """Whether ``error`` comes from a ``raise`` statement in kd_llm's own source (not from a library it called)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = str(Path(tb.tb_frame.f_code.co_filename).resolve())
    if not filename.startswith(_PACKAGE + os.sep):
        return False
    return linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).strip().startswith("raise")


def translate(error: BaseException) -> str | None:
    """One line for a library error a user can act on, or None when it is not one."""
    try:
        import torch

        if isinstance(error, torch.OutOfMemoryError):
            return ("out of memory on the device: lower per_device_train_batch_size or max_length, or turn on "
                    "gradient_checkpointing, fused_loss or bf16.")
    except ImportError:
        pass
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        where = f" while writing {error.filename}" if error.filename else ""
        return f"the disk is full{where}. Free some space and run again (older checkpoints are kept)."
    if isinstance(error, PermissionError):
        return (f"permission denied: {error.filename or error}. Choose a folder you can write to (output_dir), or fix "
                "its permissions.")
    if type(error).__name__ == "SafetensorError":
        return (f"a .safetensors weight file is damaged ({error}); save or copy the model again.")
    if isinstance(error, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({error}); save it as UTF-8."
    return None


def user_message(error: BaseException) -> str | None:
    """The one line to print for ``error``, or None when it is a bug (keep the traceback)."""
    if isinstance(error, KdLlmError) or (isinstance(error, _OWN_TYPES) and _raised_by_kd_llm(error)):
        message = str(error) or type(error).__name__
    else:
        message = translate(error)
    if message is None:
        return None
    return " ".join(message.split())  # one line, whatever the message's own layout


def debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def run_script(main, name: str, argv: list[str] | None = None):
    """Run ``main(argv)`` behind the boundary (see the module docstring); ``--debug`` is taken out of ``argv``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return main(argv)
    except KeyboardInterrupt:
        _finish(f"{name}: interrupted. Checkpoints already written are complete; resume with "
                "--resume_from_checkpoint true.", debug, status=130)
    except Exception as error:  # noqa: BLE001 - the boundary: every error is either one line or re-raised
        message = user_message(error)
        if message is None:
            raise
        _finish(f"{name}: {message}", debug, status=1)


def _finish(line: str, debug: bool, status: int) -> None:
    if debug:
        traceback.print_exc()
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(status)
