"""Capacity and negative-transfer checks.

Before training: a teacher that lacks the skill (below ``min_teacher_accuracy``, or no better than the untrained
student) has nothing to transfer, so the run stops before spending its training budget, unless forced.

After training: distillation can hurt (negative transfer): when the distilled student scores below the student trained
on hard labels alone, the report and the model card say so plainly, with the sampling noise of the comparison.
"""

from __future__ import annotations

import logging
import math

from kd_llm.errors import KdLlmError

logger = logging.getLogger(__name__)
SCORE_KEY = "mean_category_exact_match"  # every check and ratio compares this score


class TeacherCheckError(KdLlmError, RuntimeError):
    """The teacher is not good enough to distil from; raised before training, overridden by ``force``."""


def check_teacher(teacher_score: float, untrained_score: float, *, min_teacher_accuracy: float, force: bool,
                  teacher: str = "the teacher") -> dict:
    """Compare the teacher with the threshold and with the untrained student (both as mean exact match in [0, 1]).

    Returns ``{"ran", "passed", "forced", "teacher_score", "untrained_student_score", "min_teacher_accuracy",
    "problems"}``; raises :class:`TeacherCheckError` naming every problem and the ways out when it fails and
    ``force`` is off.
    """
    problems = []
    if teacher_score < min_teacher_accuracy:
        problems.append(f"{teacher} scores {100 * teacher_score:.1f}% mean exact match on the eval split, below "
                        f"min_teacher_accuracy = {100 * min_teacher_accuracy:.1f}%")
    if teacher_score <= untrained_score:
        problems.append(f"{teacher} ({100 * teacher_score:.1f}%) is no better than the untrained student "
                        f"({100 * untrained_score:.1f}%): there is no skill to transfer")
    outcome = {"ran": True, "passed": not problems, "forced": bool(problems) and force,
               "teacher_score": teacher_score, "untrained_student_score": untrained_score,
               "min_teacher_accuracy": min_teacher_accuracy, "problems": problems}
    if problems and not force:
        raise TeacherCheckError(
            "Stopping before training: " + "; ".join(problems) + ". Distilling it would spend the training budget "
            "on a skill the teacher does not have. Use a stronger teacher (or one trained on this task: "
            "scripts/train_specialist.py), check that --dataset/--prompt_style match what the teacher was trained "
            "on, lower --min_teacher_accuracy, or pass --force to train anyway."
        )
    return outcome


def teacher_check_skipped(reason: str) -> dict:
    return {"ran": False, "passed": None, "forced": False, "reason": reason, "problems": []}


def difference_noise(score_a: float, score_b: float, count: int) -> float:
    """Half-width of a 95% interval of the difference of two exact-match rates, each over ``count`` problems,
    treated as independent binomials (a conservative width for two models scored on the same problems)."""
    if count < 1:
        return float("nan")
    variance = (score_a * (1 - score_a) + score_b * (1 - score_b)) / count
    return 1.96 * math.sqrt(variance)


def negative_transfer(kd_score: float, baseline_score: float, count: int) -> dict:
    """Whether the distilled student is worse than the hard-label baseline, by how much, and whether the gap is
    larger than sampling noise."""
    gap = kd_score - baseline_score
    noise = difference_noise(kd_score, baseline_score, count)
    worse = gap < 0
    if worse:
        verdict = (f"Negative transfer: the distilled student is worse than the hard-label baseline "
                   f"({100 * kd_score:.1f}% vs {100 * baseline_score:.1f}% mean exact match, {100 * gap:+.1f} points; "
                   + ("larger than" if -gap > noise else "within")
                   + f" the ±{100 * noise:.1f}-point sampling noise of {count} problems).")
    else:
        verdict = (f"The distilled student is {'level with' if gap == 0 else 'better than'} the hard-label baseline "
                   f"({100 * kd_score:.1f}% vs {100 * baseline_score:.1f}% mean exact match, {100 * gap:+.1f} points; "
                   + ("larger than" if gap > noise else "within")
                   + f" the ±{100 * noise:.1f}-point sampling noise of {count} problems).")
    return {"negative_transfer": worse, "gap": gap, "noise_95": noise, "significant": abs(gap) > noise,
            "verdict": verdict}


def check_run_teacher(args, rows: list[dict]) -> dict:
    """The pre-training check of :func:`kd_llm.experiment.run_distillation`, on its first two evaluation rows (the
    teacher and the untrained student). Skipped, with the reason recorded, when nothing was scored or when the
    teacher is not the source of the skill (``ema``: the teacher is the student's own average; ``online``: the
    teacher learns alongside the student)."""
    mode = getattr(args, "distillation_mode", "offline")
    if mode in ("ema", "online"):
        reason = f"distillation_mode={mode}: the teacher is not a fixed, already-skilled model"
    elif str(getattr(args, "teacher", "")).startswith(("http://", "https://")):
        reason = f"the teacher is served at {args.teacher} and not evaluated here"
    elif not args.evaluate_skills:
        reason = "evaluate_skills is off, so the teacher was not scored"
    else:
        outcome = check_teacher(rows[0][SCORE_KEY], rows[1][SCORE_KEY], min_teacher_accuracy=args.min_teacher_accuracy,
                                force=args.force, teacher=f"The teacher {args.teacher!r}")
        if outcome["forced"]:
            logger.warning("Teacher check failed, training anyway (--force): %s.", "; ".join(outcome["problems"]))
        return outcome
    logger.warning("Teacher check not run: %s.", reason)
    return teacher_check_skipped(reason)
