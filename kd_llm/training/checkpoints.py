"""Atomic checkpoints and careful resumes, for every kd_llm trainer (mixed in before ``transformers.Trainer``).

Saving: ``Trainer._save_checkpoint`` writes ``checkpoint-N`` piece by piece (weights, projections, EMA or online
teacher, optimizer, scheduler, RNG, trainer state); a process killed in between used to leave a newest checkpoint
that looked whole but was not. Here the whole checkpoint is written inside ``.incomplete-checkpoint-N/`` (a name
that ``get_last_checkpoint`` ignores) and renamed to ``checkpoint-N`` only when every file is on disk, so a
``checkpoint-N`` folder is always complete. A full disk abandons the save, names the file, and keeps the older
checkpoints.

Resuming: ``resume_from_checkpoint=True`` (or ``"true"`` from the command line) takes the newest *complete*
checkpoint and names, in one line each, the incomplete ones it skips; a named checkpoint that is missing, partial,
corrupt or without its optimizer state is refused with one line, before any training. Every ``training_args.bin``
is written without the Hub token (kd_llm.secret_filter).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from kd_llm.errors import CheckpointError, OutputError
from kd_llm.models.weight_files import safetensors_problem
from kd_llm.secret_filter import secrets_removed

STAGING_PREFIX = ".incomplete-"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_STAGING = re.compile(rf"^{re.escape(STAGING_PREFIX)}{PREFIX_CHECKPOINT_DIR}-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                "pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
# Sharded runs keep weights and optimizer states in folders (DeepSpeed global_stepN/, FSDP pytorch_model_fsdp_0/).
SHARDED_STATE = re.compile(r"^(global_step\d+|pytorch_model_fsdp_\d+|optimizer_\d+)$")
DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1"), ("false", "no", "0", "none", "")


def check_output_dir(path: str | Path, what: str = "output_dir") -> None:
    """Refuse, before any work, an output folder that is a file or cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {str(path)!r} is a file, not a folder: choose another output_dir.")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{what} {str(path)!r} cannot be created: {str(existing)!r} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {str(path)!r} cannot be written: {str(existing)!r} is read-only for this user. "
                          "Choose a folder you can write to.")


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why the checkpoint ``folder`` cannot be resumed from, or None when it is whole."""
    folder = Path(folder)
    if not folder.exists():
        return "does not exist"
    if not folder.is_dir():
        return "is a file, not a checkpoint folder"
    names = set(os.listdir(folder))
    state = folder / TRAINER_STATE
    if TRAINER_STATE not in names:
        return f"has no {TRAINER_STATE} (its save was interrupted)"
    try:
        values = json.loads(state.read_text(encoding="utf-8"))
        int(values["global_step"])
    except (ValueError, KeyError, TypeError) as error:
        return f"has a broken {TRAINER_STATE} ({type(error).__name__}: {error})"
    sharded = any(SHARDED_STATE.match(name) for name in names)
    if not sharded and not names.intersection(WEIGHT_FILES):
        return "has no model weights (model.safetensors)"
    for name in sorted(n for n in names if n.endswith(".safetensors")):
        problem = safetensors_problem(folder / name)
        if problem is not None:
            return f"has a damaged {name}: {problem}"
    if not sharded and not names.intersection(OPTIMIZER_FILES):
        return ("has no optimizer.pt (saved with save_only_model?): resuming would restart AdamW from zero and "
                "give a different result. To start from its weights instead, pass the folder as student_checkpoint")
    return None


def _step(name: str, pattern: re.Pattern) -> int | None:
    match = pattern.match(name)
    return int(match.group(1)) if match else None


def last_complete_checkpoint(output_dir: str | Path, print_fn=print) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir``; each newer incomplete one (or interrupted save) is
    named in one line and skipped."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    entries = []
    for name in os.listdir(folder):
        step, staging = _step(name, _CHECKPOINT), _step(name, _STAGING)
        if step is not None:
            entries.append((step, 1, name))
        elif staging is not None:
            entries.append((staging, 0, name))
    for step, complete_name, name in sorted(entries, reverse=True):
        if not complete_name:
            print_fn(f"resume: skipping {folder / name}: a checkpoint save that was interrupted.")
            continue
        problem = checkpoint_problem(folder / name)
        if problem is None:
            return str(folder / name)
        print_fn(f"resume: skipping the incomplete checkpoint {folder / name}: it {problem}.")
    return None


def resolve_resume(resume, output_dir: str | Path, print_fn=print) -> str | None:
    """The checkpoint folder a run resumes from: None (start fresh), the newest complete one for True / "true", or a
    named folder checked whole. Raises :class:`CheckpointError` with one clear line otherwise."""
    if isinstance(resume, str) and resume.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        resume = resume.strip().lower() in TRUE_WORDS
    if resume is None or resume is False:
        return None
    if resume is True:
        found = last_complete_checkpoint(output_dir, print_fn=print_fn)
        if found is None:
            raise CheckpointError(f"resume_from_checkpoint is true, but output_dir {str(output_dir)!r} holds no "
                                  "complete checkpoint-N folder: remove resume_from_checkpoint to start from the "
                                  "beginning, or point output_dir at the run to resume.")
        return found
    problem = checkpoint_problem(resume)
    if problem is not None:
        raise CheckpointError(f"resume_from_checkpoint {str(resume)!r} {problem}. Name a complete checkpoint-N "
                              "folder, or pass true to resume from the newest complete one in output_dir.")
    return str(resume)


def resume_for_own_run(resume, output_dir: str | Path, name: str, print_fn=print) -> str | None:
    """For a second trainer of the same run (the hard-label baseline), which writes its own checkpoints in
    ``output_dir``: its own newest complete checkpoint when the run resumes, never the other trainer's."""
    if isinstance(resume, str) and resume.strip().lower() in FALSE_WORDS:
        resume = None
    if resume is None or resume is False:
        return None
    found = last_complete_checkpoint(output_dir, print_fn=print_fn)
    if found is None:
        print_fn(f"resume: the {name} has no complete checkpoint of its own in {output_dir}; it trains from the "
                 "start.")
    else:
        print_fn(f"resume: the {name} resumes from its own checkpoint {found}.")
    return found


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class AtomicCheckpointMixin:
    """Mix in before ``transformers.Trainer``: atomic ``checkpoint-N`` folders, checked resumes, token-free
    ``training_args.bin``."""

    _checkpoint_staging: str | None = None

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is being saved, Trainer writes into the staging folder instead of output_dir.
        if self._checkpoint_staging is not None:
            return self._checkpoint_staging
        return super()._get_output_dir(trial)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        with secrets_removed(self.args):  # training_args.bin is a pickle of self.args
            super()._save(output_dir, state_dict=state_dict)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_PREFIX + name)
        final = os.path.join(run_dir, name)
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)  # left by an earlier interrupted save
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging = staging_root
        try:
            super()._save_checkpoint(model, trial)
        except OSError as error:
            if self.args.should_save:
                shutil.rmtree(staging_root, ignore_errors=True)
            if error.errno in DISK_FULL:
                raise OutputError(f"The disk is full: saving {final} failed while writing "
                                  f"{error.filename or 'its files'}. That checkpoint was abandoned; the older "
                                  f"checkpoints in {run_dir} are intact. Free some space (or lower "
                                  "save_total_limit) and resume with resume_from_checkpoint true.") from error
            raise
        finally:
            self._checkpoint_staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self._publish_checkpoint(os.path.join(staging_root, name), final, staging_root, run_dir)
        self.accelerator.wait_for_everyone()

    def _publish_checkpoint(self, written: str, final: str, staging_root: str, run_dir: str) -> None:
        best = self.state.best_model_checkpoint
        if best is not None and best.startswith(staging_root):  # the best is the checkpoint just written
            self.state.best_model_checkpoint = final
            self.state.save_to_json(os.path.join(written, TRAINER_STATE))
        _fsync_tree(written)
        if os.path.exists(final):  # saved again at the same step: the new one replaces it
            shutil.rmtree(final)
        os.replace(written, final)
        _fsync_dir(run_dir)
        shutil.rmtree(staging_root, ignore_errors=True)
        rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        if self.args.should_save:
            check_output_dir(self.args.output_dir)
        quiet = lambda line: None  # noqa: E731  (one process names the skipped checkpoints)
        resume = resolve_resume(resume_from_checkpoint, self.args.output_dir,
                                print_fn=print if self.args.process_index == 0 else quiet)
        return super().train(resume_from_checkpoint=resume, trial=trial, **kwargs)
