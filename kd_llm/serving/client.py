"""The client of a served teacher: kd_llm's own server (:mod:`kd_llm.serving.server`) or vLLM's OpenAI-compatible
API, on one or several replica URLs, with identity checks, bounded retries and prefetch.

- **Identity.** Before any scoring the client asks every replica who it is (``/kd/v1/identity``; for vLLM,
  ``/v1/models``) and refuses replicas that disagree. :meth:`ServedTeacherClient.check` compares the teacher with the
  run's tokenizer (kd_llm's server reports its tokenizer hash; a vLLM server is asked to tokenize a probe text) and
  with a teacher cache's teacher hash, with one :class:`TeacherIdentityError` on a mismatch. Every binary answer
  carries the weights hash again, and a replica that came back after a failure is asked again, so a server restarted
  with another teacher is noticed and never trained on.
- **Faults.** Timeouts, refused connections, resets, HTTP 5xx / 429 and truncated or corrupt bodies are transient:
  the request is retried, on another replica when one is alive, with exponential backoff when none is, at most
  ``retries`` times; then :class:`ServedTeacherUnavailable` names the servers, the last error and the fix. HTTP 4xx
  answers (a bad request, a wrong token) are not retried.
- **Replicas.** Requests go round-robin over the live replicas; a failing one is set aside (and probed again after a
  backoff), so a dead replica costs one failed attempt, not a failed step.
- **Prefetch.** :meth:`ServedTeacherClient.submit` starts a request on a worker thread and returns a future, so the
  next batches' signal is on its way while the current step trains.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import torch

from kd_llm.serving.protocol import (
    COMPLETIONS_PATH,
    HEAD_PATH,
    IDENTITY_PATH,
    MODELS_PATH,
    SIGNAL_PATH,
    TOKENIZE_PATH,
    WEIGHTS_HASH_HEADER,
    ServedTeacherError,
    ServedTeacherUnavailable,
    SignalBodyError,
    TeacherIdentity,
    TeacherIdentityError,
    completion_request,
    decode_signal,
    parse_prompt_logprobs,
)

TOKEN_ENV = "KD_LLM_TEACHER_TOKEN"
_PROBE_TEXT = "Distil 2024-02-29 + 365 days -> ?  Ünïcödé, tabs\tand spaces."
_FIX = ("Fix: start the server (scripts/serve_teacher.py --teacher <teacher> --port <port>, or vllm serve "
        "<teacher> --max-logprobs <k>), check the URL and the network between the machines, or raise "
        "teacher_timeout / teacher_retries; then resume the run from its last checkpoint "
        "(--resume_from_checkpoint <output_dir>/checkpoint-<step>).")


class _Transient(Exception):
    pass


class _IdentityChanged(Exception):
    pass


@dataclass
class _Replica:
    url: str
    verified: bool = False  # identity confirmed since the last failure
    failures: int = 0  # consecutive
    retry_at: float = 0.0  # monotonic time before which it is not tried
    dropped: str | None = None  # why it is out for good (another teacher)

    @property
    def usable(self) -> bool:
        return self.dropped is None


def normalise_url(url: str) -> str:
    url = url.strip().rstrip("/")
    for suffix in ("/v1/completions", "/v1"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"teacher URL {url!r} must start with http:// or https://")
    return url


class ServedTeacherClient:
    """A served teacher on one or several replica URLs (see the module docstring).

    Args:
        urls: one URL or a list of replica URLs of the same teacher (``http://host:port``; a trailing ``/v1`` is
            accepted).
        token: bearer token (default: the ``KD_LLM_TEACHER_TOKEN`` environment variable); never logged or stored.
        protocol: ``"auto"`` (kd_llm's server if it answers ``/kd/v1/identity``, else vLLM), ``"kd_llm"`` or
            ``"vllm"`` (OpenAI-compatible ``prompt_logprobs``; also works against kd_llm's server).
        model: the model name to ask a vLLM server for (default: the first it lists).
        timeout: seconds for one request (connect and read).
        retries: transient failures tolerated per request before :class:`ServedTeacherUnavailable`.
        backoff / max_backoff: seconds before retrying a failed replica (doubling per consecutive failure).
        workers: threads for :meth:`submit` (prefetch and concurrent routed requests).
    """

    def __init__(self, urls, *, token: str | None = None, protocol: str = "auto", model: str | None = None,
                 timeout: float = 60.0, retries: int = 5, backoff: float = 0.5, max_backoff: float = 8.0,
                 workers: int = 2):
        import os

        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("give at least one teacher URL")
        if protocol not in ("auto", "kd_llm", "vllm"):
            raise ValueError(f"protocol must be auto, kd_llm or vllm, got {protocol!r}")
        if retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("retries must be >= 0, timeout > 0 and backoff >= 0")
        self.replicas = [_Replica(normalise_url(u)) for u in urls]
        self.protocol, self.model = protocol, model
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(timeout=httpx.Timeout(timeout), headers=headers)
        self._lock = threading.Lock()
        self._turn = itertools.count()
        self._identity: TeacherIdentity | None = None
        self._executor = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="kd-served-teacher")
        self.attempts = 0  # requests sent, successful or not (the tests read it)
        self.failures = 0

    def __repr__(self) -> str:  # no token
        return f"ServedTeacherClient({[r.url for r in self.replicas]}, protocol={self.protocol!r})"

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def describe(self) -> str:
        return ", ".join(self.urls)

    # --- identity ---------------------------------------------------------------------------------------------------

    @property
    def identity(self) -> TeacherIdentity:
        if self._identity is None:
            self.connect()
        return self._identity

    def connect(self) -> TeacherIdentity:
        """Ask every replica who it is (with retries); they must all be the same teacher. Unreachable replicas are
        set aside and asked again later; at least one must answer."""
        identities, errors = {}, {}
        for replica in self.replicas:
            try:
                identities[replica.url] = self._retrying(lambda r=replica: self._fetch_identity(r),
                                                         only=replica)
                replica.verified = True
            except ServedTeacherUnavailable as error:
                errors[replica.url] = error
                replica.verified = False
        if not identities:
            raise ServedTeacherUnavailable(f"no teacher server answered at {self.describe()}: "
                                           f"{next(iter(errors.values()))}")
        first_url, first = next(iter(identities.items()))
        for url, identity in identities.items():
            if not identity.same_teacher(first):
                raise TeacherIdentityError(
                    f"the teacher replicas disagree: {first_url} serves {_describe(first)}, {url} serves "
                    f"{_describe(identity)}. Fix: give replica URLs of one teacher only (several teachers are routed "
                    "by a teacher_id column, one URL list per teacher).")
        self._identity = first
        return first

    def _fetch_identity(self, replica: _Replica) -> TeacherIdentity:
        protocol = self.protocol
        if protocol in ("auto", "kd_llm"):
            response = self._send(replica, "GET", IDENTITY_PATH)
            if response.status_code == 200:
                return TeacherIdentity.from_dict(_json(response, replica.url))
            if protocol == "kd_llm" or response.status_code not in (404, 405):
                _raise_for(response, replica.url)
        response = self._send(replica, "GET", MODELS_PATH)
        if response.status_code != 200:
            _raise_for(response, replica.url)
        models = [m.get("id") for m in _json(response, replica.url).get("data", [])]
        if not models:
            raise ServedTeacherError(f"{replica.url}/v1/models lists no model")
        if self.model is not None and self.model not in models:
            raise TeacherIdentityError(f"{replica.url} serves {models}, not the model {self.model!r} asked for")
        model_id = self.model or models[0]
        if protocol == "auto":
            self.protocol = "vllm"
        return TeacherIdentity(model_id=model_id, weights_hash=None, tokenizer_hash=None, vocab_size=None,
                               signal_kinds=("topk",), server="vllm")

    def check(self, tokenizer, *, teacher_hash: str | None = None, signal: str = "topk") -> TeacherIdentity:
        """Refuse (one :class:`TeacherIdentityError`) a teacher whose tokenizer differs from the run's, whose weights
        differ from the teacher a cache was made with (``teacher_hash``), or that does not serve ``signal``."""
        from kd_llm.models.vocab import tokenizer_vocab_size
        from kd_llm.teacher_cache.metadata import tokenizer_sha256

        identity = self.identity
        where = f"the served teacher {identity.model_id!r} at {self.describe()}"
        if signal == "hidden" and self.protocol == "vllm":
            raise TeacherIdentityError(f"{where} is a vLLM server, which serves top-k log-probabilities, not hidden "
                                       "states: serve the teacher with scripts/serve_teacher.py")
        if signal not in identity.signal_kinds:
            raise TeacherIdentityError(f"{where} serves {', '.join(identity.signal_kinds)}, not {signal}")
        if identity.server == "vllm":
            local = list(tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"])
            remote = self._retrying(lambda r: _json(self._ok(r, "POST", TOKENIZE_PATH, json={
                "model": identity.model_id, "prompt": _PROBE_TEXT, "add_special_tokens": False}), r.url)["tokens"])
            if local != remote:
                raise TeacherIdentityError(
                    f"{where} tokenizes a probe text into other ids than this run's tokenizer ({remote[:8]}... vs "
                    f"{local[:8]}...): it uses another tokenizer. Fix: serve the teacher whose tokenizer the student "
                    "was built with.")
        else:
            vocab = tokenizer_vocab_size(tokenizer)
            if identity.vocab_size != vocab or identity.tokenizer_hash != tokenizer_sha256(tokenizer):
                raise TeacherIdentityError(
                    f"{where} uses another tokenizer than this run (vocabulary {identity.vocab_size} vs {vocab}, "
                    f"tokenizer hash {str(identity.tokenizer_hash)[:12]} vs {tokenizer_sha256(tokenizer)[:12]}). "
                    "Fix: serve the teacher whose tokenizer the student uses, or train with the teacher's tokenizer.")
        if teacher_hash is not None and identity.weights_hash is not None and identity.weights_hash != teacher_hash:
            raise TeacherIdentityError(
                f"{where} has weights hash {identity.weights_hash[:12]}, but the teacher cache was made by a teacher "
                f"with hash {teacher_hash[:12]}: they are different teachers. Fix: serve the teacher that made the "
                "cache, or rebuild the cache with this one.")
        return identity

    # --- scoring ----------------------------------------------------------------------------------------------------

    def topk(self, sequences: list[list[int]], *, k: int, temperature: float = 1.0):
        """Per sequence ``(ids [L, k] int64, log_probs [L, k] float32, log_tail [L] float32)``: row ``t`` is the
        teacher's distribution over the token after position ``t``, at ``temperature`` (vLLM: 1 only)."""
        sequences = [list(map(int, s)) for s in sequences]
        self.identity  # noqa: B018 -- connect first
        if self.protocol == "vllm":
            if abs(temperature - 1.0) > 1e-9:
                raise ServedTeacherError(f"a vLLM teacher gives prompt log-probabilities at temperature 1 only, "
                                         f"not {temperature}")
            return self._retrying(lambda r: self._vllm_topk(r, sequences, k))
        body = {"kind": "topk", "sequences": sequences, "k": int(k), "temperature": float(temperature)}
        meta, arrays = self._retrying(lambda r: self._signal(r, body))
        ids, values, tail = arrays["ids"].long(), arrays["log_probs"], arrays["log_tail"]
        return [(ids[s], values[s], tail[s]) for s in _splits(arrays["lengths"], sequences)]

    def hidden(self, sequences: list[list[int]], *, dtype: str = "float32") -> list[torch.Tensor]:
        """Per sequence ``[L, H]``: the teacher's final hidden states (after its last norm)."""
        sequences = [list(map(int, s)) for s in sequences]
        if self.identity.server == "vllm":
            raise ServedTeacherError("a vLLM server serves no hidden states: use scripts/serve_teacher.py")
        meta, arrays = self._retrying(lambda r: self._signal(r, {"kind": "hidden", "sequences": sequences,
                                                                  "dtype": dtype}))
        return [arrays["hidden"][s] for s in _splits(arrays["lengths"], sequences)]

    def head(self):
        """The teacher's lm_head (:class:`kd_llm.models.lm_head.TeacherHead`), to rebuild its logits from served
        hidden states as ``softcap(W h)``; checked against the hash the identity reported."""
        from kd_llm.models.lm_head import TeacherHead, head_sha256

        if "hidden" not in self.identity.signal_kinds:
            raise ServedTeacherError(f"the served teacher at {self.describe()} serves no hidden states: "
                                     f"{self.identity.extra.get('hidden_unavailable', 'not a kd_llm server')}")

        def fetch(replica):
            response = self._ok(replica, "GET", HEAD_PATH)
            meta, arrays = decode_signal(response.content)
            if meta.get("weights_hash") != self._identity.weights_hash:
                raise _IdentityChanged(f"{replica.url} sent the lm_head of another teacher")
            return meta, arrays["weight"]

        meta, weight = self._retrying(fetch)
        expected = self.identity.extra.get("head_sha256")
        if head_sha256(weight, meta.get("softcap")) != expected:
            raise SignalBodyError(f"the lm_head from {self.describe()} does not match the hash its identity reported")
        return TeacherHead(weight, meta.get("softcap"), bool(meta.get("tied")))

    def submit(self, method: str, *args, **kwargs) -> Future:
        """``method`` (``"topk"`` or ``"hidden"``) on a worker thread: a future of its result (prefetch)."""
        return self._executor.submit(getattr(self, method), *args, **kwargs)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- one request, on one replica --------------------------------------------------------------------------------

    def _send(self, replica: _Replica, method: str, path: str, **kwargs) -> httpx.Response:
        with self._lock:
            self.attempts += 1
        response = self._http.request(method, replica.url + path, **kwargs)
        if response.status_code >= 500 or response.status_code == 429:
            raise _Transient(f"HTTP {response.status_code} from {replica.url}{path}: {response.text[:200]}")
        return response

    def _ok(self, replica: _Replica, method: str, path: str, **kwargs) -> httpx.Response:
        response = self._send(replica, method, path, **kwargs)
        if response.status_code != 200:
            _raise_for(response, replica.url)
        return response

    def _verify(self, replica: _Replica) -> None:
        identity = self._fetch_identity(replica)
        if not identity.same_teacher(self._identity):
            raise _IdentityChanged(f"{replica.url} now serves {_describe(identity)}, not {_describe(self._identity)}")
        replica.verified = True

    def _signal(self, replica: _Replica, body: dict):
        response = self._ok(replica, "POST", SIGNAL_PATH, json=body)
        meta, arrays = decode_signal(response.content)
        expected = self._identity.weights_hash
        if meta.get("weights_hash") != expected or response.headers.get(WEIGHTS_HASH_HEADER) != expected:
            raise _IdentityChanged(f"{replica.url} answered with the signal of another teacher "
                                   f"(weights {str(meta.get('weights_hash'))[:12]}, expected {expected[:12]})")
        if int(arrays["lengths"].sum()) != sum(len(s) for s in body["sequences"]) or \
                arrays["lengths"].tolist() != [len(s) for s in body["sequences"]]:
            raise SignalBodyError(f"{replica.url} answered for other sequence lengths than asked")
        return meta, arrays

    def _vllm_topk(self, replica: _Replica, sequences, k: int):
        body = completion_request(sequences, k=k, model=self._identity.model_id)
        response = self._ok(replica, "POST", COMPLETIONS_PATH, json=body)
        answer = _json(response, replica.url)
        if answer.get("model") not in (None, self._identity.model_id):
            raise _IdentityChanged(f"{replica.url} answered as model {answer.get('model')!r}, not "
                                   f"{self._identity.model_id!r}")
        choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != len(sequences):
            raise SignalBodyError(f"{replica.url} answered {len(choices)} choices for {len(sequences)} prompts")
        try:
            return [parse_prompt_logprobs(choice.get("prompt_logprobs"), prompt, k=k)
                    for choice, prompt in zip(choices, sequences)]
        except (ValueError, KeyError, TypeError) as error:
            raise SignalBodyError(f"{replica.url} answered prompt_logprobs that do not fit the prompts: {error}") \
                from error

    # --- retries over replicas --------------------------------------------------------------------------------------

    def _pick(self, only: _Replica | None) -> _Replica:
        with self._lock:
            candidates = [only] if only is not None else [r for r in self.replicas if r.usable]
            if not candidates:
                raise TeacherIdentityError(
                    "every replica of the served teacher now serves another teacher: "
                    + "; ".join(f"{r.url}: {r.dropped}" for r in self.replicas)
                    + ". Fix: restart the servers with the run's teacher; never train on another teacher's signal.")
            now = time.monotonic()
            ready = [r for r in candidates if r.retry_at <= now]
            if ready:
                start = next(self._turn)
                return ready[start % len(ready)]
            soonest = min(candidates, key=lambda r: r.retry_at)
        time.sleep(max(0.0, soonest.retry_at - time.monotonic()))
        return soonest

    def _retrying(self, call, only: _Replica | None = None):
        errors = []
        for attempt in range(self.retries + 1):
            replica = self._pick(only)
            try:
                if not replica.verified and self._identity is not None:
                    self._verify(replica)
                result = call(replica)
            except (httpx.TransportError, _Transient, SignalBodyError, json.JSONDecodeError) as error:
                errors.append(f"{replica.url}: {type(error).__name__}: {error}")
                with self._lock:
                    self.failures += 1
                    replica.failures += 1
                    replica.verified = False  # it may come back as another server: ask it again first
                    delay = min(self.max_backoff, self.backoff * 2 ** (replica.failures - 1))
                    replica.retry_at = time.monotonic() + delay
                continue
            except _IdentityChanged as error:
                with self._lock:
                    replica.dropped = str(error)
                errors.append(str(error))
                if only is not None:
                    raise TeacherIdentityError(str(error)) from None
                continue
            with self._lock:
                replica.failures, replica.retry_at = 0, 0.0
            return result
        raise ServedTeacherUnavailable(
            f"the served teacher at {only.url if only else self.describe()} failed {len(errors)} times in a row "
            f"(last: {errors[-1]}). {_FIX}")


class TeacherRouter:
    """Several served teachers, one per ``teacher_id`` (e.g. one per domain): each example is scored by the teacher
    its id names, the groups concurrently. Every teacher is checked against the run's tokenizer."""

    def __init__(self, clients: dict[str, ServedTeacherClient]):
        if not clients:
            raise ValueError("give at least one teacher")
        self.clients = dict(clients)

    def check(self, tokenizer, *, signal: str = "topk") -> dict[str, TeacherIdentity]:
        return {name: client.check(tokenizer, signal=signal) for name, client in self.clients.items()}

    def topk(self, sequences: list[list[int]], teacher_ids: list[str], *, k: int, temperature: float = 1.0):
        if len(teacher_ids) != len(sequences):
            raise ValueError(f"{len(teacher_ids)} teacher ids for {len(sequences)} sequences")
        unknown = sorted(set(teacher_ids) - set(self.clients))
        if unknown:
            raise ValueError(f"teacher_id {unknown[0]!r} names no teacher; the run's teachers are "
                             f"{', '.join(sorted(self.clients))}")
        groups: dict[str, list[int]] = {}
        for index, name in enumerate(teacher_ids):
            groups.setdefault(name, []).append(index)
        futures = {name: self.clients[name].submit("topk", [sequences[i] for i in rows], k=k, temperature=temperature)
                   for name, rows in groups.items()}
        results: list = [None] * len(sequences)
        for name, rows in groups.items():
            for index, value in zip(rows, futures[name].result()):
                results[index] = value
        return results

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def _splits(lengths: torch.Tensor, sequences) -> list[slice]:
    slices, start = [], 0
    for length in lengths.tolist():
        slices.append(slice(start, start + length))
        start += length
    return slices


def _json(response: httpx.Response, url: str) -> dict:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SignalBodyError(f"{url} answered a body that is not JSON ({error})") from error


def _raise_for(response: httpx.Response, url: str):
    try:
        message = response.json().get("error", {}).get("message") or response.text[:300]
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        message = response.text[:300]
    if response.status_code == 401:
        raise ServedTeacherError(f"{url} refused the bearer token (HTTP 401): {message}. Fix: set "
                                 f"{TOKEN_ENV} to the token the server was started with.")
    raise ServedTeacherError(f"{url} refused the request (HTTP {response.status_code}): {message}")


def _describe(identity: TeacherIdentity) -> str:
    weights = (identity.weights_hash or "?")[:12]
    return f"{identity.model_id!r} (weights {weights}, vocabulary {identity.vocab_size})"
