"""Models' output heads for the fused losses: the lm_head as ``(weight, bias, soft cap)``, and a probe that the model's
logits really are ``soft_cap(lm_head(last hidden state))``.

How the hidden states come out without full logits (transformers 5.x causal LMs): ``logits_to_keep=1`` makes the
model project only the last position through its lm_head (``[B, 1, V]``, negligible), and
``output_hidden_states=-1`` returns the last hidden state alone, which ``capture_outputs`` replaces by the model's
``last_hidden_state`` (the post-final-norm state the lm_head reads). The student's forward still goes through the
wrapper the Trainer gave it, so DDP's gradient hooks fire as usual: the lm_head weight gets its gradient from the
fused loss, through the same parameter (a tied input embedding gets both contributions, summed by autograd).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kd_llm.losses.fused import soft_cap

# Forward keyword arguments of the fused path: last position's logits only, last hidden state only.
FUSED_FORWARD_KWARGS = {"logits_to_keep": 1, "output_hidden_states": -1}
PROBE_TOKENS = 8


@dataclass
class OutputHead:
    """A model's output projection: ``logits = soft_cap(hidden @ weight.T + bias, softcap)``."""

    weight: Tensor
    bias: Tensor | None
    softcap: float | None


def final_logit_softcap(model: nn.Module) -> float | None:
    """Gemma 2/3's ``final_logit_softcapping`` (the text config's, for multimodal configs), or None."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for candidate in configs:
        cap = getattr(candidate, "final_logit_softcapping", None)
        if cap:
            return float(cap)
    return None


def output_head(model: nn.Module) -> OutputHead | str:
    """The (unwrapped) model's lm_head, or a sentence saying why it cannot be used by the fused loss."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return f"{type(model).__name__} exposes no output embeddings (get_output_embeddings() is None)"
    if type(head) is not nn.Linear:  # a LoRA-wrapped or quantised head computes something else than weight @ h
        return f"{type(model).__name__}'s lm_head is a {type(head).__name__}, not a plain torch.nn.Linear"
    return OutputHead(head.weight, head.bias, final_logit_softcap(model))


def probe_head(model: nn.Module, head: OutputHead, *, half_precision: bool = False) -> str | None:
    """Run ``model`` on a few tokens with the fused forward arguments; None if ``head`` applied to the hidden state
    it returns gives the model's own logits, else why not (an unknown logit scaling, an ignored argument...).
    ``half_precision``: the model may run under a bf16/fp16 autocast (Accelerate wraps a prepared model's forward
    with it), so its logits carry half-precision rounding even when they come back as float32."""
    device = head.weight.device
    input_ids = (torch.arange(PROBE_TOKENS, device=device) % head.weight.shape[0]).unsqueeze(0)
    was_training = model.training
    model.eval()  # no dropout: no random numbers drawn, the same hidden state for both computations
    try:
        with torch.no_grad():
            outputs = model(input_ids=input_ids, use_cache=False, **FUSED_FORWARD_KWARGS)
    except Exception as error:  # noqa: BLE001 -- any failure here is a reason to use the dense path, reported
        return (f"{type(model).__name__}'s forward failed with {FUSED_FORWARD_KWARGS} "
                f"({type(error).__name__}: {error})")
    finally:
        model.train(was_training)
    hidden_states, logits = getattr(outputs, "hidden_states", None), getattr(outputs, "logits", None)
    if not hidden_states or logits is None:
        return f"{type(model).__name__} returned no hidden states or no logits"
    if logits.shape[-2] != 1:
        return f"{type(model).__name__} ignores logits_to_keep=1 (it returned logits for {logits.shape[-2]} positions)"
    with torch.no_grad():
        hidden = hidden_states[-1][:, -1:].to(head.weight.dtype)
        ours = soft_cap(nn.functional.linear(hidden, head.weight, head.bias).float(), head.softcap)
        theirs = logits.float()
        scale = max(theirs.abs().max().item(), 1.0)
        if half_precision or head.weight.dtype != torch.float32 or logits.dtype != torch.float32:
            # A half-precision dot product is off by up to ~2^-8 of sum |h_i w_i| (inputs and sum rounded): allow
            # that, which still catches any logit scaling (an error of the order of the logits themselves).
            products = nn.functional.linear(hidden.float().abs(), head.weight.float().abs()).max().item()
            tolerance = 1e-2 * (products + scale)
        else:
            tolerance = 1e-4 * scale
    difference = (ours - theirs).abs().max().item()
    if not difference <= tolerance:
        return (f"{type(model).__name__}'s logits are not soft_cap(lm_head(last hidden state)) (max difference "
                f"{difference:.3g}): the model post-processes its logits in a way the fused loss does not know")
    return None


def head_problem(role: str, model: nn.Module, *, half_precision: bool) -> str | None:
    """Why ``model`` (unwrapped) cannot serve the fused loss as ``role`` ("student", "teacher"), or None."""
    head = output_head(model)
    problem = head if isinstance(head, str) else probe_head(model, head, half_precision=half_precision)
    return None if problem is None else f"{role}: {problem}"
