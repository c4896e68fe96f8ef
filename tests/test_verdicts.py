"""weightspace.verdicts: the study's claims as fixed rules, on hand-made numbers, plus positive / negative
controls for Exp 3 built from planted checkpoints and measured with ``update_overlap``.

Controls (tiny llama, d_model 64): a "safety" update whose output space is span(F[:, 0:4]) on four matrices;
"useful" and "harmful" updates whose output spaces are span(F[:, 8:12]) (orthogonal to safety: distinct) or
span(F[:, 0:4]) (the same subspace: entangled). At eta = 0.99, k = 4 for every update (singular values 4, 3,
2, 1: cumulative energy 29/30 < 0.99 at k = 3), so MSO is exactly 0 (distinct) or 1 (entangled) and the
random baseline max(k)/d = 4/64.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from workbench.tiny import build_tiny

from weightspace import verdicts as V
from weightspace.checkpoints import open_checkpoint
from weightspace.deltas import DeltaSpec
from weightspace.overlap import OverlapConfig, update_overlap
from weightspace.plan import match_checkpoints

MATS = {"model.layers.0.self_attn.q_proj.weight": 64, "model.layers.0.self_attn.o_proj.weight": 64,
        "model.layers.1.self_attn.q_proj.weight": 64, "model.layers.1.mlp.down_proj.weight": 128}


# -- the rules on hand-made numbers ------------------------------------------------------------------------

def test_decide_thresholds_and_interval_rules():
    assert V.decide(0.3, [0.1, 0.5], above=0.0) == V.HOLDS
    assert V.decide(-0.1, [-0.3, 0.0], above=0.0) == V.FAILS
    assert V.decide(0.1, [-0.1, 0.3], above=0.0) == V.INCONCLUSIVE
    assert V.decide(0.02, [-0.01, 0.04], inside=0.05) == V.HOLDS
    assert V.decide(0.08, [0.06, 0.10], inside=0.05) == V.FAILS
    assert V.decide(0.04, [0.01, 0.07], inside=0.05) == V.INCONCLUSIVE
    assert V.decide(0.05, [0.0, 0.09], below=0.1) == V.HOLDS
    assert V.decide(0.5, [0.2, 0.8], below=0.1) == V.FAILS
    assert V.decide(None, None, above=0.0) == V.INCONCLUSIVE
    assert V.decide(0.01, None, inside=0.05) == V.HOLDS  # no interval: the value decides


def test_exp1_energy_parity_bootstrap_over_tensors():
    total = np.array([1.0, 2.0, 3.0, 4.0])
    # every tensor keeps 0.32 (useful) vs 0.30 (harmful): every resample gives gap 0.02 -> CI [0.02, 0.02]
    same = {0.25: {"useful": 0.32, "harmful": 0.30, "useful_kept": 0.32 * total, "useful_total": total,
                   "harmful_kept": 0.30 * total, "harmful_total": total}}
    r = V.exp1_energy_parity(same)
    assert r["verdict"] == V.HOLDS and r["value"] == pytest.approx(0.02) and r["ci"] == pytest.approx([0.02, 0.02])
    assert set(r) >= {"claim", "statistic", "value", "ci", "rule", "verdict"}
    far = {0.25: dict(same[0.25], useful_kept=0.42 * total), 0.5: same[0.25]}
    r = V.exp1_energy_parity(far)
    assert r["verdict"] == V.FAILS and r["value"] == pytest.approx(0.12)
    assert [x["verdict"] for x in r["per_rho"]] == [V.FAILS, V.HOLDS]
    # per-tensor gaps +0.24 / -0.16 (equal totals): pooled gap 0.04, but resamples range from -0.16 to 0.24
    t = np.ones(4)
    mixed = {0.5: {"useful_kept": np.array([0.54, 0.14, 0.54, 0.14]), "useful_total": t,
                   "harmful_kept": np.array([0.30, 0.30, 0.30, 0.30]), "harmful_total": t}}
    r = V.exp1_energy_parity(mixed)
    assert r["value"] == pytest.approx(0.04) and r["ci"][0] < 0.05 < r["ci"][1]
    assert r["verdict"] == V.INCONCLUSIVE


def test_exp1_rise_together():
    z, o = [0.0] * 6, [1.0] * 6
    r = V.exp1_rise_together(z, o, z, o)
    assert r["verdict"] == V.HOLDS and r["value"] == 1.0
    r = V.exp1_rise_together(z, o, z, z)  # harm does not move
    assert r["verdict"] == V.FAILS and r["value"] == 0.0 and r["harm_rise"] == 0.0
    r = V.exp1_rise_together(z, o, z, [1.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # harm rises for one prompt in six
    assert r["verdict"] == V.INCONCLUSIVE and r["value"] == pytest.approx(1 / 6)


def test_exp2_no_selective_removal():
    u = [[1.0, 1.0, 0.0, 1.0]] * 2  # two rho values x four utility prompts
    h = [[1.0, 0.0, 1.0, 1.0, 0.0]] * 2  # two rho values x five harmful prompts (1 = compliant)
    r = V.exp2_no_selective_removal(u, u, h, h)  # TopK = Random: no selectivity advantage
    assert r["verdict"] == V.HOLDS and r["value"] == 0.0
    # TopK removes every compliant answer, Random none, utility unchanged: selective (advantage 3/5 > 0.1)
    r = V.exp2_no_selective_removal(u, u, [[0.0] * 5] * 2, h)
    assert r["verdict"] == V.FAILS and r["value"] == pytest.approx(3 / 5)
    # TopK removes the harm but costs all utility beyond Random: proportional, not selective
    r = V.exp2_no_selective_removal([[0.0] * 4] * 2, [[1.0] * 4] * 2, [[0.0] * 5] * 2, [[1.0] * 5] * 2)
    assert r["verdict"] == V.HOLDS and r["value"] == pytest.approx(0.0)
    assert r["utility_lost_beyond_random"] == 1.0 and r["harm_removed_beyond_random"] == 1.0


def test_exp3_overlap_rule_on_hand_numbers():
    base = [0.0625] * 4
    uh = {"mso": [0.6, 0.5, 0.7, 0.6], "baseline": base}  # 0.05 above safety~harmful at every tensor
    sh = {"mso": [0.55, 0.45, 0.65, 0.55], "baseline": base}
    r = V.exp3_overlap(uh, sh)
    assert r["value"] == pytest.approx(0.05) and r["noninferiority"] == V.HOLDS and r["verdict"] == V.HOLDS
    assert r["pairs"]["safety~harmful"]["verdict"] == "entangled"
    r = V.exp3_overlap(sh, uh)  # useful~harmful 0.05 below safety~harmful at every tensor, margin 0.02
    assert r["ci"][1] <= -0.02 and r["noninferiority"] == V.FAILS and r["verdict"] == V.FAILS


# -- positive / negative controls: planted checkpoints through update_overlap ---------------------------------

def _orth(d: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _update(left: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    out = {}
    for i, (name, n) in enumerate(MATS.items()):
        R = _orth(n, 4, seed + i)
        out[name] = sum(s * torch.outer(left[:, j], R[:, j]) for j, s in enumerate([4.0, 3.0, 2.0, 1.0]))
    return out


def _write(path, updates):
    model, tok = build_tiny("llama", seed=0)
    sd = model.state_dict()
    with torch.no_grad():
        for name, d in updates.items():
            sd[name].add_(d.float())
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return open_checkpoint(path, label=path.name)


@pytest.fixture(scope="module")
def controls(tmp_path_factory):
    root = tmp_path_factory.mktemp("controls")
    F = _orth(64, 64, 0)
    aligned = _write(root / "aligned", {})
    safety = _write(root / "safety", _update(F[:, 0:4], 10))
    out = {}
    for case, cols in (("distinct", slice(8, 12)), ("entangled", slice(0, 4))):
        useful = _write(root / f"useful-{case}", _update(F[:, cols], 20))
        harmful = _write(root / f"harmful-{case}", _update(F[:, cols], 30))
        plan = match_checkpoints({"aligned": aligned, "safety": safety, "useful": useful, "harmful": harmful})
        specs = [DeltaSpec("safety", safety, aligned), DeltaSpec("useful", useful, aligned),
                 DeltaSpec("harmful", harmful, aligned)]
        res = update_overlap(specs, plan, OverlapConfig(etas=(0.99,)), progress=False)
        per: dict[str, dict[str, list[float]]] = {}
        for r in res.tensor_rows:
            p = per.setdefault(r["pair"], {"mso": [], "baseline": [], "tensor": []})
            p["mso"].append(r["mso"]), p["baseline"].append(r["baseline"]), p["tensor"].append(r["tensor"])
        out[case] = per
    return out


def test_planted_controls_distinct_and_entangled(controls):
    for case, want_sh in (("distinct", 0.0), ("entangled", 1.0)):
        per = controls[case]
        sh, uh = per["safety~harmful"], per["useful~harmful"]
        assert sorted(sh["tensor"]) == sorted(MATS) and sh["tensor"] == uh["tensor"]
        assert sh["mso"] == pytest.approx([want_sh] * 4, abs=1e-9)  # by construction (see the docstring)
        assert uh["mso"] == pytest.approx([1.0] * 4, abs=1e-9)
        assert sh["baseline"] == pytest.approx([4 / 64] * 4)
    d = V.separability(controls["distinct"]["safety~harmful"]["mso"],
                       controls["distinct"]["safety~harmful"]["baseline"])
    e = V.separability(controls["entangled"]["safety~harmful"]["mso"],
                       controls["entangled"]["safety~harmful"]["baseline"])
    assert d["verdict"] == "distinct" and d["value"] == pytest.approx(0.0, abs=1e-8)
    assert e["verdict"] == "entangled" and e["value"] == pytest.approx(16.0)  # 1 / (4/64)
    # the Exp 3 claim (not linearly distinct) fails on the distinct control and holds on the entangled one
    strip = lambda p: {"mso": p["mso"], "baseline": p["baseline"]}  # noqa: E731
    for case, want in (("distinct", V.FAILS), ("entangled", V.HOLDS)):
        per = controls[case]
        r = V.exp3_overlap(strip(per["useful~harmful"]), strip(per["safety~harmful"]),
                           {"safety~useful": strip(per["safety~useful"])})
        assert r["verdict"] == want, case
        assert r["pairs"]["safety~harmful"]["verdict"] == ("distinct" if case == "distinct" else "entangled")


# -- the same controls through the chain's own overlap phase and Exp 3 verdict (weightspace.controls) -----------

def test_controls_module_and_cli_come_out_distinct_and_entangled(tmp_path, capsys):
    from workbench import cli as core

    from weightspace.controls import planted_controls

    # noise-free: exact MSO 0 / 1, so the verdicts cannot be luck
    c = planted_controls(tmp_path / "exact", noise=0.0)
    assert (c["planted_distinct"], c["planted_entangled"], c["passed"]) == ("distinct", "entangled", True)
    d, e = c["details"]["planted_distinct"], c["details"]["planted_entangled"]
    assert d["mso_mean"]["safety~harmful"] == pytest.approx(0.0, abs=1e-9)
    assert e["mso_mean"]["safety~harmful"] == pytest.approx(1.0, abs=1e-9)
    assert e["separability_safety_harmful"]["value"] == pytest.approx(64.0)  # 1 / (1/64): k = 1 at eta 0.5
    assert (d["exp3"]["verdict"], e["exp3"]["verdict"]) == (V.FAILS, V.HOLDS)
    # the chain's layout was used: each case is a chain folder with the overlap phase's outputs
    assert (tmp_path / "exact" / "planted_distinct" / "overlap" / "overlap_tensors.csv").is_file()
    # with dense noise on every update (the default) the verdicts still come out, from values near 0 and 1
    rc = core.main(["weightspace", "controls", "--out", str(tmp_path / "cli")])
    out = capsys.readouterr().out
    assert rc == 0 and "controls passed" in out
    j = json.loads((tmp_path / "cli" / "controls.json").read_text())
    assert (j["planted_distinct"], j["planted_entangled"], j["noise"]) == ("distinct", "entangled", 0.03)
    assert 0 < j["details"]["planted_distinct"]["mso_mean"]["safety~harmful"] < 0.01
    assert 0.95 < j["details"]["planted_entangled"]["mso_mean"]["safety~harmful"] < 1.0
    # bad input: a clear refusal before any work, nothing written
    assert core.main(["weightspace", "controls", "--out", str(tmp_path / "bad"), "--noise", "1.5"]) != 0
    assert "--noise must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_controls_can_fail_when_noise_swamps_the_planted_structure(tmp_path):
    """The controls' pass flag is not a constant: at noise 0.1 per entry (noise energy ~2-4x the planted
    rank-4 energy) the entangled case no longer passes Exp 3 cleanly."""
    from weightspace.controls import planted_controls

    c = planted_controls(tmp_path, noise=0.1)
    assert c["passed"] is False
    e = c["details"]["planted_entangled"]["mso_mean"]["safety~harmful"]
    assert 0.3 < e < 0.9  # far from the noise-free 1
