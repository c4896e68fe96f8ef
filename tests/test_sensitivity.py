"""``weightspace.sensitivity`` on planted overlap tables: per-eta, per-group and per-aggregation slices of the
Exp 3 statistic recover what was planted, and each can come out either way."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from workbench.errors import WorkbenchError

from weightspace import sensitivity as S

FIELDS = ["tensor", "layer", "module", "pair", "eta", "k_a", "k_b", "d", "mso", "baseline"]


def _write(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    return path


def _planted(tmp_path, *, q_gap=-0.5):
    """4 layers x (q, down): useful~harmful = safety~harmful = 0.4 everywhere, except the q tensors at eta 0.5,
    where useful~harmful is lower by ``-q_gap``; at eta 0.9 nothing differs. Baseline 0.01, k 2 (q) / 6 (down)."""
    rng = np.random.default_rng(0)
    rows = []
    for layer in range(4):
        for module, k in (("q", 2), ("down", 6)):
            name = f"model.layers.{layer}.{module}.weight"
            for eta in (0.5, 0.9):
                noise = float(rng.normal(0, 1e-4))
                sh = 0.4 + noise
                uh = sh + (q_gap if (module == "q" and eta == 0.5) else 0.0)
                for pair, v in (("useful~harmful", uh), ("safety~harmful", sh)):
                    rows.append({"tensor": name, "layer": str(layer), "module": module, "pair": pair, "eta": eta,
                                 "k_a": k, "k_b": k, "d": 64, "mso": v, "baseline": 0.01})
    return S.load_tensor_rows(_write(tmp_path / "overlap_tensors.csv", rows))


def test_the_module_that_carries_a_planted_gap_is_the_one_flagged(tmp_path):
    rows = _planted(tmp_path)
    mods = {r["module"]: r for r in S.exp3_by_group(rows, 0.5, "module", n_boot=200)}
    assert mods["q"]["difference"] == pytest.approx(-0.5, abs=1e-9) and mods["q"]["noninferiority"] == "does not hold"
    assert mods["down"]["difference"] == pytest.approx(0.0, abs=1e-9) and mods["down"]["noninferiority"] == "holds"
    assert mods["q"]["n_tensors"] == 4 and mods["q"]["useful~harmful_over_baseline"] == pytest.approx(-0.1 / 0.01, abs=0.05)
    layers = S.exp3_by_group(rows, 0.5, "layer", n_boot=200)
    assert [r["layer"] for r in layers] == ["0", "1", "2", "3"]
    assert all(r["difference"] == pytest.approx(-0.25, abs=1e-9) for r in layers)  # (q -0.5 + down 0) / 2
    with pytest.raises(WorkbenchError, match="'module' or 'layer'"):
        S.exp3_by_group(rows, 0.5, "tensor")


def test_eta_and_aggregation_slices(tmp_path):
    rows = _planted(tmp_path)
    by_eta = {r["eta"]: r for r in S.exp3_by_eta(rows, [0.5, 0.9], n_boot=200)}
    assert by_eta[0.5]["value"] == pytest.approx(-0.25, abs=1e-9) and by_eta[0.5]["verdict"] == "does not hold"
    assert by_eta[0.9]["value"] == pytest.approx(0.0, abs=1e-9) and by_eta[0.9]["verdict"] == "holds"
    agg = {r["aggregation"].split(" ")[0]: r for r in S.exp3_by_aggregation(rows, 0.5, n_boot=200)}
    assert agg["per-tensor"]["value"] == pytest.approx(-0.25, abs=1e-9)
    # weighted by min(k): q weighs 2, down 6 -> (-0.5 * 2) / 8 = -0.125
    assert agg["size-weighted"]["value"] == pytest.approx(-0.125, abs=1e-6)
    assert agg["mean"]["value"] == pytest.approx(-0.25, abs=1e-9) and agg["mean"]["n_units"] == 4
    # a small gap passes non-inferiority under every aggregation
    rows = _planted(tmp_path, q_gap=-0.01)
    assert all(r["verdict"] == "holds" for r in S.exp3_by_aggregation(rows, 0.5, n_boot=200))


def test_missing_overlap_table_is_a_clear_error(tmp_path):
    with pytest.raises(WorkbenchError, match="overlap phase has not finished"):
        S.load_tensor_rows(tmp_path / "nope.csv")
