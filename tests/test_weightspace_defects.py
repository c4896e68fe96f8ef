"""Issue #10, the measurement defects: each test plants numbers computed by hand / with numpy (never by the
function under test) and fails on the code before the fix.

1. orthogonal-mode ``energy_kept`` reported the energy removed (``||P D||^2``), not the energy written;
2. the Exp 1 verdict compared E_k(TopK) with E_k(Random) instead of E_k(useful) with E_k(harmful);
3. the Random control was not random: rank-1 along ``Delta_ref`` for 1-D tensors, zero where ``Delta_ref``
   is zero, and redrawn per rho (not nested);
4. E_k was measured before rounding to the stored dtype (bf16 updates that round to zero were counted);
5. embedding orientation: the study takes the left space of the table as stored (``[vocab, d_model]``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from workbench.tiny import build_tiny

from weightspace.checkpoints import open_checkpoint
from weightspace.deltas import DeltaSpec
from weightspace.overlap import OverlapConfig, update_overlap
from weightspace.plan import match_checkpoints
from weightspace.projection import ProjectionConfig, project_checkpoint
from weightspace.reference import DeltaReference

Q = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"
O0 = "model.layers.0.self_attn.o_proj.weight"
EMB = "model.embed_tokens.weight"


def _orth(d: int, k: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, k)))
    return q


def _save(model, tok, path: Path) -> Path:
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def _set(model, updates: dict[str, np.ndarray], *, add: bool = True) -> None:
    sd = model.state_dict()
    with torch.no_grad():
        for name, v in updates.items():
            t = torch.as_tensor(v).to(sd[name].dtype)
            sd[name].add_(t) if add else sd[name].copy_(t)


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """aligned, safety = aligned + Delta_ref, ft = aligned + Delta_T (float32 tiny llama).

    Delta_ref: q = sum_i s_i a_i r_i^T (rank 4, s = 4, 3, 2, 1), norm = v, embedding (stored [384, 64]) =
    3 e f^T (e in vocab space, f in d_model space); o_proj: no reference update (zero).
    Delta_T: q = 0.3 G (dense Gaussian), norm = 2 v + w, o_proj = 0.2 G', embedding = 2 c f^T with c _|_ e.
    """
    root = tmp_path_factory.mktemp("defects")
    rng = np.random.default_rng(0)
    A = _orth(64, 4, 1)
    R = _orth(64, 4, 2)
    e, c = _orth(384, 2, 3).T
    f = _orth(64, 1, 4)[:, 0]
    v = np.zeros(64)
    v[0] = 0.5
    w = np.zeros(64)
    w[1] = 0.5
    dref = {Q: sum(s * np.outer(A[:, i], R[:, i]) for i, s in enumerate([4.0, 3.0, 2.0, 1.0])),
            NORM: v, EMB: 3 * np.outer(e, f)}
    dT = {Q: 0.3 * rng.standard_normal((64, 64)), NORM: 2 * v + w, O0: 0.2 * rng.standard_normal((64, 64)),
          EMB: 2 * np.outer(c, f)}
    model, tok = build_tiny("llama", seed=0)
    aligned = _save(model, tok, root / "aligned")
    _set(model, dref)
    safety = _save(model, tok, root / "safety")
    model, tok = build_tiny("llama", seed=0)
    _set(model, dT)
    ft = _save(model, tok, root / "ft")
    return {"aligned": aligned, "safety": safety, "ft": ft, "A": A, "e": e, "c": c, "f": f, "v": v}


def _ref(p, **kw) -> DeltaReference:
    return DeltaReference(DeltaSpec("safety", open_checkpoint(p["safety"], label="safety"),
                                    open_checkpoint(p["aligned"], label="aligned")), **kw)


def _project(p, out, cfg, ref=None):
    return project_checkpoint(open_checkpoint(p["aligned"], label="aligned"), open_checkpoint(p["ft"], label="ft"),
                              ref or _ref(p), cfg, out, progress=False)


# -- defect 1: orthogonal mode reports the energy written --------------------------------------------------

def test_orthogonal_energy_kept_is_the_energy_written(three, tmp_path):
    Wa = load_file(str(three["aligned"] / "model.safetensors"))
    Wt = load_file(str(three["ft"] / "model.safetensors"))
    D = _f64(Wt[Q]) - _f64(Wa[Q])
    U = three["A"]  # the top-4 left singular vectors of Delta_ref(q), planted
    e_par = float(np.sum((U @ (U.T @ D)) ** 2) / np.sum(D ** 2))  # by hand: ||U U^T D||^2 / ||D||^2
    assert 0.02 < e_par < 0.2  # far from 1/2: the two modes' values cannot be confused
    got = {}
    for mode in ("parallel", "orthogonal", "opposite"):
        res = _project(three, tmp_path / mode, ProjectionConfig(mode, rho=4 / 64, kind="topk"))
        rec = {r.name: r for r in res.records}[Q]
        Wn = load_file(str(res.model_path / "model.safetensors"))[Q]
        written = float(np.sum((_f64(Wn) - _f64(Wa[Q])) ** 2) / np.sum(D ** 2))  # from the written weights
        assert rec.energy_kept == pytest.approx(written, abs=1e-6), mode
        got[mode] = rec.energy_kept
    assert got["parallel"] == pytest.approx(e_par, abs=1e-5)
    assert got["opposite"] == pytest.approx(e_par, abs=1e-5)
    assert got["orthogonal"] == pytest.approx(1 - e_par, abs=1e-5)  # was e_par before the fix


# -- defect 2: Exp 1 compares E_k(useful) with E_k(harmful) ------------------------------------------------

def test_exp1_verdict_compares_useful_with_harmful_energy():
    from weightspace.chain import ChainConfig, findings

    # the chain's own TopK rows from the issue (useful / harmful); Random rows at k/d, far from TopK
    ek = {0.01: (0.061, 0.088), 0.25: (0.312, 0.355), 0.5: (0.512, 0.549), 0.75: (0.650, 0.697),
          0.99: (0.716, 0.759)}
    assert max(abs(u - h) for u, h in ek.values()) <= 0.048
    rows = []
    for rho, (u, h) in ek.items():
        for kind, (eu, eh) in (("topk", (u, h)), ("random", (rho, rho))):
            for model, val in (("useful", eu), ("harmful", eh)):
                rows.append({"config": f"exp1-{model}-{kind}-rho{rho:g}", "experiment": "exp1", "model": model,
                             "rho": rho, "kind": kind, "energy_kept": val})
    cfg = ChainConfig(rhos=tuple(ek))
    f = findings({"sweep": {"rows": rows, "baselines": {}}}, cfg, None)["exp1_topk_vs_random"]
    assert f["ek_about_the_same"] is True
    parity = f["verdicts"]["exp1_energy_parity"]
    assert parity["verdict"] == "holds"
    assert parity["value"] == pytest.approx(0.650 - 0.697)  # the largest |gap| (rho 0.75), by hand
    assert [r["gap"] for r in parity["per_rho"]] == pytest.approx([u - h for u, h in ek.values()])
    assert "holds" in f["verdict"]
    # one rho 0.1 apart: the rule says no
    ek2 = {**ek, 0.5: (0.45, 0.55)}
    rows2 = [dict(r, energy_kept=ek2[r["rho"]][0 if r["model"] == "useful" else 1]) if r["kind"] == "topk" else r
             for r in rows]
    f2 = findings({"sweep": {"rows": rows2, "baselines": {}}}, cfg, None)["exp1_topk_vs_random"]
    assert f2["verdicts"]["exp1_energy_parity"]["verdict"] == "does not hold" and f2["ek_about_the_same"] is False


# -- defect 3: the Random control is random, nested across rho ---------------------------------------------

def test_random_control_for_1d_tensors_ignores_the_reference_direction(three, tmp_path):
    ref = _ref(three)
    plan = match_checkpoints({"aligned": ref.spec.old, "safety": ref.spec.new})
    info = plan.by_name()[NORM]
    op = ref.operator(info, ref.prepare(info), 0.25, "random", seed=0)
    vec = _f64(op.vector).reshape(-1)
    v = three["v"]
    cos = abs(float(vec @ v) / (np.linalg.norm(vec) * np.linalg.norm(v)))
    assert cos < 0.5  # the old "random" operator was rank-1 along Delta_ref itself: |cos| = 1
    assert op.k == 1 and op.d == 64 and op.random_expectation == pytest.approx(1 / 64)
    # the same direction whatever Delta_ref is (here: Delta_T as the reference)
    ref2 = DeltaReference(DeltaSpec("t", open_checkpoint(three["ft"], label="ft"), ref.spec.old))
    op2 = ref2.operator(info, ref2.prepare(info), 0.25, "random", seed=0)
    assert np.allclose(_f64(op2.vector).reshape(-1), vec)
    # energy kept of Delta_T = 2 v + w on the random unit vector g: <D, g>^2 / ||D||^2, by hand
    D = 2 * v + np.eye(64)[1] * 0.5
    g = vec / np.linalg.norm(vec)
    res = _project(three, tmp_path / "r", ProjectionConfig("parallel", rho=0.25, kind="random"))
    rec = {r.name: r for r in res.records}[NORM]
    assert rec.kept_unrounded == pytest.approx(float(D @ g) ** 2, rel=1e-4, abs=1e-9)


def test_random_control_where_the_reference_is_zero_is_a_random_subspace(three, tmp_path):
    res = _project(three, tmp_path / "r", ProjectionConfig("parallel", rho=0.25, kind="random"))
    rec = {r.name: r for r in res.records}[O0]  # Delta_ref(o_proj) = 0
    assert (rec.operator, rec.k, rec.d) == ("basis", 16, 64)  # was ("zero", 0, 0 -> P = 0)
    assert rec.energy_random == pytest.approx(16 / 64)
    Wa = load_file(str(three["aligned"] / "model.safetensors"))[O0]
    Wt = load_file(str(three["ft"] / "model.safetensors"))[O0]
    Wn = load_file(str(res.model_path / "model.safetensors"))[O0]
    D, P = _f64(Wt) - _f64(Wa), _f64(Wn) - _f64(Wa)
    assert 0.05 < np.sum(P ** 2) / np.sum(D ** 2) < 0.6  # about 16/64 of a dense random update, not 0
    assert np.linalg.matrix_rank(P, tol=1e-4) == 16
    topk = _project(three, tmp_path / "t", ProjectionConfig("parallel", rho=0.25, kind="topk"))
    assert {r.name: r for r in topk.records}[O0].operator == "zero"  # TopK: no subspace to project on


def test_random_bases_are_nested_across_rho(three):
    ref = _ref(three)
    plan = match_checkpoints({"aligned": ref.spec.old, "safety": ref.spec.new})
    info = plan.by_name()[Q]
    prep = ref.prepare(info)
    b25 = _f64(ref.operator(info, prep, 0.25, "random", seed=3).basis.vectors)
    b50 = _f64(ref.operator(info, prep, 0.5, "random", seed=3).basis.vectors)
    assert b25.shape == (64, 16) and b50.shape == (64, 32)
    mso = float(np.sum((b25.T @ b50) ** 2)) / 16  # numpy MSO: 1 = span(b25) inside span(b50); ~0.5 before
    assert mso == pytest.approx(1.0, abs=1e-10)
    other = _f64(ref.operator(info, prep, 0.5, "random", seed=4).basis.vectors)
    assert float(np.sum((b25.T @ other) ** 2)) / 16 < 0.8  # another seed: another frame


# -- defect 4: E_k of the weights written in bf16 ----------------------------------------------------------

@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    rng = np.random.default_rng(5)
    model, tok = build_tiny("llama", seed=0, dtype=torch.bfloat16)
    W = 1.0 + rng.random((64, 64))  # in [1, 2): bf16 spacing 2^-7
    _set(model, {Q: W}, add=False)
    aligned = _save(model, tok, root / "aligned")
    A, R = _orth(64, 4, 6), _orth(64, 4, 7)
    _set(model, {Q: 0.25 * sum(s * np.outer(A[:, i], R[:, i]) for i, s in enumerate([4.0, 3.0, 2.0, 1.0]))})
    safety = _save(model, tok, root / "safety")
    model, tok = build_tiny("llama", seed=0, dtype=torch.bfloat16)
    _set(model, {Q: W}, add=False)
    _set(model, {Q: 0.02 * rng.standard_normal((64, 64))})
    ft = _save(model, tok, root / "ft")
    return {"aligned": aligned, "safety": safety, "ft": ft}


def test_energy_kept_is_measured_on_the_rounded_bf16_weights(bf16, tmp_path, capsys):
    Wa = _f64(load_file(str(bf16["aligned"] / "model.safetensors"))[Q])
    D = _f64(load_file(str(bf16["ft"] / "model.safetensors"))[Q]) - Wa
    Dref = _f64(load_file(str(bf16["safety"] / "model.safetensors"))[Q]) - Wa
    U = np.linalg.svd(Dref)[0][:, :4]  # numpy: top-4 left singular vectors of the stored Delta_ref
    PD = U @ (U.T @ D)
    e_unrounded = float(np.sum(PD ** 2) / np.sum(D ** 2))
    w_new = torch.from_numpy(Wa).float() + torch.from_numpy(PD).float()  # W_new in float32, then stored as bf16
    written = _f64(w_new.to(torch.bfloat16)) - Wa
    e_written = float(np.sum(written ** 2) / np.sum(D ** 2))
    zeroed = float(np.mean(written[PD != 0] == 0))
    assert zeroed > 0.3 and abs(e_written - e_unrounded) > 0.01  # the planted case rounds a lot away
    res = _project(bf16, tmp_path / "p", ProjectionConfig("parallel", rho=4 / 64, kind="topk"))
    rep = res.report
    assert rep["energy_kept"]["energy_kept"] == pytest.approx(e_written, abs=2e-3)  # was e_unrounded
    assert rep["energy_kept_unrounded"]["energy_kept"] == pytest.approx(e_unrounded, abs=1e-4)
    Wn = _f64(load_file(str(res.model_path / "model.safetensors"))[Q])  # what the checkpoint holds
    assert rep["energy_kept"]["energy_kept"] == pytest.approx(float(np.sum((Wn - Wa) ** 2) / np.sum(D ** 2)),
                                                             abs=1e-9)
    assert rep["rounding"]["share_update_entries_zeroed"] == pytest.approx(zeroed, abs=0.02)
    assert rep["warnings"] and "unrounded" in rep["warnings"][0]
    assert "warning" in capsys.readouterr().err
    # writing float32 keeps the unrounded update: no warning
    res32 = _project(bf16, tmp_path / "p32", ProjectionConfig("parallel", rho=4 / 64, kind="topk",
                                                              write_dtype="float32"))
    assert res32.report["energy_kept"]["energy_kept"] == pytest.approx(e_unrounded, abs=1e-4)
    assert res32.report["warnings"] == []
    assert load_file(str(res32.model_path / "model.safetensors"))[Q].dtype == torch.float32


# -- defect 5: embedding orientation -----------------------------------------------------------------------

def test_embedding_orientation_default_is_the_stored_left_space(three, tmp_path):
    # Delta_ref(embed) = 3 e f^T, Delta_T(embed) = 2 c f^T (stored [vocab, d_model]), c _|_ e.
    # stored (left = vocab): P = e e^T, P Delta_T = e (e.c) 2 f^T = 0 -> E = 0.
    # transposed (left = d_model): P = f f^T acting on Delta_T^T = 2 f c^T -> all kept -> E = 1.
    assert abs(float(three["e"] @ three["c"])) < 1e-12
    res = _project(three, tmp_path / "s", ProjectionConfig("parallel", rho=1 / 64, kind="topk"))
    rec = {r.name: r for r in res.records}[EMB]
    assert (rec.k, rec.d) == (1, 384) and rec.energy_kept == pytest.approx(0.0, abs=1e-6)
    assert res.report["reference"]["embedding_orientation"] == "stored"
    res_t = _project(three, tmp_path / "t", ProjectionConfig("parallel", rho=1 / 64, kind="topk"),
                     ref=_ref(three, embedding_orientation="transposed"))
    rec_t = {r.name: r for r in res_t.records}[EMB]
    assert (rec_t.k, rec_t.d) == (1, 64) and rec_t.energy_kept == pytest.approx(1.0, abs=1e-5)
    assert res_t.report["reference"]["embedding_orientation"] == "transposed"
    # the overlap: MSO(span e, span c) = 0 as stored; MSO(span f, span f) = 1 transposed
    cks = {n: open_checkpoint(three[n], label=n) for n in ("aligned", "safety", "ft")}
    plan = match_checkpoints(cks)
    specs = [DeltaSpec("safety", cks["safety"], cks["aligned"]), DeltaSpec("ft", cks["ft"], cks["aligned"])]
    for orient, d, want in (("stored", 384, 0.0), ("transposed", 64, 1.0)):
        cfg = OverlapConfig(etas=(0.99,), embedding_orientation=orient)
        assert cfg.describe()["embedding_orientation"] == orient
        rows = [r for r in update_overlap(specs, plan, cfg, progress=False).tensor_rows if r["tensor"] == EMB]
        assert len(rows) == 1 and rows[0]["d"] == d and rows[0]["mso"] == pytest.approx(want, abs=1e-6), orient
    assert OverlapConfig().embedding_orientation == "stored"
    assert math.isfinite(rec.energy_random)
