"""Seeded utility tasks: small arithmetic word problems with exact integer answers.

These tasks measure whether an intervention (steering, ablation, weight edit)
damages a model's general ability. Numbers are kept small (mostly below 50)
and problems use one or two operations, so even a ~0.5B model solves some.

Example:
    >>> items = make_arithmetic_tasks(3, seed=0)
    >>> items[0].id
    'task-00001'
    >>> exact_match("The answer is " + items[0].answer + ".", items[0].answer)
    True
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

from workbench.errors import WorkbenchError

__all__ = ["TaskItem", "make_arithmetic_tasks", "extract_number", "exact_match"]

SUFFIX = " Answer with just the number."


@dataclass(frozen=True)
class TaskItem:
    """One question with its exact answer (an integer written as a string)."""

    id: str
    question: str
    answer: str


_NAMES = [
    "Alice", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hiro", "Isla",
    "Jamal", "Kofi", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa",
    "Sam", "Tara", "Uma", "Victor", "Wen", "Yusuf", "Zoe",
]

# Each template takes an RNG and returns (question, integer answer).
_Template = Callable[[random.Random], tuple[str, int]]


def _apples(r: random.Random) -> tuple[str, int]:
    n = r.choice(_NAMES)
    a, b = r.randint(5, 40), r.randint(1, 20)
    fruit = r.choice(["apples", "oranges", "pears", "plums", "lemons"])
    return f"{n} has {a} {fruit} and buys {b} more. How many {fruit} does {n} have now?", a + b


def _give_away(r: random.Random) -> tuple[str, int]:
    n, m = r.sample(_NAMES, 2)
    a = r.randint(10, 45)
    b = r.randint(1, a - 1)
    thing = r.choice(["stickers", "marbles", "cookies", "pencils", "cards"])
    return f"{n} had {a} {thing} and gave {b} of them to {m}. How many {thing} does {n} have left?", a - b


def _boxes(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(2, 9), r.randint(2, 12)
    thing = r.choice(["eggs", "books", "cups", "toys", "candles"])
    return f"There are {a} boxes and each box holds {b} {thing}. How many {thing} are there in total?", a * b


def _share(r: random.Random) -> tuple[str, int]:
    k, q = r.randint(2, 8), r.randint(2, 9)
    n = r.choice(_NAMES)
    return f"{n} shares {k * q} sweets equally among {k} friends. How many sweets does each friend get?", q


def _train(r: random.Random) -> tuple[str, int]:
    speed, hours = r.randint(10, 45), r.randint(2, 5)
    return f"A train travels at {speed} kilometres per hour for {hours} hours. How many kilometres does it travel?", speed * hours


def _train_passengers(r: random.Random) -> tuple[str, int]:
    a = r.randint(20, 49)
    off = r.randint(1, a - 5)
    on = r.randint(1, 20)
    return (
        f"A train leaves the station with {a} passengers. At the next stop {off} passengers get off "
        f"and {on} get on. How many passengers are on the train now?",
        a - off + on,
    )


def _money(r: random.Random) -> tuple[str, int]:
    n = r.choice(_NAMES)
    have = r.randint(20, 49)
    price, qty = r.randint(2, 9), r.randint(2, 4)
    while price * qty > have:
        qty -= 1
    return (
        f"{n} has {have} dollars and buys {qty} notebooks that cost {price} dollars each. "
        f"How many dollars does {n} have left?",
        have - price * qty,
    )


def _wage(r: random.Random) -> tuple[str, int]:
    n = r.choice(_NAMES)
    rate, hours, bonus = r.randint(5, 15), r.randint(2, 8), r.randint(1, 20)
    return (
        f"{n} earns {rate} dollars per hour, works {hours} hours, and then gets a bonus of {bonus} dollars. "
        f"How many dollars does {n} earn in total?",
        rate * hours + bonus,
    )


def _ages(r: random.Random) -> tuple[str, int]:
    n, m = r.sample(_NAMES, 2)
    age, diff = r.randint(5, 30), r.randint(2, 15)
    return f"{n} is {age} years old. {m} is {diff} years older than {n}. How old is {m}?", age + diff


def _ages_future(r: random.Random) -> tuple[str, int]:
    n = r.choice(_NAMES)
    age, years = r.randint(3, 40), r.randint(2, 12)
    return f"{n} is {age} years old now. How old will {n} be in {years} years?", age + years


def _two_step(r: random.Random) -> tuple[str, int]:
    a, b, c = r.randint(10, 40), r.randint(2, 20), r.randint(1, 9)
    return f"What is {a} plus {b} minus {c}?", a + b - c


def _mul_add(r: random.Random) -> tuple[str, int]:
    a, b, c = r.randint(2, 9), r.randint(2, 9), r.randint(1, 30)
    return f"What is {a} times {b} plus {c}?", a * b + c


def _classroom(r: random.Random) -> tuple[str, int]:
    rows, per, absent = r.randint(3, 8), r.randint(3, 6), r.randint(1, 5)
    return (
        f"A classroom has {rows} rows of desks with {per} desks in each row. "
        f"If {absent} desks are empty today, how many desks are being used?",
        rows * per - absent,
    )


def _garden(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(5, 30), r.randint(5, 30)
    return f"A garden has {a} red flowers and {b} yellow flowers. How many flowers are there altogether?", a + b


def _temperature(r: random.Random) -> tuple[str, int]:
    t, drop = r.randint(0, 12), r.randint(3, 20)
    return f"The temperature was {t} degrees in the evening and fell by {drop} degrees overnight. What was the temperature in the morning?", t - drop


_TEMPLATES: tuple[_Template, ...] = (
    _apples, _give_away, _boxes, _share, _train, _train_passengers, _money,
    _wage, _ages, _ages_future, _two_step, _mul_add, _classroom, _garden, _temperature,
)


def make_arithmetic_tasks(n: int, seed: int = 0) -> list[TaskItem]:
    """Generate ``n`` arithmetic word problems, deterministically from ``seed``.

    Questions end with "Answer with just the number." and answers are exact
    integers as strings. Question texts are unique within one call.

    Example:
        >>> a = make_arithmetic_tasks(5, seed=1)
        >>> a == make_arithmetic_tasks(5, seed=1)
        True
        >>> a[4].id
        'task-00005'
    """
    if n < 0:
        raise WorkbenchError(f"n must be non-negative, got {n}")
    rng = random.Random(seed)
    items: list[TaskItem] = []
    seen: set[str] = set()
    attempts = 0
    while len(items) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise RuntimeError(f"could not generate {n} unique tasks")
        question, value = rng.choice(_TEMPLATES)(rng)
        question += SUFFIX
        if question in seen:
            continue
        seen.add(question)
        items.append(TaskItem(id=f"task-{len(items) + 1:05d}", question=question, answer=str(value)))
    return items


_NUMBER = re.compile(r"(?<![\d.])-?\d{1,3}(?:,\d{3})+(?!\d)|(?<![\d.])-?\d+")


def extract_number(text: str) -> str | None:
    """Return the first integer in ``text`` as a normalised string, or None.

    Thousands separators are removed and leading zeros dropped; Markdown
    emphasis and surrounding words are ignored.

    Example:
        >>> extract_number("The answer is **1,234**.")
        '1234'
        >>> extract_number("-3") , extract_number("no digits")
        ('-3', None)
    """
    match = _NUMBER.search(text)
    if match is None:
        return None
    return str(int(match.group(0).replace(",", "")))


def exact_match(reply: str, answer: str) -> bool:
    """True when the first integer in ``reply`` equals ``answer``.

    Example:
        >>> exact_match("It is 42 apples.", "42")
        True
        >>> exact_match("41", "42")
        False
    """
    got = extract_number(reply)
    want = extract_number(answer)
    return got is not None and got == want
