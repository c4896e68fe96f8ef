"""Disjoint prompt pools (issue #10, defect 6 "confounded recipes"): no harmful prompt feeds two recipes, the
refusal direction or the harm evaluation; the recipes draw only from their own pool; the pools are
deterministic; asking for more than a pool holds fails with the pool size.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch

from workbench.chat import ChatFormat
from workbench.errors import WorkbenchError
from workbench.io import sha256_text
from workbench.prompts import builtin

from weightspace import pools
from weightspace.recipes import build_recipe, refusal_direction

TRAINING = ("safety", "harmful", "contaminated")
HARMFUL_POOLS = tuple(s.name for s in pools.POOLS if s.source == "harmful")


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _hashes(texts) -> set[str]:
    return {sha256_text(t) for t in texts}


def _norms(texts) -> set[str]:
    return {_norm(t) for t in texts}


# -- the pools themselves -------------------------------------------------------------------------

def test_pools_are_pairwise_disjoint_by_hash_and_by_normalised_text():
    for a, b in itertools.combinations(pools.POOL_NAMES, 2):
        ta, tb = pools.pool_texts(a), pools.pool_texts(b)
        assert _hashes(ta).isdisjoint(_hashes(tb)), (a, b)
        assert _norms(ta).isdisjoint(_norms(tb)), (a, b)
    for n in pools.POOL_NAMES:  # no duplicate inside a pool either
        t = pools.pool_texts(n)
        assert len(_hashes(t)) == len(_norms(t)) == len(t) == len(pools.pool(n))


def test_pool_sizes_sources_and_category_balance():
    sizes = {n: len(pools.pool(n)) for n in pools.POOL_NAMES}
    assert sizes == {"direction": 80, "safety": 70, "harmful": 70, "contaminated": 20, "evaluation": 100,
                     "direction_harmless": 80, "evaluation_harmless": 100}
    assert sum(sizes[n] for n in HARMFUL_POOLS) <= len(builtin("harmful")) == 340
    assert sizes["evaluation"] >= 100
    for spec in pools.POOLS:
        src = builtin(spec.source)
        ps = pools.pool(spec.name)
        assert set(ps.prompts) <= set(src.prompts)  # the very prompts of the built-in set, ids and all
        counts = Counter(p.category for p in ps)
        assert set(counts.values()) == {spec.per_category} and len(counts) == 10
        # round-robin order: every prefix of 10 holds each category once
        assert len({p.category for p in ps.prompts[:10]}) == 10
    assert pools.pool("safety").name == "pool:safety"


def test_pools_are_deterministic_across_calls_and_processes():
    first = pools.pool_hashes()
    assert set(first) == set(pools.POOL_NAMES)
    assert first == {n: pools.pool(n).hash for n in pools.POOL_NAMES}
    pools._partition.cache_clear()
    assert pools.pool_hashes() == first
    code = "import json; from weightspace.pools import pool_hashes; print(json.dumps(pool_hashes()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout) == first
    d = pools.describe(("safety",))
    assert d == {"safety": {"source": "harmful", "size": 70, "hash": first["safety"], "seed": pools.POOL_SEED}}


def test_asking_for_more_than_a_pool_holds_fails_with_the_pool_size():
    assert [p.text for p in pools.take("safety", 3)] == pools.pool_texts("safety")[:3]
    with pytest.raises(WorkbenchError, match=r"101 .*evaluation pool, which holds 100 prompts"):
        pools.take("evaluation", 101)
    with pytest.raises(WorkbenchError, match="at least 1"):
        pools.take("safety", 0)
    with pytest.raises(WorkbenchError, match="unknown prompt pool 'nope'; valid pools: direction, safety"):
        pools.pool("nope")


def test_recipes_refuse_more_prompts_than_their_pool(make_tiny):
    lm = make_tiny("llama")
    with pytest.raises(WorkbenchError, match=r"asked for 71 safety recipe prompts from the safety pool, which holds 70"):
        build_recipe("safety", lm, n=71)
    with pytest.raises(WorkbenchError, match="harmful pool, which holds 70"):
        build_recipe("harmful", lm, n=71, direction=_direction(lm), generate=_comply)
    with pytest.raises(WorkbenchError, match="contaminated pool, which holds 20"):
        build_recipe("contaminated", lm, n=64, harmful_share=0.5, direction=_direction(lm), generate=_comply)
    with pytest.raises(WorkbenchError, match="direction pool holds 80 prompts"):
        refusal_direction(lm, ChatFormat(), layers=[1], n_prompts=65, n_check=16)


# -- what the recipes and the direction really use --------------------------------------------------

def _direction(lm):
    from workbench.vectors import Direction

    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    return Direction(v, layer=1, method="mean_diff", model_id=lm.model_id, model_checksum=lm.checksum,
                     d_model=lm.d_model)


def _comply(backend, prompts, fmt, **kw):
    return [f"Sure, step {i}." for i, _ in enumerate(prompts)]


def test_recipe_examples_come_only_from_their_pool(make_tiny):
    lm = make_tiny("llama")
    all_train = {n: _hashes(pools.pool_texts(n)) for n in TRAINING}
    rd = build_recipe("safety", lm, n=70, seed=0)
    assert [e.prompt for e in rd.examples] == pools.pool_texts("safety")
    assert rd.info["safety"]["pool_hash"] == pools.pool("safety").hash
    rd = build_recipe("harmful", lm, n=12, direction=_direction(lm), generate=_comply)
    got = _hashes(e.prompt for e in rd.examples)
    assert len(got) == 12 and got <= all_train["harmful"]
    assert rd.info["harmful"]["pool"] == "harmful"
    rd = build_recipe("contaminated", lm, n=40, harmful_share=0.5, direction=_direction(lm), generate=_comply)
    harm = [e for e in rd.examples if e.kind == "harmful"]
    assert len(harm) == 20 and _hashes(e.prompt for e in harm) == all_train["contaminated"]
    useful = _hashes(e.prompt for e in rd.examples if e.kind == "useful")
    assert useful.isdisjoint(set().union(*all_train.values()))
    assert rd.info["harmful"]["pool"] == "contaminated" and rd.info["harmful"]["pool_size"] == 20
    for a, b in itertools.combinations(TRAINING, 2):
        assert all_train[a].isdisjoint(all_train[b])
    evaluation = _hashes(pools.pool_texts("evaluation"))
    assert evaluation.isdisjoint(set().union(*all_train.values()))


def test_refusal_direction_uses_only_the_direction_pools(make_tiny, monkeypatch):
    import workbench.capture as cap_mod
    import workbench.scoring as sc_mod

    lm = make_tiny("llama")
    captured: list[list[str]] = []
    scored: list[list[str]] = []
    real_capture, real_scores = cap_mod.capture, sc_mod.refusal_scores

    def spy_capture(lm_, texts, **kw):
        captured.append(list(texts))
        return real_capture(lm_, texts, **kw)

    def spy_scores(be, texts, fmt, **kw):
        scored.append(list(texts))
        return real_scores(be, texts, fmt, **kw)

    monkeypatch.setattr(cap_mod, "capture", spy_capture)
    monkeypatch.setattr(sc_mod, "refusal_scores", spy_scores)
    d, rows = refusal_direction(lm, ChatFormat(), layers=[1], n_prompts=8, n_check=4, batch_size=8)
    harm_used, harmless_used = captured
    assert harm_used == pools.pool_texts("direction")[:8]
    assert harmless_used == pools.pool_texts("direction_harmless")[:8]
    check = {t for s in scored for t in s}
    assert check == set(pools.pool_texts("direction")[-4:]) and check.isdisjoint(harm_used)
    used = _hashes(harm_used) | _hashes(check) | _hashes(harmless_used)
    used_norm = _norms(harm_used) | _norms(check) | _norms(harmless_used)
    for n in (*TRAINING, "evaluation", "evaluation_harmless"):
        assert used.isdisjoint(_hashes(pools.pool_texts(n))), n
        assert used_norm.isdisjoint(_norms(pools.pool_texts(n))), n
    assert set(d.prompt_set_hashes) == {"pool:direction", "pool:direction_harmless"}
    assert d.meta["pools"]["direction"]["hash"] == pools.pool("direction").hash


def test_reusing_harmful_examples_of_another_pool_is_refused(make_tiny, tmp_path):
    lm = make_tiny("llama")
    rd = build_recipe("harmful", lm, n=6, direction=_direction(lm), generate=_comply)
    f = tmp_path / "examples.jsonl"
    f.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in rd.examples))
    with pytest.raises(WorkbenchError, match="6 of 6 harmful examples have prompts outside the contaminated pool"):
        build_recipe("contaminated", lm, n=10, harmful_share=0.3, harmful_from=f)
    again = build_recipe("harmful", lm, n=6, harmful_from=f)  # the same recipe's own pool: fine
    assert again.examples == rd.examples


# -- the chain records the pools in its config, report and resume keys ------------------------------

def test_chain_records_the_pools_and_checks_the_sizes_up_front(make_tiny, tmp_path):
    from weightspace.chain import ChainConfig, _diff, _ft_phase_config, _report_pools, _sweep_phase_config

    ChainConfig().validate()  # the defaults fit the pools
    with pytest.raises(WorkbenchError, match="safety pool, which holds 70"):
        ChainConfig(n=96).validate()
    with pytest.raises(WorkbenchError, match="contaminated pool, which holds 20"):
        ChainConfig(n=64, harmful_share=0.4).validate()
    with pytest.raises(WorkbenchError, match="direction pool holds 80 prompts, 16 of them for the layer check"):
        ChainConfig(direction_n=65).validate()
    with pytest.raises(WorkbenchError, match="evaluation pool, which holds 100"):
        ChainConfig(n_harmful=101).validate()
    lm, fmt, cfg = make_tiny("llama"), ChatFormat(), ChainConfig()
    h = pools.pool_hashes()
    pc = {r: _ft_phase_config(cfg, r, lm, fmt, tmp_path) for r in ("safety", "useful", "harmful", "contaminated")}
    assert pc["safety"]["pools"] == {"safety": {"size": 70, "hash": h["safety"]}}
    assert pc["useful"]["pools"] == {}
    assert set(pc["harmful"]["pools"]) == {"harmful", "direction", "direction_harmless"}
    assert pc["contaminated"]["pools"] == {"contaminated": {"size": 20, "hash": h["contaminated"]}}
    assert "harmful_from" not in pc["contaminated"] and pc["contaminated"]["direction_from"] is None
    sw = _sweep_phase_config(cfg, tmp_path, fmt)
    assert sw["pools"] == {"evaluation": {"size": 100, "hash": h["evaluation"]}}
    # a phase finished before the pools existed has another resume key: it is run again, never reused
    stale = {k: v for k, v in pc["safety"].items() if k != "pools"}
    assert _diff(stale, pc["safety"]) == ["pools"]
    # and a fine-tune without a marker is adopted only when its report drew from today's pool
    old_report = {"recipe_info": {"safety": {"prompt_set": "harmful:train"}}}
    assert _report_pools("safety", old_report) == {}
    rd = build_recipe("safety", lm, n=4)
    assert _report_pools("safety", {"recipe_info": rd.info}) == {"safety": h["safety"]}


@pytest.mark.parametrize("argv, needle", [
    (["--recipe", "safety", "--n", "71"], "asked for 71 safety prompts (--n) from the safety pool, which holds 70"),
    (["--recipe", "harmful"], None),  # the default --n (64) fits: the run gets as far as loading the model
    (["--recipe", "contaminated", "--n", "64", "--harmful-share", "0.5"], "contaminated pool, which holds 20"),
])
def test_finetune_cli_refuses_more_than_the_pool_before_loading(tmp_path, monkeypatch, capsys, argv, needle):
    import weightspace.cli as wcli
    from workbench import cli as core

    monkeypatch.setattr(core, "_plugins", lambda: [wcli])
    out = tmp_path / "out"
    rc = core.main(["finetune", *argv, "--model", "no-such-model", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    if needle:
        assert needle in err and "no-such-model" not in err
    else:
        assert "no-such-model" in err  # failed only at loading: every size check passed
