"""The trainer's fused loss path: final hidden states through the (possibly DDP-wrapped) models, then the chunked
objective of :mod:`kd_llm.losses.fused` on the two lm_head weights, so no ``[B, T, V]`` logits are ever built.

How the hidden states come out without full logits (transformers 5.x causal LMs): ``logits_to_keep=1`` makes the
model project only the last position through its lm_head (``[B, 1, V]``, negligible), and
``output_hidden_states=-1`` returns the last hidden state alone, which ``capture_outputs`` replaces by the model's
``last_hidden_state`` (the post-final-norm state the lm_head reads). The student's forward still goes through the
wrapper the Trainer gave it, so DDP's gradient hooks fire as usual: the lm_head weight gets its gradient from the
fused loss, through the same parameter (a tied input embedding gets both contributions, summed by autograd).

Whether the fused path is usable is decided once, when the trainer is built (:func:`choose_loss_path`): each model
must expose its lm_head as a ``nn.Linear`` and pass a probe (its own logits on a few tokens equal the head applied to
the hidden state it returns, soft cap included). With ``fused_loss="auto"`` anything that rules it out falls back to
the dense path, with the reason logged; with ``fused_loss="true"`` it is an error instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kd_llm.data.packing import model_inputs
from kd_llm.losses import LossComponents
from kd_llm.losses.fused import fused_distillation_objective, soft_cap
from kd_llm.losses.fused_sparse import fused_sparse_distillation_objective

logger = logging.getLogger(__name__)

FUSED_LOSS_CHOICES = ("auto", "true", "false")
# Forward keyword arguments of the fused path: last position's logits only, last hidden state only.
FUSED_FORWARD_KWARGS = {"logits_to_keep": 1, "output_hidden_states": -1}
PROBE_TOKENS = 8
SIDE_PROCESS_REASON = ("the teacher runs in a side process (TeacherProcess), which returns logits, not the hidden "
                       "states and lm_head weights the fused loss reads")


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


def fused_path_blockers(trainer) -> list[str]:
    """Why the fused path cannot serve this trainer (empty: it can). Checks the models with :func:`probe_head`."""
    args = trainer.args
    reasons = []
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        reasons.append("FSDP / DeepSpeed shard the lm_head weights the fused loss reads whole")
    if getattr(trainer, "teacher_logits", None) is not None or args.precompute_teacher_logits:
        reasons.append("precompute_teacher_logits serves teacher logits, not the teacher's hidden states")
    if getattr(trainer, "served_teacher", None) is not None:
        reasons.append("a served teacher's top-k takes the dense sparse loss")
    if getattr(trainer, "feature_distiller", None) is not None:
        reasons.append("feature distillation (hidden_weight / attention_weight) runs the teacher for full logits")
    from kd_llm.training.trainer import DistillationTrainer  # imported here: trainer.py imports this module

    if type(trainer).compute_loss is not DistillationTrainer.compute_loss:
        reasons.append(f"{type(trainer).__name__} computes its own loss (compute_loss)")
    elif type(trainer)._teacher_logits_for is not DistillationTrainer._teacher_logits_for:
        reasons.append(f"{type(trainer).__name__} builds its own teacher target (_teacher_logits_for)")
    models = [("student", trainer.accelerator.unwrap_model(trainer.model))]
    if getattr(trainer, "teacher_in_side_process", False):
        # It returns logits only. With a cache the cached batches can still be fused; the ones the side process
        # scores take the dense loss (compute_loss), which choose_loss_path logs.
        if getattr(trainer, "teacher_cache", None) is None:
            reasons.append(SIDE_PROCESS_REASON)
    elif args.alpha < 1 and trainer.teacher is not None:
        models.append(("teacher", trainer.accelerator.unwrap_model(trainer.teacher)))
    if not reasons:  # probing costs two tiny forward passes: skip it when the answer is already no
        for role, model in models:
            head = output_head(model)
            problem = head if isinstance(head, str) else probe_head(
                model, head, half_precision=trainer.accelerator.mixed_precision != "no")
            if problem is not None:
                reasons.append(f"{role}: {problem}")
    return reasons


def choose_loss_path(trainer) -> bool:
    """True for the fused path. Logs the choice; raises when ``fused_loss="true"`` cannot be honoured."""
    setting = trainer.args.fused_loss
    if setting == "false":
        logger.info("kd_llm loss path: dense (fused_loss=false).")
        return False
    reasons = fused_path_blockers(trainer)
    if reasons and setting == "true":
        raise ValueError("fused_loss=true, but the fused loss cannot be used here: " + "; ".join(reasons)
                         + ". Set fused_loss=auto (falls back to the dense loss) or false.")
    if reasons:
        logger.warning("kd_llm loss path: dense (fused_loss=auto fell back: %s).", "; ".join(reasons))
        return False
    chunk = trainer.args.loss_chunk_size or "auto"
    logger.info("kd_llm loss path: fused, chunked (loss_chunk_size=%s): no [B, T, V] logits are materialised.", chunk)
    if getattr(trainer, "teacher_in_side_process", False):
        logger.warning("kd_llm loss path: fused for the teacher cache's batches only; the batches the cache does not "
                       "hold (on-policy samples, evaluation) take the dense loss: %s.", SIDE_PROCESS_REASON)
    return True


def fused_objective_terms(trainer, student_outputs, inputs: dict, shifted_labels: Tensor, *, alpha: float,
                          temperature: float, num_items_in_batch, cache_index: Tensor | None = None) -> LossComponents:
    """The objective from the student's forward outputs (run with ``FUSED_FORWARD_KWARGS``) and a live teacher
    forward on the same batch, both aligned with ``shifted_labels`` (``[B, T-1]``); or, given ``cache_index``, the
    teacher cache's stored targets for those examples (``kd_llm.teacher_cache``)."""
    args = trainer.args
    student_head = output_head(trainer.accelerator.unwrap_model(trainer.model))
    student_hidden = student_outputs.hidden_states[-1][:, :-1]
    if cache_index is not None:
        targets = None
        if alpha < 1:
            targets = trainer.teacher_cache.gather(cache_index, shifted_labels, device=student_hidden.device)
        return fused_sparse_distillation_objective(
            student_hidden, student_head.weight, shifted_labels, targets, student_bias=student_head.bias,
            alpha=alpha, loss=args.distillation_loss, temperature=temperature, tail_mode=args.teacher_cache_tail_mode,
            beta=args.beta, skew=args.skew, num_items_in_batch=num_items_in_batch,
            kd_vocab_size=trainer.teacher_cache.vocab_size, chunk_size=args.loss_chunk_size or None,
            student_softcap=student_head.softcap,
        )
    teacher_hidden = teacher_weight = teacher_bias = teacher_softcap = None
    if alpha < 1:
        teacher_head = output_head(trainer.accelerator.unwrap_model(trainer.teacher))
        with torch.no_grad():
            teacher_outputs = trainer.teacher(**model_inputs(inputs), use_cache=False, **FUSED_FORWARD_KWARGS)
        teacher_hidden = teacher_outputs.hidden_states[-1][:, :-1]
        teacher_weight, teacher_bias, teacher_softcap = teacher_head.weight, teacher_head.bias, teacher_head.softcap
    return fused_distillation_objective(
        student_hidden, student_head.weight, shifted_labels, teacher_hidden, teacher_weight,
        student_bias=student_head.bias, teacher_bias=teacher_bias, alpha=alpha, loss=args.distillation_loss,
        temperature=temperature, beta=args.beta, skew=args.skew, num_items_in_batch=num_items_in_batch,
        kd_vocab_size=trainer.kd_vocab_size, chunk_size=args.loss_chunk_size or None,
        student_softcap=student_head.softcap, teacher_softcap=teacher_softcap,
    )
