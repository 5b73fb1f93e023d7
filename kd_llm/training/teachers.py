"""Teacher sources beyond one frozen model: a weighted ensemble of teachers, and an EMA copy of the student.

**Ensemble target.** ``kd_loss`` applies ``softmax(z / T)`` to whatever teacher logits it is given, and every
divergence reads only the teacher's log-probabilities. So the ensemble hands the loss ``z = T * log p_mix``, where
``log p_mix`` is the *normalised* log-probability of the mixture at temperature T: then
``softmax(z / T) = softmax(log p_mix) = p_mix`` exactly (up to float rounding), whatever the loss and the temperature.
(Averaging the members' logits instead would give neither mixture.) Two mixtures:

- ``"probs"`` (default): ``p_mix = sum_k w_k softmax(z_k / T)``, the usual ensemble average;
- ``"log_probs"``: ``p_mix ∝ exp(sum_k w_k log_softmax(z_k / T))``, the weighted geometric mean, renormalised; it
  keeps only what all teachers find likely.

Each member's logits are cut to the shared tokenizer length before its softmax, as for a single teacher, so members
whose embeddings are padded to different sizes mix over the same tokens.

**EMA teacher** (self-distillation): a frozen copy of the student whose weights follow the student's,
``teacher = decay * teacher + (1 - decay) * student`` after every optimizer step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_llm.models.loading import freeze_teacher

__all__ = ["ENSEMBLE_MIXTURES", "EMATeacher", "LogProbMixture", "TeacherEnsemble", "ensemble_target_logits",
           "mix_log_probs", "validate_ensemble_weights"]

ENSEMBLE_MIXTURES = ("probs", "log_probs")
_WEIGHT_TOLERANCE = 1e-6


def validate_ensemble_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """One positive weight per teacher, summing to 1; ``None`` gives equal weights. Raises ``ValueError``."""
    if count < 1:
        raise ValueError("a teacher ensemble needs at least one teacher")
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} teacher weights for {count} teachers: give one weight per teacher")
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise ValueError(f"teacher weights must be positive and finite, got {weights}")
    total = sum(weights)
    if abs(total - 1.0) > _WEIGHT_TOLERANCE:
        normalised = [round(w / total, 6) for w in weights]
        raise ValueError(f"teacher weights must sum to 1, got {weights} (sum {total:g}); give normalised weights, "
                         f"e.g. {normalised}")
    return weights


class LogProbMixture:
    """Accumulates teachers one at a time into the log-probabilities of their mixture at one temperature.

    Adding members one by one lets a precomputed target be built while only one teacher is in memory.
    """

    def __init__(self, mixture: str, temperature: float, vocab_size: int | None = None):
        if mixture not in ENSEMBLE_MIXTURES:
            raise ValueError(f"unknown ensemble mixture {mixture!r}; choose one of {', '.join(ENSEMBLE_MIXTURES)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.mixture, self.temperature, self.vocab_size = mixture, temperature, vocab_size
        self._total: Tensor | None = None

    def add(self, logits: Tensor, weight: float) -> None:
        """Add one teacher's logits ``[..., V_k]`` (any float dtype) with its weight."""
        if self.vocab_size is not None:
            if logits.shape[-1] < self.vocab_size:
                raise ValueError(f"teacher logits have {logits.shape[-1]} columns, fewer than the {self.vocab_size} "
                                 "shared vocabulary entries")
            logits = logits[..., : self.vocab_size]
        dtype = torch.promote_types(logits.dtype, torch.float32)
        log_probs = F.log_softmax(logits.detach().to(dtype) / self.temperature, dim=-1)
        if self._total is not None and self._total.shape != log_probs.shape:
            raise ValueError(f"teacher logits {tuple(logits.shape)} do not match the ensemble's earlier members "
                             f"{tuple(self._total.shape)}: every member must see the same tokens")
        if self.mixture == "probs":
            # log(sum_k w_k p_k), accumulated in log space: no underflow of small probabilities.
            term = log_probs + math.log(weight)
            self._total = term if self._total is None else torch.logaddexp(self._total.to(term.device), term)
        else:
            term = weight * log_probs
            self._total = term if self._total is None else self._total.to(term.device) + term

    def log_probs(self) -> Tensor:
        """Normalised log-probabilities of the mixture (the geometric mean needs it; for ``probs`` with weights
        summing to 1 it only removes rounding)."""
        if self._total is None:
            raise ValueError("the mixture has no teacher yet")
        return F.log_softmax(self._total, dim=-1)


def mix_log_probs(teacher_logits: Sequence[Tensor], weights: Sequence[float] | None = None, *,
                  temperature: float = 1.0, mixture: str = "probs", vocab_size: int | None = None) -> Tensor:
    """Log-probabilities ``[..., V]`` (float32, or float64 for float64 input) of the weighted mixture of the
    teachers' tempered distributions (see the module docstring), over the first ``vocab_size`` columns if given."""
    weights = validate_ensemble_weights(weights, len(teacher_logits))
    mixed = LogProbMixture(mixture, temperature, vocab_size)
    for logits, weight in zip(teacher_logits, weights):
        mixed.add(logits, weight)
    return mixed.log_probs()


def ensemble_target_logits(teacher_logits: Sequence[Tensor], weights: Sequence[float] | None = None, *,
                           temperature: float = 1.0, mixture: str = "probs",
                           vocab_size: int | None = None) -> Tensor:
    """Logits ``z = T * log p_mix`` to give ``kd_loss`` in place of one teacher's: ``softmax(z / T) = p_mix``."""
    return temperature * mix_log_probs(teacher_logits, weights, temperature=temperature, mixture=mixture,
                                       vocab_size=vocab_size)


TeacherMember = nn.Module | Callable[[], nn.Module]


class TeacherEnsemble(nn.Module):
    """Several teachers on one tokenizer, with weights, distilled as one mixture (see the module docstring).

    An ``nn.Module`` only so that code handling teachers (unwrapping, placement checks) accepts it; the teachers are
    deliberately not registered submodules: they are loaded lazily and frozen and placed one by one.

    Args:
        teachers: models, or zero-argument functions that load one. A function is only called when its teacher is
            needed, so a precomputed target (``precompute_teacher_logits``) loads the teachers one after another
            and frees each before the next; a live ensemble holds all of them at once.
        weights: one positive weight per teacher, summing to 1 (default: equal).
        mixture: ``"probs"`` (weighted mean of probabilities) or ``"log_probs"`` (weighted mean of
            log-probabilities, renormalised).
        tokenizers: each teacher's tokenizer (None: the student's), checked against the student's before training.
        names: how errors name the teachers (default ``teacher 0``, ``teacher 1``, ...).
    """

    def __init__(self, teachers: Sequence[TeacherMember], weights: Sequence[float] | None = None, *,
                 mixture: str = "probs", tokenizers: Sequence | None = None, names: Sequence[str] | None = None):
        super().__init__()
        teachers = list(teachers)
        self.weights = validate_ensemble_weights(weights, len(teachers))
        if mixture not in ENSEMBLE_MIXTURES:
            raise ValueError(f"unknown ensemble mixture {mixture!r}; choose one of {', '.join(ENSEMBLE_MIXTURES)}")
        for index, member in enumerate(teachers):
            if not (isinstance(member, nn.Module) or callable(member)):
                raise TypeError(f"teacher {index} is a {type(member).__name__}: give a model or a function that "
                                "loads one")
        self.mixture = mixture
        self.tokenizers = list(tokenizers) if tokenizers is not None else [None] * len(teachers)
        self.names = list(names) if names is not None else [f"teacher {i}" for i in range(len(teachers))]
        if len(self.tokenizers) != len(teachers) or len(self.names) != len(teachers):
            raise ValueError("give one tokenizer (or None) and one name per teacher")
        self._loaders = [None if isinstance(m, nn.Module) else m for m in teachers]
        self.models: list[nn.Module | None] = [m if isinstance(m, nn.Module) else None for m in teachers]

    def __len__(self) -> int:
        return len(self.models)

    def load(self, index: int, prepare: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
        """Teacher ``index``, loading it (and passing it through ``prepare``, e.g. freeze and place) if needed."""
        if self.models[index] is None:
            model = self._loaders[index]()
            if not isinstance(model, nn.Module):
                raise TypeError(f"the loader of {self.names[index]} returned a {type(model).__name__}, not a model")
            self.models[index] = prepare(model) if prepare is not None else model
        return self.models[index]

    def release(self, index: int) -> None:
        """Drop teacher ``index`` from memory if it can be loaded again (it came from a loader)."""
        if self._loaders[index] is not None:
            self.models[index] = None

    @torch.no_grad()
    def target_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, temperature: float,
                      vocab_size: int | None = None, position_ids: Tensor | None = None) -> Tensor:
        """``T * log p_mix`` ``[B, L, vocab_size]`` for a batch, every teacher loaded and run (no gradients);
        ``position_ids`` for packed rows (kd_llm.data.packing)."""
        mixed = LogProbMixture(self.mixture, temperature, vocab_size)
        for index, weight in enumerate(self.weights):
            model = self.load(index)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False).logits
            mixed.add(logits, weight)
        return temperature * mixed.log_probs()


class EMATeacher:
    """A frozen copy of the student that follows it: ``teacher = decay * teacher + (1 - decay) * student``.

    The copy starts equal to the student (so the distillation term starts at 0) and moves only through
    :meth:`update`, never through gradients. Only the student's trainable parameters are averaged (the rest, e.g. the
    frozen base of a LoRA student, never change); buffers are copied.
    """

    def __init__(self, student: nn.Module, decay: float = 0.999):
        if not (isinstance(decay, (int, float)) and 0.0 <= decay < 1.0):
            raise ValueError(f"ema_decay must be in [0, 1), got {decay!r}: 0 copies the student after every step, "
                             "values near 1 (e.g. 0.999) average over about 1 / (1 - decay) steps")
        self.decay = float(decay)
        self.model = freeze_teacher(copy.deepcopy(student))

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        teacher_parameters = dict(self.model.named_parameters())
        for name, parameter in student.named_parameters():
            if not parameter.requires_grad:
                continue
            if name not in teacher_parameters:
                raise RuntimeError(f"the EMA teacher has no parameter {name!r}: the student's structure changed "
                                   "after the EMA copy was made")
            target = teacher_parameters[name]
            target.lerp_(parameter.detach().to(device=target.device, dtype=target.dtype), 1.0 - self.decay)
        teacher_buffers = dict(self.model.named_buffers())
        for name, buffer in student.named_buffers():
            if name in teacher_buffers:
                teacher_buffers[name].copy_(buffer)
