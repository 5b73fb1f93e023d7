"""Tests for kd_llm.tasks.date_arithmetic against an independent calendar written here.

The module computes answers with ``datetime``; the reference below uses none of it: its own leap-year rule and month
table, a day count from a fixed epoch (1 January 1800), and Zeller's congruence for the weekday. The reference is
itself checked against facts known from outside the code (century leap rules, famous weekdays) and against itself
(Zeller vs. the day count).
"""

from __future__ import annotations

import bisect
import datetime as dt
import random
import re
from collections import Counter

import pytest

from kd_llm.tasks import date_arithmetic as da

# ----------------------------------------------------------------------------------------------------------------------
# Independent calendar (proleptic Gregorian), no datetime.
# ----------------------------------------------------------------------------------------------------------------------

EPOCH_YEAR = 1800
LAST_YEAR = 2300
DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
DAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
               "November", "December")


def is_leap(year: int) -> bool:
    if year % 400 == 0:
        return True
    if year % 100 == 0:
        return False
    return year % 4 == 0


def days_in_month(year: int, month: int) -> int:
    if month == 2 and is_leap(year):
        return 29
    return DAYS_IN_MONTH[month - 1]


def _year_starts() -> list[int]:
    starts, total = [], 0
    for year in range(EPOCH_YEAR, LAST_YEAR + 1):
        starts.append(total)
        total += 366 if is_leap(year) else 365
    return starts


YEAR_STARTS = _year_starts()  # day number of 1 January of EPOCH_YEAR + i


def day_number(year: int, month: int, day: int) -> int:
    """Days since 1800-01-01."""
    assert 1 <= month <= 12 and 1 <= day <= days_in_month(year, month), (year, month, day)
    number = YEAR_STARTS[year - EPOCH_YEAR]
    for m in range(1, month):
        number += days_in_month(year, m)
    return number + day - 1


def from_day_number(number: int) -> tuple[int, int, int]:
    year = EPOCH_YEAR + bisect.bisect_right(YEAR_STARTS, number) - 1
    rest = number - YEAR_STARTS[year - EPOCH_YEAR]
    month = 1
    while rest >= days_in_month(year, month):
        rest -= days_in_month(year, month)
        month += 1
    return year, month, rest + 1


def shift(year: int, month: int, day: int, days: int) -> tuple[int, int, int]:
    return from_day_number(day_number(year, month, day) + days)


def zeller_weekday(year: int, month: int, day: int) -> int:
    """Zeller's congruence, converted to 0 = Monday."""
    if month < 3:
        month += 12
        year -= 1
    k, j = year % 100, year // 100
    h = (day + (13 * (month + 1)) // 5 + k + k // 4 + j // 4 + 5 * j) % 7  # 0 = Saturday
    return (h + 5) % 7


def iso(year: int, month: int, day: int) -> str:
    return f"{year:04d}-{month:02d}-{day:02d}"


def parse_iso(text: str) -> tuple[int, int, int]:
    match = re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})", text)
    assert match, text
    return int(match[1]), int(match[2]), int(match[3])


def next_month(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def prev_month(year: int, month: int) -> tuple[int, int]:
    return (year - 1, 12) if month == 1 else (year, month - 1)


def test_reference_calendar_against_known_facts():
    assert [is_leap(y) for y in (1900, 2000, 2100, 2400, 2024, 2023, 1996)] == [
        False, True, False, True, True, False, True]
    assert day_number(2000, 3, 1) - day_number(2000, 2, 28) == 2
    assert day_number(1900, 3, 1) - day_number(1900, 2, 28) == 1
    assert day_number(2100, 3, 1) - day_number(2100, 2, 28) == 1
    assert day_number(2001, 1, 1) - day_number(2000, 1, 1) == 366
    assert day_number(1901, 1, 1) - day_number(1900, 1, 1) == 365
    # 400 Gregorian years are exactly 146097 days (20871 weeks).
    assert day_number(2200, 1, 1) - day_number(1800, 1, 1) == 146097
    # Weekdays known from outside the code.
    assert DAY_NAMES[zeller_weekday(2000, 1, 1)] == "Saturday"
    assert DAY_NAMES[zeller_weekday(1900, 1, 1)] == "Monday"
    assert DAY_NAMES[zeller_weekday(1969, 7, 20)] == "Sunday"  # Apollo 11 landing
    assert DAY_NAMES[zeller_weekday(2001, 9, 11)] == "Tuesday"
    assert DAY_NAMES[zeller_weekday(2024, 2, 29)] == "Thursday"
    # Zeller and the day count agree on every day of 1899-2101, and the day count round-trips.
    anchor = day_number(2000, 1, 1)
    for number in range(day_number(1899, 1, 1), day_number(2101, 12, 31) + 1):
        y, m, d = from_day_number(number)
        assert day_number(y, m, d) == number
        assert zeller_weekday(y, m, d) == (5 + number - anchor) % 7


# ----------------------------------------------------------------------------------------------------------------------
# Reading problems back with the reference.
# ----------------------------------------------------------------------------------------------------------------------


def parse_written_date(text: str) -> tuple[int, int, int]:
    full = {name: i + 1 for i, name in enumerate(MONTH_NAMES)}
    short = {name[:3]: i + 1 for i, name in enumerate(MONTH_NAMES)}
    if match := re.fullmatch(r"([A-Z][a-z]+) (\d{1,2}), (\d+)", text):  # "December 28, 2001"
        return int(match[3]), full[match[1]], int(match[2])
    if match := re.fullmatch(r"(\d{1,2}) ([A-Z][a-z]+) (\d+)", text):  # "28 December 2001"
        return int(match[3]), full[match[2]], int(match[1])
    if match := re.fullmatch(r"([A-Z][a-z]{2}) (\d{1,2}) (\d+)", text):  # "Dec 28 2001"
        return int(match[3]), short[match[1]], int(match[2])
    raise AssertionError(f"unreadable written date {text!r}")


def parse_prompt(problem: da.DateProblem):
    """(date, days / end date) read back from a compact or verbose prompt."""
    p = problem.prompt
    patterns = {
        "add": [r"add:(\S+),(\d+)", r"What is the date (\d+) days after (\S+)\? Answer in YYYY-MM-DD format\."],
        "sub": [r"sub:(\S+),(\d+)", r"What is the date (\d+) days before (\S+)\? Answer in YYYY-MM-DD format\."],
        "diff": [r"diff:(\S+),(\S+)", r"How many days are there from (\S+) to (\S+)\? Answer with a number\."],
        "weekday": [r"wd:(\S+)", r"What day of the week is (\S+)\? Answer with the weekday's name\."],
        "iso": [r"iso:(.+)", r"Write the date (.+) in ISO format \(YYYY-MM-DD\)\."],
    }[problem.category]
    for index, pattern in enumerate(patterns):
        match = re.fullmatch(pattern, p)
        if not match:
            continue
        groups = match.groups()
        if problem.category in ("add", "sub"):
            date, days = (groups[0], groups[1]) if index == 0 else (groups[1], groups[0])
            return parse_iso(date), int(days)
        if problem.category == "diff":
            return parse_iso(groups[0]), parse_iso(groups[1])
        if problem.category == "weekday":
            return (parse_iso(groups[0]),)
        return (parse_written_date(groups[0]),)
    raise AssertionError(f"unreadable prompt {p!r}")


def expected_answer(problem: da.DateProblem) -> str:
    parsed = parse_prompt(problem)
    if problem.category == "add":
        return iso(*shift(*parsed[0], parsed[1]))
    if problem.category == "sub":
        return iso(*shift(*parsed[0], -parsed[1]))
    if problem.category == "diff":
        return str(day_number(*parsed[1]) - day_number(*parsed[0]))
    if problem.category == "weekday":
        return DAY_NAMES[zeller_weekday(*parsed[0])]
    return iso(*parsed[0])


ARITH = re.compile(r"(\d\d)([+-])(\d\d)=(\d\d)")


def arith(text: str) -> tuple[int, str, int, int]:
    """One two-digit step ``a+b=c`` or ``a-b=c``, checked: returns (a, op, b, c)."""
    match = ARITH.fullmatch(text)
    assert match, f"not a two-digit step: {text!r}"
    a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
    assert c == (a + b if op == "+" else a - b), f"wrong arithmetic {text!r}"
    return a, op, b, c


def replay_add(scratchpad: str, start: tuple[int, int, int], days: int) -> tuple[int, int, int]:
    """Re-execute an add scratchpad step by step; returns the date it lands on."""
    year, month, day = start
    first_day, remaining = day, days
    steps = scratchpad.split(";")
    for index, step in enumerate(steps):
        match = re.fullmatch(r"(\d{4})-(\d{2}):([^,]+),(.+)", step)
        assert match, step
        assert (int(match[1]), int(match[2])) == (year, month), f"step {step!r} is in the wrong month"
        length, op, begin, left = arith(match[3])
        assert op == "-" and length == days_in_month(year, month) and begin == first_day
        a, op, b, c = arith(match[4])
        if index == len(steps) - 1:
            assert op == "+" and (a, b) == (first_day, remaining) and remaining <= left
            return year, month, c
        assert op == "-" and (a, b) == (remaining, left) and remaining > left
        remaining, first_day = c, 0
        year, month = next_month(year, month)
    raise AssertionError("empty scratchpad")


def replay_sub(scratchpad: str, start: tuple[int, int, int], days: int) -> tuple[int, int, int]:
    year, month, day = start
    current, remaining = day, days
    steps = scratchpad.split(";")
    for index, step in enumerate(steps):
        match = re.fullmatch(r"(\d{4})-(\d{2}):(\d\d),(.+)", step)
        assert match, step
        assert (int(match[1]), int(match[2])) == (year, month), f"step {step!r} is in the wrong month"
        assert int(match[3]) == current
        a, op, b, c = arith(match[4])
        if index == len(steps) - 1:
            assert op == "-" and (a, b) == (current, remaining) and remaining < current
            return year, month, c
        assert op == "-" and (a, b) == (remaining, current) and remaining >= current
        remaining = c
        year, month = prev_month(year, month)
        current = days_in_month(year, month)
    raise AssertionError("empty scratchpad")


def replay_diff(scratchpad: str, start: tuple[int, int, int], end: tuple[int, int, int]) -> int:
    year, month, first_day = start
    total = 0
    steps = scratchpad.split(";")
    for index, step in enumerate(steps):
        match = re.fullmatch(r"(\d{4})-(\d{2}):([^,]+),(.+)", step)
        assert match, step
        assert (int(match[1]), int(match[2])) == (year, month), f"step {step!r} is in the wrong month"
        last = index == len(steps) - 1
        assert last == ((year, month) == end[:2])
        stop, op, begin, span = arith(match[3])
        assert op == "-" and begin == first_day
        assert stop == (end[2] if last else days_in_month(year, month))
        a, op, b, c = arith(match[4])
        assert op == "+" and (a, b) == (total, span)
        total, first_day = c, 0
        year, month = next_month(year, month)
    return total


def check_weekday_scratchpad(scratchpad: str, date: tuple[int, int, int]) -> str:
    match = re.fullmatch(r"(\d)\+(\d)=(\d)\+(\d)=(\d)", scratchpad)
    assert match, scratchpad
    w0, month_offset, partial, day_offset, final = map(int, match.groups())
    year, month, day = date
    assert w0 == zeller_weekday(year, 1, 1)
    assert month_offset == (day_number(year, month, 1) - day_number(year, 1, 1)) % 7
    assert partial == (w0 + month_offset) % 7
    assert day_offset == (day - 1) % 7
    assert final == (partial + day_offset) % 7
    return DAY_NAMES[final]


def check_problem(problem: da.DateProblem) -> None:
    """The answer against the reference, and the scratchpad re-executed."""
    assert problem.category in da.CATEGORIES
    assert problem.answer == expected_answer(problem), problem
    parsed = parse_prompt(problem)
    if problem.category == "add":
        assert iso(*replay_add(problem.scratchpad, *parsed)) == problem.answer, problem
    elif problem.category == "sub":
        assert iso(*replay_sub(problem.scratchpad, *parsed)) == problem.answer, problem
    elif problem.category == "diff":
        assert str(replay_diff(problem.scratchpad, *parsed)) == problem.answer, problem
    elif problem.category == "weekday":
        assert check_weekday_scratchpad(problem.scratchpad, parsed[0]) == problem.answer, problem
    else:
        assert problem.scratchpad == ""
    target = problem.target()
    assert da.extract_answer(target) == problem.answer
    if problem.scratchpad:
        assert target == f"{problem.scratchpad}>{problem.answer}"
    assert problem.target(with_scratchpad=False) == problem.answer


# ----------------------------------------------------------------------------------------------------------------------
# Generated problems, in bulk.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("year_range", [(1980, 2039), (1900, 1900), (2000, 2000), (2100, 2100), (1895, 2105)])
def test_generated_problems_match_reference(year_range):
    problems = da.generate_problems("train", 1500, seed=7, year_range=year_range)
    # A single year holds only about 37 eval weekday prompts, so the eval sample stays small.
    problems += da.generate_problems("eval", 100, seed=7, year_range=year_range)
    assert Counter(p.category for p in problems) == {c: 320 for c in da.CATEGORIES}
    for problem in problems:
        check_problem(problem)
        assert year_range[0] <= parse_prompt(problem)[0][0] <= year_range[1]  # the drawn date


def test_verbose_prompts_match_reference():
    problems = da.generate_problems("train", 500, seed=3, prompt_style="verbose")
    assert not any(p.prompt.startswith(("add:", "sub:", "diff:", "wd:", "iso:")) for p in problems)
    for problem in problems:
        check_problem(problem)


def test_all_three_written_date_styles_appear_and_parse():
    problems = da.generate_problems("train", 300, seed=11, categories=("iso",))
    shapes = set()
    for problem in problems:
        check_problem(problem)
        text = problem.prompt[len("iso:"):]
        shapes.add("comma" if "," in text else "day-first" if text[0].isdigit() else "short")
    assert shapes == {"comma", "day-first", "short"}


def test_max_days_bounds_offsets_and_gaps():
    for max_days in (1, 5, 99):
        for problem in da.generate_problems("train", 400, seed=max_days, max_days=max_days):
            parsed = parse_prompt(problem)
            if problem.category in ("add", "sub"):
                assert 1 <= parsed[1] <= max_days
            elif problem.category == "diff":
                assert 1 <= int(problem.answer) <= max_days


# ----------------------------------------------------------------------------------------------------------------------
# Forced edge cases, through make_problem with a scripted random source.
# ----------------------------------------------------------------------------------------------------------------------

RANGE = (1890, 2110)


class ScriptedRandom:
    """Stands in for random.Random: hands make_problem the date offset, day count and written style we choose."""

    def __init__(self, date: tuple[int, int, int], days: int = 1, style: int = 0):
        self.randrange_values = [day_number(*date) - day_number(RANGE[0], 1, 1), style]
        self.days = days

    def randrange(self, n):
        value = self.randrange_values.pop(0)
        assert 0 <= value < n
        return value

    def randint(self, a, b):
        assert a <= self.days <= b
        return self.days


def forced(category, date, days=1, style=0, prompt_style="compact") -> da.DateProblem:
    problem = da.make_problem(ScriptedRandom(date, days, style), category, year_range=RANGE,
                              prompt_style=prompt_style)
    date_in_prompt = parse_prompt(problem)[0]
    assert date_in_prompt == date  # the script really steered the draw
    return problem


EDGE_ADD = [
    ((2000, 2, 28), 1, "2000-02-29"),
    ((2000, 2, 29), 1, "2000-03-01"),
    ((2024, 2, 28), 1, "2024-02-29"),
    ((2024, 2, 29), 1, "2024-03-01"),
    ((1900, 2, 28), 1, "1900-03-01"),
    ((2100, 2, 28), 1, "2100-03-01"),
    ((2023, 2, 28), 1, "2023-03-01"),
    ((1999, 12, 31), 1, "2000-01-01"),
    ((2023, 12, 15), 20, "2024-01-04"),
    ((2024, 1, 31), 30, "2024-03-01"),
    ((2023, 1, 31), 29, "2023-03-01"),
    ((2024, 1, 31), 29, "2024-02-29"),
    ((2024, 4, 30), 1, "2024-05-01"),
    ((2024, 4, 29), 1, "2024-04-30"),
]

EDGE_SUB = [
    ((2000, 3, 1), 1, "2000-02-29"),
    ((2024, 3, 1), 1, "2024-02-29"),
    ((1900, 3, 1), 1, "1900-02-28"),
    ((2100, 3, 1), 1, "2100-02-28"),
    ((2000, 1, 1), 1, "1999-12-31"),
    ((2024, 1, 15), 20, "2023-12-26"),
    ((2024, 3, 31), 31, "2024-02-29"),
    ((2024, 2, 29), 29, "2024-01-31"),
    ((2024, 5, 1), 1, "2024-04-30"),
    ((2024, 5, 2), 1, "2024-05-01"),
]


@pytest.mark.parametrize(("date", "days", "answer"), EDGE_ADD)
def test_add_edge_cases(date, days, answer):
    problem = forced("add", date, days)
    assert problem.answer == answer == iso(*shift(*date, days))  # hand value and reference agree
    check_problem(problem)
    assert problem.scratchpad.rsplit("=", 1)[1] == answer[-2:]  # the last step gives the answer's day


@pytest.mark.parametrize(("date", "days", "answer"), EDGE_SUB)
def test_sub_edge_cases(date, days, answer):
    problem = forced("sub", date, days)
    assert problem.answer == answer == iso(*shift(*date, -days))
    check_problem(problem)
    assert problem.scratchpad.rsplit("=", 1)[1] == answer[-2:]


@pytest.mark.parametrize(("date", "days"), [((2024, 2, 28), 2), ((1900, 2, 28), 1), ((2000, 2, 1), 29),
                                            ((1999, 12, 31), 1), ((2023, 12, 1), 99), ((2100, 1, 31), 60)])
def test_diff_edge_cases(date, days):
    problem = forced("diff", date, days)
    assert problem.answer == str(days)
    assert parse_prompt(problem)[1] == shift(*date, days)
    check_problem(problem)


@pytest.mark.parametrize(("date", "name"), [((2000, 2, 29), "Tuesday"), ((2024, 2, 29), "Thursday"),
                                            ((1900, 3, 1), "Thursday"), ((2000, 1, 1), "Saturday"),
                                            ((1999, 12, 31), "Friday"), ((2100, 12, 31), "Friday")])
def test_weekday_edge_cases(date, name):
    problem = forced("weekday", date)
    assert problem.answer == name == DAY_NAMES[zeller_weekday(*date)]
    check_problem(problem)


@pytest.mark.parametrize("style", [0, 1, 2])
def test_iso_edge_cases(style):
    for date in ((2000, 2, 29), (1900, 2, 28), (2024, 12, 31), (2001, 1, 1)):
        problem = forced("iso", date, style=style)
        assert problem.answer == iso(*date)
        check_problem(problem)


def test_every_day_of_century_years_through_every_category():
    """Every date of 1900, 2000, 2024 and 2100, each category, a spread of offsets: a sweep over the leap rules."""
    count = 0
    for year in (1900, 2000, 2024, 2100):
        for number in range(day_number(year, 1, 1), day_number(year, 12, 31) + 1):
            date = from_day_number(number)
            days = number * 37 % 99 + 1
            for category in da.CATEGORIES:
                check_problem(forced(category, date, days, style=number % 3))
                count += 1
    assert count == (365 + 366 + 366 + 365) * 5


def test_scratchpad_helpers_replay_under_the_reference():
    # The helpers the generator uses, called with dates as datetime objects, replay under the reference.
    start = (2024, 12, 20)
    assert iso(*replay_add(da.add_scratchpad(dt.date(*start), 99), start, 99)) == iso(*shift(*start, 99))
    assert iso(*replay_sub(da.sub_scratchpad(dt.date(*start), 99), start, 99)) == iso(*shift(*start, -99))
    end = shift(*start, 75)
    assert replay_diff(da.diff_scratchpad(dt.date(*start), dt.date(*end)), start, end) == 75
    assert check_weekday_scratchpad(da.weekday_scratchpad(dt.date(*start)), start) == DAY_NAMES[
        zeller_weekday(*start)]
    assert [da.month_length(y, m) for y, m in [(1900, 2), (2000, 2), (2100, 2), (2023, 4)]] == [
        days_in_month(y, m) for y, m in [(1900, 2), (2000, 2), (2100, 2), (2023, 4)]]


def test_scratchpad_replay_catches_a_wrong_step():
    """The replay checker itself can fail: corrupt one digit of a real scratchpad."""
    problem = forced("add", (2023, 12, 15), 20)
    good = problem.scratchpad
    bad = good[:-1] + str((int(good[-1]) + 1) % 10)
    with pytest.raises(AssertionError):
        replay_add(bad, (2023, 12, 15), 20)
    with pytest.raises(AssertionError):
        check_weekday_scratchpad("5+0=5+1=0", (2000, 1, 1))


# ----------------------------------------------------------------------------------------------------------------------
# extract_answer
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "answer"), [
    ("2023-12:31-15=16,20-16=04;2024-01:31-00=31,00+04=04>2024-01-04", "2024-01-04"),
    ("2+6=1+5=6>Sunday", "Sunday"),
    ("2024-01-04", "2024-01-04"),
    ("  Sunday  ", "Sunday"),
    ("x>2024-01-04\nadd:2020-01-01,5", "2024-01-04"),
    ("x>2024-01-04  \n\nmore text\nand more", "2024-01-04"),
    # A later line with its own ">" must not replace the answer on the first line.
    ("s>2024-01-04\nx>junk", "2024-01-04"),
    ("x> 17\n", "17"),
    ("a>b>c", "c"),
    ("2024-01-04\nanother line", "2024-01-04"),
    ("", ""),
    (">", ""),
    ("   \n  ", ""),
])
def test_extract_answer(text, answer):
    assert da.extract_answer(text) == answer


# ----------------------------------------------------------------------------------------------------------------------
# Determinism, splits, balance, arguments
# ----------------------------------------------------------------------------------------------------------------------


def test_same_seed_same_problems_different_seed_different():
    for split in ("train", "eval"):
        a = da.generate_problems(split, 200, seed=5)
        b = da.generate_problems(split, 200, seed=5)
        c = da.generate_problems(split, 200, seed=6)
        assert a == b
        assert [p.prompt for p in a] != [p.prompt for p in c]
        assert len({p.prompt for p in a} & {p.prompt for p in c}) < 20


def test_train_and_eval_are_disjoint_over_large_samples():
    train = da.generate_problems("train", 20_000, seed=0)
    evaluation = da.generate_problems("eval", 2_000, seed=0)
    train_prompts = {p.prompt for p in train}
    eval_prompts = [p.prompt for p in evaluation]
    assert not train_prompts & set(eval_prompts)
    assert len(set(eval_prompts)) == len(eval_prompts)  # eval problems are unique
    assert all(da.split_of(p) == "train" for p in train_prompts)
    assert all(da.split_of(p) == "eval" for p in eval_prompts)
    # Another seed's eval split never meets this seed's train split either: the split is a property of the prompt.
    other_eval = {p.prompt for p in da.generate_problems("eval", 1_000, seed=1)}
    assert not train_prompts & other_eval


def test_split_of_is_a_stable_one_in_ten_hash():
    prompts = [f"wd:{iso(*from_day_number(n))}" for n in range(day_number(1990, 1, 1), day_number(2009, 12, 31))]
    splits = [da.split_of(p) for p in prompts]
    assert set(splits) == {"train", "eval"}
    fraction = splits.count("eval") / len(splits)
    assert 0.08 < fraction < 0.12
    assert [da.split_of(p) for p in prompts] == splits


def test_eval_uniqueness_in_a_small_space_and_exhaustion_error():
    # 366 weekday prompts exist for year 2000, about a tenth of them in eval.
    available = sum(da.split_of(f"wd:{iso(*from_day_number(n))}") == "eval"
                    for n in range(day_number(2000, 1, 1), day_number(2000, 12, 31) + 1))
    problems = da.generate_problems("eval", available, categories=("weekday",), year_range=(2000, 2000))
    assert len({p.prompt for p in problems}) == available
    with pytest.raises(ValueError, match="distinct"):
        da.generate_problems("eval", available + 1, categories=("weekday",), year_range=(2000, 2000))


@pytest.mark.parametrize("categories", [da.CATEGORIES, ("iso", "add"), ("diff",), ("weekday", "sub", "iso")])
def test_categories_come_in_round_robin(categories):
    for split in ("train", "eval"):
        problems = da.generate_problems(split, 47, seed=2, categories=categories)
        assert [p.category for p in problems] == [categories[i % len(categories)] for i in range(47)]
        counts = Counter(p.category for p in problems)
        assert max(counts.values()) - min(counts.values()) <= 1


def test_to_records():
    problems = da.generate_problems("train", 10, seed=4)
    records = da.to_records(problems)
    assert [set(r) for r in records] == [{"category", "prompt", "completion", "answer"}] * 10
    for problem, record in zip(problems, records):
        assert (record["category"], record["prompt"], record["answer"]) == (
            problem.category, problem.prompt, problem.answer)
        assert da.extract_answer(record["completion"]) == problem.answer
        expected = f"{problem.scratchpad}>{problem.answer}" if problem.scratchpad else problem.answer
        assert record["completion"] == expected
    assert [r["completion"] for r in da.to_records(problems, with_scratchpad=False)] == [p.answer for p in problems]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"categories": ("add", "leap")}, "categories"),
    ({"categories": ()}, "categories"),
    ({"max_days": 0}, "max_days"),
    ({"max_days": 100}, "max_days"),
    ({"prompt_style": "chatty"}, "prompt_style"),
    ({"size": 0}, "size"),
    ({"split": "test"}, "split"),
    ({"split": "validation"}, "split"),
])
def test_generate_problems_rejects_bad_arguments(kwargs, match):
    arguments = {"split": "train", "size": 5} | kwargs
    with pytest.raises(ValueError, match=match):
        da.generate_problems(**arguments)


@pytest.mark.parametrize(("category", "kwargs", "match"), [
    ("leap", {}, "category"),
    ("add", {"max_days": 0}, "max_days"),
    ("add", {"max_days": 100}, "max_days"),
    ("add", {"prompt_style": "chatty"}, "prompt_style"),
])
def test_make_problem_rejects_bad_arguments(category, kwargs, match):
    with pytest.raises(ValueError, match=match):
        da.make_problem(random.Random(0), category, **kwargs)
