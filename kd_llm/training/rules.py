"""The rule book: which distillation settings combine, and which loss path a run takes.

Pure functions of a :class:`~kd_llm.training.DistillationConfig` (any object with its fields) and a small
:class:`RunShape` (the mode, where the teacher is, processes, sharding). This module imports nothing from
``kd_llm.training``: the config's validation, the target chooser (``kd_llm.training.targets.choose``), the memory
estimate, ``kd_llm.experiment`` and the modes' ``check_config`` all ask it, so the answer is written once.

- :func:`config_problems`: settings that do not combine, whatever the run (config validation), including what a
  teacher with another tokenizer (``cross_tokenizer_loss``) cannot do;
- :func:`teacher_problems`: what the teacher source (none, live, side process) cannot serve;
- :func:`mode_problems`: what a mode (ensemble, EMA, online) cannot honour;
- :func:`fused_blockers` / :func:`loss_path`: why the fused loss is ruled out, and the path that runs;
- :func:`teacher_source`: where the experiment's KD run takes its teacher from (a cache, a side process, live).
"""

from __future__ import annotations

from dataclasses import dataclass

from kd_llm.cross_tokenizer.losses import CROSS_TOKENIZER_LOSSES
from kd_llm.losses.sparse import SPARSE_DIVERGENCES, TAIL_MODES, same_temperature

FUSED_LOSS_CHOICES = ("auto", "true", "false")
CACHE_FORMATS = ("top_k", "hidden_states")
MODES = ("offline", "ensemble", "ema", "online")
TEACHER_KINDS = ("live", "side_process", "none")
DENSE, FUSED = "dense", "fused"

SIDE_PROCESS_REASON = ("the teacher runs in a side process (TeacherProcess), which returns logits, not the hidden "
                       "states and lm_head weights the fused loss reads (start it with hidden_states=True)")


@dataclass(frozen=True)
class RunShape:
    """What a run is besides its settings: the distillation mode, where the teacher is ("live": a model in this
    process; "side_process": a TeacherProcess; "none": no teacher), processes, and FSDP / DeepSpeed sharding."""

    mode: str = "offline"
    teacher: str = "live"
    processes: int = 1
    sharded: bool = False
    teacher_ships_hidden: bool = False  # a side-process teacher returns final hidden states (and sent its lm_head)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.teacher not in TEACHER_KINDS:
            raise ValueError(f"teacher must be one of {', '.join(TEACHER_KINDS)}, got {self.teacher!r}")


@dataclass(frozen=True)
class Blocker:
    """A reason the fused loss cannot serve a run: ``name`` for a short note, ``reason`` the whole sentence."""

    name: str
    reason: str


@dataclass(frozen=True)
class ModeProblem:
    """A setting a mode cannot honour; ``unsupported``: not implemented (NotImplementedError), else a bad value."""

    message: str
    unsupported: bool = False

    def error(self) -> Exception:
        return (NotImplementedError if self.unsupported else ValueError)(self.message)


@dataclass(frozen=True)
class LossPath:
    path: str  # "dense" or "fused"
    note: str | None = None


def _served(config) -> bool:
    """A served teacher (kd_llm.serving): teacher_url or teacher_routes."""
    return bool(getattr(config, "teacher_url", None) or getattr(config, "teacher_routes", None))


def _features(config) -> bool:
    return bool(getattr(config, "hidden_weight", 0) or getattr(config, "attention_weight", 0))


def teacher_cache_problems(config) -> list[str]:
    """Problems of the ``teacher_cache*`` fields (empty if none)."""
    problems = []
    tail_mode = config.teacher_cache_tail_mode
    cache_format = getattr(config, "teacher_cache_format", "top_k")
    if cache_format not in CACHE_FORMATS:
        return [f"teacher_cache_format must be one of {', '.join(CACHE_FORMATS)}, got {cache_format!r}"]
    if tail_mode not in TAIL_MODES:
        return [f"teacher_cache_tail_mode must be one of {', '.join(TAIL_MODES)}, got {tail_mode!r}"]
    if not config.teacher_cache:
        return problems
    hidden = cache_format == "hidden_states"  # exact: every divergence, any temperature schedule
    if not hidden and config.distillation_loss not in SPARSE_DIVERGENCES[tail_mode]:
        problems.append(
            f"distillation_loss={config.distillation_loss!r} cannot be computed from a teacher cache with "
            f"teacher_cache_tail_mode={tail_mode!r} (the tail's individual probabilities are not stored); use one of "
            f"{', '.join(SPARSE_DIVERGENCES[tail_mode])}"
        )
    if config.precompute_teacher_logits:
        problems.append("teacher_cache and precompute_teacher_logits both serve stored teacher outputs: set "
                        "precompute_teacher_logits=False")
    if config.seq_kd or config.lmbda >= 1.0:
        problems.append("teacher_cache holds the teacher on the dataset's completions, which seq_kd / lmbda=1 "
                        "replace in every batch, so it would never be read: remove teacher_cache")
    if (not hidden and tail_mode == "tail_bucket"
            and not same_temperature(config.temperature, config.final_temperature)):
        problems.append(
            f"the temperature moves from {config.temperature} to {config.final_temperature}, but with "
            "teacher_cache_tail_mode=tail_bucket the cached values hold at the one temperature they were taken at: "
            "use a constant temperature, or teacher_cache_tail_mode=renormalise (which re-tempers exactly)"
        )
    return problems


def cross_tokenizer_config_problems(config) -> list[str]:
    """What a ``DistillationConfig`` with ``cross_tokenizer_loss`` set cannot do, one reason each."""
    method = getattr(config, "cross_tokenizer_loss", None)
    if method is None:
        return []
    if method not in CROSS_TOKENIZER_LOSSES:
        return [f"cross_tokenizer_loss must be one of {', '.join(CROSS_TOKENIZER_LOSSES)} (or unset), got {method!r}"]
    problems = []
    if config.uld_weight < 0:
        problems.append(f"uld_weight must be >= 0, got {config.uld_weight}")
    reasons = {
        "teacher_cache": "a teacher cache stores the teacher's outputs at its own token positions without their "
                         "character offsets, so they cannot be aligned with the student's",
        "precompute_teacher_logits": "precomputed logits are gathered by the student's positions, which are not the "
                                     "teacher's",
        "hidden_weight": "hidden-state terms pair student and teacher positions one to one, which two tokenizers "
                         "do not share",
        "attention_weight": "attention-map terms pair positions one to one, which two tokenizers do not share",
    }
    for name, reason in reasons.items():
        if getattr(config, name, None):
            problems.append(f"{name} is not supported with cross_tokenizer_loss: {reason}")
    if getattr(config, "packing", False):  # dataset batches pack (kd_llm.cross_tokenizer.data), generated ones not yet
        if config.lmbda > 0 or config.seq_kd:
            problems.append(f"packing is not supported with cross_tokenizer_loss and "
                            f"{'seq_kd' if config.seq_kd else f'lmbda={config.lmbda}'}: generated cross-tokenizer "
                            "rows are not packed yet (set packing=False, or lmbda=0 and seq_kd=False)")
        if getattr(config, "packing_overlong", "error") == "truncate" and getattr(config, "packing_max_length", 0):
            problems.append("packing_overlong=truncate is not supported with cross_tokenizer_loss: the teacher's "
                            "rendering and the alignment cover whole examples (set packing_overlong=error, or cut "
                            "the examples when building the dataset: max_length)")
    if _served(config):
        problems.append("teacher_url / teacher_routes are not supported with cross_tokenizer_loss: a served teacher "
                        "scores the student's token ids, and a teacher with another tokenizer needs its own rendering "
                        "of each record (unset cross_tokenizer_loss, or load the teacher here)")
    if config.fused_loss == "true":
        problems.append("fused_loss=true is not possible with cross_tokenizer_loss: the loss compares aligned spans "
                        "of two vocabularies from dense logits (use auto or false)")
    return problems


def config_problems(config) -> list[str]:
    """Settings that do not combine, whatever the run (``DistillationConfig.__post_init__`` raises them)."""
    problems = []
    if config.lmbda > 0 and config.alpha >= 1.0:
        problems.append(f"lmbda={config.lmbda} needs a distillation term (alpha < 1): on the student's own samples "
                        "the labels are its own tokens, so only the teacher's distribution can teach")
    if config.precompute_teacher_logits and (config.seq_kd or config.lmbda >= 1.0):
        problems.append("precompute_teacher_logits caches the teacher on the dataset's completions, which "
                        f"{'seq_kd' if config.seq_kd else 'lmbda=1'} replaces in every batch, so the cache would "
                        "never be read: set precompute_teacher_logits=False (generated batches are always scored "
                        "by the live teacher; with 0 < lmbda < 1 the cache serves the dataset batches)")
    if config.fused_loss not in FUSED_LOSS_CHOICES:
        problems.append(f"fused_loss must be one of {', '.join(FUSED_LOSS_CHOICES)}, got {config.fused_loss!r}")
    problems.extend(teacher_cache_problems(config))
    problems.extend(packing_problems(config))
    problems.extend(cross_tokenizer_config_problems(config))
    return problems


def packing_problems(config) -> list[str]:
    """What packed rows (kd_llm.data.packing) cannot serve. lmbda > 0 and seq_kd: the generated completions are
    packed too (kd_llm.training.on_policy). Stored targets (precomputed logits, the top-k and hidden-state caches)
    are re-laid into packed rows example by example (kd_llm.data.packing.supervised_order), so they need every
    example whole."""
    if not getattr(config, "packing", False):
        return []
    problems = []
    stored = [name for name, on in (("precompute_teacher_logits", config.precompute_teacher_logits),
                                    ("teacher_cache", bool(config.teacher_cache))) if on]
    cuts = getattr(config, "packing_overlong", "error") == "truncate" and getattr(config, "packing_max_length", 0)
    if stored and cuts:  # packing_max_length=0 (rows as long as the longest example) never cuts one
        problems.append(f"packing_overlong=truncate would cut examples whose stored teacher targets ({stored[0]}) "
                        "cover them whole: set packing_overlong=error with a packing_max_length of at least the "
                        "longest example (0: the micro-batch's longest), or cut the examples when building the "
                        "dataset (max_length) before the targets are stored")
    return problems


def side_process_problems(config, shape: RunShape) -> list[str]:
    """Why a teacher in a side process cannot serve this run (empty: it can)."""
    problems = []
    if shape.processes > 1 or shape.sharded:
        problems.append("it serves one training process, and under several processes, FSDP or DeepSpeed each rank "
                        "would need its own side process (and its own copy of the teacher): launch a single process, "
                        "or pass the teacher model itself")
    if config.seq_kd:
        problems.append("seq_kd has the teacher write completions, and the side process only scores them")
    if _features(config):
        problems.append("hidden_weight / attention_weight read the teacher's hidden states and attention maps, "
                        "which stay in the side process")
    if config.precompute_teacher_logits:
        problems.append("for stored teacher outputs use teacher_cache (scripts/cache_teacher.py), not "
                        "precompute_teacher_logits")
    if getattr(config, "cross_tokenizer_loss", None):
        problems.append("with cross_tokenizer_loss the teacher reads its own rendering of each record, but the side "
                        "process scores the student's token ids: pass the teacher model itself")
    if shape.mode != "offline":
        problems.append(f"the {shape.mode} mode needs the teacher model itself (ensemble, online or EMA teacher)")
    return problems


def teacher_problems(config, shape: RunShape) -> list[str]:
    """What this run asks of its teacher that the teacher source cannot give (empty: nothing)."""
    if shape.teacher == "side_process":
        return side_process_problems(config, shape)
    if shape.teacher == "live":
        return []
    problems = []
    if _served(config):  # the served teacher scores every batch (what it cannot do: kd_llm.serving.settings)
        return problems
    if config.alpha < 1 and not config.teacher_cache:
        problems.append(f"alpha={config.alpha} weights a distillation term, so a teacher_model is required (or "
                        "a teacher_cache built by scripts/cache_teacher.py, or a served teacher_url).")
    if config.lmbda > 0 or config.seq_kd:
        # A cache of teacher outputs on fixed data cannot score (or write) completions generated during training.
        problems.append("lmbda > 0 (on-policy) and seq_kd generate new completions during training, which only a "
                        "live teacher can score or write, not a cache of teacher outputs on the dataset: pass "
                        "teacher_model=<the teacher> (a cache may still serve the dataset batches), or, for "
                        "lmbda > 0 with the teacher out of this process, teacher_model=TeacherProcess(<teacher "
                        "path>) (kd_llm.training.teacher_process), which scores the student's samples in a side "
                        "process while the cache serves the dataset batches.")
    return problems


def mode_problems(config, mode: str) -> list[ModeProblem]:
    """What the ``ensemble``, ``ema`` and ``online`` modes cannot honour (offline: nothing)."""
    problems = []
    on_policy = getattr(config, "lmbda", 0) > 0 or getattr(config, "seq_kd", False)
    if mode != "offline" and getattr(config, "cross_tokenizer_loss", None):
        problems.append(ModeProblem(f"cross_tokenizer_loss (a teacher with another tokenizer) is supported with one "
                                    f"frozen teacher (offline), not in the {mode} mode", unsupported=True))
    if mode == "ensemble":
        if config.alpha >= 1:
            problems.append(ModeProblem("alpha=1 trains on hard labels alone: an ensemble of teachers would never "
                                        "be used."))
        if on_policy:
            problems.append(ModeProblem("on-policy distillation (lmbda > 0, seq_kd) from a teacher ensemble is not "
                                        "supported: use one teacher", unsupported=True))
        if _features(config):
            problems.append(ModeProblem("hidden-state / attention distillation from a teacher ensemble is not "
                                        "supported (whose hidden states?): set hidden_weight and attention_weight "
                                        "to 0", unsupported=True))
        if (config.precompute_teacher_logits and config.temperature_schedule != "constant"
                and config.final_temperature != config.temperature):
            problems.append(ModeProblem(
                "a precomputed ensemble target is the mixture at one temperature, but the temperature schedule moves "
                f"from {config.temperature} to {config.final_temperature}: use a constant temperature, or "
                "precompute_teacher_logits=False to mix the teachers live at each step's temperature."))
    elif mode == "ema":
        if config.alpha >= 1:
            problems.append(ModeProblem("alpha=1 trains on hard labels alone: the EMA teacher would never be used."))
        if config.precompute_teacher_logits:
            problems.append(ModeProblem("precompute_teacher_logits=True cannot serve an EMA teacher: its outputs "
                                        "change after every step. Set precompute_teacher_logits=False."))
    elif mode == "online":
        if config.alpha >= 1:
            problems.append(ModeProblem("alpha=1 trains each model on hard labels alone: they would not learn from "
                                        "each other. Use alpha < 1."))
        if config.precompute_teacher_logits:
            problems.append(ModeProblem("precompute_teacher_logits=True cannot serve online distillation: the "
                                        "teacher trains, so its outputs change every step. Set "
                                        "precompute_teacher_logits=False."))
        if on_policy:
            problems.append(ModeProblem("on-policy distillation (lmbda > 0, seq_kd) is not supported in online mode.",
                                        unsupported=True))
        if _features(config):
            problems.append(ModeProblem("hidden-state / attention distillation is not supported in online mode: set "
                                        "hidden_weight and attention_weight to 0", unsupported=True))
        if config.fp16:
            problems.append(ModeProblem("online distillation with fp16 loss scaling is not supported (the teacher's "
                                        "optimizer does not share the scaler): use bf16 or fp32.", unsupported=True))
    return problems


def fused_blockers(config, shape: RunShape) -> list[Blocker]:
    """The settings that rule the fused loss out for this run (empty: it may run, if both models pass the
    chooser's lm_head probe)."""
    blockers = []
    if shape.sharded:
        blockers.append(Blocker("FSDP/DeepSpeed", "FSDP / DeepSpeed shard the lm_head weights the fused loss reads "
                                                  "whole"))
    if config.precompute_teacher_logits:
        blockers.append(Blocker("precompute_teacher_logits", "precompute_teacher_logits serves teacher logits, not "
                                                             "the teacher's hidden states"))
    if _features(config):
        blockers.append(Blocker("feature distillation", "feature distillation (hidden_weight / attention_weight) "
                                                        "runs the teacher for full logits"))
    if shape.mode == "ensemble":
        blockers.append(Blocker("ensemble", "an ensemble's target is the mixture of several teachers' "
                                            "distributions, which reaches the loss as logits"))
    if shape.mode == "online":
        blockers.append(Blocker("online", "online distillation trains the teacher too, each model on the other's "
                                          "full logits"))
    if _served(config):
        blockers.append(Blocker("served teacher", "a served teacher's top-k takes the dense sparse loss"))
    if shape.teacher == "side_process" and not config.teacher_cache and not shape.teacher_ships_hidden:
        blockers.append(Blocker("side-process teacher", SIDE_PROCESS_REASON))
    if getattr(config, "cross_tokenizer_loss", None):
        blockers.append(Blocker("cross-tokenizer", "cross-tokenizer distillation compares aligned spans of two "
                                                   "vocabularies, from dense logits"))
    return blockers


def fused_refusal(reasons: list[str]) -> str:
    return ("fused_loss=true, but the fused loss cannot be used here: " + "; ".join(reasons)
            + ". Set fused_loss=auto (falls back to the dense loss) or false.")


def loss_path(config, shape: RunShape) -> LossPath:
    """The loss path of the run's training batches: "fused" or "dense", with a note when the answer still depends on
    the models (auto: the chooser probes their lm_heads). Raises for fused_loss=true with a blocker."""
    setting = str(getattr(config, "fused_loss", "false")).lower()
    if setting == "false":
        return LossPath(DENSE)
    blockers = fused_blockers(config, shape)
    if setting == "true":
        if blockers:
            raise ValueError(fused_refusal([blocker.reason for blocker in blockers]))
        return LossPath(FUSED)
    if blockers:
        return LossPath(DENSE, "fused_loss=auto takes the dense loss here "
                               f"({', '.join(blocker.name for blocker in blockers)})")
    return LossPath(FUSED, "fused_loss=auto: fused if both models pass the trainer's lm_head probe, else dense")


def teacher_source(config, mode: str) -> str:
    """Where a run's KD training takes its teacher from when a ``teacher_cache`` may serve it: "none" (the cache
    serves everything: plain offline distillation of one teacher's logits on the dataset's completions),
    "side_process" (as "none", but with lmbda > 0: a side process scores the student's samples), else "live".
    ``mode``: offline, ensemble, ema, online, or another name (e.g. born_again) that needs the live teacher."""
    cache_serves = (bool(config.teacher_cache) and config.alpha < 1 and not config.seq_kd and not _features(config)
                    and mode == "offline")
    if not cache_serves:
        return "live"
    return "side_process" if config.lmbda > 0 else "none"
