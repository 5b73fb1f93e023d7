"""A teacher that runs in a side process and scores sequences for the training process: :class:`TeacherProcess`.

Why: on-policy distillation (``lmbda > 0``) from a teacher cache. The cache (``teacher_cache``, built by
scripts/cache_teacher.py) serves the dataset's batches, but the student's own samples are new sequences no cache
holds, so a live teacher must score them. Loaded in the training process it would cost what the cache saved: its
weights and activations next to the student, its gradients and optimizer states. ``TeacherProcess`` loads it in a
child process instead ("spawn": a fresh interpreter that shares no memory with the parent and may use CUDA), which
answers forward requests over a Pipe: ``input_ids`` and ``attention_mask`` (packed rows: ``position_ids``) go there, float32 logits for every
position come back. The teacher's memory moves to that process (or to another device, with ``device=``).

With ``hidden_states=True`` the child sends its lm_head once at start-up (checked: its logits must be
``softcap(lm_head(h))``, :func:`kd_llm.training.teacher_head.checked_teacher_head`) and then answers a forward asked with
``output_hidden_states`` with the final hidden states only: ``d`` numbers per position instead of ``V`` (576 against
49,152 for SmolLM2: 1/85 in float32, 1/170 with ``transport_dtype="bfloat16"``). The proxy then exposes that head
(``get_output_embeddings()``, ``config``), so the trainer's fused path runs on it like on a live teacher: the training
process applies the lm_head a chunk at a time and never holds ``[B, T, V]`` teacher logits.

What it is not: a module. The proxy has no parameters, hidden states, lm_head or ``generate``; it scores sequences.
So ``DistillationTrainer`` never freezes, places or saves it, gives the batches it scores the dense loss (the fused
path reads hidden states and lm_head weights), and refuses it where more is needed (seq_kd, feature terms, several
processes: ``kd_llm.training.rules.side_process_problems``). At start-up the child reports what the trainer checks:
the teacher's config, its embedding sizes (the vocabulary check) and its weights hash (so a cache made by another
teacher is still refused).

Errors and lifetime: the child sends any exception (loading or forward) with its traceback, and the parent raises it
as one :class:`TeacherProcessError`; a child that dies silently (killed, out of memory) is noticed by polling
``is_alive()`` while waiting, and every wait has a timeout. ``close()`` (or leaving a ``with`` block) asks the child to
stop, joins it and kills it if it does not stop in time; ``weakref.finalize`` does the same when the proxy is garbage
collected or the interpreter exits, and a child whose parent died sees its Pipe close and exits.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
import weakref
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import CausalLMOutput

from kd_llm.errors import KdLlmError
from kd_llm.losses.fused import soft_cap

TRANSPORT_DTYPES = ("float32", "bfloat16", "float16")
_POLL_SECONDS = 0.5  # how often a waiting parent checks that the child is alive (poll returns at once on an answer)
_STOP_SECONDS = 10.0  # how long close() waits for the child to stop before terminating it


class TeacherProcessError(KdLlmError, RuntimeError):
    """The side-process teacher failed (to load, or on a request), died, or did not answer in time."""


@dataclass(frozen=True)
class TeacherInfo:
    """What the child reports once, after loading: what the trainer checks the teacher by."""

    config: object  # the teacher's transformers config
    embedding_rows: dict  # {"input": rows or None, "output": rows or None}
    weights_hash: str  # kd_llm.teacher_cache.metadata.state_dict_sha256 of the loaded (merged) teacher
    parameters: int
    dtype: str
    device: str
    head: object = None  # hidden_states=True: the teacher's kd_llm.models.lm_head.TeacherHead (weights on CPU)


def _embedding_rows(model, which: str) -> int | None:
    getter = getattr(model, f"get_{which}_embeddings", None)
    weight = getattr(getter() if callable(getter) else None, "weight", None)
    return None if weight is None else int(weight.shape[0])


def _serve(connection, spec: str, adapter: str | None, trust_remote_code: bool, dtype: str, device: str,
           num_threads: int | None, hidden_states: bool = False, transport_dtype: str = "float32") -> None:
    """The child: load and freeze the teacher, report it, then answer ``(input_ids, attention_mask, position_ids,
    hidden)`` requests (the mask or the positions may be None) with float32 logits (or, when ``hidden``, final hidden states in ``transport_dtype``) until told to stop
    (None) or until the parent's end of the Pipe closes."""
    try:
        from kd_llm.models.lm_head import HIDDEN_STATE_FORWARD_KWARGS
        from kd_llm.models.loading import freeze_teacher, load_model, load_peft_teacher
        from kd_llm.teacher_cache.metadata import state_dict_sha256
        from kd_llm.training.teacher_head import checked_teacher_head

        if num_threads:
            torch.set_num_threads(num_threads)
        torch.set_grad_enabled(False)  # the teacher never trains here
        weights_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        if adapter is not None:
            model = load_peft_teacher(spec, adapter, dtype=weights_dtype, trust_remote_code=trust_remote_code)
        else:
            model = load_model(spec, dtype=weights_dtype, trust_remote_code=trust_remote_code)
        model = freeze_teacher(model)
        rows = {which: _embedding_rows(model, which) for which in ("input", "output")}
        head = checked_teacher_head(model) if hidden_states else None  # refused here, with the reason, if it can't
        info = TeacherInfo(config=model.config, embedding_rows=rows, weights_hash=state_dict_sha256(model),
                           parameters=sum(p.numel() for p in model.parameters()),
                           dtype=str(next(model.parameters()).dtype), device=device, head=head)
        model.to(device)
        wire_dtype = getattr(torch, transport_dtype)
    except BaseException:  # noqa: BLE001 -- whatever it is, the parent must hear it rather than wait
        connection.send(("error", traceback.format_exc()))
        connection.close()
        return
    connection.send(("ready", info))
    while True:
        try:
            request = connection.recv()
        except (EOFError, OSError):  # the parent is gone
            break
        if request is None:
            break
        try:
            input_ids, attention_mask, position_ids, hidden = request
            # Packed rows (kd_llm.data.packing) come with position_ids and no mask: the mask the model builds from
            # them keeps each example to itself, as in the training process.
            inputs = {name: value.to(device) for name, value in (("input_ids", input_ids),
                                                                 ("attention_mask", attention_mask),
                                                                 ("position_ids", position_ids)) if value is not None}
            if hidden:
                outputs = model(**inputs, use_cache=False, **HIDDEN_STATE_FORWARD_KWARGS)
                answer = ("hidden", outputs.hidden_states[-1].to(wire_dtype).cpu())
            else:
                logits = model(**inputs, use_cache=False).logits
                answer = ("logits", logits.float().cpu())
        except Exception:  # noqa: BLE001 -- reported; the child keeps serving
            answer = ("error", traceback.format_exc())
        try:
            connection.send(answer)
        except OSError:  # the parent is gone
            break
    connection.close()


def _stop_child(process, connection) -> None:
    """Ask the child to stop, then terminate / kill it if it does not; always join it (no zombie)."""
    if process.is_alive():
        try:
            connection.send(None)
        except (OSError, ValueError):  # Pipe already broken or closed
            pass
        process.join(_STOP_SECONDS)
        if process.is_alive():
            process.terminate()
            process.join(_STOP_SECONDS)
        if process.is_alive():
            process.kill()
    process.join()
    connection.close()


class TeacherProcess:
    """A causal LM teacher in a side process, callable like the model for scoring:
    ``proxy(input_ids=..., attention_mask=..., use_cache=False).logits`` (float32, on ``input_ids``' device).

    Args:
        spec: the teacher, any spec of :func:`kd_llm.models.loading.load_model` (folder, .gguf, packaged:, Hub id).
        adapter: a PEFT adapter folder merged into it (as :func:`~kd_llm.models.loading.load_peft_teacher`).
        trust_remote_code: passed to the loader.
        dtype: the teacher's weights dtype in the child ("float32", "bfloat16", ...).
        device: where the child runs it ("cpu", "cuda:1", ...).
        num_threads: torch CPU threads in the child (None: torch's default).
        hidden_states: the child also answers with final hidden states (``output_hidden_states=...``), and sends its
            lm_head once, so the trainer's fused loss can run on it. Refused at start-up, with the reason, for a
            teacher whose logits are not ``softcap(lm_head(h))``.
        transport_dtype: dtype of the hidden states on the wire ("float32": exact; "bfloat16": half the bytes).
        startup_timeout / request_timeout: seconds to wait for loading / one answer (None: no limit; a dead child
            is noticed anyway).
    """

    def __init__(self, spec: str | os.PathLike, *, adapter: str | os.PathLike | None = None,
                 trust_remote_code: bool = False, dtype: str | torch.dtype = "float32", device: str = "cpu",
                 num_threads: int | None = None, startup_timeout: float | None = 900.0,
                 request_timeout: float | None = 600.0, hidden_states: bool = False,
                 transport_dtype: str = "float32"):
        if transport_dtype not in TRANSPORT_DTYPES:
            raise ValueError(f"transport_dtype must be one of {', '.join(TRANSPORT_DTYPES)}, got {transport_dtype!r}.")
        self.spec, self.request_timeout = str(spec), request_timeout
        self.ships_hidden_states = hidden_states
        context = multiprocessing.get_context("spawn")
        self._connection, child_end = context.Pipe()
        self._process = context.Process(
            target=_serve, name=f"kd_llm-teacher:{self.spec}", daemon=True,
            args=(child_end, self.spec, None if adapter is None else str(adapter), trust_remote_code,
                  str(dtype).removeprefix("torch."), str(device), num_threads, hidden_states, transport_dtype))
        self._process.start()
        child_end.close()  # the child holds it now; the parent keeping it would hide the child's death from recv
        self._finalizer = weakref.finalize(self, _stop_child, self._process, self._connection)
        self.requests = 0  # forward passes answered
        self.bytes_received = 0  # payload bytes of the answers (logits or hidden states), for the benchmarks
        self._output_embeddings = None
        try:
            self.info: TeacherInfo = self._receive(startup_timeout, f"loading the teacher {self.spec!r}")
        except BaseException:
            self.close()
            raise

    # -- what the trainer checks ----------------------------------------------------------------------------------

    @property
    def config(self):
        return self.info.config

    @property
    def weights_hash(self) -> str:
        return self.info.weights_hash

    @property
    def reported_embedding_rows(self) -> dict:
        """Rows of the teacher's input / output embeddings, read by kd_llm.models.vocab's vocabulary check."""
        return dict(self.info.embedding_rows)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def is_alive(self) -> bool:
        return self._finalizer.alive and self._process.is_alive()

    # -- scoring ---------------------------------------------------------------------------------------------------

    @property
    def head(self):
        """The teacher's :class:`~kd_llm.models.lm_head.TeacherHead` (``hidden_states=True`` only, else None)."""
        return self.info.head

    def get_output_embeddings(self):
        """The teacher's lm_head as a frozen ``nn.Linear`` (``hidden_states=True``), what the fused path reads."""
        if self.info.head is None:
            return None
        if self._output_embeddings is None:
            self._output_embeddings = self.info.head.as_linear()
        return self._output_embeddings

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 use_cache: bool | None = None, output_hidden_states=None, logits_to_keep: int = 0,
                 position_ids: torch.Tensor | None = None, **unsupported) -> CausalLMOutput:
        """Logits ``[B, T, V]``; with ``output_hidden_states`` (``hidden_states=True`` only) the final hidden states
        ``hidden_states=(h,)`` come over the wire, and the logits of the last ``logits_to_keep`` positions (all for
        0) are computed here from them and the head. Packed rows (kd_llm.data.packing): ``position_ids`` and no
        ``attention_mask``, both sent as given, so the child's model isolates the examples as a live teacher does."""
        if unsupported or (output_hidden_states and self.info.head is None):
            asked = sorted(unsupported) or ["output_hidden_states"]
            raise TypeError(f"The side-process teacher returns logits only; it does not take {asked}"
                            + ("" if unsupported else ": start it with TeacherProcess(..., hidden_states=True)."))
        if not self._finalizer.alive:
            raise TeacherProcessError(f"The teacher process ({self.spec}) is closed.")
        hidden = bool(output_hidden_states)
        on_cpu = [None if value is None else value.detach().cpu() for value in (input_ids, attention_mask,
                                                                                 position_ids)]
        try:
            self._connection.send((*on_cpu, hidden))
        except OSError as error:  # a broken Pipe: the child is gone
            raise self._gone("scoring a batch") from error
        payload = self._receive(self.request_timeout, "scoring a batch")
        self.requests += 1
        self.bytes_received += payload.numel() * payload.element_size()
        if not hidden:
            return CausalLMOutput(logits=payload.to(input_ids.device))
        states = payload.to(input_ids.device, torch.float32)
        head = self.info.head
        kept = states[:, -logits_to_keep:] if logits_to_keep else states
        with torch.no_grad():
            logits = soft_cap(kept @ head.weight.to(kept.device).T, head.softcap)
        return CausalLMOutput(logits=logits, hidden_states=(states,))

    def _receive(self, timeout: float | None, doing: str):
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._connection.poll(_POLL_SECONDS):
            if not self._process.is_alive():
                if self._connection.poll():  # it answered just before exiting
                    break
                raise self._gone(doing)
            if deadline is not None and time.monotonic() > deadline:
                self.close()
                raise TeacherProcessError(
                    f"The teacher process ({self.spec}) did not answer within {timeout:g} s while {doing}; it was "
                    "stopped. If it is only slow, raise startup_timeout / request_timeout.")
        try:
            kind, payload = self._connection.recv()
        except (EOFError, OSError) as error:
            raise self._gone(doing) from error
        if kind == "error":  # the child's own exception first, then its traceback
            raise TeacherProcessError(f"The teacher process ({self.spec}) failed while {doing}: "
                                      f"{payload.strip().splitlines()[-1]}\n\nTraceback in the teacher process:\n"
                                      f"{payload}")
        return payload

    def _gone(self, doing: str) -> TeacherProcessError:
        """The error for a child that died without a message; reaps it."""
        self._process.join(_STOP_SECONDS)  # its Pipe closed as it died: let it finish exiting, for its exit code
        code = self._process.exitcode
        self.close()
        return TeacherProcessError(f"The teacher process ({self.spec}) exited with code {code} while {doing}, "
                                   "without a message (killed? out of memory?).")

    # -- lifetime --------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the child and reap it. Idempotent."""
        self._finalizer()

    def __enter__(self) -> TeacherProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.is_alive() else "closed"
        return f"TeacherProcess({self.spec!r}, pid={self.pid}, {state})"
