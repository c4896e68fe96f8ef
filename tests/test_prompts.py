"""Tests for workbench.prompts: built-in sets, seeded splits and file loaders."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from workbench.errors import WorkbenchError
from workbench.prompts import (
    BUILTIN_NAMES,
    Prompt,
    PromptSet,
    builtin,
    builtin_split,
    load_prompts,
    resolve_prompts,
    split_prompts,
)
from workbench.tasks import exact_match

HARMFUL_CATS = {
    "violence_weapons", "cybercrime", "fraud_scams", "drugs", "harassment",
    "privacy_violation", "misinformation", "self_harm", "theft_burglary", "hate_speech",
}
HARMLESS_CATS = {
    "cooking", "programming", "science", "travel", "fitness", "finance_personal",
    "writing_creative", "home_repair", "history", "education",
}


# ---------------------------------------------------------------- built-ins


@pytest.mark.parametrize(("name", "cats"), [("harmful", HARMFUL_CATS), ("harmless", HARMLESS_CATS)])
def test_builtin_sets(name: str, cats: set[str]) -> None:
    ps = builtin(name)
    assert ps.name == name
    assert len(ps) >= 300
    ids = [p.id for p in ps]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith(f"{name}-") for i in ids)
    texts = ps.texts
    assert len(set(texts)) == len(texts)
    assert all(t == t.strip() and len(t.split()) >= 4 for t in texts)
    counts = Counter(p.category for p in ps)
    assert set(counts) == cats
    assert min(counts.values()) >= 25  # roughly balanced
    assert sum("," in t for t in texts) >= 50  # commas survive loading


def test_builtin_files_are_valid_jsonl() -> None:
    root = Path(__file__).resolve().parents[1] / "workbench" / "data"
    for name in ("harmful", "harmless"):
        lines = (root / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) >= 320
        for line in lines:
            obj = json.loads(line)
            assert set(obj) == {"id", "instruction", "category"}


def test_harmful_and_harmless_are_disjoint_and_similar_length() -> None:
    a, b = builtin("harmful"), builtin("harmless")
    assert not set(a.texts) & set(b.texts)
    mean = lambda ps: sum(len(t.split()) for t in ps.texts) / len(ps)  # noqa: E731
    assert abs(mean(a) - mean(b)) < 3


def test_builtin_utility() -> None:
    ps = builtin("utility")
    assert len(ps) == 400
    assert all(p.answer is not None and exact_match(p.answer, p.answer) for p in ps)
    assert ps.texts == builtin("utility").texts


def test_builtin_unknown_name() -> None:
    with pytest.raises(WorkbenchError, match="harmful, harmless, utility"):
        builtin("nope")
    assert BUILTIN_NAMES == ("harmful", "harmless", "utility", "harmful_styled", "useful_requests",
                             "harmful_extra", "alarming_harmless", "everyday")


# ---------------------------------------------------------------- PromptSet


def test_promptset_basics() -> None:
    ps = PromptSet("demo", (Prompt("a", "x, y"), Prompt("b", "z")))
    assert len(ps) == 2
    assert [p.id for p in ps] == ["a", "b"]
    assert ps.texts == ["x, y", "z"]
    assert len(ps.hash) == 64
    assert ps.hash == PromptSet("other", (Prompt("q", "x, y"), Prompt("r", "z"))).hash
    assert ps.hash != PromptSet("demo", (Prompt("b", "z"), Prompt("a", "x, y"))).hash
    assert ps.subset([1]).texts == ["z"]
    with pytest.raises(ValueError, match="empty"):
        PromptSet("empty", ())
    with pytest.raises(ValueError, match="empty"):
        ps.subset([])


def test_builtin_hash_is_stable() -> None:
    assert builtin("harmful").hash == builtin("harmful").hash
    assert builtin("harmful").hash != builtin("harmless").hash


# ---------------------------------------------------------------- splits


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_splits_disjoint_covering_deterministic(name: str) -> None:
    ps = builtin(name)
    s = split_prompts(ps)
    assert set(s) == {"train", "val", "test"}
    ids = {k: {p.id for p in v} for k, v in s.items()}
    assert not ids["train"] & ids["val"]
    assert not ids["train"] & ids["test"]
    assert not ids["val"] & ids["test"]
    assert ids["train"] | ids["val"] | ids["test"] == {p.id for p in ps}
    assert abs(len(s["train"]) - 0.6 * len(ps)) <= 1
    again = split_prompts(builtin(name))
    assert all(s[k].texts == again[k].texts for k in s)
    assert s["train"].name == f"{name}:train"
    assert builtin_split(name, "val").texts == s["val"].texts
    assert ps.split("test").texts == s["test"].texts


def test_split_seed_changes_assignment() -> None:
    ps = builtin("harmful")
    assert split_prompts(ps, seed=0)["train"].texts != split_prompts(ps, seed=1)["train"].texts


def test_split_errors() -> None:
    ps = builtin("harmful")
    with pytest.raises(ValueError, match="valid splits"):
        ps.split("dev")
    with pytest.raises(ValueError, match="fractions"):
        split_prompts(ps, fractions=(0.5, 0.5))
    tiny = PromptSet("tiny", (Prompt("a", "one"), Prompt("b", "two")))
    with pytest.raises(ValueError, match="would be empty"):
        split_prompts(tiny)


# ---------------------------------------------------------------- file loaders


def test_csv_quoted_commas_load_whole(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "instruction", "category"])
        w.writerow(["1", "Write a poem about rain, wind, and the sea", "poetry"])
        w.writerow(["2", 'Say "hi", then leave', "misc"])
        w.writerow(["3", "Line one\nline two, still one prompt", "misc"])
    ps = load_prompts(path)
    assert ps.name == "p"
    assert ps.texts == [
        "Write a poem about rain, wind, and the sea",
        'Say "hi", then leave',
        "Line one\nline two, still one prompt",
    ]
    assert [p.category for p in ps] == ["poetry", "misc", "misc"]


def test_csv_column_choice_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text('question,notes\n"What is 2+2, exactly?",x\nWhy?,y\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"'question', 'notes'"):
        load_prompts(path)
    assert load_prompts(path, column="question").texts == ["What is 2+2, exactly?", "Why?"]
    assert resolve_prompts(f"{path}#question").texts == ["What is 2+2, exactly?", "Why?"]
    with pytest.raises(ValueError, match="not found; available columns: 'question', 'notes'"):
        load_prompts(path, column="prompt")
    default = tmp_path / "d.csv"
    default.write_text("text\nhello, there, friend\n", encoding="utf-8")
    assert load_prompts(default).texts == ["hello, there, friend"]  # one column: commas rejoined
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("instruction,category\nWrite a poem, please,poetry\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 has more fields.*double quotes"):
        load_prompts(ragged)


def test_json_list_of_strings_and_objects(tmp_path: Path) -> None:
    a = tmp_path / "a.json"
    a.write_text(json.dumps(["one, two", "three"]), encoding="utf-8")
    assert load_prompts(a).texts == ["one, two", "three"]
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"prompt": "p1, with comma"}, {"prompt": "p2", "category": "c"}]), encoding="utf-8")
    ps = load_prompts(b, name="bee")
    assert ps.name == "bee" and ps.texts == ["p1, with comma", "p2"]
    assert ps[1].category == "c"
    c = tmp_path / "c.json"
    c.write_text(json.dumps([{"q": "x"}, {"q": "y"}]), encoding="utf-8")
    assert load_prompts(c, field="q").texts == ["x", "y"]
    with pytest.raises(ValueError, match="'q'"):
        load_prompts(c)


def test_json_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_prompts(bad)
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"prompts": ["a"]}), encoding="utf-8")
    with pytest.raises(ValueError, match="list of strings or a list of objects"):
        load_prompts(obj)
    nums = tmp_path / "nums.json"
    nums.write_text(json.dumps([1, 2]), encoding="utf-8")
    with pytest.raises(ValueError, match="only strings or only objects"):
        load_prompts(nums)
    nonstr = tmp_path / "nonstr.json"
    nonstr.write_text(json.dumps([{"text": "ok"}, {"text": 5}]), encoding="utf-8")
    with pytest.raises(ValueError, match="must be a string, got int"):
        load_prompts(nonstr)
    empty = tmp_path / "empty.json"
    empty.write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompts found"):
        load_prompts(empty)


def test_jsonl_loader(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    rows = [{"instruction": "Do this, then that", "category": "a"}, {"instruction": "Another"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    ps = load_prompts(path)
    assert ps.texts == ["Do this, then that", "Another"]
    assert [p.category for p in ps] == ["a", None]
    assert [p.id for p in ps] == ["x-0001", "x-0002"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_prompts(broken)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "ok"}\n{"other": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="record 2 has no field 'text'"):
        load_prompts(missing)


def test_txt_loader(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("First prompt, with a comma\n\n   \nSecond prompt\n", encoding="utf-8")
    assert load_prompts(path).texts == ["First prompt, with a comma", "Second prompt"]
    with pytest.raises(ValueError, match="no columns"):
        load_prompts(path, column="text")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompts found"):
        load_prompts(blank)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        load_prompts(tmp_path / "nope.csv")
    weird = tmp_path / "p.xlsx"
    weird.write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unknown file extension '\.xlsx'; supported: \.csv, \.json, \.jsonl, \.txt"):
        load_prompts(weird)
    empty_csv = tmp_path / "e.csv"
    empty_csv.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="no header row"):
        load_prompts(empty_csv)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(WorkbenchError, match="not UTF-8"):
        load_prompts(binary)
    header_only = tmp_path / "h.csv"
    header_only.write_text("instruction\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompts found"):
        load_prompts(header_only)


# ---------------------------------------------------------------- resolve


def test_resolve_builtin_specs() -> None:
    assert resolve_prompts("harmful").texts == builtin("harmful").texts
    assert resolve_prompts("harmless:train").texts == builtin_split("harmless", "train").texts
    assert resolve_prompts("utility:test").name == "utility:test"
    with pytest.raises(ValueError, match="valid splits: train, val, test"):
        resolve_prompts("harmful:dev")
    with pytest.raises(ValueError, match="neither a built-in"):
        resolve_prompts("harmfull")


def test_resolve_file_spec(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"goal": "Hello, world"}) + "\n", encoding="utf-8")
    assert resolve_prompts(f"{path}#goal").texts == ["Hello, world"]
    with pytest.raises(ValueError, match="available fields: 'goal'"):
        resolve_prompts(str(path))
