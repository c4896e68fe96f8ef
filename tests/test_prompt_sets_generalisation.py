"""The generalisation prompt sets of issue 12: harmful_extra (categories and styles the built-in harmful set
lacks) and alarming_harmless (harmless requests that merely sound alarming)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from workbench.prompts import BUILTIN_NAMES, builtin, builtin_split, resolve_prompts

DATA = Path(__file__).resolve().parents[1] / "workbench" / "data"
NEW = ("harmful_extra", "alarming_harmless")
OTHERS = ("harmful", "harmless", "harmful_styled", "useful_requests", "utility")
IMPERATIVE = re.compile(r"^(Explain how|Write|Give|Describe|Create|Tell me|List|Show|Provide|Outline)\b")
ALARMING = re.compile(
    r"\b(kill|killing|shoot|shooting|shot|terminate|terminating|execute|attack|attacking|poison|destroy|bomb|"
    r"blood|bleeding|murder|murderer|nuke|explod\w*|explosive|drop|wipe|abort|exploit|hijack|zombie|orphan|"
    r"brute-force|break|breaking|fire|crush|takeover|take over|butcher|beat|torch|smoking|smoke|cure|"
    r"slice|sharp|weeds|poison|behead|girdle|rats|exterminate|trap|knockout|punch|choke|snipe|sacrifice|"
    r"take down|blow|assassinate|raid|steal|heist|overdose|doses?|painkillers|crack|villain|sword|eulogy|"
    r"atomic|assassination|besieged|genocide|codebreakers?|raids|mould|bleach|shred|nuclear|black holes?|"
    r"hijack|demolitions?|mushrooms|put my old dog down|euthanise|biting|aggression|fleas|aggressive|"
    r"graffiti|smash|short|slash|grab|rifle|gas|spiked|field-dress|bear|hacked|lock down|attackers|purge|"
    r"blacklist|crashing|dark|fireworks|headshot|fake blood|target|lease|liquidate|fired?|lobster|"
    r"chemicals?|toxic|battery|swallowed|bone|fish|lure|flint|knife|hunting|deer|deadly|die|dies|death|"
    r"danger\w*|horror|thriller|poisoning|wasp|mice|hornets?|slugs|poison ivy|stump|moss)\b", re.I)


def _norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


@pytest.mark.parametrize("name", NEW)
def test_registered_counted_unique_and_split(name: str) -> None:
    assert name in BUILTIN_NAMES
    ps = builtin(name)
    assert len(ps) >= 100
    ids = [p.id for p in ps]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(rf"{name}-\d{{4}}", i) for i in ids)
    texts = [_norm(t) for t in ps.texts]
    assert len(set(texts)) == len(texts)
    assert all(p.category for p in ps)
    for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
        assert set(json.loads(line)) == {"id", "instruction", "category"}
    sp = {k: builtin_split(name, k) for k in ("train", "val", "test")}
    assert sum(len(v) for v in sp.values()) == len(ps)
    assert {p.id for v in sp.values() for p in v} == set(ids)
    assert resolve_prompts(f"{name}:val").texts == sp["val"].texts
    assert builtin_split(name, "test").texts == sp["test"].texts  # fixed, seeded


@pytest.mark.parametrize("name", NEW)
def test_no_text_shared_with_the_other_builtin_sets(name: str) -> None:
    mine = {_norm(t) for t in builtin(name).texts}
    for other in OTHERS + tuple(n for n in NEW if n != name):
        assert not mine & {_norm(t) for t in builtin(other).texts}, other


def test_harmful_extra_has_new_categories_balanced() -> None:
    extra, harmful = builtin("harmful_extra"), builtin("harmful")
    cats = Counter(p.category for p in extra)
    assert len(cats) >= 10
    assert not set(cats) & {p.category for p in harmful}  # only categories the built-in set lacks
    assert max(cats.values()) - min(cats.values()) <= 1


def test_harmful_extra_has_styles_and_lengths_harmful_lacks() -> None:
    extra, harmful = builtin("harmful_extra"), builtin("harmful")
    words = lambda ps: [len(t.split()) for t in ps.texts]  # noqa: E731
    lo, hi = min(words(harmful)), max(words(harmful))
    outside = [w for w in words(extra) if w < lo or w > hi]
    assert len(outside) >= 30  # terse fragments and long stories, outside the built-in set's length range
    assert sum(w <= 8 for w in words(extra)) >= 12 and sum(w >= 40 for w in words(extra)) >= 12
    assert sum(bool(IMPERATIVE.match(t)) for t in extra.texts) <= len(extra) // 4  # harmful is mostly imperative
    assert sum(bool(IMPERATIVE.match(t)) for t in harmful.texts) >= len(harmful) // 2
    assert sum(t.rstrip().endswith("?") for t in extra.texts) >= 25  # questions
    assert sum(t[0].islower() for t in extra.texts) >= 20  # lower-case chat
    non_ascii = [t for t in extra.texts if re.search(r"[àâçéèêëîïôûùüÿñæœäöß¿¡]", t.lower())]
    assert len(non_ascii) >= 10  # French, German, Spanish, Italian requests


def test_alarming_harmless_spans_domains_and_sounds_alarming() -> None:
    ps = builtin("alarming_harmless")
    cats = Counter(p.category for p in ps)
    assert len(cats) >= 12 and max(cats.values()) <= len(ps) // 5
    alarming = [t for t in ps.texts if ALARMING.search(t)]
    assert len(alarming) >= int(0.9 * len(ps))
    # interleaved by domain: the first 40 (the over-refusal measurement) cover every domain
    assert {p.category for p in list(ps)[:40]} == set(cats)
