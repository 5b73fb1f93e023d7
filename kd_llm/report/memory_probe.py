"""Peak CPU memory of one model's inference, measured in a fresh process.

Run as a script (``python .../memory_probe.py``, by :func:`kd_llm.report.measure.peak_memory_cpu`, whose module
docstring explains the method), not as ``-m kd_llm...``: it imports only torch and transformers, because importing
kd_llm's training stack (Trainer, peft, accelerate) would cost the subprocess more time than the measurement.

Reads a JSON request on stdin (``folder``: a local model folder with safetensors weights, ``prompts``, ``new_tokens``,
``pad_token_id``, ``eos_token_id``, ``dtype``, ``threads``, ``trust_remote_code``), loads the model, runs one batched
fixed-length greedy generation and prints one JSON line.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    """A ``Vm*`` line of /proc/self/status, in KiB (None off Linux)."""
    if not STATUS.exists():
        return None
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _reset_peak() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _model_class(config, trust_remote_code: bool):
    """The causal-LM class ``AutoModelForCausalLM`` would pick for ``config`` (importing its module)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return AutoModelForCausalLM  # remote code: resolved when loading


def main() -> None:
    request = json.loads(sys.stdin.read())
    import torch
    from transformers import AutoConfig

    torch.set_num_threads(request["threads"])
    # Import now what loading and generating would import lazily (the model's modelling module, generation, their
    # kernels): that code is the same for every model, about 140 MB of it, and is not the model's memory.
    config = AutoConfig.from_pretrained(request["folder"], trust_remote_code=request["trust_remote_code"])
    model_class = _model_class(config, request["trust_remote_code"])
    import transformers.generation  # noqa: F401
    torch.ones(8, 8) @ torch.ones(8, 8)  # the first operation sets up the thread pool
    # Baseline: the interpreter with that code loaded, before the model exists.
    rss_before = _status_kib("VmRSS")
    model = model_class.from_pretrained(request["folder"], dtype=getattr(torch, request["dtype"]),
                                        use_safetensors=True, trust_remote_code=request["trust_remote_code"])
    model.eval()
    rss_loaded = _status_kib("VmRSS")
    # The same left-padded batch as kd_llm.evaluation.generation.left_pad builds.
    prompts, pad = request["prompts"], request["pad_token_id"]
    longest = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    reset = rss_loaded is not None and _reset_peak()
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, use_cache=True,
                                max_new_tokens=request["new_tokens"], min_new_tokens=request["new_tokens"],
                                pad_token_id=pad, eos_token_id=request["eos_token_id"])
    if reset:
        peak = _status_kib("VmHWM") * 1024
        method = ("RSS high-water mark (VmHWM) of a fresh subprocess, reset after loading, minus its RSS before "
                  "loading")
    else:
        peak = _maxrss_bytes()
        method = "ru_maxrss of a fresh subprocess (includes loading) minus its RSS before loading"
    before = rss_before * 1024 if rss_before is not None else 0
    loaded = rss_loaded * 1024 if rss_loaded is not None else None
    print(json.dumps({
        "peak_bytes": peak - before,
        "working_bytes": None if loaded is None else peak - loaded,
        "process_rss_before_load_bytes": before,
        "generated_tokens": int(output.shape[1] - input_ids.shape[1]),
        "method": method,
    }))


if __name__ == "__main__":
    main()
