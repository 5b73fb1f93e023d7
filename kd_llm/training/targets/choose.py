"""The target chooser: the one place that turns a run (settings, shape, the teacher sources it has) into the
:class:`~kd_llm.training.targets.base.TeacherTarget` its batches go through. Called once, when the trainer is built;
it logs the chosen target and why the fused loss was ruled out, if it was.

Which settings combine and which loss path runs is :mod:`kd_llm.training.rules`; this module adds what only the
models can tell (the lm_head probe of :mod:`kd_llm.training.targets.heads`) and builds the targets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from kd_llm.teacher_cache.hidden_cache import HiddenStateCache
from kd_llm.training import rules
from kd_llm.training.targets.base import TeacherTarget
from kd_llm.training.targets.cross_tokenizer import CrossTokenizer
from kd_llm.training.targets.ensemble import EnsembleMixture
from kd_llm.training.targets.hidden_cache import HiddenCache, HiddenCacheFused
from kd_llm.training.targets.heads import head_problem
from kd_llm.training.targets.live import LiveHead, LiveLogits
from kd_llm.training.targets.precomputed import PrecomputedLogits, PrecomputedTeacherLogits
from kd_llm.training.targets.routed import Routed
from kd_llm.training.targets.served import ServedTeacher
from kd_llm.training.targets.side_process import SideProcess
from kd_llm.training.targets.side_process_hidden import SideProcessHidden
from kd_llm.training.targets.topk_cache import TopKCache, TopKCacheFused

logger = logging.getLogger(__name__)


@dataclass
class TargetSources:
    """What a run has to build its target from.

    ``teacher``: what runs the teacher's forward (a placed model, a TeacherProcess, an ensemble, or None);
    ``teacher_module``: the unwrapped teacher model whose lm_head the fused loss reads (None if not a model);
    ``student``: the unwrapped student; ``cache``: an opened top-k or hidden-state teacher cache; ``precomputed``:
    teacher logits kept in memory; ``load_ensemble``: for an ensemble teacher, loads every member not in memory yet; ``served``: a
    served teacher's signal (kd_llm.serving.training.ServedTopK), ``on_served_failure`` what to do when it fails for
    good; ``cross_tokenizer``: the checked settings of a teacher with another tokenizer (kd_llm.cross_tokenizer)."""

    args: object
    shape: rules.RunShape
    student: nn.Module
    teacher: object = None
    teacher_module: nn.Module | None = None
    cache: object = None
    precomputed: PrecomputedTeacherLogits | None = None
    load_ensemble: Callable[[], None] | None = None
    served: object = None
    on_served_failure: Callable[[Exception], None] | None = None
    mixed_precision: bool = False
    cross_tokenizer: object = None  # CrossTokenizerSettings: a live teacher with another tokenizer


def fused_reasons(sources: TargetSources) -> list[str]:
    """Why the fused loss cannot serve this run: the rule book's blockers, else the models' lm_head probes."""
    args, shape = sources.args, sources.shape
    reasons = [blocker.reason for blocker in rules.fused_blockers(args, shape)]
    if reasons:  # probing costs two tiny forward passes: skip it when the answer is already no
        return reasons
    models = [("student", sources.student)]
    if args.alpha < 1 and shape.teacher == "live" and sources.teacher_module is not None:
        models.append(("teacher", sources.teacher_module))
    for role, model in models:
        problem = head_problem(role, model, half_precision=sources.mixed_precision)
        if problem is not None:
            reasons.append(problem)
    return reasons


def choose_fused(sources: TargetSources) -> bool:
    """True for the fused loss. Logs the choice; raises when ``fused_loss="true"`` cannot be honoured."""
    setting = sources.args.fused_loss
    if setting == "false":
        logger.info("kd_llm loss path: dense (fused_loss=false).")
        return False
    reasons = fused_reasons(sources)
    if reasons and setting == "true":
        raise ValueError(rules.fused_refusal(reasons))
    if reasons:
        logger.warning("kd_llm loss path: dense (fused_loss=auto fell back: %s).", "; ".join(reasons))
        return False
    chunk = sources.args.loss_chunk_size or "auto"
    logger.info("kd_llm loss path: fused, chunked (loss_chunk_size=%s): no [B, T, V] logits are materialised.", chunk)
    if sources.shape.teacher == "side_process" and not sources.shape.teacher_ships_hidden:
        logger.warning("kd_llm loss path: fused for the teacher cache's batches only; the batches the cache does not "
                       "hold (on-policy samples, evaluation) take the dense loss: %s.", rules.SIDE_PROCESS_REASON)
    return True


def live_target(sources: TargetSources, fused: bool) -> TeacherTarget | None:
    """The target of a teacher that runs during training (None when there is none)."""
    if sources.served is not None:  # it scores every batch; a teacher model given too is its parity reference
        return ServedTeacher(sources.served, sources.args.teacher_cache_tail_mode, sources.on_served_failure)
    if sources.shape.teacher == "side_process":
        if fused and sources.shape.teacher_ships_hidden:  # its hidden states and head reach the fused loss
            return SideProcessHidden(sources.student, sources.teacher)
        return SideProcess(sources.teacher)
    if sources.load_ensemble is not None:
        return EnsembleMixture(sources.teacher, sources.load_ensemble)
    if sources.teacher is None and sources.args.alpha < 1:
        return None  # a stored target serves the training batches; nothing serves the rest
    if sources.cross_tokenizer is not None:
        return CrossTokenizer(sources.teacher, sources.cross_tokenizer)
    if fused:
        return LiveHead(sources.student, sources.teacher, sources.teacher_module)
    return LiveLogits(sources.teacher)


def stored_target(sources: TargetSources, fused: bool) -> TeacherTarget | None:
    """The target of teacher outputs stored before training (None without)."""
    args = sources.args
    if isinstance(sources.cache, HiddenStateCache):
        return HiddenCacheFused(sources.cache, sources.student) if fused else HiddenCache(sources.cache)
    if sources.cache is not None:
        tail_mode = args.teacher_cache_tail_mode
        return (TopKCacheFused(sources.cache, tail_mode, sources.student) if fused
                else TopKCache(sources.cache, tail_mode))
    if sources.precomputed is not None:
        return PrecomputedLogits(sources.precomputed)
    return None


def choose_target(sources: TargetSources) -> TeacherTarget:
    """The run's target: the stored one for training batches (if any), routed to the live one for the rest."""
    fused = choose_fused(sources)
    live, stored = live_target(sources, fused), stored_target(sources, fused)
    if stored is not None and live is not None:
        target = Routed(stored, live)
    else:
        target = stored or live
    if target is None:
        raise ValueError("No teacher target: pass a teacher_model or a teacher_cache, or set alpha=1.")
    args = sources.args
    if args.lmbda > 0 and not target.scores_generated:
        raise ValueError(f"lmbda > 0 has the teacher score the student's samples, which {target.name} cannot: pass "
                         "a teacher_model (or a TeacherProcess).")
    if args.seq_kd and not target.writes_completions:
        raise ValueError(f"seq_kd has the teacher write completions, which {target.name} cannot: pass the teacher "
                         "model itself.")
    logger.info("kd_llm teacher target: %s.", target.name)
    return target
