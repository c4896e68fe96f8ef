"""weightspace.projection: details surviving mutants showed untested (benchmarks/mutation.py, projection).

On the planted checkpoints of tests/planted_weights.py (expected values by hand): records of unselected
tensors, the reference state cache the sweep passes in, the written dtype and its rounding statistics, the
report's counts, cosine and metadata, pass-through of a head only the aligned checkpoint stores, the rounding
warning rule, label de-duplication and the documented defaults.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from weightspace.checkpoints import open_checkpoint
from weightspace.deltas import DeltaSpec
from weightspace.plan import Selection, match_checkpoints
from weightspace.projection import (ROUNDING_WARN, ProjectionConfig, TensorRecord, project_checkpoint,
                                    projected_tensors, rounding_check, unique_checkpoints)
from weightspace.reference import DeltaReference, DirectionReference

from planted_weights import DN, O0, build_planted, planted_updates, weights  # noqa: E402  (tests/ is on sys.path)

TOL = 1e-5


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    # "mirror": aligned + R with R_DN = D_DN and R_O0 = -D_O0 (cosine +1 on layer 1, -1 on layer 0)
    _, upd = planted_updates()
    return build_planted(tmp_path_factory.mktemp("planted-projection"), extra={"mirror": {DN: upd[DN], O0: -upd[O0]}})


def _cks(planted, *names):
    return {nm: open_checkpoint(planted["paths"][nm], label=nm) for nm in names}


def test_unselected_records_and_defaults():
    cfg = ProjectionConfig()
    assert (cfg.mode, cfg.rho, cfg.kind, cfg.operator, cfg.safelora_threshold, cfg.unselected, cfg.seed,
            cfg.write_dtype) == ("parallel", 0.25, "topk", "projector", None, "finetuned", 0, "stored")
    rec = TensorRecord("t", "0", "q", "2x2", True, "basis", 1, 2, 1.0, 1.0, 2.0, 0.5, 0.5)
    assert rec.applied is True and math.isnan(rec.cos_update_projected) and math.isnan(rec.kept_unrounded)
    assert (rec.n_update, rec.n_update_zeroed) == (0, 0)


def test_projected_tensors_records_and_the_prepared_cache(planted, monkeypatch):
    cks = _cks(planted, "aligned", "ft", "base")
    plan = match_checkpoints(cks)
    ref = DeltaReference(DeltaSpec("alignment", cks["aligned"], cks["base"]))
    sel = Selection.parse("1", None, n_layers=2)
    cfg = ProjectionConfig("parallel", rho=0.25, selection=sel)
    calls = []
    real = DeltaReference.prepare

    def spy(self, info, **kw):
        calls.append((info.name, kw.get("max_rho")))
        return real(self, info, **kw)

    monkeypatch.setattr(DeltaReference, "prepare", spy)
    first = {i.name: (w.clone(), rec) for i, w, rec in
             projected_tensors(plan, plan.tensors, cks["aligned"], cks["ft"], ref, cfg)}
    selected = [t for t in plan.tensors if sel.accepts(t)]
    assert [c[0] for c in calls] == [t.name for t in selected] and {c[1] for c in calls} == {0.25}
    rec = first[O0][1]  # layer 0: unselected
    assert (rec.selected, rec.operator, rec.k, rec.d, rec.kept, rec.total, rec.applied) == (
        False, "unselected", 0, 0, 0.0, 0.0, False)
    assert math.isnan(rec.energy_kept) and math.isnan(rec.energy_random) and math.isnan(rec.ref_energy)
    # the sweep passes the reference state in: no second prepare, the same tensors
    prepared = {t.name: real(ref, t, operator="projector", kinds=("topk",), max_rho=0.25) for t in selected}
    calls.clear()
    again = {i.name: w for i, w, _ in
             projected_tensors(plan, plan.tensors, cks["aligned"], cks["ft"], ref, cfg, prepared=prepared)}
    assert calls == []
    for name, (w, _) in first.items():
        assert torch.equal(again[name], w), name
    # a reference without rho (directions) prepares with max_rho 1
    dref = DirectionReference([planted["r"]])
    calls.clear()
    monkeypatch.setattr(DirectionReference, "prepare",
                        lambda self, info, **kw: calls.append(kw.get("max_rho")))
    list(projected_tensors(plan, plan.tensors[:12], cks["aligned"], cks["ft"], dref,
                           ProjectionConfig("parallel", rho=None)))
    assert calls and set(calls) == {1.0}


def test_report_counts_cosine_metadata_and_config(planted, tmp_path, capsys):
    cks = _cks(planted, "aligned", "ft", "mirror")
    ref = DeltaReference(DeltaSpec("mirror", cks["mirror"], cks["aligned"]))
    t0 = time.perf_counter()
    res = project_checkpoint(cks["aligned"], cks["ft"], ref, ProjectionConfig("parallel", rho=0.25), tmp_path / "a")
    elapsed = time.perf_counter() - t0
    assert "project (parallel)" in capsys.readouterr().err  # a progress bar unless asked not to
    rep = res.report
    n = rep["plan"]["n_tensors"]
    # the reference update is non-zero on O0 and DN only: every other tensor gets the zero operator
    assert rep["n_selected"] == n and rep["n_unselected"] == 0 and rep["n_zero_reference"] == n - 2
    # pooled cosine of D with R over all tensors: (||D_DN||^2 - ||D_O0||^2) / (||D|| ||R||) = (5 - 25) / 30
    assert rep["cosine_update_reference"]["cosine"] == pytest.approx(-2 / 3, abs=1e-5)
    assert 0 <= rep["seconds"] <= elapsed + 0.01
    with safe_open(str(res.model_path / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["producer"] == "workbench weightspace project" and meta["mode"] == "parallel"
    config = json.loads((res.path / "config.json").read_text())
    assert config["command"] == "weightspace project" and config["mode"] == "parallel" and config["rho"] == 0.25
    # only the selected tensors (layer 1: DN, cosine +1) enter the cosine
    sel = Selection.parse("1", None, n_layers=2)
    res1 = project_checkpoint(cks["aligned"], cks["ft"], ref, ProjectionConfig("parallel", rho=0.25, selection=sel),
                              tmp_path / "b", progress=False)
    assert res1.report["cosine_update_reference"]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert res1.report["n_unselected"] == sum(1 for t in match_checkpoints(cks).tensors if not sel.accepts(t))


@pytest.fixture(scope="module")
def planted_bf16(tmp_path_factory):
    return build_planted(tmp_path_factory.mktemp("planted-bf16"), dtype=torch.bfloat16)


@pytest.mark.parametrize("write_dtype", ["stored", "float32"])
def test_written_dtype_and_rounding_statistics(planted_bf16, tmp_path, write_dtype):
    p = planted_bf16
    cks = _cks(p, "aligned", "ft")
    r = planted_bf16["r"]
    res = project_checkpoint(cks["aligned"], cks["ft"], DirectionReference([r]),
                             ProjectionConfig("parallel", write_dtype=write_dtype), tmp_path / "p", progress=False)
    out = load_file(str(res.model_path / "model.safetensors"))
    want = torch.bfloat16 if write_dtype == "stored" else torch.float32
    assert {v.dtype for v in out.values()} == {want}
    A, T = weights(p, "aligned"), weights(p, "ft")
    recs = {x.name: x for x in res.records}
    for name in (O0, DN):
        a, d = A[name].float(), (T[name] - A[name]).float()
        exact = a + torch.outer(r.float(), r.float() @ d)  # W_A + r r^T D, by hand, before any rounding
        rec = recs[name]
        written = out[name].float()
        assert rec.n_update == int((exact != a).sum())
        assert rec.n_update_zeroed == int(((exact != a) & (written == a)).sum())
        assert rec.kept == pytest.approx(float(((written - a).double() ** 2).sum()), rel=1e-6)
        assert rec.kept_unrounded == pytest.approx(float(((exact - a).double() ** 2).sum()), rel=1e-4)
        assert rec.energy_kept_unrounded == pytest.approx(rec.kept_unrounded / rec.total, rel=1e-9)
        if write_dtype == "float32":
            torch.testing.assert_close(written, exact, atol=1e-6, rtol=0)
            assert rec.n_update_zeroed == 0
    rounding = res.report["rounding"]
    ek_w, ek_u = rounding["energy_kept_written"], rounding["energy_kept_unrounded"]
    assert rounding["abs_diff"] == pytest.approx(abs(ek_w - ek_u), abs=1e-12)
    assert rounding["write_dtype"] == write_dtype
    if write_dtype == "stored":
        assert sum(recs[n].n_update_zeroed for n in (O0, DN)) > 0  # bf16 really rounds some of the update away


def test_a_head_only_the_aligned_checkpoint_stores_is_passed_through(tmp_path):
    from workbench.tiny import build_tiny

    model, tok = build_tiny("gemma3")  # tied: save_pretrained leaves lm_head out
    for name in ("al", "ft"):
        model.save_pretrained(str(tmp_path / name))
        tok.save_pretrained(str(tmp_path / name))
    sd = load_file(str(tmp_path / "al" / "model.safetensors"))
    head = torch.randn_like(sd["model.embed_tokens.weight"])
    save_file(sd | {"lm_head.weight": head}, str(tmp_path / "al" / "model.safetensors"))
    ft = load_file(str(tmp_path / "ft" / "model.safetensors"))
    o = "model.layers.0.self_attn.o_proj.weight"
    ft[o] = ft[o] + 0.5
    save_file(ft, str(tmp_path / "ft" / "model.safetensors"))
    al, f = open_checkpoint(tmp_path / "al", label="al"), open_checkpoint(tmp_path / "ft", label="ft")
    r = torch.zeros(64)
    r[0] = 1.0
    res = project_checkpoint(al, f, DirectionReference(r), ProjectionConfig("parallel"), tmp_path / "p", progress=False)
    assert [s["name"] for s in res.report["plan"]["skipped"]] == ["lm_head.weight"]
    out = load_file(str(res.model_path / "model.safetensors"))
    assert torch.equal(out["lm_head.weight"], head)


def test_rounding_warning_rule():
    assert ROUNDING_WARN == 0.01
    assert rounding_check(0.5, 0.505) is None
    assert rounding_check(0.505, 0.5) is None
    msg = rounding_check(0.5, 0.515, where="x: ")
    assert msg is not None and msg.startswith("x: ") and "0.0150" in msg
    assert rounding_check(0.515, 0.5) is not None
    for a, b in ((None, 0.5), (0.5, None), (float("nan"), 0.5), (0.5, float("nan"))):
        assert rounding_check(a, b) is None


def test_unique_checkpoints_labels(planted):
    cks = _cks(planted, "aligned", "ft", "base")
    out = unique_checkpoints(("x", cks["aligned"]), ("x", cks["ft"]), ("x", cks["base"]), ("y", None),
                             ("z", cks["aligned"]), ("x", open_checkpoint(planted["paths"]["ft"], label="again")))
    assert list(out) == ["x", "x#2", "x#3"]
    assert out["x"] is cks["aligned"] and out["x#2"] is cks["ft"] and out["x#3"] is cks["base"]
