"""One filter for secrets, applied wherever kd_llm serialises settings (configs, results, reports, cards, logs,
checkpoints): no Hub token ever reaches a file.

A value is secret when its key names a credential (``hub_token``, ``token``, ``*_api_key`` ...), when it equals a
token this process knows (``HF_TOKEN``, ``HUGGING_FACE_HUB_TOKEN``, the token of ``hf auth login``, or one registered
with :func:`register_secret`, e.g. ``--hub_token``), or when it looks like a Hugging Face token (``hf_`` + 30 or
more letters and digits). Secrets are replaced by :data:`REDACTED`; inside longer strings only the token is.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from contextlib import contextmanager
from typing import Any

REDACTED = "<redacted>"
SECRET_KEYS = frozenset({"hub_token", "token", "hf_token", "use_auth_token", "auth_token", "access_token",
                         "api_key", "password", "secret"})
SECRET_KEY_SUFFIXES = ("_api_key", "_password", "_secret", "_auth_token", "_access_token", "hub_token")
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")
HF_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{30,}")
_registered: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret this process was given (e.g. ``--hub_token``), so that it is filtered everywhere."""
    if isinstance(value, str) and len(value) >= 8:
        _registered.add(value)


def known_secrets() -> set[str]:
    """The tokens of this process: registered ones, the token environment variables and the saved login."""
    secrets = set(_registered)
    secrets.update(os.environ[name] for name in TOKEN_ENV_VARS if len(os.environ.get(name, "")) >= 8)
    try:
        from huggingface_hub import get_token

        saved = get_token()
    except Exception:  # no login, unreadable token file: nothing to filter
        saved = None
    if saved and len(saved) >= 8:
        secrets.add(saved)
    return secrets


def is_secret_key(key: Any) -> bool:
    key = str(key).lower()
    return key in SECRET_KEYS or key.endswith(SECRET_KEY_SUFFIXES)


def _redact_text(text: str, secrets: set[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return HF_TOKEN_PATTERN.sub(REDACTED, text)


def redact_secrets(value: Any, secrets: set[str] | None = None) -> Any:
    """A copy of ``value`` (dicts, lists, tuples, strings, dataclasses as dicts) with every secret replaced by
    :data:`REDACTED`; a secret-named key keeps its key, with ``None`` left as ``None``."""
    secrets = known_secrets() if secrets is None else secrets
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: (REDACTED if v is not None and is_secret_key(k) else redact_secrets(v, secrets))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_secrets(v, secrets) for v in value)
    if isinstance(value, str):
        return _redact_text(value, secrets)
    return value


@contextmanager
def secrets_removed(obj):
    """Within the block, every secret-named attribute of ``obj`` (e.g. ``TrainingArguments.hub_token``) is None, so
    that pickling ``obj`` (``training_args.bin``) stores no token; restored afterwards."""
    names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else list(vars(obj))
    saved = {name: getattr(obj, name) for name in names if is_secret_key(name) and getattr(obj, name, None)}
    for name in saved:
        object.__setattr__(obj, name, None)
    try:
        yield obj
    finally:
        for name, value in saved.items():
            object.__setattr__(obj, name, value)


def without_secrets(obj):
    """A shallow copy of ``obj`` with its secret-named attributes set to None."""
    clone = copy.copy(obj)
    names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else list(vars(obj))
    for name in names:
        if is_secret_key(name) and getattr(clone, name, None):
            object.__setattr__(clone, name, None)
    return clone
