"""Linear probe sweeps: planted structure is recovered, intervals behave, errors are clear, and the
end-to-end ``run_probe_sweep`` writes a complete, loadable run folder (tiny model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import probes.cli
from probes.metrics import scored_metrics
from probes.sweep import ProbeSweep, generalisation_matrix
from workbench.errors import WorkbenchError

D, L = 8, 3
SEPARATED = (1, 2)  # layers where the classes differ along U; layer 0 carries no signal
# Equal-magnitude entries: per-feature standardisation is then isotropic along U, so the raw-space
# logistic normal is expected to point along U (not a rescaled version of it).
U = np.array([1, -1, 1, 1, -1, 1, -1, -1], dtype=np.float64) / np.sqrt(D)
V = np.array([1, 1, -1, 1, 1, -1, -1, -1], dtype=np.float64) / np.sqrt(D)  # orthogonal to U
assert abs(U @ V) < 1e-12

FAST = dict(Cs=(0.1, 1.0), cv=3, n_jobs=1)  # a small grid keeps the 2-core test machine free


def planted(n: int, seed: int, *, delta: float = 6.0, layers=SEPARATED, direction=U):
    """Two Gaussian classes [n, L, D], shifted by +-delta/2 along ``direction`` at ``layers`` only."""
    rng = np.random.default_rng(seed)
    pos, neg = rng.standard_normal((n, L, D)), rng.standard_normal((n, L, D))
    for layer in layers:
        pos[:, layer] += delta / 2 * direction
        neg[:, layer] -= delta / 2 * direction
    return pos, neg


@pytest.fixture(scope="module")
def fitted():
    p, n = planted(40, seed=1)
    pt, nt = planted(40, seed=2)
    sw = ProbeSweep(n_boot=30, seed=0, **FAST).fit(p, n)
    return sw, sw.evaluate(pt, nt), (p, n, pt, nt)


def test_auroc_is_one_where_separated_and_chance_where_not(fitted):
    _, res, _ = fitted
    rows = {r["layer"]: r for r in res.rows}
    assert sorted(rows) == [0, 1, 2]
    for layer in SEPARATED:
        for kind in ("logistic", "mean_diff"):
            assert rows[layer][f"{kind}_auroc"] > 0.99
            assert rows[layer][f"{kind}_accuracy"] >= 0.95
    for kind in ("logistic", "mean_diff"):
        assert abs(rows[0][f"{kind}_auroc"] - 0.5) < 0.2  # ~3 sd of a null AUROC with 40+40 examples
        assert rows[0][f"{kind}_accuracy"] < 0.75
    assert res.best_layer() in SEPARATED
    assert res.best_layer("mean_diff_auroc") in SEPARATED


def test_directions_recover_the_planted_direction(fitted):
    sw, res, (p, n, _, _) = fitted
    for pr in res.probes:
        assert np.linalg.norm(pr.logistic_direction) == pytest.approx(1.0, abs=1e-9)
        assert np.linalg.norm(pr.mean_diff_direction) == pytest.approx(1.0, abs=1e-9)
        # the unnormalised mean difference and its midpoint threshold, exactly
        md = p[:, pr.layer].mean(0) - n[:, pr.layer].mean(0)
        np.testing.assert_allclose(pr.mean_diff, md, atol=1e-12)
        mid = (p[:, pr.layer].mean(0) + n[:, pr.layer].mean(0)) / 2
        assert pr.mean_diff_threshold == pytest.approx(float(mid @ md), abs=1e-9)
    for layer in SEPARATED:
        pr = res.probes[layer]
        # signed: the directions point from the negative class to the positive class
        assert pr.logistic_direction @ U > 0.95
        assert pr.mean_diff_direction @ U > 0.95
        assert res.rows[layer]["cos_logistic_mean_diff"] > 0.95
    assert abs(res.probes[0].mean_diff_direction @ U) < 0.7
    C = sw.direction_cosines("mean_diff")
    assert C.shape == (L, L)
    np.testing.assert_allclose(np.diag(C), 1.0, atol=1e-9)
    assert C[1, 2] > 0.9 and abs(C[0, 1]) < 0.7


def test_bootstrap_intervals_contain_the_estimate(fitted):
    _, res, _ = fitted
    for r in res.rows:
        for kind in ("logistic", "mean_diff"):
            for m in ("accuracy", "auroc", "f1"):
                lo, v, hi = r[f"{kind}_{m}_lo"], r[f"{kind}_{m}"], r[f"{kind}_{m}_hi"]
                assert 0.0 <= lo <= v + 1e-9 and v <= hi + 1e-9 and hi <= 1.0, (r["layer"], kind, m, lo, v, hi)
    null = res.rows[0]
    assert null["logistic_auroc_hi"] - null["logistic_auroc_lo"] > 0.1  # a chance layer is genuinely uncertain


def test_bootstrap_intervals_narrow_with_more_data_and_are_seeded():
    def scores(n, seed):
        p, q = planted(n, seed, delta=1.0)
        X = np.concatenate([p[:, 1], q[:, 1]])
        y = np.r_[np.ones(n, int), np.zeros(n, int)]
        return y, X @ U

    y_s, s_s = scores(30, 3)
    y_l, s_l = scores(300, 4)
    small = scored_metrics(y_s, s_s, threshold=0.0, n_boot=100, seed=0)
    large = scored_metrics(y_l, s_l, threshold=0.0, n_boot=100, seed=0)
    for m in ("accuracy", "auroc", "f1"):
        for res in (small, large):
            assert res[f"{m}_lo"] <= res[m] <= res[f"{m}_hi"]
        w_small, w_large = small[f"{m}_hi"] - small[f"{m}_lo"], large[f"{m}_hi"] - large[f"{m}_lo"]
        assert w_large < 0.6 * w_small, (m, w_small, w_large)  # ~1/sqrt(10) expected
    assert scored_metrics(y_s, s_s, threshold=0.0, n_boot=100, seed=0) == small
    other = scored_metrics(y_s, s_s, threshold=0.0, n_boot=100, seed=1)
    assert other["auroc"] == small["auroc"] and other["auroc_lo"] != small["auroc_lo"]
    assert "auroc_lo" not in scored_metrics(y_s, s_s, threshold=0.0, n_boot=0)


def test_seeded_refit_is_reproducible(fitted):
    sw, res, (p, n, pt, nt) = fitted
    res2 = ProbeSweep(n_boot=30, seed=0, **FAST).fit(p, n).evaluate(pt, nt)
    assert res2.rows == res.rows
    for a, b in zip(res.probes, res2.probes):
        np.testing.assert_array_equal(a.logistic_direction, b.logistic_direction)
    assert sw.fit_seconds_ > 0


def test_layer_labels_and_torch_input():
    p, n = planted(12, seed=5)
    sw = ProbeSweep(Cs=(1.0,), cv=2, n_boot=0, n_jobs=1, layers=[10, 20, 30])
    res = sw.fit(torch.tensor(p, dtype=torch.float32), torch.tensor(n, dtype=torch.float32)).evaluate(p, n)
    assert [r["layer"] for r in res.rows] == [10, 20, 30]
    assert [pr.layer for pr in res.probes] == [10, 20, 30]
    assert res.rows[1]["logistic_auroc"] > 0.99 and res.best_layer() in (20, 30)
    assert "logistic_auroc_lo" not in res.rows[0]  # n_boot=0: no intervals


@pytest.mark.parametrize(
    "pos, neg, match",
    [
        (np.zeros((5, 8)), np.zeros((5, 8)), r"\[n, layers, d\]"),
        (np.zeros((5, 3, 8)), np.zeros((5, 3, 7)), r"\[n, layers, d\]"),
        (np.zeros((5, 3, 8)), np.zeros((5, 2, 8)), r"\[n, layers, d\]"),
        (np.zeros((1, 3, 8)), np.zeros((5, 3, 8)), "at least 2 examples"),
        (np.zeros((5, 3, 8)), np.zeros((1, 3, 8)), "at least 2 examples"),
    ],
)
def test_bad_shapes_and_too_few_examples(pos, neg, match):
    with pytest.raises(WorkbenchError, match=match):
        ProbeSweep(**FAST).fit(pos, neg)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_activations_are_refused(bad):
    p, n = planted(6, seed=0)
    n[3, 1, 2] = bad
    with pytest.raises(WorkbenchError, match="non-finite"):
        ProbeSweep(**FAST).fit(p, n)


def test_evaluate_before_fit_and_bad_test_shapes(fitted):
    with pytest.raises(WorkbenchError, match="fit"):
        ProbeSweep().evaluate(*planted(4, seed=0))
    sw, _, _ = fitted
    with pytest.raises(WorkbenchError, match="fitted on"):
        sw.evaluate(np.zeros((4, 2, D)), np.zeros((4, 2, D)))  # fewer layers than fitted
    with pytest.raises(WorkbenchError, match="fitted on"):
        sw.evaluate(np.zeros((4, L, D + 1)), np.zeros((4, L, D + 1)))
    with pytest.raises(WorkbenchError, match="2 layer labels given for activations with 3 layers"):
        ProbeSweep(layers=[0, 1], **FAST).fit(*planted(6, seed=0))
    with pytest.raises(WorkbenchError, match="non-finite"):
        p, n = planted(4, seed=0)
        p[0, 0, 0] = np.nan
        sw.evaluate(p, n)


def test_generalisation_matrix_on_planted_pairs():
    # A and B share the planted direction U at layer 1, C is separated along the orthogonal V.
    pairs = {"A": planted(100, 10), "B": planted(100, 11), "C": planted(100, 12, direction=V)}
    held = {"A": planted(30, 20), "B": planted(30, 21), "C": planted(30, 22, direction=V)}
    names_tr, names_te, M = generalisation_matrix(pairs, layer_index=1, test_pairs=held, Cs=(0.1, 1.0))
    assert names_tr == names_te == ["A", "B", "C"]
    assert M.shape == (3, 3)
    np.testing.assert_array_less(0.98, np.diag(M))  # each probe works on held-out data of its own kind
    assert M[0, 1] > 0.98 and M[1, 0] > 0.98  # same direction: transfers
    for a, b in ((0, 2), (1, 2), (2, 0), (2, 1)):  # orthogonal direction: chance (up to estimation leakage)
        assert abs(M[a, b] - 0.5) < 0.25, (a, b, M)
    # layer 0 carries no signal anywhere
    _, _, M0 = generalisation_matrix(pairs, layer_index=0, test_pairs=held, Cs=(1.0,))
    assert np.all(np.abs(M0 - 0.5) < 0.25)


# -- end to end on a tiny model --------------------------------------------------------------------


class _OneJobSweep(ProbeSweep):
    """ProbeSweep without joblib worker processes (starting them costs ~10 s on the shared 2 cores)."""

    def __init__(self, **kw):
        kw["n_jobs"] = 1
        super().__init__(**kw)


def test_run_probe_sweep_writes_a_complete_run_folder(make_tiny, tmp_path, monkeypatch):
    from workbench.capture import capture
    from workbench.chat import ChatFormat
    from workbench.runs import RunFolder
    from workbench.vectors import load_directions

    monkeypatch.setattr(probes.cli, "ProbeSweep", _OneJobSweep)
    lm = make_tiny("llama")
    fmt = ChatFormat()
    run = RunFolder(tmp_path / "probe", config={"test": True})
    out = probes.cli.run_probe_sweep(lm, fmt, run, "harmful", "harmless", n_boot=20, limit=8, seed=0)

    names = {p.name for p in run.path.iterdir()}
    expected = {"probe_layers.csv", "probe_layers.json", "probe_directions.safetensors", "probe_timing.json",
                "probe_summary.json", "probe_auroc_vs_layer.png", "probe_cosine_logistic_vs_mean_diff.png",
                "probe_direction_cosines.png"}
    assert expected <= names
    for png in [n for n in expected if n.endswith(".png")]:
        assert (run.path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = json.loads((run.path / "probe_layers.json").read_text())
    assert [r["layer"] for r in rows] == [0, 1]
    for r in rows:
        assert {"logistic_auroc", "logistic_auroc_lo", "logistic_auroc_hi", "mean_diff_auroc", "C",
                "cos_logistic_mean_diff"} <= set(r)
    csv_lines = (run.path / "probe_layers.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 3 and "logistic_auroc" in csv_lines[0]

    timing = json.loads((run.path / "probe_timing.json").read_text())
    assert timing["n_prompts"] == 4 * 8 and timing["n_layers"] == 2
    assert timing["fit_seconds"] >= 0 and timing["capture_seconds"] >= 0
    summary = json.loads((run.path / "probe_summary.json").read_text())
    # the best layer is the one with the highest held-out logistic AUROC in the rows written (lower layer on ties)
    top = max(r["logistic_auroc"] for r in rows)
    best = min(r["layer"] for r in rows if r["logistic_auroc"] == top)
    assert summary["best_layer"] == best
    assert summary["best_logistic_auroc"] == top
    best_row = next(r for r in rows if r["layer"] == best)
    assert summary["best_logistic_auroc_ci"] == [best_row["logistic_auroc_lo"], best_row["logistic_auroc_hi"]]
    assert summary["best_mean_diff_auroc"] == max(r["mean_diff_auroc"] for r in rows)

    dirs = load_directions(run.path / "probe_directions.safetensors")
    assert sorted((d.layer, d.method) for d in dirs) == [(0, "logistic"), (0, "mean_diff"), (1, "logistic"),
                                                         (1, "mean_diff")]
    for d in dirs:
        assert d.d_model == lm.d_model == 64 and d.vector.shape == (64,)
        assert d.model_checksum == lm.checksum and d.model_id == lm.model_id
        assert d.position == "last" and d.meta == {"source": "probe_sweep"}
        assert set(d.prompt_set_hashes) == {"positive", "negative"}
        d.check_compatible(lm)
        if d.method == "logistic":
            assert d.norm == pytest.approx(1.0, abs=1e-5)

    # the saved mean-difference vectors are the raw mean differences of the captured training activations
    tr_pos, _ = probes.cli._splits("harmful")
    tr_neg, _ = probes.cli._splits("harmless")
    acts = [capture(lm, ps.texts[:8], layers="all", positions=["last"], fmt=fmt, cache=False, progress=False)
            for ps in (tr_pos, tr_neg)]
    X = [probes.cli.stack_layers(a) for a in acts]
    md = X[0].mean(0) - X[1].mean(0)
    for d in dirs:
        if d.method == "mean_diff":
            torch.testing.assert_close(d.vector, md[d.layer], atol=1e-5, rtol=1e-5)
    assert len(out["directions"]) == 4 and out["rows"] == rows


def test_vectorised_bootstrap_metrics_equal_sklearn_per_resample():
    """Every resample's accuracy, AUROC and F1 equal sklearn's, with ties, constant scores and an all-negative
    prediction (F1 = 0); and the interval equals a loop over the same draws scored by sklearn."""
    from probes.metrics import _metrics, batch_metrics

    rng = np.random.default_rng(5)
    for case in range(12):
        n = int(rng.integers(5, 60))
        y = np.r_[0, 1, rng.integers(0, 2, n - 2)]
        s = rng.normal(size=n) + y
        if case % 3 == 0:
            s = np.round(s, 0)  # many ties
        if case % 4 == 1:
            s = np.zeros(n)  # constant scores: AUROC 0.5, nothing predicted positive
        thr = 10.0 if case == 5 else 0.3
        got = batch_metrics(y[None], s[None], thr)[0]
        np.testing.assert_allclose(got, _metrics(y, s, thr), atol=1e-12)
    y = rng.integers(0, 2, 40)
    s = np.round(rng.normal(size=40) + y, 1)
    m = scored_metrics(y, s, threshold=0.2, n_boot=200, seed=3)
    r = np.random.default_rng(3)
    boots = []
    for _ in range(200):
        idx = r.integers(0, 40, 40)
        if len(np.unique(y[idx])) == 2:
            boots.append(_metrics(y[idx], s[idx], 0.2))
    b = np.array(boots)
    for j, name in enumerate(("accuracy", "auroc", "f1")):
        lo, hi = np.percentile(b[:, j], [2.5, 97.5])
        assert m[f"{name}_lo"] == pytest.approx(lo, abs=1e-12) and m[f"{name}_hi"] == pytest.approx(hi, abs=1e-12)
