"""Push a distilled student to the Hugging Face Hub: an allow-list of files, one commit, clear errors.

What goes up is decided by :data:`PUSH_ALLOW_PATTERNS` (the student's weights and config, its tokenizer, the model
card, the report, its plots and ``results.json``), never by "everything in the folder": an output folder also holds
``training_args.bin`` (a pickle that can carry ``hub_token``), checkpoints with optimizer states, the hard-label
baseline, feature projections and caches. :data:`NEVER_PUSH_PATTERNS` is a second guard that no allow pattern can
override. Every file is scanned for the token before anything is sent.

The push is a single ``create_commit``: a failure (network down, 401, 403, 409, ...) commits nothing, leaves the local
folder untouched, and is raised as :class:`HubPushError` saying what failed and how to fix it.

:class:`HubPushMixin` routes ``transformers.Trainer``'s own Hub calls (``--push_to_hub``) through the same path.
"""

from __future__ import annotations

import fnmatch
import logging
import struct
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

from kd_llm.errors import KdLlmError
from kd_llm.models.weight_files import safetensors_problem
from kd_llm.report.artifacts import (BASELINE_DIR, MODEL_CARD, PLOTS_DIR, REPORT_JSON, REPORT_MARKDOWN,
                                     RESULTS_JSON)

logger = logging.getLogger(__name__)

# Relative POSIX paths, matched segment by segment (``*`` never crosses a ``/``).
PUSH_ALLOW_PATTERNS = (
    # the student
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "adapter_config.json", "adapter_model.safetensors",
    # its tokenizer
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model",
    # card, report, plots and the run's results (written by kd_llm.report and kd_llm.experiment)
    MODEL_CARD, REPORT_MARKDOWN, REPORT_JSON, RESULTS_JSON, f"{PLOTS_DIR}/*.png",
)
# Refused even if an allow pattern matches: any path segment matching one of these keeps the file local.
NEVER_PUSH_PATTERNS = (
    "*projection*", "*teacher*", "checkpoint-*", BASELINE_DIR, "training_args.bin", "optimizer*",
    "scheduler*", "rng_state*", "trainer_state.json", ".*", "*cache*", "*token*.txt",
)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
# Strategies that push checkpoint folders (optimizer and scheduler states) to the repo.
CHECKPOINT_HUB_STRATEGIES = ("checkpoint", "all_checkpoints")


class HubPushError(KdLlmError, RuntimeError):
    """A push that could not happen; the message says what failed and how to fix it. Nothing local was changed."""


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    commit_url: str
    commit_oid: str
    files: tuple[str, ...]


def _matches(path: str, pattern: str) -> bool:
    parts, pattern_parts = PurePosixPath(path).parts, PurePosixPath(pattern).parts
    return len(parts) == len(pattern_parts) and all(map(fnmatch.fnmatchcase, parts, pattern_parts))


def is_pushable(path: str) -> bool:
    """Whether a file at ``path`` (relative, POSIX) may be pushed: allow-listed, and no segment deny-listed."""
    if any(fnmatch.fnmatchcase(part, p) for part in PurePosixPath(path).parts for p in NEVER_PUSH_PATTERNS):
        return False
    return any(_matches(path, pattern) for pattern in PUSH_ALLOW_PATTERNS)


def select_files_to_push(folder: str | Path) -> list[str]:
    """The allow-listed files of ``folder``, as sorted relative POSIX paths. Raises when it holds no student."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HubPushError(f"Output folder {str(folder)!r} does not exist. Fix: pass the --output_dir of a finished "
                           "distillation run (it holds config.json and model.safetensors).")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    selected = [f for f in files if is_pushable(f)]
    if "config.json" not in selected or not any(f in WEIGHT_FILES or f.startswith("model-") for f in selected):
        raise HubPushError(f"{str(folder)!r} holds no saved student (config.json plus model.safetensors or an adapter)."
                           " Fix: point at the output folder of a finished run, or save the student with "
                           "trainer.save_model(folder) first.")
    if MODEL_CARD not in selected:
        logger.warning("%s has no model card (%s): the Hub repo will have none. Write the report first (python "
                       "scripts/report.py) to get one.", folder, MODEL_CARD)
    return selected


def _bytes_to_scan(path: Path) -> bytes:
    """Where a token could hide: the whole file, except for safetensors weights, whose only text is the header."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    with path.open("rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))
        return file.read(header_size)


def refuse_files_with_token(folder: Path, files: list[str], token: str | None) -> None:
    if not token:
        return
    leaking = [f for f in files if token.encode() in _bytes_to_scan(folder / f)]
    if leaking:
        raise HubPushError(f"Refusing to push: {', '.join(leaking)} in {str(folder)!r} contain(s) your Hub token. "
                           "Fix: remove the token from these files (and revoke it at "
                           "https://huggingface.co/settings/tokens if it was ever shared), then push again.")


def resolve_token(token: str | None = None) -> str:
    """``token``, else HF_TOKEN or the token saved by ``hf auth login``."""
    token = token or get_token()
    if not token:
        raise HubPushError("No Hugging Face token found. Fix: run `hf auth login` with a token that has write access "
                           "(https://huggingface.co/settings/tokens), or set the HF_TOKEN environment variable.")
    return token


def _network_cause(error: BaseException) -> BaseException | None:
    """The HTTP or connection error behind ``error`` (huggingface_hub wraps LFS upload errors in RuntimeError)."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, (HfHubHTTPError, httpx2.TransportError, OfflineModeIsEnabled)):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def explain_hub_error(error: BaseException, *, repo_id: str, folder: str | Path | None = None) -> HubPushError:
    """One message per failure: what went wrong and how to fix it, plus how to retry the push."""
    endpoint = constants.ENDPOINT
    retry = ""
    if folder is not None:
        retry = (f" Nothing in {str(folder)!r} was changed; once fixed, push it with `python scripts/push_to_hub.py "
                 f"--output_dir {folder} --hub_model_id {repo_id}`.")
    cause = _network_cause(error)
    status = cause.response.status_code if isinstance(cause, HfHubHTTPError) and cause.response is not None else None
    if isinstance(error, LocalTokenNotFoundError):
        what = ("No Hugging Face token found. Fix: run `hf auth login` or set HF_TOKEN to a token with write access.")
    elif isinstance(cause, OfflineModeIsEnabled):
        what = "Offline mode is on (HF_HUB_OFFLINE=1), so nothing can be pushed. Fix: unset HF_HUB_OFFLINE."
    elif isinstance(cause, httpx2.TransportError):
        what = (f"Could not reach the Hub at {endpoint} ({type(cause).__name__}: the network is down or the endpoint "
                "is wrong). Fix: check the connection, a proxy, or HF_ENDPOINT.")
    elif status == 401:
        what = (f"The Hub rejected the token (401 Unauthorized) while pushing {repo_id!r}. Fix: create a token with "
                "write access at https://huggingface.co/settings/tokens and run `hf auth login --force` or set "
                "HF_TOKEN (a token passed as --hub_token wins over both).")
    elif status == 403:
        what = (f"The token may not write to {repo_id!r} (403 Forbidden). Fix: use a token with write access to that "
                "namespace (fine-grained tokens need the repo or organisation listed), or push to your own namespace.")
    elif status == 404:
        what = (f"Repository {repo_id!r} or its namespace was not found (404). Fix: check --hub_model_id "
                "(namespace/name) and that the namespace exists.")
    elif status in (409, 412):  # 412: the branch moved since the commit was prepared
        what = (f"The Hub refused the push to {repo_id!r} because of a conflict ({status}: another commit or "
                "operation on the repo happened at the same time, or the name is taken in a conflicting way). "
                "Nothing was committed. Fix: push again, or choose another --hub_model_id.")
    elif status is not None and status >= 500:
        what = f"The Hub failed with {status} while pushing {repo_id!r}. Fix: retry later."
    elif status is not None:
        what = f"The Hub refused the push to {repo_id!r} ({status}: {cause})."
    else:
        what = f"Pushing to {repo_id!r} failed: {type(error).__name__}: {error}"
    return HubPushError(what + retry)


def check_repo_id(repo_id: str | None) -> str:
    if not repo_id:
        raise HubPushError("push_to_hub needs a repository name. Fix: pass --hub_model_id namespace/name.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubPushError(f"--hub_model_id {repo_id!r} is not a valid repository id ({error}). Fix: use "
                           "namespace/name with letters, digits, '-', '_' and '.'.") from None
    return repo_id


def prepare_repo(repo_id: str | None, *, token: str | None = None, private: bool | None = None,
                 api: HfApi | None = None) -> str:
    """Check the token (whoami) and create the repository if needed; return its full ``namespace/name``.

    Cheap enough to run before training, so that a bad token or a network problem surfaces before the work."""
    repo_id = check_repo_id(repo_id)
    token = resolve_token(token)
    api = api or HfApi()
    try:
        user = api.whoami(token=token)["name"]
        full_id = repo_id if "/" in repo_id else f"{user}/{repo_id}"
        return api.create_repo(full_id, token=token, private=private, exist_ok=True).repo_id
    except Exception as error:
        raise explain_hub_error(error, repo_id=repo_id) from None


def push_output_folder(folder: str | Path, repo_id: str | None, *, token: str | None = None,
                       private: bool | None = None, revision: str | None = None,
                       commit_message: str | None = None) -> PushResult:
    """Push the allow-listed files of ``folder`` to ``repo_id`` in one commit. ``folder`` is only read."""
    folder = Path(folder)
    check_repo_id(repo_id)
    files = select_files_to_push(folder)
    for name in files:  # a half-written weight file is refused before anything is sent
        problem = safetensors_problem(folder / name) if name.endswith(".safetensors") else None
        if problem is not None:
            raise HubPushError(f"{folder / name} is damaged: {problem}. Nothing was pushed; save the model again "
                               "(or let the run finish) and push once every weight file is whole.")
    token = resolve_token(token)
    refuse_files_with_token(folder, files, token)
    api = HfApi()
    try:
        full_id = prepare_repo(repo_id, token=token, private=private, api=api)
    except HubPushError as error:
        raise HubPushError(f"{error} Nothing in {str(folder)!r} was changed; once fixed, push it with `python "
                           f"scripts/push_to_hub.py --output_dir {folder} --hub_model_id {repo_id}`.") from None
    logger.info("Pushing %d files from %s to %s: %s", len(files), folder, full_id, ", ".join(files))
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
    try:
        commit = api.create_commit(full_id, operations, token=token, revision=revision,
                                   commit_message=commit_message or f"Upload distilled student ({len(files)} files)")
    except Exception as error:
        raise explain_hub_error(error, repo_id=full_id, folder=folder) from None
    logger.info("Pushed %s: %s", full_id, commit.commit_url)
    return PushResult(full_id, commit.commit_url, commit.oid, tuple(files))


@dataclass(frozen=True)
class HubTarget:
    """Where a run pushes, checked before the run starts (token, network, repository), so that a bad token is
    reported before hours of training rather than after."""

    repo_id: str
    token: str = field(repr=False)
    private: bool | None = None
    revision: str | None = None

    @classmethod
    def from_training_args(cls, args) -> HubTarget:
        check_hub_strategy(args.hub_strategy)
        token = resolve_token(args.hub_token)
        repo_id = prepare_repo(args.hub_model_id, token=token, private=args.hub_private_repo)
        return cls(repo_id, token, args.hub_private_repo, args.hub_revision)

    def push(self, folder: str | Path, commit_message: str | None = None) -> PushResult:
        return push_output_folder(folder, self.repo_id, token=self.token, private=self.private,
                                  revision=self.revision, commit_message=commit_message)


def without_hub_push(args):
    """A copy of TrainingArguments whose Trainer never pushes and whose ``training_args.bin`` holds no token."""
    return dataclasses.replace(args, push_to_hub=False, hub_token=None)


def check_hub_strategy(strategy) -> None:
    value = getattr(strategy, "value", strategy)
    if value in CHECKPOINT_HUB_STRATEGIES:
        raise HubPushError(f"hub_strategy={value!r} pushes checkpoint folders with optimizer states, which kd_llm "
                           "never pushes. Fix: use hub_strategy 'end' or 'every_save'.")


class HubPushMixin:
    """Makes ``transformers.Trainer``'s Hub pushes (``push_to_hub=True``) use :func:`push_output_folder`.

    Trainer would upload the whole output folder (``training_args.bin`` with the token, projections, ...) and write
    its own README.md over the report's card; here only the allow-list goes up, and the card is left alone."""

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        if not self.is_world_process_zero():
            return
        check_hub_strategy(self.args.hub_strategy)
        self.hub_model_id = prepare_repo(self.args.hub_model_id, token=token or self.args.hub_token,
                                         private=private if private is not None else self.args.hub_private_repo)
        self.push_in_progress = None

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None,
                    **kwargs) -> PushResult | None:
        if kwargs:
            raise TypeError(f"push_to_hub does not write a model card, so {sorted(kwargs)} cannot be used: the card "
                            "comes from kd_llm's report.")
        if getattr(self, "hub_model_id", None) is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        return push_output_folder(self.args.output_dir, self.hub_model_id, token=token or self.args.hub_token,
                                  revision=revision or self.args.hub_revision, commit_message=commit_message)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # The checkpoint's student and tokenizer only, synchronously; its optimizer and RNG states stay local.
        if not self.is_world_process_zero() or getattr(self.args.hub_strategy, "value", None) == "end":
            return
        push_output_folder(checkpoint_folder, self.hub_model_id, token=self.args.hub_token,
                           revision=self.args.hub_revision,
                           commit_message=f"Training in progress, step {self.state.global_step}")
