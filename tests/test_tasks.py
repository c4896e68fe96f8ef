"""Tests for workbench.tasks: the seeded arithmetic task generator and answer parsing."""

from __future__ import annotations

import re

import pytest

from workbench.tasks import TaskItem, exact_match, extract_number, make_arithmetic_tasks


def _recompute(q: str) -> int:
    """Independently recompute the answer of a generated question from its text."""
    nums = [int(x) for x in re.findall(r"\d+", q)]
    if "buys" in q and "more" in q:
        return nums[0] + nums[1]
    if "gave" in q:
        return nums[0] - nums[1]
    if "boxes and each box" in q:
        return nums[0] * nums[1]
    if "equally among" in q:
        return nums[0] // nums[1]
    if "kilometres per hour" in q:
        return nums[0] * nums[1]
    if "passengers" in q:
        return nums[0] - nums[1] + nums[2]
    if "notebooks" in q:
        return nums[0] - nums[1] * nums[2]
    if "per hour, works" in q:
        return nums[0] * nums[1] + nums[2]
    if "years older than" in q:
        return nums[0] + nums[1]
    if "How old will" in q:
        return nums[0] + nums[1]
    if " plus " in q and " minus " in q:
        return nums[0] + nums[1] - nums[2]
    if " times " in q:
        return nums[0] * nums[1] + nums[2]
    if "rows of desks" in q:
        return nums[0] * nums[1] - nums[2]
    if "flowers" in q:
        return nums[0] + nums[1]
    if "temperature" in q:
        return nums[0] - nums[1]
    raise AssertionError(f"unrecognised template: {q}")


def test_count_ids_and_types() -> None:
    items = make_arithmetic_tasks(50, seed=3)
    assert len(items) == 50
    assert all(isinstance(t, TaskItem) for t in items)
    assert [t.id for t in items] == [f"task-{i:05d}" for i in range(1, 51)]
    assert len({t.question for t in items}) == 50


def test_deterministic_and_seed_dependent() -> None:
    assert make_arithmetic_tasks(40, seed=7) == make_arithmetic_tasks(40, seed=7)
    assert make_arithmetic_tasks(40, seed=7) != make_arithmetic_tasks(40, seed=8)
    # A prefix of a longer run matches a shorter run with the same seed.
    assert make_arithmetic_tasks(10, seed=1) == make_arithmetic_tasks(30, seed=1)[:10]


def test_answers_are_exact() -> None:
    items = make_arithmetic_tasks(400, seed=0)
    for t in items:
        assert t.question.endswith("Answer with just the number.")
        assert re.fullmatch(r"-?\d+", t.answer)
        assert int(t.answer) == _recompute(t.question), t.question
        if "temperature" not in t.question:
            assert int(t.answer) >= 0


def test_templates_are_varied_and_small() -> None:
    items = make_arithmetic_tasks(400, seed=0)
    openings = {" ".join(t.question.split()[1:3]) for t in items}
    assert len(openings) >= 10
    assert any(int(t.answer) < 0 for t in items)  # the temperature template can go below zero
    for t in items:
        assert all(int(x) < 50 for x in re.findall(r"\d+", t.question))


def test_zero_and_negative() -> None:
    assert make_arithmetic_tasks(0) == []
    with pytest.raises(ValueError):
        make_arithmetic_tasks(-1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 42.", "42"),
        ("42", "42"),
        ("-3", "-3"),
        ("It was -3 degrees.", "-3"),
        ("1,234", "1234"),
        ("**12**", "12"),
        ("The total is **1,000,000** dollars", "1000000"),
        ("007", "7"),
        ("Step 1: add. So 5", "1"),
        ("3.5 apples", "3"),
        ("no digits here", None),
        ("", None),
        ("12,34", "12"),
    ],
)
def test_extract_number(text: str, expected: str | None) -> None:
    assert extract_number(text) == expected


def test_exact_match() -> None:
    assert exact_match("The answer is 42.", "42")
    assert exact_match("**-3**", "-3")
    assert exact_match("1,234 km", "1234")
    assert not exact_match("41", "42")
    assert not exact_match("I don't know", "42")
    items = make_arithmetic_tasks(5, seed=0)
    assert all(exact_match(f"Answer: {t.answer}", t.answer) for t in items)
