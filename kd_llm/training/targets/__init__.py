"""Teacher targets: the ways the distillation target reaches the loss, chosen once when the trainer is built.

A :class:`TeacherTarget` owns everything path-specific: the student forward's extra arguments
(``student_forward_kwargs``: none for logits, last hidden state only for the fused path), which batches it serves
(``serves_dataset``, ``serves_evaluation``, ``scores_generated``), whether a teacher that writes seq_kd completions
stands behind it (``writes_completions``), and ``terms(student_outputs, batch, request)``, the loss components.
``DistillationTrainer.compute_loss`` only pops a :class:`KDBatch`, asks ``self.target.for_batch(...)`` for the
target of that batch, runs the student with its kwargs and weights the terms. Capabilities are declared attributes,
never inferred from which methods a trainer subclass overrides.

The targets (one module each):

- ``live``: :class:`LiveLogits` (a live teacher's logits, dense) and :class:`LiveHead` (its hidden states and
  lm_head, fused); with no teacher they compute the hard-label term alone (alpha = 1);
- ``precomputed``: :class:`PrecomputedLogits`, teacher logits computed before training and kept in memory;
- ``topk_cache``: :class:`TopKCache` / :class:`TopKCacheFused`, the on-disk top-k cache of scripts/cache_teacher.py;
- ``hidden_cache``: :class:`HiddenCache` / :class:`HiddenCacheFused`, the on-disk hidden-state cache with the
  teacher's lm_head (exact at any temperature and divergence);
- ``side_process``: :class:`SideProcess`, a :class:`~kd_llm.training.teacher_process.TeacherProcess`'s logits;
- ``side_process_hidden``: :class:`SideProcessHidden`, a TeacherProcess shipping final hidden states, fused;
- ``ensemble``: :class:`EnsembleMixture`, the mixture of several frozen teachers, live;
- ``served``: :class:`ServedTeacher`, a served teacher's top-k over HTTP (kd_llm.serving), on the sparse loss;
- ``cross_tokenizer``: :class:`CrossTokenizer`, a live teacher with another tokenizer, compared over aligned spans
  (dataset, evaluation and generated batches; it writes seq_kd completions);
- ``routed``: :class:`Routed(primary, fallback)`: a stored target serves training batches of the dataset, a live or
  side-process teacher the rest (evaluation, generated completions).

How to add a target (e.g. a hidden-state cache, a served teacher, a teacher with another tokenizer):

1. One file here, ``targets/<name>.py``, with a :class:`TeacherTarget` subclass: set ``name`` (logged once),
   ``fused`` and ``student_forward_kwargs`` (``heads.FUSED_FORWARD_KWARGS`` if it reads the student's hidden states;
   then read the student's head with ``heads.output_head(student)``), the capability flags, and ``terms``, which
   returns :class:`~kd_llm.losses.LossComponents` for ``batch.shifted_labels`` from ``request`` (alpha, temperature,
   num_items_in_batch, divergence, ...: pass ``**request.objective_kwargs`` to the loss). A target never imports
   the trainer; what it needs (teacher, cache, head) is given to its constructor.
2. Registration in ``choose.py``: a field of :class:`TargetSources` for what it is built from (the trainer fills it
   in ``DistillationTrainer._target_sources``), and a branch in ``live_target`` (a teacher that runs during
   training) or ``stored_target`` (teacher outputs stored before training; wrapped in :class:`Routed` with the live
   one when both exist).
3. Its rules in ``kd_llm/training/rules.py``: what it cannot combine with (``config_problems``, ``teacher_problems``
   and a teacher kind in :class:`~kd_llm.training.rules.RunShape` if it is a new place for the teacher), and
   whether it rules the fused loss out (``fused_blockers``), so that the memory estimate names the same path.
4. A row in tests/test_targets.py's contract test (same batch: the dense reference's loss and gradients) and, for
   a new rule, in tests/test_rules.py's table.
"""

from kd_llm.training.targets.base import (
    EXAMPLE_INDEX_COLUMN,
    KDBatch,
    LossRequest,
    TargetCannotServe,
    TeacherTarget,
)
from kd_llm.training.targets.choose import TargetSources, choose_target
from kd_llm.training.targets.cross_tokenizer import CrossTokenizer
from kd_llm.training.targets.ensemble import EnsembleMixture
from kd_llm.training.targets.hidden_cache import HiddenCache, HiddenCacheFused, open_hidden_training_cache
from kd_llm.training.targets.live import LiveHead, LiveLogits
from kd_llm.training.targets.precomputed import PrecomputedLogits, PrecomputedTeacherLogits
from kd_llm.training.targets.routed import Routed
from kd_llm.training.targets.served import ServedTeacher
from kd_llm.training.targets.side_process import SideProcess
from kd_llm.training.targets.side_process_hidden import SideProcessHidden
from kd_llm.training.targets.topk_cache import TopKCache, TopKCacheFused, open_training_cache

__all__ = ["EXAMPLE_INDEX_COLUMN", "CrossTokenizer", "EnsembleMixture", "HiddenCache", "HiddenCacheFused", "KDBatch",
           "LiveHead", "LiveLogits", "LossRequest", "PrecomputedLogits", "PrecomputedTeacherLogits", "Routed",
           "ServedTeacher", "SideProcess", "SideProcessHidden", "TargetCannotServe", "TargetSources", "TeacherTarget",
           "TopKCache", "TopKCacheFused", "choose_target", "open_hidden_training_cache", "open_training_cache"]
