"""kd_llm's teacher server (aiohttp): vLLM-compatible ``/v1/completions`` with ``prompt_logprobs``, a compact binary
signal endpoint, the teacher's identity, and batching of concurrent requests.

Endpoints:

- ``GET /health``: ``{"status": "ok"}`` (no token needed, so that load balancers can probe it);
- ``GET /v1/models``: the OpenAI model list, one model (the served teacher);
- ``GET /kd/v1/identity``: :class:`~kd_llm.serving.protocol.TeacherIdentity` as JSON;
- ``POST /tokenize``: vLLM's tokenizer endpoint (``{"prompt", "add_special_tokens"}`` -> ``{"tokens", "count",
  "max_model_len"}``), which the client uses to check a vLLM teacher's tokenizer;
- ``POST /v1/completions``: the OpenAI/vLLM completions request, for scoring: token-id (or text) prompts,
  ``prompt_logprobs=k``, ``max_tokens`` 0 or 1 (the one token is greedy). The response has vLLM's shape (see
  :mod:`kd_llm.serving.protocol`). This server scores; it does not generate longer completions;
- ``GET /kd/v1/head``: the teacher's lm_head weight ``[V, d]`` (float32) and soft cap as a binary body, once per
  client, for a hidden-state teacher whose logits the training process rebuilds as ``softcap(W h)``;
- ``GET /kd/v1/stats``: requests answered and forward passes run (batching shows as fewer passes than requests);
- ``POST /kd/v1/signal``: JSON ``{"sequences": [[ids]], "kind": "topk" | "hidden", "k", "temperature",
  "dtype"}`` -> a binary body (:func:`~kd_llm.serving.protocol.encode_signal`) with the rows of every sequence,
  concatenated: top-k ``ids`` (int32), ``log_probs`` and ``log_tail`` (float32), or ``hidden`` (``dtype``), and
  ``lengths``.

Batching: requests for the same kind of signal that arrive within ``batch_window`` seconds of each other are scored
in one forward pass (up to ``max_batch_tokens`` tokens), one pass at a time on one worker thread, so concurrent
training processes share the teacher.

Security: binds 127.0.0.1 unless told otherwise; with a bearer token (from the environment or a file, never the
command line) every endpoint but ``/health`` requires ``Authorization: Bearer <token>``, compared in constant time and
never logged; request bodies, sequences per request and tokens per request are limited.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from aiohttp import web

from kd_llm.serving.protocol import (
    BINARY_CONTENT_TYPE,
    COMPLETIONS_PATH,
    HEAD_PATH,
    HIDDEN_DTYPES,
    IDENTITY_PATH,
    MODELS_PATH,
    SIGNAL_KINDS,
    SIGNAL_PATH,
    STATS_PATH,
    TOKENIZE_PATH,
    WEIGHTS_HASH_HEADER,
    encode_signal,
    prompt_logprobs_entries,
)
from kd_llm.serving.scoring import ServedModel

logger = logging.getLogger("kd_llm.serving")


@dataclass
class ServerLimits:
    max_body_bytes: int = 64 * 1024 * 1024
    max_sequences: int = 1024
    max_tokens: int = 1 << 20  # tokens in one request
    max_batch_tokens: int = 65536  # tokens in one forward pass
    batch_window: float = 0.005  # seconds to wait for more requests to batch with


class RequestError(ValueError):
    """A bad request: answered with HTTP 400 and this message."""


def _error(status: int, message: str) -> web.Response:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
            413: "RequestTooLarge"}.get(status, "InternalServerError")
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": status}},
                             status=status)


@dataclass
class _Job:
    key: tuple  # requests with equal keys are scored in one pass
    sequences: list
    future: asyncio.Future
    tokens: int = field(init=False)

    def __post_init__(self):
        self.tokens = sum(len(s) for s in self.sequences)


class Batcher:
    """Collects concurrent scoring jobs and runs them, batched, on one worker thread."""

    def __init__(self, served: ServedModel, limits: ServerLimits):
        self.served, self.limits = served, limits
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kd-teacher")
        self.task: asyncio.Task | None = None
        self.passes = 0  # forward passes run
        self.jobs = 0  # scoring requests answered

    async def submit(self, key: tuple, sequences: list):
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(key, sequences, future))
        return await future

    def _run(self, key: tuple, sequences: list):
        kind = key[0]
        if kind == "topk":
            return self.served.topk(sequences, k=key[1], temperature=key[2])
        if kind == "hidden":
            return self.served.final_hidden(sequences)
        return self.served.completion_rows(sequences, k=key[1])

    async def loop(self):
        loop = asyncio.get_running_loop()
        pending: list[_Job] = []
        while True:
            first = pending.pop(0) if pending else await self.queue.get()
            jobs, tokens = [first], first.tokens
            deadline = loop.time() + self.limits.batch_window
            while tokens < self.limits.max_batch_tokens:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                if job.key == first.key and tokens + job.tokens <= self.limits.max_batch_tokens:
                    jobs.append(job)
                    tokens += job.tokens
                else:
                    pending.append(job)
            sequences = [s for job in jobs for s in job.sequences]
            try:
                results = await loop.run_in_executor(self.executor, self._run, first.key, sequences)
                self.passes += 1
            except Exception as error:  # noqa: BLE001 -- every waiting request hears it
                logger.exception("scoring failed")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            offset = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(results[offset:offset + len(job.sequences)])
                offset += len(job.sequences)
            self.jobs += len(jobs)


def _require_int(body: dict, name: str, default, *, low: int, high: int) -> int:
    value = body.get(name, default)
    if type(value) is not int or not low <= value <= high:
        raise RequestError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


class TeacherServer:
    """The aiohttp application around one :class:`ServedModel` (see the module docstring)."""

    def __init__(self, served: ServedModel, *, token: str | None = None, limits: ServerLimits | None = None):
        self.served = served
        self.limits = limits or ServerLimits()
        self._token = token.encode() if token else None
        self.batcher = Batcher(served, self.limits)
        self.started = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_body_bytes, middlewares=[self._middleware])
        app.router.add_get("/health", self.health)
        app.router.add_get(MODELS_PATH, self.models)
        app.router.add_get(IDENTITY_PATH, self.identity)
        app.router.add_get(STATS_PATH, self.stats)
        app.router.add_get(HEAD_PATH, self.head)
        app.router.add_post(TOKENIZE_PATH, self.tokenize)
        app.router.add_post(COMPLETIONS_PATH, self.completions)
        app.router.add_post(SIGNAL_PATH, self.signal)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app):
        self.batcher.task = asyncio.create_task(self.batcher.loop())

    async def _stop(self, app):
        if self.batcher.task:
            self.batcher.task.cancel()
        self.batcher.executor.shutdown(wait=False, cancel_futures=True)

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        if self._token is not None and request.path != "/health":
            given = request.headers.get("Authorization", "")
            expected = b"Bearer " + self._token
            if not hmac.compare_digest(given.encode(), expected):
                return _error(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>' with the "
                                   "token the server was started with")
        try:
            return await handler(request)
        except RequestError as error:
            return _error(400, str(error))
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"request body over the server's limit of {self.limits.max_body_bytes} bytes")

    async def _json(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except json.JSONDecodeError as error:
            raise RequestError(f"the body is not valid JSON ({error.msg})") from error
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        return body

    def _sequences(self, sequences) -> list[list[int]]:
        if isinstance(sequences, list) and len(sequences) > self.limits.max_sequences:
            raise RequestError(f"{len(sequences)} sequences in one request, more than the limit of "
                               f"{self.limits.max_sequences}: split the request")
        try:
            checked = self.served.check_sequences(sequences)
        except ValueError as error:
            raise RequestError(str(error)) from error
        tokens = sum(len(s) for s in checked)
        if tokens > self.limits.max_tokens:
            raise RequestError(f"{tokens} tokens in one request, more than the limit of {self.limits.max_tokens}")
        return checked

    # --- handlers ---------------------------------------------------------------------------------------------------

    async def health(self, request):
        return web.json_response({"status": "ok"})

    async def models(self, request):
        identity = self.served.identity
        return web.json_response({"object": "list", "data": [{
            "id": identity.model_id, "object": "model", "created": self.started, "owned_by": "kd_llm",
            "root": identity.model_id, "parent": None, "max_model_len": self.served.max_length}]})

    async def identity(self, request):
        return web.json_response(self.served.identity.to_dict())

    async def head(self, request):
        head = self.served.head
        if head is None:
            return _error(404, "this teacher serves no hidden states: "
                               + str(self.served.identity.extra.get("hidden_unavailable")))
        body = encode_signal({"weight": head.weight.detach().float().cpu()},
                             meta={"softcap": head.softcap, "tied": head.tied, "head_sha256": head.sha256,
                                   "weights_hash": self.served.identity.weights_hash})
        return web.Response(body=body, content_type=BINARY_CONTENT_TYPE,
                            headers={WEIGHTS_HASH_HEADER: self.served.identity.weights_hash})

    async def stats(self, request):
        return web.json_response({"requests": self.batcher.jobs, "passes": self.batcher.passes})

    async def tokenize(self, request):
        body = await self._json(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string")
        tokens = self.served.tokenizer(prompt, add_special_tokens=bool(body.get("add_special_tokens", True)))
        ids = list(tokens["input_ids"])
        return web.json_response({"count": len(ids), "max_model_len": self.served.max_length, "tokens": ids,
                                  "token_strs": None})

    def _prompts(self, body: dict) -> list[list[int]]:
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str)
                                                                                 for p in prompt)):
            texts = [prompt] if isinstance(prompt, str) else prompt
            add_special = bool(body.get("add_special_tokens", True))
            return self._sequences([list(self.served.tokenizer(t, add_special_tokens=add_special)["input_ids"])
                                    for t in texts])
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            return self._sequences([prompt])
        return self._sequences(prompt)

    async def completions(self, request):
        body = await self._json(request)
        if body.get("stream"):
            raise RequestError("`prompt_logprobs` are not available when `stream=True`.")
        if body.get("n", 1) != 1 or body.get("use_beam_search"):
            raise RequestError("this teacher server scores prompts: n must be 1 and beam search is not supported")
        if body.get("logprobs") is not None:
            raise RequestError("this teacher server returns prompt_logprobs only; leave logprobs unset")
        model = body.get("model")
        if model is not None and model != self.served.identity.model_id:
            return _error(404, f"The model `{model}` does not exist.")
        max_tokens = body.get("max_tokens", 16)
        max_tokens = 16 if max_tokens is None else max_tokens
        if type(max_tokens) is not int or not 0 <= max_tokens <= 1:
            raise RequestError("this teacher server scores prompts and writes at most one (greedy) token: set "
                               f"max_tokens to 0 or 1, got {max_tokens!r}")
        prompt_logprobs = body.get("prompt_logprobs")
        vocab = self.served.vocab_size
        if prompt_logprobs is not None:
            if type(prompt_logprobs) is not int or not (prompt_logprobs >= 0 or prompt_logprobs == -1):
                raise RequestError("`prompt_logprobs` must be a positive value or -1.")
            prompt_logprobs = vocab if prompt_logprobs == -1 else prompt_logprobs
            if prompt_logprobs > vocab:
                raise RequestError(f"prompt_logprobs={prompt_logprobs} is more than the vocabulary of {vocab}")
        prompts = self._prompts(body)
        rows = await self.batcher.submit(("completion", prompt_logprobs or 0), prompts)
        decode = self._decoder()
        choices, prompt_tokens = [], 0
        for index, (prompt, (ids, values, target_lp, target_rank, next_token)) in enumerate(zip(prompts, rows)):
            generated = [next_token] if max_tokens == 1 else []
            choice = {"index": index, "text": "".join(decode(t) for t in generated), "logprobs": None,
                      "finish_reason": "length", "stop_reason": None,
                      "token_ids": generated if body.get("return_token_ids") else None,
                      "prompt_logprobs": None if prompt_logprobs is None else prompt_logprobs_entries(
                          ids, values, prompt, target_logprob=target_lp, target_rank=target_rank, decode=decode),
                      "prompt_token_ids": prompt if body.get("return_token_ids") else None}
            choices.append(choice)
            prompt_tokens += len(prompt)
        completion_tokens = len(choices) if max_tokens == 1 else 0
        return web.json_response({
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": self.served.identity.model_id, "choices": choices, "service_tier": None,
            "system_fingerprint": None, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens +
                                                  completion_tokens, "completion_tokens": completion_tokens,
                                                  "prompt_tokens_details": None}})

    def _decoder(self):
        tokenizer, memo = self.served.tokenizer, {}

        def decode(token_id: int) -> str:
            if token_id not in memo:
                memo[token_id] = tokenizer.decode([token_id])
            return memo[token_id]

        return decode

    async def signal(self, request):
        body = await self._json(request)
        kind = body.get("kind", "topk")
        if kind not in SIGNAL_KINDS:
            raise RequestError(f"kind must be one of {', '.join(SIGNAL_KINDS)}, got {kind!r}")
        sequences = self._sequences(body.get("sequences"))
        lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
        meta = {"kind": kind, "weights_hash": self.served.identity.weights_hash}
        if kind == "topk":
            k = _require_int(body, "k", None, low=1, high=self.served.vocab_size)
            temperature = body.get("temperature", 1.0)
            if not isinstance(temperature, (int, float)) or not temperature > 0:
                raise RequestError(f"temperature must be a positive number, got {temperature!r}")
            rows = await self.batcher.submit(("topk", k, float(temperature)), sequences)
            arrays = {"lengths": lengths, "ids": torch.cat([r[0] for r in rows]).to(torch.int32),
                      "log_probs": torch.cat([r[1] for r in rows]).float(),
                      "log_tail": torch.cat([r[2] for r in rows]).float()}
            meta.update(k=k, temperature=float(temperature))
        else:
            if "hidden" not in self.served.identity.signal_kinds:
                raise RequestError("this teacher serves no hidden states: "
                                   + str(self.served.identity.extra.get("hidden_unavailable")))
            dtype = body.get("dtype", "float32")
            if dtype not in HIDDEN_DTYPES:
                raise RequestError(f"dtype must be one of {', '.join(HIDDEN_DTYPES)}, got {dtype!r}")
            rows = await self.batcher.submit(("hidden",), sequences)
            arrays = {"lengths": lengths, "hidden": torch.cat(rows).to(getattr(torch, dtype))}
        payload = encode_signal(arrays, meta=meta)
        return web.Response(body=payload, content_type=BINARY_CONTENT_TYPE,
                            headers={WEIGHTS_HASH_HEADER: self.served.identity.weights_hash})


async def serve(server: TeacherServer, *, host: str = "127.0.0.1", port: int = 8000, ready=None):
    """Run until cancelled; ``ready(url)`` is called once the socket listens (``port=0`` picks a free port)."""
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host=host, port=port)
    await site.start()
    bound_port = runner.addresses[0][1]
    url = f"http://{host}:{bound_port}"
    if ready is not None:
        ready(url)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
