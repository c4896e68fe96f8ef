"""Experiment 4 under two protocols (issue #10, defect 8): the study's (uncentred bases, 65-90 % depth slice,
H1 / H2 from two harmful sources, U = useful requests in the harmful requests' form) and the workbench's
(centred, all layers, H1 / H2 = halves of one set, U = arithmetic), side by side from one capture; and the two
built-in prompt sets the study protocol needs."""

from __future__ import annotations

import csv
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import probes.cli
from probes.overlap import (
    PROTOCOLS,
    STUDY_SLICE,
    activation_overlap,
    depth_slice,
    protocol_names,
    protocol_overlap,
)
from workbench.errors import WorkbenchError
from workbench.prompts import BUILTIN_NAMES, builtin, builtin_split, resolve_prompts

IMPERATIVE = re.compile(r"^(Explain how|Write|Give|Describe|Create)\b")


# -- the depth slice ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_layers, expected", [
    (24, [15, 16, 17, 18, 19, 20]),  # l/23: 14/23 = 0.609 < 0.65 <= 15/23 = 0.652; 20/23 = 0.870 <= 0.9 < 21/23
    (30, [19, 20, 21, 22, 23, 24, 25, 26]),  # l/29: 18/29 = 0.621, 19/29 = 0.655; 26/29 = 0.897, 27/29 = 0.931
    (21, [13, 14, 15, 16, 17, 18]),  # l/20: both ends exact (13/20 = 0.65, 18/20 = 0.90) and included
    (11, [7, 8, 9]),  # l/10: 0.6 out, 0.7, 0.8, 0.9 in, 1.0 out
    (4, [2]),  # l/3: 0.667 only
    (3, [2]),  # l/2 = 0, 0.5, 1: none inside -> the layer nearest 0.775 * 2 = 1.55
    (2, [1]),  # the tiny models: 0 and 1 -> nearest 0.775
    (1, [0]),
])
def test_depth_slice_by_hand(n_layers, expected):
    assert depth_slice(n_layers) == expected
    assert STUDY_SLICE == (0.65, 0.90)


def test_depth_slice_errors_and_other_bounds():
    assert depth_slice(11, 0.0, 1.0) == list(range(11))
    assert depth_slice(11, 0.5, 0.5) == [5]
    for bad in [(0, 0.65, 0.9), (10, 0.9, 0.65), (10, -0.1, 0.5)]:
        with pytest.raises(WorkbenchError):
            depth_slice(*bad)


def test_protocol_definitions():
    assert PROTOCOLS["study"].centered is False and PROTOCOLS["study"].headline == "slice"
    assert PROTOCOLS["study"].sources == {"U": "useful_requests", "H1": "harmful", "H2": "harmful_styled"}
    assert PROTOCOLS["workbench"].centered is True and PROTOCOLS["workbench"].headline == "all"
    assert PROTOCOLS["workbench"].sources["U"] == "utility"
    assert protocol_names("both") == ["study", "workbench"] and protocol_names("study") == ["study"]
    with pytest.raises(WorkbenchError, match="unknown protocol"):
        protocol_names("paper")


# -- centred vs uncentred on planted data -------------------------------------------------------------------

def common_mean_sets(n: int = 40, d: int = 12, L: int = 3, mean: float = 20.0) -> dict[str, torch.Tensor]:
    """Two sets sharing a large mean along e0, with their spread in disjoint planes (e1, e2) and (e3, e4)."""
    g = torch.Generator().manual_seed(0)

    def make(lo: int) -> torch.Tensor:
        X = torch.zeros(n, L, d, dtype=torch.float64)
        X[:, :, 0] = mean
        noise = torch.randn(n, L, 2, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0])
        X[:, :, lo:lo + 2] = noise - noise.mean(0)  # zero-mean spread: the uncentred top direction is exactly e0
        return X

    return {"A": make(1), "B": make(3)}


def test_uncentred_sees_the_common_mean_centred_does_not():
    sets = common_mean_sets()
    roles = {"A": "A", "B": "B"}
    res = protocol_overlap(sets, {"study": roles, "workbench": roles}, etas=[0.5], n_boot=0)
    study, work = res.table("study", 0.5)["A~B"], res.table("workbench", 0.5)["A~B"]
    assert len(study) == len(work) == 3
    for r in study:  # uncentred: the top direction of both is the shared mean e0 (k = 1): overlap ~ 1
        assert r["centered"] is False and r["k_a"] == r["k_b"] == 1
        assert r["mso"] == pytest.approx(1.0, abs=1e-6)
    for r in work:  # centred: the mean is gone, the spreads live in orthogonal planes: overlap ~ 0
        assert r["centered"] is True
        assert r["mso"] < 1e-12 < r["baseline"]
    # per-layer values are exactly what activation_overlap gives for the same centring
    ref = activation_overlap(sets, etas=[0.5], n_boot=0)
    for c, rows in ((False, study), (True, work)):
        for r, q in zip(rows, ref.table(0.5, centered=c)["A~B"]):
            assert (r["layer"], r["k_a"], r["k_b"], r["baseline"]) == (q["layer"], q["k_a"], q["k_b"], q["baseline"])
            assert r["mso"] == pytest.approx(q["mso"], abs=1e-12)


def planted_roles(n: int = 30, d: int = 16, L: int = 6) -> dict[str, torch.Tensor]:
    """H1, H2 in span(e0..e2) at every layer; U in the same span at layers >= 3 and in span(e5..e7) below."""
    g = torch.Generator().manual_seed(1)

    def in_span(lo: int) -> torch.Tensor:
        return torch.randn(n, d, generator=g, dtype=torch.float64)[:, :3] * torch.tensor([3.0, 2.0, 1.0])

    sets = {k: torch.zeros(n, L, d, dtype=torch.float64) for k in ("U", "H1", "H2")}
    for j in range(L):
        for k in ("H1", "H2"):
            sets[k][:, j, 0:3] = in_span(0)
        lo = 0 if j >= 3 else 5
        sets["U"][:, j, lo:lo + 3] = in_span(lo)
    return sets


def test_slice_averages_and_the_exp4_statistic():
    sets = planted_roles()
    roles = {"U": "U", "H1": "H1", "H2": "H2"}
    res = protocol_overlap(sets, {"study": roles}, etas=[0.99], n_boot=8, seed=2)
    assert res.n_layers == 6 and res.slice_layers == depth_slice(6) == [4]  # l/5: 0.8 only
    t = res.table("study", 0.99)
    assert list(t) == ["U~H1", "U~H2", "H1~H2"]
    for pair, rows in t.items():
        for r in rows:
            assert r["in_slice"] is (r["layer"] == 4) and r["sets"] == pair
            assert r["mso_lo"] <= r["mso_hi"]
            shared = pair == "H1~H2" or r["layer"] >= 3
            assert r["mso"] == pytest.approx(1.0 if shared else 0.0, abs=1e-9)
    a_all, a_slice = res.average("study", "U~H1", 0.99, "all"), res.average("study", "U~H1", 0.99, "slice")
    assert a_all["mean_mso"] == pytest.approx(0.5, abs=1e-9) and a_all["n_layers"] == 6
    assert a_slice["mean_mso"] == pytest.approx(1.0, abs=1e-9) and a_slice["n_layers"] == 1
    assert a_all["mean_baseline"] == pytest.approx(np.mean([r["baseline"] for r in t["U~H1"]]))
    ex_s, ex_a = res.exp4("study", 0.99, "slice"), res.exp4("study", 0.99, "all")
    # on the slice U shares the harmful subspace exactly as H1 and H2 share it: difference 0, ratio 1
    assert ex_s["u_h"] == pytest.approx(1.0, abs=1e-9) and ex_s["h1_h2"] == pytest.approx(1.0, abs=1e-9)
    assert ex_s["diff"] == pytest.approx(0.0, abs=1e-9) and ex_s["ratio"] == pytest.approx(1.0, abs=1e-9)
    assert ex_s["diff_ci"] == pytest.approx([0.0, 0.0], abs=1e-9)  # every resample keeps the planted spans
    assert ex_s["layer_ids"] == [4] and ex_s["n_boot"] == 8 and len(ex_s["boot"]["u_h"]) == 8
    # over all layers half of U's layers are orthogonal to H: U~H = 0.5 against a ceiling of 1
    assert ex_a["u_h"] == pytest.approx(0.5, abs=1e-9) and ex_a["diff"] == pytest.approx(-0.5, abs=1e-9)
    assert ex_a["diff_ci"][1] < 0 and ex_a["ratio_ci"][1] < 1
    # a protocol without the roles U, H1, H2 has no experiment-4 statistic
    other = protocol_overlap(sets, {"workbench": {"A": "U", "B": "H1"}}, etas=[0.99], n_boot=0)
    assert other.exp4("workbench", 0.99, "slice") is None


def test_shared_bootstrap_draws_are_reproducible_and_bases_are_computed_once_per_centring(monkeypatch):
    import probes.overlap as ov

    sets = planted_roles(n=12, d=10, L=3)
    assign = {"study": {"U": "U", "H1": "H1", "H2": "H2"}, "workbench": {"U": "U", "H1": "H1", "H2": "H2"}}
    a = protocol_overlap(sets, assign, etas=[0.5, 0.9], n_boot=4, seed=5)
    b = protocol_overlap(sets, assign, etas=[0.5, 0.9], n_boot=4, seed=5)
    assert a.rows == b.rows
    assert all(np.array_equal(a.boot[k], b.boot[k]) for k in a.boot)
    calls = []
    real = ov.bases_for_etas
    monkeypatch.setattr(ov, "bases_for_etas", lambda X, etas, c: calls.append(c) or real(X, etas, c))
    protocol_overlap(sets, {"study": assign["study"]}, etas=[0.5], n_boot=4)
    assert len(calls) == 3 * 3 * (1 + 4) and not any(calls)  # sets x layers x (point + draws), uncentred only


@pytest.mark.parametrize("kw, match", [
    ({"assignments": {}}, "at least one protocol"),
    ({"assignments": {"paper": {"U": "U", "H1": "H1"}}}, "unknown protocol"),
    ({"assignments": {"study": {"U": "U"}}}, "at least two sets"),
    ({"assignments": {"study": {"U": "U", "H1": "Z"}}}, "not given"),
    ({"etas": [0.0]}, "eta"),
])
def test_protocol_overlap_errors(kw, match):
    sets = planted_roles(n=5, d=8, L=2)
    kw = {"assignments": {"study": {"U": "U", "H1": "H1"}}} | kw
    with pytest.raises(WorkbenchError, match=match):
        protocol_overlap(sets, kw.pop("assignments"), n_boot=0, **kw)


# -- the run folder: both protocols side by side, each set captured once -------------------------------------

def _count_captures(monkeypatch):
    calls = []
    real = probes.cli.capture

    def spy(lm, texts, **kw):
        calls.append(len(texts))
        return real(lm, texts, **kw)

    monkeypatch.setattr(probes.cli, "capture", spy)
    return calls


def _check_outputs(path, n, n_layers):
    names = {p.name for p in path.iterdir()}
    for f in ("overlap.csv", "overlap_layers.csv", "overlap_averages.csv", "overlap_summary.json",
              "overlap_protocols.png", "overlap_vs_layer_study_uncentred.png", "overlap_vs_layer_workbench_centred.png",
              "overlap_heatmap_U_vs_H1_study_uncentred.png", "overlap_heatmap_H1_vs_H2_workbench_centred.png"):
        assert f in names, f
    for f in [f for f in names if f.endswith(".png")]:
        assert (path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((path / "overlap.csv").open()))
    assert {(r["protocol"], r["centered"]) for r in rows} == {("study", "False"), ("workbench", "True")}
    assert {r["sets"] for r in rows if r["protocol"] == "study"} == {
        "useful_requests~harmful", "useful_requests~harmful_styled", "harmful~harmful_styled"}
    assert {r["sets"] for r in rows if r["protocol"] == "workbench"} == {
        "utility~harmful", "utility~harmful_half2", "harmful~harmful_half2"}
    wide = list(csv.DictReader((path / "overlap_layers.csv").open()))
    assert len(wide) == n_layers
    for p in ("study", "workbench"):
        for pair in ("U~H1", "U~H2", "H1~H2"):
            assert {f"{p}:{pair}", f"{p}:{pair}:lo", f"{p}:{pair}:hi", f"{p}:{pair}:baseline"} <= set(wide[0])
    av = list(csv.DictReader((path / "overlap_averages.csv").open()))
    assert {(r["protocol"], r["layers"]) for r in av} == {(p, w) for p in ("study", "workbench")
                                                          for w in ("slice", "all")}
    s = json.loads((path / "overlap_summary.json").read_text())
    assert s["slice"]["layers"] == depth_slice(n_layers) and s["slice"]["bounds"] == [0.65, 0.9]
    assert set(s["protocols"]) == {"study", "workbench"}
    for p, roles in (("study", {"U": "useful_requests", "H1": "harmful", "H2": "harmful_styled"}),
                     ("workbench", {"U": "utility", "H1": "harmful", "H2": "harmful_half2"})):
        ps = s["protocols"][p]
        assert ps["sets"] == roles and ps["n_prompts"] == {"U": n, "H1": n, "H2": n}
        assert ps["centered"] is (p == "workbench")
        for pair in ("U~H1", "U~H2", "H1~H2"):
            for w in ("slice", "all"):
                a = ps["pairs"][pair][w]
                assert 0 <= a["mean_mso"] <= 1 and a["mean_baseline"] > 0 and len(a["ci"]) == 2
        e = ps["exp4"]["slice"]
        assert e["u_h"] == pytest.approx((ps["pairs"]["U~H1"]["slice"]["mean_mso"]
                                          + ps["pairs"]["U~H2"]["slice"]["mean_mso"]) / 2)
        assert e["h1_h2"] == pytest.approx(ps["pairs"]["H1~H2"]["slice"]["mean_mso"])
        assert e["diff"] == pytest.approx(e["u_h"] - e["h1_h2"])
        for k in ("u_h_ci", "h1_h2_ci", "diff_ci"):
            assert e[k][0] <= e[k][1]
        # the experiment-4 verdict, written beside its statistic, on the slice and on all layers
        from workbench.verdict_rules import EXP4_CLAIM, exp4_from_block

        for w in ("slice", "all"):
            v = ps["exp4"][w]["verdict"]
            assert {"claim", "statistic", "value", "ci", "rule", "verdict"} <= set(v)
            assert v["claim"] == EXP4_CLAIM and v["verdict"] in ("holds", "does not hold", "inconclusive")
            assert v["value"] == pytest.approx(ps["exp4"][w]["diff"]) and v["ci"] == ps["exp4"][w]["diff_ci"]
            assert v["layers"] == w and v["n_draws"] == s["n_boot"]
            assert exp4_from_block(ps["exp4"][w]) == v  # recomputable from the JSON alone (weightspace reads it)
    return s


def test_run_overlap_writes_both_protocols_from_one_capture(make_tiny, tmp_path, tmp_cache, monkeypatch):
    from workbench.chat import ChatFormat
    from workbench.runs import RunFolder

    lm = make_tiny("llama")
    calls = _count_captures(monkeypatch)
    sets, roles = probes.cli.protocol_overlap_sets(n=6)
    with RunFolder(tmp_path / "ov", config={"test": True}) as run:
        out = probes.cli.run_overlap(lm, ChatFormat(), run, sets, etas=[0.5, 0.9], n_boot=3, protocols=roles)
    assert calls == [6] * 5  # five sets, H1 shared by both protocols: captured once each
    s = _check_outputs(tmp_path / "ov", 6, lm.n_layers)
    assert out["summary"] == s


def test_run_overlap_on_given_sets_applies_both_protocols_to_them(make_tiny, tmp_path, tmp_cache):
    """The app's call: the old default sets (U, H1, H2), no protocol mapping -> both protocols read those sets."""
    from workbench.chat import ChatFormat
    from workbench.runs import RunFolder

    lm = make_tiny("llama")
    sets = {k: v[:4] for k, v in probes.cli.default_overlap_sets().items()}
    with RunFolder(tmp_path / "ov", config={"test": True}) as run:
        out = probes.cli.run_overlap(lm, ChatFormat(), run, sets, etas=[0.5], n_boot=2)
    s = out["summary"]["protocols"]
    assert s["study"]["sets"] == s["workbench"]["sets"] == {"U": "U", "H1": "H1", "H2": "H2"}
    assert s["study"]["exp4"]["slice"]["u_h"] >= 0 and s["workbench"]["exp4"]["all"]["h1_h2"] >= 0
    assert (tmp_path / "ov" / "overlap_protocols.png").exists()


def test_protocol_sets():
    sets, _ = probes.cli.protocol_overlap_sets()
    assert {len(v) for v in sets.values()} == {150}  # the most the study's sets allow, the same for every role
    assert set(sets["harmful"]).isdisjoint(sets["harmful_half2"])
    assert set(sets["harmful"]) <= set(builtin("harmful").texts)
    assert sets["harmful_styled"] == builtin("harmful_styled").texts[:150]
    only_wb, roles_wb = probes.cli.protocol_overlap_sets(["workbench"])
    assert list(roles_wb) == ["workbench"] and {len(v) for v in only_wb.values()} == {170}
    legacy = probes.cli.default_overlap_sets()  # the workbench protocol's sets at full size are the old defaults
    assert (legacy["U"], legacy["H1"], legacy["H2"]) == (only_wb["utility"], only_wb["harmful"],
                                                         only_wb["harmful_half2"])
    with pytest.raises(WorkbenchError, match="between 2 and 150"):
        probes.cli.protocol_overlap_sets(n=151)


def test_overlap_cli_protocol_option(make_tiny, tmp_path, tmp_cache, monkeypatch, capsys):
    import workbench.cli
    from workbench.cli import build_parser, run_command

    lm = make_tiny("llama")
    monkeypatch.setattr(workbench.cli, "load_from_args", lambda args: lm)
    ap = build_parser()
    with pytest.raises(SystemExit):
        ap.parse_args(["overlap", "--protocol", "paper", "--out", str(tmp_path / "x")])
    args = ap.parse_args(["overlap", "--model", "tiny", "--n-per-set", "5", "--n-boot", "2", "--etas", "0.5",
                          "--out", str(tmp_path / "both")])
    assert args.protocol == "both"
    assert run_command(args) == 0
    _check_outputs(tmp_path / "both", 5, lm.n_layers)
    printed = capsys.readouterr().out
    assert "[study protocol: uncentred" in printed and "[workbench protocol: centred" in printed
    assert "exp 4 on the slice" in printed
    args = ap.parse_args(["overlap", "--model", "tiny", "--protocol", "study", "--n-per-set", "4", "--n-boot", "0",
                          "--etas", "0.5", "--out", str(tmp_path / "study")])
    assert run_command(args) == 0
    s = json.loads((tmp_path / "study" / "overlap_summary.json").read_text())
    assert list(s["protocols"]) == ["study"] and s["protocols"]["study"]["exp4"]["slice"]["diff_ci"] is None
    # user sets: both protocols read them as they are (same sets, other centring and layer average)
    args = ap.parse_args(["overlap", "--model", "tiny", "--sets", "A=harmless:test", "B=harmful:test", "--n-boot", "0",
                          "--etas", "0.5", "--out", str(tmp_path / "custom")])
    assert run_command(args) == 0
    s = json.loads((tmp_path / "custom" / "overlap_summary.json").read_text())
    assert {p: v["sets"] for p, v in s["protocols"].items()} == {"study": {"A": "A", "B": "B"},
                                                                  "workbench": {"A": "A", "B": "B"}}
    assert all(v["exp4"] is None for v in s["protocols"].values())
    args = ap.parse_args(["overlap", "--model", "tiny", "--n-per-set", "2", "--n-boot", "5", "--etas", "0.5",
                          "--out", str(tmp_path / "small")])
    with pytest.raises(WorkbenchError, match="at least 3 prompts per set"):  # before any work
        run_command(args)
    assert not (tmp_path / "small").exists()
    args = ap.parse_args(["overlap", "--model", "tiny", "--sets", "A=harmless:test", "B=harmful:test",
                          "--n-per-set", "3", "--out", str(tmp_path / "bad")])
    with pytest.raises(WorkbenchError, match="--n-per-set"):
        run_command(args)


def test_main_stage_overlap_reuses_the_core_capture(make_tiny, tmp_path, tmp_cache, monkeypatch):
    from workbench.chat import ChatFormat
    from workbench.mainjob import MainContext, core_stage
    from workbench.runs import RunFolder

    # the probe sweep half of the stage is tested in test_probes.py; here only its overlap half runs
    monkeypatch.setattr(probes.cli, "run_probe_sweep", lambda *a, **kw: {"stub": True})
    monkeypatch.setattr(probes.cli, "_print_probe", lambda out: None)
    lm = make_tiny("llama")
    args = SimpleNamespace(backend="native", seed=0)
    with RunFolder(tmp_path / "main", config={"test": True}) as run:
        ctx = MainContext(args, lm, ChatFormat(), run, quick=True)
        core_stage(ctx)
        calls = _count_captures(monkeypatch)
        probes.cli.main_stage(ctx)
        staged = run.path
        half = ctx.results["core_acts"]["harmful:train"].n_prompts // 2
        assert calls == [half] * 3  # utility, useful_requests, harmful_styled; H1 and H2 come from the core capture
        s = _check_outputs(staged / "overlap", half, lm.n_layers)
        assert ctx.results["overlap"]["summary"] == s
        cfg = json.loads((staged / "overlap" / "config.json").read_text())
        assert cfg["protocols"]["study"]["H2"] == "harmful_styled"


# -- the two new built-in prompt sets -------------------------------------------------------------------------

def _norm(t: str) -> str:
    return " ".join(t.casefold().split())


@pytest.mark.parametrize("name", ["harmful_styled", "useful_requests"])
def test_new_builtin_sets_load_and_split(name):
    assert name in BUILTIN_NAMES
    ps = builtin(name)
    assert len(ps) >= 120
    ids = [p.id for p in ps]
    assert len(set(ids)) == len(ids) and all(i.startswith(f"{name}-") for i in ids)
    texts = [_norm(t) for t in ps.texts]
    assert len(set(texts)) == len(texts) and all(len(t) > 20 for t in texts)
    assert all(p.category for p in ps)
    sp = {k: builtin_split(name, k) for k in ("train", "val", "test")}
    assert sum(len(v) for v in sp.values()) == len(ps)
    assert resolve_prompts(f"{name}:test").texts == sp["test"].texts
    # none of their prompts appears in the other built-in sets
    others = {_norm(t) for other in ("harmful", "harmless") for t in builtin(other).texts}
    assert not set(texts) & others
    styled, useful = ({_norm(t) for t in builtin(n).texts} for n in ("harmful_styled", "useful_requests"))
    assert not styled & useful


def test_styled_set_is_another_style_with_the_same_categories():
    styled, harmful = builtin("harmful_styled"), builtin("harmful")
    assert {p.category for p in styled} == {p.category for p in harmful}
    counts = {c: sum(p.category == c for p in styled) for c in {p.category for p in styled}}
    assert min(counts.values()) >= 10
    share = np.mean([bool(IMPERATIVE.match(t)) for t in styled.texts])
    assert share < 0.2
    assert np.mean([bool(IMPERATIVE.match(t)) for t in harmful.texts]) > 0.6  # the pattern it differs from
    # longer, multi-sentence messages on average
    assert np.mean([len(t.split()) for t in styled.texts]) > 1.8 * np.mean([len(t.split()) for t in harmful.texts])
    # any prefix (the overlap takes the first n) covers every category
    assert {p.category for p in styled.prompts[:20]} == set(counts)


def test_useful_requests_have_the_harmful_requests_form():
    useful = builtin("useful_requests")
    assert np.mean([bool(IMPERATIVE.match(t)) for t in useful.texts]) > 0.6
    lengths = [len(t.split()) for t in useful.texts]
    harmful_lengths = [len(t.split()) for t in builtin("harmful").texts]
    assert abs(np.mean(lengths) - np.mean(harmful_lengths)) < 4  # short requests like the harmful ones
    assert len({p.category for p in useful.prompts[:20]}) == len({p.category for p in useful})
