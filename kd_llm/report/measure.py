"""What a model costs to keep and to run: parameters, bytes on disk, generation latency and throughput, peak memory.

Every model in a report is measured here with the same prompts, the same number of generated tokens and on the same
device, so the ratios between them mean something.

Generation speed is timed on a fixed-length workload: greedy decoding of exactly ``new_tokens`` tokens per prompt
(EOS is suppressed until then), so a model that stops early is not "faster" for it. Batch 1 gives the latency a
single user sees; a larger batch gives throughput.

Peak memory during inference:

- GPU: ``torch.cuda.max_memory_allocated`` over the batched generation, after ``reset_peak_memory_stats``. Its rise
  over what was allocated before (KV cache, activations, logits) is added to the model's own weight bytes, so the
  figure is what the model needs alone, whatever else shares the GPU.
- CPU: the process's resident set size, in a fresh Python subprocess (:mod:`kd_llm.report.memory_probe`) that loads
  only this model and runs the same batched generation. A fresh process matters: in the process that trained, memory
  freed earlier is kept by the allocator and reused without showing up in RSS, and the other models sit in RSS too.
  On Linux the probe resets the RSS high-water mark (``/proc/self/clear_refs`` ← 5) after loading, so the peak it
  reads (``VmHWM``) is the peak *during generation*, not a transient of loading; where that is not possible it falls
  back to ``getrusage(RUSAGE_SELF).ru_maxrss``, which also covers loading, and says so in ``method``.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kd_llm.evaluation.generation import left_pad


@dataclass
class BenchmarkSettings:
    """How generation speed and memory are measured; the same for every model of a report."""

    batch_size: int = field(default=16, metadata={"help": "The larger batch of the throughput measurement."})
    new_tokens: int = field(default=32, metadata={"help": "Tokens generated per prompt in the timed runs."})
    repeats: int = field(default=5, metadata={"help": "Timed runs per batch size; the median is reported."})
    measure_memory: bool = field(
        default=True, metadata={"help": "Measure peak inference memory (on CPU: one subprocess per model)."}
    )

    def __post_init__(self):
        for name in ("batch_size", "new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchmarkSettings.{name} must be at least 1, got {getattr(self, name)}.")

    def to_dict(self) -> dict:
        return asdict(self)


def parameter_count(model) -> int:
    """Parameters, each shared (tied) tensor counted once: ``parameters()`` already yields a tied weight once."""
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers in memory, shared tensors counted once."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def local_weights_folder(source: str | os.PathLike | None) -> Path | None:
    """The local folder whose safetensors ``load_model(source)`` reads, or None (a Hub id, or no source)."""
    if source is None:
        return None
    from kd_llm.models.loading import resolve_model_source
    from kd_llm.models.packaged import gguf_cache_dir

    path, gguf_file = resolve_model_source(source)
    if gguf_file is not None:
        return Path(gguf_cache_dir(Path(path) / gguf_file))  # the GGUF is loaded from its dequantized safetensors
    return Path(path) if Path(path).is_absolute() else None


def size_on_disk(model, source: str | os.PathLike | None = None) -> dict:
    """Bytes of the safetensors weight files the model is loaded from; for a model with no local folder, of a copy
    saved with ``save_pretrained`` into a temporary folder (same dtype, shared tensors stored once)."""
    folder = local_weights_folder(source)
    files = sorted(folder.glob("*.safetensors")) if folder is not None else []
    how = "weight files of its folder"
    if not files:
        with tempfile.TemporaryDirectory(prefix="kd_llm_size_") as scratch:
            model.save_pretrained(scratch)
            files = sorted(Path(scratch).glob("*.safetensors"))
            return {"bytes": sum(f.stat().st_size for f in files), "files": len(files),
                    "how": "safetensors copy saved for the measurement"}
    return {"bytes": sum(f.stat().st_size for f in files), "files": len(files), "how": how}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cycled_batch(prompts: list[list[int]], size: int) -> list[list[int]]:
    """``size`` prompts, cycling through ``prompts`` when there are fewer."""
    return [prompts[i % len(prompts)] for i in range(size)]


@torch.no_grad()
def generate_fixed_length(model, prompts: list[list[int]], *, new_tokens: int, pad_token_id: int,
                          eos_token_id: int | list[int] | None) -> torch.Tensor:
    """Greedy generation of exactly ``new_tokens`` tokens for each prompt (EOS suppressed until then)."""
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompts, pad_token_id, device)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, use_cache=True,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_token_id,
                            eos_token_id=eos_token_id)
    generated = output.shape[1] - input_ids.shape[1]
    if generated != new_tokens:
        raise RuntimeError(f"Asked for {new_tokens} new tokens and the model generated {generated}; the timing "
                           "would not compare like with like.")
    return output


def time_generation(model, prompts: list[list[int]], *, batch_size: int, new_tokens: int, repeats: int,
                    pad_token_id: int, eos_token_id) -> dict:
    """Median wall time of ``repeats`` fixed-length generations of ``batch_size`` prompts, after one warm-up run.

    Batch 1 cycles through different prompts; a larger batch reuses the same ``batch_size`` prompts each time.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = ([[prompts[i % len(prompts)]] for i in range(repeats)] if batch_size == 1
               else [cycled_batch(prompts, batch_size)] * repeats)
    generate = lambda batch: generate_fixed_length(model, batch, new_tokens=new_tokens,  # noqa: E731
                                                   pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    generate(batches[0])  # warm-up: first-call allocations and kernel selection are not part of the latency
    seconds = []
    for batch in batches:
        _synchronize(device)
        started = time.perf_counter()
        generate(batch)
        _synchronize(device)
        seconds.append(time.perf_counter() - started)
    model.train(was_training)
    latency = statistics.median(seconds)
    return {
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "latency_seconds": latency,
        "tokens_per_second": batch_size * new_tokens / latency,
        "runs": repeats,
        "latency_range_seconds": [min(seconds), max(seconds)],  # on a shared machine, the spread says how much
    }


@torch.no_grad()
def peak_memory_cuda(model, prompts: list[list[int]], *, new_tokens: int, pad_token_id: int, eos_token_id) -> dict:
    """Peak CUDA memory of one batched fixed-length generation: the model's weights plus the peak rise over what was
    allocated before it started."""
    device = next(model.parameters()).device
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    generate_fixed_length(model, prompts, new_tokens=new_tokens, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    torch.cuda.synchronize(device)
    working = torch.cuda.max_memory_allocated(device) - before
    weights = weight_bytes(model)
    return {"peak_bytes": weights + working, "weights_bytes": weights, "working_bytes": working,
            "method": "torch.cuda.max_memory_allocated during generation (weights + peak rise)"}


def cpu_probe_request(folder: str | os.PathLike, prompts: list[list[int]], *, new_tokens: int, pad_token_id: int,
                      eos_token_id, dtype: torch.dtype, trust_remote_code: bool = False) -> dict:
    """What the probe subprocess needs: a local folder with safetensors weights (see :func:`probe_folder`)."""
    return {"folder": str(folder), "prompts": prompts, "new_tokens": new_tokens, "pad_token_id": pad_token_id,
            "eos_token_id": eos_token_id, "dtype": str(dtype).removeprefix("torch."),
            "trust_remote_code": trust_remote_code, "threads": torch.get_num_threads()}


def peak_memory_cpu(requests: list[dict], *, timeout: float = 900) -> list[dict]:
    """Peak resident memory of loading each request's model and running one batched fixed-length generation, each in
    its own fresh subprocess (see the module docstring for why). The subprocesses run at the same time: each
    measures only its own memory, and starting Python with torch is most of their cost. Call this after the speed
    timings, never during them."""
    command = [sys.executable, str(Path(__file__).with_name("memory_probe.py"))]
    processes = []
    for request in requests:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=os.environ.copy())
        processes.append((request["folder"], process, json.dumps(request)))
    results = []
    for source, process, payload in processes:
        try:
            stdout, stderr = process.communicate(payload, timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise RuntimeError(f"The memory probe for {source} ran past {timeout:.0f} s and was stopped.") from None
        if process.returncode != 0:
            raise RuntimeError(f"The memory probe for {source} failed (exit {process.returncode}):\n{stderr[-3000:]}")
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"The memory probe for {source} printed no result:\n{stdout[-2000:]}")
        result = json.loads(lines[-1])
        if result["generated_tokens"] != next(r for r in requests if r["folder"] == source)["new_tokens"]:
            raise RuntimeError(f"The memory probe for {source} generated {result['generated_tokens']} tokens, not the "
                               "requested number; its peak would not compare with the others'.")
        results.append(result)
    return results


def measure_model(model, *, source: str | os.PathLike | None, prompts: list[list[int]], new_tokens: int,
                  pad_token_id: int, eos_token_id, settings: BenchmarkSettings, trust_remote_code: bool = False,
                  cpu_memory: bool = True) -> dict:
    """Parameters, size on disk, speed at batch 1 and at ``settings.batch_size``, and peak inference memory.

    ``cpu_memory=False`` leaves the CPU memory probe to the caller, which can then run the probes of several models
    together after all their timings (:func:`peak_memory_cpu`)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    timing = dict(new_tokens=new_tokens, repeats=settings.repeats, pad_token_id=pad_token_id,
                  eos_token_id=eos_token_id)
    result = {
        "parameters": parameter_count(model),
        "weights_bytes": weight_bytes(model),
        "size_on_disk": size_on_disk(model, source),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "speed": {
            "batch_1": time_generation(model, prompts, batch_size=1, **timing),
            f"batch_{settings.batch_size}": time_generation(model, prompts, batch_size=settings.batch_size, **timing),
        },
    }
    if settings.measure_memory:
        batch = cycled_batch(prompts, settings.batch_size)
        options = dict(new_tokens=new_tokens, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
        if device.type == "cuda":
            result["memory"] = peak_memory_cuda(model, batch, **options)
        elif cpu_memory:
            with probe_folder(model, source) as folder:
                request = cpu_probe_request(folder, batch, dtype=dtype, trust_remote_code=trust_remote_code,
                                            **options)
                result["memory"] = {**peak_memory_cpu([request])[0], "weights_bytes": weight_bytes(model)}
        if "memory" in result:
            result["memory"]["batch_size"] = settings.batch_size
    return result


@contextlib.contextmanager
def probe_folder(model, source):
    """A local folder with the model's safetensors weights for the probe subprocess: the one ``source`` loads from,
    or (a Hub id, or no source) a temporary saved copy."""
    folder = local_weights_folder(source)
    if folder is not None and any(folder.glob("*.safetensors")):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="kd_llm_probe_") as scratch:
        model.save_pretrained(scratch)
        yield scratch
