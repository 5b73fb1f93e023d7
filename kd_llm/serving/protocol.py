"""What a served teacher and kd_llm's client say to each other: the teacher's identity, the compact binary signal body,
and vLLM's OpenAI-compatible ``/v1/completions`` with ``prompt_logprobs``.

**vLLM compatibility.** The request and response shapes below were matched against vLLM's own code (read, not
copied), in the versions stored for vllm-project/vllm on 2026-12-01:

- ``vllm/entrypoints/openai/completion/protocol.py`` (``CompletionRequest.prompt`` may be a list of token-id lists,
  ``prompt_logprobs: int | None``, ``max_tokens``, ``echo``; ``CompletionResponseChoice.prompt_logprobs:
  list[dict[int, Logprob] | None]``), commit 002032ee2b18;
- ``vllm/entrypoints/openai/completion/serving.py`` (``request_output_to_completion_response``: one choice per
  prompt, in prompt order, ``prompt_logprobs`` after ``clamp_prompt_logprobs``), commit 030ea52effcb;
- ``vllm/entrypoints/generate/base/serving.py`` (``clamp_prompt_logprobs``: ``-inf`` becomes ``-9999.0``);
- ``vllm/v1/engine/logprobs.py`` (``_update_prompt_logprobs``: position 0 is ``None``; position ``j`` holds the
  ``k`` most likely tokens for ``x_j`` given ``x_<j``, ranks 1..k, plus the prompt token itself when it is not among
  them, so ``k`` or ``k + 1`` entries), commit 016e747a032d;
- the Logprob dataclass (``logprob``, ``rank``, ``decoded_token``), which JSON carries as an object per token id key.

vLLM's prompt log-probabilities are ``log_softmax`` of the raw logits in float32 (temperature 1, before any sampling
processing), so a vLLM teacher's signal is at ``T = 1``. vLLM refuses ``prompt_logprobs`` above its
``--max-logprobs`` (default 20): start it with ``--max-logprobs K`` for top-K.

**Binary body** (``POST /kd/v1/signal``): ``MAGIC`` (4 bytes), a little-endian uint32 header length, a UTF-8 JSON
header, then the arrays back to back, raw little-endian. The header names the arrays, their dtypes and shapes, the
teacher's weights hash and a CRC-32 of the payload, so a truncated or corrupted body, or one from another teacher, is
detected rather than trained on.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

PROTOCOL_VERSION = 1
MAGIC = b"KDT1"
BINARY_CONTENT_TYPE = "application/x-kd-llm-signal"
SIGNAL_KINDS = ("topk", "hidden")
HIDDEN_DTYPES = ("float32", "bfloat16", "float16")
IDENTITY_PATH = "/kd/v1/identity"
SIGNAL_PATH = "/kd/v1/signal"
STATS_PATH = "/kd/v1/stats"
HEAD_PATH = "/kd/v1/head"
COMPLETIONS_PATH = "/v1/completions"
MODELS_PATH = "/v1/models"
TOKENIZE_PATH = "/tokenize"  # vLLM's tokenizer endpoint (kd_llm's server answers it too)
WEIGHTS_HASH_HEADER = "X-KD-Teacher-Hash"
VLLM_CLAMPED_LOGPROB = -9999.0  # what vLLM sends for -inf (clamp_prompt_logprobs)


class ServedTeacherError(RuntimeError):
    """A served teacher that cannot be used (a request it refused, or one that failed for good)."""


class ServedTeacherUnavailable(ServedTeacherError):
    """Every attempt failed on transient errors: the servers are down, unreachable or too slow."""


class TeacherIdentityError(ServedTeacherError, ValueError):
    """The served teacher is not the teacher this run expects (tokenizer, weights, vocabulary, or replicas that
    disagree)."""


class SignalBodyError(ValueError):
    """A binary signal body that is truncated, corrupted or malformed."""


@dataclass(frozen=True)
class TeacherIdentity:
    """What a served teacher is: checked by the client before training, against the run's tokenizer and cache."""

    model_id: str
    weights_hash: str | None  # state_dict_sha256 of the loaded (merged) teacher; None for a vLLM server
    tokenizer_hash: str | None  # tokenizer_sha256 of the teacher's tokenizer; None for a vLLM server
    vocab_size: int | None  # columns the tokenizer addresses (the signal's vocabulary)
    signal_kinds: tuple[str, ...] = ("topk",)
    output_rows: int | None = None  # lm_head rows (may exceed vocab_size by embedding padding)
    hidden_size: int | None = None
    max_k: int | None = None
    dtype: str | None = None
    server: str = "kd_llm"  # "kd_llm" or "vllm"
    protocol_version: int = PROTOCOL_VERSION
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["signal_kinds"] = list(self.signal_kinds)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "TeacherIdentity":
        names = {f for f in cls.__dataclass_fields__}
        values = {key: value for key, value in values.items() if key in names}
        values["signal_kinds"] = tuple(values.get("signal_kinds", ()))
        return cls(**values)

    def same_teacher(self, other: "TeacherIdentity") -> bool:
        keys = ("model_id", "weights_hash", "tokenizer_hash", "vocab_size", "server")
        return all(getattr(self, key) == getattr(other, key) for key in keys)


# --- binary signal bodies ---------------------------------------------------------------------------------------

def _array_bytes(tensor: torch.Tensor) -> bytes:
    # Through uint8 so that bfloat16 (no numpy dtype) travels as its raw bytes too.
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


_TORCH_DTYPES = {"int32": torch.int32, "int64": torch.int64, "float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}


def encode_signal(arrays: dict[str, torch.Tensor], *, meta: dict) -> bytes:
    """``MAGIC | len | header | payload`` for named tensors (``meta`` goes into the header as it is)."""
    entries, chunks = [], []
    for name, tensor in arrays.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _TORCH_DTYPES:
            raise TypeError(f"cannot send a {dtype} array")
        data = _array_bytes(tensor)
        entries.append({"name": name, "dtype": dtype, "shape": list(tensor.shape), "bytes": len(data)})
        chunks.append(data)
    payload = b"".join(chunks)
    header = json.dumps({"meta": meta, "arrays": entries, "payload_bytes": len(payload),
                         "crc32": zlib.crc32(payload)}).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + payload


def decode_signal(body: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, arrays)`` from :func:`encode_signal`'s bytes; raises :class:`SignalBodyError` on any damage."""
    if len(body) < 8 or body[:4] != MAGIC:
        raise SignalBodyError(f"not a kd_llm signal body ({len(body)} bytes, starts {body[:4]!r})")
    (header_length,) = struct.unpack("<I", body[4:8])
    if 8 + header_length > len(body):
        raise SignalBodyError(f"truncated signal body: header of {header_length} bytes, body of {len(body)}")
    try:
        header = json.loads(body[8:8 + header_length])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SignalBodyError(f"corrupt signal header ({error})") from error
    payload = body[8 + header_length:]
    if len(payload) != header.get("payload_bytes"):
        raise SignalBodyError(f"truncated signal body: {len(payload)} payload bytes of {header.get('payload_bytes')}")
    if zlib.crc32(payload) != header.get("crc32"):
        raise SignalBodyError("corrupt signal body: the payload's CRC-32 does not match its header")
    arrays, offset = {}, 0
    for entry in header["arrays"]:
        dtype = _TORCH_DTYPES[entry["dtype"]]
        size = entry["bytes"]
        raw = torch.frombuffer(bytearray(payload[offset:offset + size]), dtype=torch.uint8) if size else \
            torch.empty(0, dtype=torch.uint8)
        arrays[entry["name"]] = raw.view(dtype).reshape(entry["shape"])
        offset += size
    return header["meta"], arrays


# --- top-k rows and their tail ------------------------------------------------------------------------------------

@torch.no_grad()
def topk_with_tail(logits: torch.Tensor, *, k: int, temperature: float, vocab_size: int):
    """``(ids [N, k] int64, log_probs [N, k] float32, log_tail [N] float32)`` at ``temperature`` over the first
    ``vocab_size`` columns, ids in descending probability; the tail is the exact log-mass outside the ids."""
    log_probs = torch.log_softmax(logits[..., :vocab_size].float() / temperature, dim=-1)
    top, ids = log_probs.topk(min(k, vocab_size), dim=-1)
    if ids.shape[-1] == vocab_size:
        log_tail = torch.full_like(top[..., 0], -math.inf)
    else:
        log_tail = torch.logsumexp(log_probs.scatter(-1, ids, -math.inf), dim=-1)
    return ids, top, log_tail


def tail_from_top(log_probs: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum exp(log_probs))`` per row, for a server that sends no tail (vLLM): ``-inf`` where the top-k
    hold all the mass up to the float32 rounding of their sum (k values of relative error 2^-24 each; e.g. k = V,
    where a rounding-sized "tail" would be an outcome the student cannot have). Computed as ``log(-expm1(lse))``,
    accurate when the tail is small."""
    lse = torch.logsumexp(log_probs.double(), dim=-1)
    tail = torch.log(-torch.expm1(lse.clamp(max=0.0)))
    rounding = math.log(log_probs.shape[-1] * 2.0 ** -23)
    return torch.where(tail < rounding, torch.full_like(tail, -math.inf), tail).float()


# --- vLLM's OpenAI-compatible completions with prompt_logprobs ----------------------------------------------------

def completion_request(prompts: list[list[int]], *, k: int, model: str | None) -> dict:
    """The ``/v1/completions`` body that asks for the top-``k`` prompt log-probabilities of token-id prompts.

    ``max_tokens=1``: vLLM generates at least one token unless ``echo`` is set; the one token is ignored.
    ``temperature=0`` keeps that token deterministic (prompt log-probabilities do not depend on it).
    """
    body = {"prompt": [list(map(int, p)) for p in prompts], "max_tokens": 1, "temperature": 0.0,
            "prompt_logprobs": int(k), "add_special_tokens": False}
    if model:
        body["model"] = model
    return body


def parse_prompt_logprobs(choice_logprobs: list, prompt: list[int], *, k: int):
    """One choice's ``prompt_logprobs`` as rows aligned with the positions that predict: row ``t`` is the teacher's
    distribution over token ``t + 1`` (from entry ``t + 1``; entry 0 is None). The last position predicts past the
    prompt and gets an empty row (the shifted labels never supervise it).

    Returns ``(ids [L, k] int64, log_probs [L, k] float32, log_tail [L] float32)``.
    Raises ``ValueError`` for a response that does not fit the prompt (wrong length, fewer than ``k`` entries).
    """
    length = len(prompt)
    if not isinstance(choice_logprobs, list) or len(choice_logprobs) != length:
        got = len(choice_logprobs) if isinstance(choice_logprobs, list) else type(choice_logprobs).__name__
        raise ValueError(f"prompt_logprobs has {got} entries for a prompt of {length} tokens")
    ids = np.zeros((length, k), dtype=np.int64)
    values = np.full((length, k), -math.inf, dtype=np.float32)
    for position in range(1, length):
        entry = choice_logprobs[position]
        if not isinstance(entry, dict) or len(entry) < k:
            raise ValueError(f"prompt_logprobs[{position}] has {len(entry) if isinstance(entry, dict) else entry} "
                             f"entries, fewer than k={k}: the server was asked for k={k} (is vLLM's --max-logprobs "
                             "at least k?)")
        # vLLM adds the prompt token with a rank past k when it is not in the top-k: keep the k best ranks.
        items = sorted(entry.items(), key=lambda item: (_rank(item[1]), -_logprob(item[1])))[:k]
        row = position - 1
        for column, (token, value) in enumerate(items):
            ids[row, column] = int(token)
            lp = _logprob(value)
            values[row, column] = -math.inf if lp <= VLLM_CLAMPED_LOGPROB else lp
    ids_t, values_t = torch.from_numpy(ids), torch.from_numpy(values)
    tail = tail_from_top(values_t)
    tail[length - 1:] = -math.inf
    return ids_t, values_t, tail


def _logprob(value) -> float:
    return float(value["logprob"] if isinstance(value, dict) else value)


def _rank(value) -> float:
    rank = value.get("rank") if isinstance(value, dict) else None
    return math.inf if rank is None else float(rank)


def prompt_logprobs_entries(ids: torch.Tensor, log_probs: torch.Tensor, prompt: list[int], *, target_logprob,
                            target_rank, decode) -> list:
    """A prompt's ``prompt_logprobs`` list as vLLM writes it, from the top-k rows of positions ``0 .. L-2``:
    ``[None, {id: {logprob, rank, decoded_token}}, ...]``, the prompt token added (with its true rank) when it is
    not in the top-k, ``-inf`` clamped to ``-9999.0``."""
    entries: list = [None]
    for position in range(1, len(prompt)):
        row, token = position - 1, int(prompt[position])
        entry = {}
        for rank, (token_id, value) in enumerate(zip(ids[row].tolist(), log_probs[row].tolist()), start=1):
            entry[str(token_id)] = {"logprob": max(value, VLLM_CLAMPED_LOGPROB), "rank": rank,
                                    "decoded_token": decode(token_id)}
        if str(token) not in entry:
            entry[str(token)] = {"logprob": max(float(target_logprob[row]), VLLM_CLAMPED_LOGPROB),
                                 "rank": int(target_rank[row]), "decoded_token": decode(token)}
        entries.append(entry)
    return entries
