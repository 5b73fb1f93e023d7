"""Temperature schedules: start soft (high T) and sharpen towards the end of training, as the seed papers advise."""

from __future__ import annotations

import math

TEMPERATURE_SCHEDULES = ("constant", "linear", "cosine")


def temperature_at(step: int, total_steps: int, start: float, end: float, schedule: str = "constant") -> float:
    """The temperature after ``step`` of ``total_steps`` optimizer steps.

    ``constant`` keeps ``start``; ``linear`` and ``cosine`` move from ``start`` at step 0 to ``end`` at the last step.
    It depends on the step alone, so a resumed run continues the schedule exactly.
    """
    if schedule not in TEMPERATURE_SCHEDULES:
        raise ValueError(f"Unknown temperature schedule {schedule!r}; choose from {TEMPERATURE_SCHEDULES}.")
    if schedule == "constant" or total_steps <= 1:
        return start
    progress = min(max(step / (total_steps - 1), 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * progress
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
