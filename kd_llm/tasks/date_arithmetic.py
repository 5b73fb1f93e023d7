"""Date arithmetic: the first specialist skill.

Every answer is computed with Python's ``datetime``. A problem has a prompt, a final answer and, optionally, a short
scratchpad that the model writes before the answer. The scratchpad breaks each problem into steps that are each a
lookup or a two-digit operation, which is what makes the skill learnable by a model of a few million parameters:

* ``add``/``sub`` walk month by month: ``2023-05:31-17=14,45-14=31;2023-06:30-00=30,31-30=01;...``
* ``diff`` sums the days spent in each month between the two dates.
* ``weekday`` adds three small offsets mod 7: weekday of 1 January, the month's offset, and (day-1) mod 7.
* ``iso`` is a direct rewrite and needs none.

The final answer always follows the last ``>`` (see :func:`extract_answer`). Train and eval splits are disjoint by
construction: a problem belongs to the eval split iff a stable hash of its prompt says so.
"""

from __future__ import annotations

import calendar
import datetime as dt
import hashlib
import random
from dataclasses import dataclass

CATEGORIES = ("add", "sub", "diff", "weekday", "iso")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)
ANSWER_MARK = ">"
EVAL_FRACTION_DENOMINATOR = 10  # 1 problem in 10 belongs to the eval split
PROMPT_STYLES = ("compact", "verbose")


@dataclass(frozen=True)
class DateProblem:
    category: str
    prompt: str
    answer: str
    scratchpad: str = ""

    def target(self, with_scratchpad: bool = True) -> str:
        """The text the model is trained to write: scratchpad, then ``>``, then the answer."""
        if with_scratchpad and self.scratchpad:
            return f"{self.scratchpad}{ANSWER_MARK}{self.answer}"
        return self.answer


def extract_answer(text: str) -> str:
    """The final answer in a model's completion: on its first line, the text after the last ``>``, stripped.

    A completion without ``>`` (a model that skips the scratchpad) is taken whole. Only the first line counts, so
    text that a model writes after its answer does not spoil an exact match.
    """
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    return first.rsplit(ANSWER_MARK, 1)[-1].strip()


def month_length(year: int, month: int) -> int:
    return calendar.monthrange(year, month)[1]


def _next_month(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def _prev_month(year: int, month: int) -> tuple[int, int]:
    return (year - 1, 12) if month == 1 else (year, month - 1)


def add_scratchpad(date: dt.date, days: int) -> str:
    """Walk forward month by month. Each step: ``YYYY-MM:len-start=left`` then either the final day or the rest."""
    steps, year, month, start = [], date.year, date.month, date.day
    while True:
        length = month_length(year, month)
        left = length - start
        head = f"{year:04d}-{month:02d}:{length:02d}-{start:02d}={left:02d}"
        if days <= left:
            steps.append(f"{head},{start:02d}+{days:02d}={start + days:02d}")
            return ";".join(steps)
        steps.append(f"{head},{days:02d}-{left:02d}={days - left:02d}")
        days, start = days - left, 0
        year, month = _next_month(year, month)


def sub_scratchpad(date: dt.date, days: int) -> str:
    """Walk backward month by month. Each step: ``YYYY-MM:day`` then the final day or the days still to go."""
    steps, year, month, current = [], date.year, date.month, date.day
    while True:
        head = f"{year:04d}-{month:02d}:{current:02d}"
        if days < current:
            steps.append(f"{head},{current:02d}-{days:02d}={current - days:02d}")
            return ";".join(steps)
        steps.append(f"{head},{days:02d}-{current:02d}={days - current:02d}")
        days -= current
        year, month = _prev_month(year, month)
        current = month_length(year, month)


def diff_scratchpad(start_date: dt.date, end_date: dt.date) -> str:
    """Sum the days spent in each month from ``start_date`` to ``end_date`` (which must not come before it)."""
    steps, year, month, start, total = [], start_date.year, start_date.month, start_date.day, 0
    while True:
        last = (year, month) == (end_date.year, end_date.month)
        end = end_date.day if last else month_length(year, month)
        span = end - start
        steps.append(f"{year:04d}-{month:02d}:{end:02d}-{start:02d}={span:02d},{total:02d}+{span:02d}={total + span:02d}")
        total += span
        if last:
            return ";".join(steps)
        start = 0
        year, month = _next_month(year, month)


def weekday_scratchpad(date: dt.date) -> str:
    """``w0+m=s+d=w``: weekday of 1 January (0 = Monday), plus the month's offset, plus (day - 1) mod 7."""
    jan1 = dt.date(date.year, 1, 1)
    w0 = jan1.weekday()
    month_offset = (dt.date(date.year, date.month, 1) - jan1).days % 7
    day_offset = (date.day - 1) % 7
    partial = (w0 + month_offset) % 7
    return f"{w0}+{month_offset}={partial}+{day_offset}={(partial + day_offset) % 7}"


def written_date(date: dt.date, style: int) -> str:
    month = MONTHS[date.month - 1]
    if style == 0:
        return f"{month} {date.day}, {date.year}"
    if style == 1:
        return f"{date.day} {month} {date.year}"
    return f"{month[:3]} {date.day} {date.year}"


def _prompt(category: str, style: str, *values: str) -> str:
    if style == "compact":
        return {"add": "add:{},{}", "sub": "sub:{},{}", "diff": "diff:{},{}", "weekday": "wd:{}", "iso": "iso:{}"}[
            category
        ].format(*values)
    return {
        "add": "What is the date {1} days after {0}? Answer in YYYY-MM-DD format.",
        "sub": "What is the date {1} days before {0}? Answer in YYYY-MM-DD format.",
        "diff": "How many days are there from {0} to {1}? Answer with a number.",
        "weekday": "What day of the week is {0}? Answer with the weekday's name.",
        "iso": "Write the date {0} in ISO format (YYYY-MM-DD).",
    }[category].format(*values)


def make_problem(
    rng: random.Random,
    category: str,
    *,
    year_range: tuple[int, int] = (1980, 2039),
    max_days: int = 99,
    prompt_style: str = "compact",
) -> DateProblem:
    """Draw one problem of ``category``. ``max_days`` bounds offsets and gaps (at most 99: two-digit scratchpads)."""
    if category not in CATEGORIES:
        raise ValueError(f"Unknown date-arithmetic category {category!r}; choose from {CATEGORIES}.")
    if not 1 <= max_days <= 99:
        raise ValueError(f"max_days must be in [1, 99] so scratchpad numbers keep two digits, got {max_days}.")
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}.")
    first, last = dt.date(year_range[0], 1, 1), dt.date(year_range[1], 12, 31)
    date = first + dt.timedelta(days=rng.randrange((last - first).days + 1))
    days = rng.randint(1, max_days)
    iso = date.isoformat()
    if category == "add":
        answer = (date + dt.timedelta(days=days)).isoformat()
        return DateProblem(category, _prompt(category, prompt_style, iso, days), answer, add_scratchpad(date, days))
    if category == "sub":
        answer = (date - dt.timedelta(days=days)).isoformat()
        return DateProblem(category, _prompt(category, prompt_style, iso, days), answer, sub_scratchpad(date, days))
    if category == "diff":
        end = date + dt.timedelta(days=days)
        answer = str((end - date).days)
        return DateProblem(
            category, _prompt(category, prompt_style, iso, end.isoformat()), answer, diff_scratchpad(date, end)
        )
    if category == "weekday":
        return DateProblem(category, _prompt(category, prompt_style, iso), WEEKDAYS[date.weekday()],
                           weekday_scratchpad(date))
    return DateProblem(category, _prompt(category, prompt_style, written_date(date, rng.randrange(3))), iso)


def split_of(prompt: str) -> str:
    """``"eval"`` or ``"train"``, from a stable hash of the prompt, so the two splits never share a problem."""
    bucket = int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % EVAL_FRACTION_DENOMINATOR
    return "eval" if bucket == 0 else "train"


def generate_problems(
    split: str,
    size: int,
    *,
    seed: int = 0,
    categories: tuple[str, ...] = CATEGORIES,
    year_range: tuple[int, int] = (1980, 2039),
    max_days: int = 99,
    prompt_style: str = "compact",
) -> list[DateProblem]:
    """``size`` problems of ``split``, categories in round robin. Eval problems are unique; the same seed gives the
    same list."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}.")
    unknown = set(categories) - set(CATEGORIES)
    if not categories or unknown:
        raise ValueError(f"categories must be a non-empty subset of {CATEGORIES}, got {categories!r}.")
    rng = random.Random(f"date-arithmetic/{split}/{seed}")
    problems: list[DateProblem] = []
    seen: set[str] = set()
    attempts = 0
    while len(problems) < size:
        attempts += 1
        if attempts > 200 * size + 10_000:
            raise ValueError(f"Could not draw {size} distinct {split} problems; widen year_range or max_days.")
        category = categories[len(problems) % len(categories)]
        problem = make_problem(rng, category, year_range=year_range, max_days=max_days, prompt_style=prompt_style)
        if split_of(problem.prompt) != split or (split == "eval" and problem.prompt in seen):
            continue
        seen.add(problem.prompt)
        problems.append(problem)
    return problems


def to_records(problems: list[DateProblem], with_scratchpad: bool = True) -> list[dict]:
    """Prompt/completion records that :mod:`kd_llm.data` formats with a chat template."""
    return [
        {"category": p.category, "prompt": p.prompt, "completion": p.target(with_scratchpad), "answer": p.answer}
        for p in problems
    ]
