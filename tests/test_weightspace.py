"""Weight-space tools on planted structure: checkpoints, deltas, subspaces, metrics, projection, overlap.

The planted models (tiny Llama, d_model 64, 2 layers):

* ``base``: a random tiny model.
* ``aligned = base + Delta_A`` with ``Delta_A = sum_i s_i a_i r_i^T`` (``s = 4, 3, 2, 1``, orthonormal ``a_i``)
  on ``layers.0.q_proj`` and ``layers.1.down_proj``, and ``v`` on ``layers.0.input_layernorm``.
* ``finetuned = aligned + Delta_T`` with known singular vectors partly inside ``span(a_0..a_3)``:
  ``q``: ``3 a0 s0^T + 2 m s1^T + 1 n0 s2^T`` with ``m = (a1 + n1)/sqrt 2``; ``down``: ``2 a2 u0^T + 1.5 n2 u1^T``;
  norm: ``2 v + w`` (``w`` orthogonal to ``v``). Everything else is unchanged.

So k(eta), E_k, MSO and the projections have exact values (derived in the comments below).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from workbench.cli import run_command
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from workbench.errors import WorkbenchError
from workbench.subspace import basis_by_rank_fraction, bases_for_grid
from workbench.tiny import build_tiny

from weightspace.checkpoints import open_checkpoint
from weightspace.deltas import DeltaSpec, load_delta, load_f32
from weightspace.overlap import OverlapConfig, update_overlap
from weightspace.plan import Selection, match_checkpoints
from weightspace.projection import ProjectionConfig, project_checkpoint
from weightspace.reference import DeltaReference, DirectionReference
from weightspace.spectral import check_grid, spectrum_of

Q = "model.layers.0.self_attn.q_proj.weight"
DN = "model.layers.1.mlp.down_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"
O0 = "model.layers.0.self_attn.o_proj.weight"
TOL = 1e-5


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return q


def _save(model, tok, path: Path, **kw) -> Path:
    model.save_pretrained(str(path), **kw)
    tok.save_pretrained(str(path))
    return path


def _add(model, updates: dict[str, torch.Tensor]) -> None:
    sd = model.state_dict()
    with torch.no_grad():
        for name, d in updates.items():
            sd[name].add_(d.to(sd[name].dtype))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    F = _orthonormal(64, 64, seed=1)  # a_i = F[:, i] (i < 4), n_j = F[:, 4 + j]
    a = [F[:, i] for i in range(4)]
    nv = [F[:, 4 + j] for j in range(4)]
    rq = _orthonormal(64, 4, seed=2).T  # right vectors of Delta_A (q): rows
    rd = _orthonormal(128, 4, seed=3).T
    sq = _orthonormal(64, 3, seed=4).T  # right vectors of Delta_T (q)
    ud = _orthonormal(128, 2, seed=5).T
    s_a = [4.0, 3.0, 2.0, 1.0]
    dA = {Q: sum(s * torch.outer(a[i], rq[i]) for i, s in enumerate(s_a)),
          DN: sum(s * torch.outer(a[i], rd[i]) for i, s in enumerate(s_a)),
          NORM: 0.5 * torch.eye(64, dtype=torch.float64)[0]}
    m = (a[1] + nv[1]) / math.sqrt(2)
    dT = {Q: 3 * torch.outer(a[0], sq[0]) + 2 * torch.outer(m, sq[1]) + 1 * torch.outer(nv[0], sq[2]),
          DN: 2 * torch.outer(a[2], ud[0]) + 1.5 * torch.outer(nv[2], ud[1]),
          NORM: 2 * 0.5 * torch.eye(64, dtype=torch.float64)[0] + 0.5 * torch.eye(64, dtype=torch.float64)[1]}
    model, tok = build_tiny("llama", seed=0)
    base = _save(model, tok, root / "base")
    _add(model, dA)
    aligned = _save(model, tok, root / "aligned")
    _add(model, dT)
    ft = _save(model, tok, root / "ft")
    return {"root": root, "base": base, "aligned": aligned, "ft": ft, "a": a, "n": nv, "dA": dA, "dT": dT,
            "rq": rq, "rd": rd}


def _cks(p, *names):
    return {n: open_checkpoint(p[n], label=n) for n in names}


def _plan(p, *names):
    return match_checkpoints(_cks(p, *names))


# -- checkpoints, plan, deltas ----------------------------------------------------------------------------

def test_plan_groups_and_orientation(planted):
    plan = _plan(planted, "aligned", "ft")
    info = plan.by_name()
    assert len(plan.tensors) == 21 and plan.n_layers == 2 and plan.d_model == 64
    assert (info[Q].layer, info[Q].module, info[DN].module, info[NORM].module) == (0, "q", "down", "norm")
    assert info["lm_head.weight"].module == "lm_head" and info["lm_head.weight"].layer is None
    emb = info["model.embed_tokens.weight"]
    assert emb.transpose and emb.stored_shape == (384, 64) and emb.shape == (64, 384)  # output space = d_model
    assert [t.layer for t in plan.tensors[:9]] == [0] * 9  # ordered by layer


def test_deltas_are_float32_from_the_stored_values(planted):
    plan = _plan(planted, "aligned", "ft")
    cks = plan.checkpoints
    info = plan.by_name()[Q]
    d = load_delta(DeltaSpec("t", cks["ft"], cks["aligned"]), info)
    assert d.dtype == torch.float32
    want = load_file(str(planted["ft"] / "model.safetensors"))[Q] - load_file(str(planted["aligned"] / "model.safetensors"))[Q]
    assert torch.equal(d, want)
    assert torch.allclose(d.double(), planted["dT"][Q], atol=TOL)


def test_sharded_checkpoints_with_and_without_index(planted, tmp_path):
    model, tok = build_tiny("llama", seed=0)
    _add(model, planted["dA"])
    sharded = _save(model, tok, tmp_path / "sharded", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    ck = open_checkpoint(sharded)
    assert len(ck.files) > 1 and sorted(ck.names) == sorted(open_checkpoint(planted["aligned"]).names)
    for source in (sharded, sharded / "model.safetensors.index.json"):
        plan = match_checkpoints({"aligned": open_checkpoint(source, label="aligned"),
                                  "ft": open_checkpoint(planted["ft"], label="ft")})
        cks = plan.checkpoints
        for info in plan.tensors:
            d = load_delta(DeltaSpec("t", cks["ft"], cks["aligned"]), info)
            want = planted["dT"].get(info.name)
            want = torch.zeros(d.shape, dtype=torch.float64) if want is None else want
            assert torch.allclose(d.double(), want, atol=TOL), info.name
    (sharded / "model.safetensors.index.json").unlink()  # shards without an index are read too
    assert sorted(open_checkpoint(sharded).names) == sorted(ck.names)


def test_bf16_checkpoints_give_exact_float32_deltas_and_bf16_projections(tmp_path):
    model, tok = build_tiny("llama", seed=0, dtype=torch.bfloat16)
    with torch.no_grad():
        model.state_dict()[Q][0, 0] = 0.0
    al = _save(model, tok, tmp_path / "al")
    with torch.no_grad():
        model.state_dict()[Q][0, 0] = 1e5  # beyond float16's range: a delta through fp16 would be inf
    ft = _save(model, tok, tmp_path / "ft")
    plan = match_checkpoints({"al": open_checkpoint(al, label="al"), "ft": open_checkpoint(ft, label="ft")})
    assert plan.by_name()[Q].dtype == "BF16"
    d = load_delta(DeltaSpec("t", plan.checkpoints["ft"], plan.checkpoints["al"]), plan.by_name()[Q])
    assert d.dtype == torch.float32 and float(d[0, 0]) == 99840.0  # bf16(1e5) = 99840; fp16 would give inf
    assert int((d != 0).sum()) == 1
    ref = DeltaReference(DeltaSpec("self", plan.checkpoints["ft"], plan.checkpoints["al"]))
    res = project_checkpoint(plan.checkpoints["al"], plan.checkpoints["ft"], ref,
                             ProjectionConfig("parallel", rho=0.5), tmp_path / "proj", progress=False)
    with safe_open(str(res.model_path / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert float(f.get_tensor(Q)[0, 0].float()) == 99840.0  # the update lies in its own top subspace


def test_mismatched_names_shapes_and_archs_fail_before_any_work(planted, tmp_path, monkeypatch):
    from weightspace import checkpoints as ckmod

    sd = load_file(str(planted["ft"] / "model.safetensors"))
    missing = tmp_path / "missing"
    missing.mkdir()
    save_file({k: v for k, v in sd.items() if k != DN}, str(missing / "model.safetensors"), metadata={"format": "pt"})
    (missing / "config.json").write_text((planted["ft"] / "config.json").read_text())
    small = _save(*build_tiny("llama", d_model=32), tmp_path / "small")
    gpt2 = _save(*build_tiny("gpt2"), tmp_path / "gpt2")

    def no_reads(*a, **k):
        raise AssertionError("a tensor was read before the checkpoints were validated")

    monkeypatch.setattr(ckmod.Checkpoint, "read", no_reads)
    monkeypatch.setattr(ckmod.Checkpoint, "read_rows", no_reads)
    al = open_checkpoint(planted["aligned"], label="aligned")
    ref = DeltaReference(DeltaSpec("alignment", al, open_checkpoint(planted["base"], label="base")))
    cases = {
        missing: [f"{DN}: missing in 'finetuned' (present in 'aligned', 'base')"],
        small: [f"{Q}: shape differs: [64, 64] in 'aligned', [32, 32] in 'finetuned', [64, 64] in 'base'",
                "21 difference(s)"],
        gpt2: ["model_type differs: 'llama' in 'aligned', 'gpt2' in 'finetuned', 'llama' in 'base'",
               "transformer.h.0.attn.c_attn.weight: missing in 'aligned', 'base' (present in 'finetuned')"],
    }
    for bad, needles in cases.items():
        out = tmp_path / f"out-{bad.name}"
        with pytest.raises(WorkbenchError) as e:
            project_checkpoint(al, open_checkpoint(bad, label="finetuned"), ref, ProjectionConfig(), out,
                               progress=False)
        for needle in needles:
            assert needle in str(e.value)
        assert "nothing was computed" in str(e.value)
        assert not out.exists()


def test_tied_lm_head_absent_in_some_checkpoints_is_left_out(tmp_path):
    model, tok = build_tiny("gemma3")  # tied: save_pretrained omits lm_head.weight
    al = _save(model, tok, tmp_path / "al")
    sd = load_file(str(al / "model.safetensors"))
    assert "lm_head.weight" not in sd
    ft = tmp_path / "ft"
    ft.mkdir()
    save_file(sd | {"lm_head.weight": sd["model.embed_tokens.weight"].clone()}, str(ft / "model.safetensors"))
    plan = match_checkpoints({"al": open_checkpoint(al, label="al"), "ft": open_checkpoint(ft, label="ft")})
    assert [s["name"] for s in plan.skipped] == ["lm_head.weight"]
    assert "lm_head.weight" not in plan.by_name()
    extra = tmp_path / "extra"
    extra.mkdir()
    save_file(sd | {"model.extra.weight": torch.zeros(2)}, str(extra / "model.safetensors"))
    with pytest.raises(WorkbenchError, match=r"model.extra.weight: missing in 'al' \(present in 'extra'\)"):
        match_checkpoints({"al": open_checkpoint(al, label="al"), "extra": open_checkpoint(extra, label="extra")})


def test_non_finite_values_are_rejected(planted, tmp_path):
    sd = load_file(str(planted["ft"] / "model.safetensors"))
    sd[DN][3, 5] = float("nan")
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(sd, str(bad / "model.safetensors"))
    plan = match_checkpoints({"aligned": open_checkpoint(planted["aligned"], label="aligned"),
                              "bad": open_checkpoint(bad, label="bad")})
    spec = DeltaSpec("t", plan.checkpoints["bad"], plan.checkpoints["aligned"])
    with pytest.raises(WorkbenchError, match=f"checkpoint 'bad': tensor {DN} has 1 non-finite"):
        update_overlap([spec, DeltaSpec("u", plan.checkpoints["aligned"], plan.checkpoints["bad"])], plan,
                       OverlapConfig(etas=(0.5,)), progress=False)


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), "x"])
def test_fractions_outside_0_1_are_rejected(bad):
    with pytest.raises(WorkbenchError, match=r"\(0, 1\]"):
        ProjectionConfig(rho=bad)
    with pytest.raises(WorkbenchError, match=r"\(0, 1\]"):
        OverlapConfig(etas=(0.5, bad))
    with pytest.raises(WorkbenchError, match=r"\(0, 1\]"):
        check_grid([0.25, bad], "rho")


def test_existing_output_folder_is_refused_unless_overwrite(planted, tmp_path):
    cks = _cks(planted, "aligned", "ft", "base")
    ref = DeltaReference(DeltaSpec("alignment", cks["aligned"], cks["base"]))
    out = tmp_path / "p"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(WorkbenchError, match="already exists"):
        project_checkpoint(cks["aligned"], cks["ft"], ref, ProjectionConfig(), out, progress=False)
    assert (out / "keep.txt").exists()
    with pytest.raises(WorkbenchError, match="not a workbench run folder"):  # not ours: never replaced
        project_checkpoint(cks["aligned"], cks["ft"], ref, ProjectionConfig(), out, overwrite=True, progress=False)
    assert (out / "keep.txt").read_text() == "x"
    res = project_checkpoint(cks["aligned"], cks["ft"], ref, ProjectionConfig(), tmp_path / "q", progress=False)
    assert res.path == tmp_path / "q" and res.model_path == tmp_path / "q" / "model" and res.model_path.is_dir()
    (tmp_path / "q" / "keep.txt").write_text("x")  # a run the workbench made may be replaced
    project_checkpoint(cks["aligned"], cks["ft"], ref, ProjectionConfig(), tmp_path / "q", overwrite=True,
                       progress=False)
    assert not (tmp_path / "q" / "keep.txt").exists() and (tmp_path / "q" / "model" / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- spectra and bases are the core's -----------------------------------------------------------------------

def test_cached_spectrum_bases_equal_the_core_functions():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(40, 24, generator=g, dtype=torch.float64) @ torch.diag(torch.linspace(3, 0.1, 24, dtype=torch.float64))
    for side in ("left", "right"):
        sp = spectrum_of(M, side=side)
        for rho in (0.1, 0.5, 1.0):
            for kind in ("topk", "randomk", "random"):
                mine = sp.rank_basis(rho, kind, seed=7)
                core = basis_by_rank_fraction(M, rho, side=side, kind=kind, seed=7)
                assert (mine.k, mine.kind, mine.indices) == (core.k, core.kind, core.indices)
                if kind == "random":  # nested across rho (issue #10), so not the core's per-k draw
                    V = mine.vectors
                    assert torch.allclose(V.T @ V, torch.eye(mine.k, dtype=V.dtype), atol=1e-12)
                    continue
                assert torch.equal(mine.vectors, core.vectors), (side, rho, kind)
                assert mine.energy == pytest.approx(core.energy, rel=1e-12, nan_ok=True)
        etas = [0.1, 0.5, 0.9, 0.99]
        core = bases_for_grid(M, etas, side=side)
        for e, b in sp.eta_bases(etas).items():
            assert b.k == core[e].k and torch.equal(b.vectors, core[e].vectors) and b.energy == core[e].energy


# -- metrics on planted structure ---------------------------------------------------------------------------

def test_overlap_recovers_planted_k_and_mso(planted):
    plan = _plan(planted, "aligned", "ft", "base")
    cks = plan.checkpoints
    specs = [DeltaSpec("alignment", cks["aligned"], cks["base"]), DeltaSpec("ft", cks["ft"], cks["aligned"])]
    etas = (0.5, 0.8, 0.9, 0.99)
    res = update_overlap(specs, plan, OverlapConfig(etas=etas), progress=False)
    k = {(r["tensor"], r["label"], r["eta"]): r["k"] for r in res.rank_rows}
    # Delta_A energies 16, 9, 4, 1 (of 30): k = 1, 2, 3, 4 at eta = .5, .8, .9, .99
    assert [k[(Q, "alignment", e)] for e in etas] == [1, 2, 3, 4] == [k[(DN, "alignment", e)] for e in etas]
    # Delta_T(q) energies 9, 4, 1 (of 14): k = 1, 2, 2, 3; Delta_T(down) 4, 2.25 (of 6.25): k = 1, 2, 2, 2
    assert [k[(Q, "ft", e)] for e in etas] == [1, 2, 2, 3]
    assert [k[(DN, "ft", e)] for e in etas] == [1, 2, 2, 2]
    mso = {(r["tensor"], r["eta"]): r for r in res.tensor_rows}
    # q: {a0}|{a0} -> 1; {a0,a1}|{a0,m} -> (1 + 1/2)/2; {a0,a1,a2}|{a0,m} -> 1.5/2; {a0..a3}|{a0,m,n0} -> 1.5/3
    assert [mso[(Q, e)]["mso"] for e in etas] == pytest.approx([1.0, 0.75, 0.75, 0.5], abs=TOL)
    # down: {a0}|{a2} -> 0; {a0,a1}|{a2,n2} -> 0; {a0,a1,a2}|{a2,n2} -> 1/2; {a0..a3}|{a2,n2} -> 1/2
    assert [mso[(DN, e)]["mso"] for e in etas] == pytest.approx([0.0, 0.0, 0.5, 0.5], abs=TOL)
    assert mso[(Q, 0.99)]["baseline"] == 4 / 64 and mso[(DN, 0.8)]["baseline"] == 2 / 64
    assert mso[(Q, 0.5)]["angle_max_deg"] == pytest.approx(0.0, abs=1e-3)
    assert mso[(DN, 0.5)]["angle_min_deg"] == pytest.approx(90.0, abs=1e-3)
    model = {r["eta"]: r for r in res.table.rows("model")}
    # pooled: sum ||Qa^T Qb||^2 / sum min(k): eta .8 -> (1.5 + 0) / (2 + 2); eta .99 -> (1.5 + 1) / (3 + 2)
    assert model[0.8]["mso_pooled"] == pytest.approx(0.375, abs=TOL)
    assert model[0.99]["mso_pooled"] == pytest.approx(0.5, abs=TOL)
    assert model[0.8]["baseline_pooled"] == pytest.approx((4 / 64 + 4 / 64) / 4)
    assert model[0.8]["mso_mean"] == pytest.approx(0.375, abs=TOL) and model[0.8]["n_tensors"] == 2
    layers = {r["group"]: r for r in res.table.rows("layer") if r["eta"] == 0.99}
    assert sorted(layers) == ["0", "1"]  # per layer really is per layer
    assert layers["0"]["mso_pooled"] == pytest.approx(0.5, abs=TOL) and layers["1"]["mso_pooled"] == pytest.approx(0.5, abs=TOL)
    assert {z["tensor"] for z in res.zero_updates} == {t.name for t in plan.tensors if t.is_matrix} - {Q, DN}
    assert res.spectra[f"alignment|{Q}"][:4].tolist() == pytest.approx([4, 3, 2, 1], abs=TOL)


def test_flattened_cosine_is_pooled_over_tensors_by_hand(planted, tmp_path):
    al = load_file(str(planted["aligned"] / "model.safetensors"))
    K = "model.layers.0.self_attn.k_proj.weight"
    paths = {}
    for name, edits in {"x": {(Q, 0, 0): 3.0, (Q, 1, 1): 4.0, (K, 0, 0): 1.0},
                        "y": {(Q, 0, 0): 1.0, (K, 0, 0): 2.0, (K, 2, 2): 2.0}}.items():
        sd = {k: v.clone() for k, v in al.items()}
        for (t, i, j), v in edits.items():
            sd[t][i, j] += v
        paths[name] = tmp_path / name
        paths[name].mkdir()
        save_file(sd, str(paths[name] / "model.safetensors"))
    cks = {"aligned": open_checkpoint(planted["aligned"], label="aligned")}
    cks |= {n: open_checkpoint(p, label=n) for n, p in paths.items()}
    plan = match_checkpoints(cks)
    specs = [DeltaSpec(n, cks[n], cks["aligned"]) for n in ("x", "y")]
    res = update_overlap(specs, plan, OverlapConfig(etas=(0.5,)), progress=False)
    # <x, y> = 3*1 + 1*2 = 5; ||x||^2 = 9 + 16 + 1 = 26; ||y||^2 = 1 + 4 + 4 = 9  (not the mean of 3/5 and 2/sqrt 8)
    assert res.cosines.value("x~y") == pytest.approx(5 / (math.sqrt(26) * 3), rel=1e-5)
    assert res.cosines.value("x~y", "tensor", Q) == pytest.approx(3 / 5, rel=1e-5)
    assert res.cosines.value("x~y", "module", "k") == pytest.approx(2 / math.sqrt(8), rel=1e-5)


# -- projection ----------------------------------------------------------------------------------------------

def _project(planted, out, **kw):
    cks = _cks(planted, "aligned", "ft", "base")
    ref = DeltaReference(DeltaSpec("alignment", cks["aligned"], cks["base"]))
    return project_checkpoint(cks["aligned"], cks["ft"], ref, ProjectionConfig(**kw), out, progress=False)


def test_projection_energy_kept_is_exact(planted, tmp_path):
    # rho = 4/64 -> k = 4 -> P = span(a0..a3). q: (9 + 4/2 + 0) / 14; down: 4 / 6.25; norm (rank-1 on v): 1 / 1.25
    res = _project(planted, tmp_path / "p", mode="parallel", rho=4 / 64, kind="topk")
    mods = {r["group"]: r for r in res.energy.rows("module")}
    assert mods["q"]["energy_kept"] == pytest.approx(11 / 14, abs=TOL)
    assert mods["down"]["energy_kept"] == pytest.approx(0.64, abs=TOL)
    assert mods["norm"]["energy_kept"] == pytest.approx(0.8, abs=TOL)
    layers = {r["group"]: r for r in res.energy.rows("layer")}
    assert layers["0"]["energy_kept"] == pytest.approx((11 + 1) / (14 + 1.25), abs=TOL)
    assert layers["1"]["energy_kept"] == pytest.approx(0.64, abs=TOL)
    s = res.energy.summary()
    assert s["energy_kept"] == pytest.approx(16 / 21.5, abs=TOL)
    assert s["energy_random"] == pytest.approx((4 / 64 * 14 + 4 / 64 * 6.25 + 1 / 64 * 1.25) / 21.5, abs=TOL)
    recs = {r.name: r for r in res.records}
    assert (recs[Q].k, recs[Q].d, recs[Q].operator, recs[NORM].operator) == (4, 64, "basis", "rank1")
    assert recs[Q].ref_energy == pytest.approx(1.0, abs=TOL)
    assert recs[O0].operator == "zero"  # no reference update there: P = 0
    report = json.loads((res.path / "report.json").read_text())
    assert report["energy_kept"]["energy_kept"] == pytest.approx(16 / 21.5, abs=TOL)
    for f in ("energy.csv", "tensors.csv", "cosine.csv", "energy_by_layer.png", "energy_by_module.png"):
        assert (res.path / f).stat().st_size > 0


def test_parallel_plus_orthogonal_is_the_full_update_and_loads_with_transformers(planted, tmp_path):
    from transformers import AutoModelForCausalLM

    par = _project(planted, tmp_path / "par", mode="parallel", rho=4 / 64)
    orth = _project(planted, tmp_path / "orth", mode="orthogonal", rho=4 / 64)
    opp = _project(planted, tmp_path / "opp", mode="opposite", rho=4 / 64)
    A = load_file(str(planted["aligned"] / "model.safetensors"))
    T = load_file(str(planted["ft"] / "model.safetensors"))
    P = load_file(str(par.model_path / "model.safetensors"))
    O = load_file(str(orth.model_path / "model.safetensors"))
    N = load_file(str(opp.model_path / "model.safetensors"))
    U = torch.stack(planted["a"], dim=1)  # P = U U^T
    for k in A:
        assert torch.allclose(P[k] + O[k] - A[k], T[k], atol=TOL), k
        assert torch.allclose(P[k] - A[k], A[k] - N[k], atol=TOL), k
    dq = (T[Q] - A[Q]).double()
    assert torch.allclose(P[Q].double(), A[Q].double() + U @ (U.T @ dq), atol=TOL)
    m = AutoModelForCausalLM.from_pretrained(str(par.model_path))
    sd = m.state_dict()
    for k in A:
        assert torch.equal(sd[k], P[k]), k
    assert torch.allclose(sd[DN].double(), A[DN].double() + U @ (U.T @ (T[DN] - A[DN]).double()), atol=TOL)


def test_right_side_reference_projects_in_the_input_space(planted, tmp_path):
    cks = _cks(planted, "aligned", "ft", "base")
    ref = DeltaReference(DeltaSpec("alignment", cks["aligned"], cks["base"]), side="right")
    res = project_checkpoint(cks["aligned"], cks["ft"], ref, ProjectionConfig("parallel", rho=4 / 64),
                             tmp_path / "r", progress=False)
    recs = {r.name: r for r in res.records}
    dT, rq, rd = planted["dT"], planted["rq"], planted["rd"]  # right TopK-4 space of Delta_A: span(rows of rq / rd)
    assert (recs[Q].k, recs[Q].d, recs[DN].k, recs[DN].d) == (4, 64, 4, 128)
    assert recs[Q].kept == pytest.approx(float(((dT[Q] @ rq.T) ** 2).sum()), abs=TOL)
    assert recs[DN].kept == pytest.approx(float(((dT[DN] @ rd.T) ** 2).sum()), abs=TOL)
    assert recs[DN].total == pytest.approx(6.25, abs=TOL)
    P = load_file(str(res.model_path / "model.safetensors"))
    A = load_file(str(planted["aligned"] / "model.safetensors"))
    assert torch.allclose(P[DN].double(), A[DN].double() + dT[DN] @ rd.T @ rd, atol=TOL)


def test_layer_range_and_random_controls_are_seeded(planted, tmp_path):
    res = _project(planted, tmp_path / "l1", mode="parallel", rho=4 / 64, selection=Selection.parse("1", None, n_layers=2))
    A = load_file(str(planted["aligned"] / "model.safetensors"))
    T = load_file(str(planted["ft"] / "model.safetensors"))
    P = load_file(str(res.model_path / "model.safetensors"))
    assert torch.equal(P[Q], T[Q]) and torch.equal(P[NORM], T[NORM])  # layer 0 untouched: fine-tuned weights
    assert not torch.allclose(P[DN], T[DN], atol=1e-3)
    assert res.energy.summary()["energy_kept"] == pytest.approx(0.64, abs=TOL)
    sha = {}
    for name, seed in (("r0", 0), ("r0b", 0), ("r1", 1)):
        r = _project(planted, tmp_path / name, mode="parallel", rho=0.25, kind="random", seed=seed)
        sha[name] = r.report["model"]["sha256"]
    assert sha["r0"] == sha["r0b"] != sha["r1"]
    rk = _project(planted, tmp_path / "rk", mode="parallel", rho=0.25, kind="randomk")
    recs = {r.name: r for r in rk.records}
    assert recs[Q].k == 16 and 0 <= recs[Q].energy_kept <= 1
    assert torch.equal(load_file(str(rk.model_path / "model.safetensors"))["model.norm.weight"], A["model.norm.weight"])


def test_safelora_operator(planted, tmp_path):
    res = _project(planted, tmp_path / "s", mode="parallel", operator="safelora")
    A = load_file(str(planted["aligned"] / "model.safetensors"))
    T = load_file(str(planted["ft"] / "model.safetensors"))
    P = load_file(str(res.model_path / "model.safetensors"))
    V = planted["dA"][Q]
    D = (T[Q] - A[Q]).double()
    want = A[Q].double() + V @ (V.T @ D) / torch.linalg.matrix_norm(V)
    assert torch.allclose(P[Q].double(), want, atol=1e-4)
    assert {r.name: r for r in res.records}[Q].operator == "safelora"


# -- activation-direction references -------------------------------------------------------------------------

def test_direction_reference_planted_update_inside_the_span_keeps_all_energy(planted, tmp_path):
    from workbench.vectors import Direction, save_directions

    r = planted["n"][3].float()
    path = save_directions(tmp_path / "dirs.safetensors",
                           [Direction(r * 5, layer=0, method="mean_diff", model_id="tiny", model_checksum="x", d_model=64)])
    model, tok = build_tiny("llama", seed=0)
    _add(model, planted["dA"])
    w = _orthonormal(64, 1, seed=9)[:, 0]
    _add(model, {O0: 3 * torch.outer(r.double(), w)})
    ft = _save(model, tok, tmp_path / "ft_dir")
    ref = DirectionReference.from_file(str(path), layer=0)
    al = open_checkpoint(planted["aligned"], label="aligned")
    res = project_checkpoint(al, open_checkpoint(ft, label="ft"), ref, ProjectionConfig("orthogonal"),
                             tmp_path / "pd", progress=False)
    # orthogonal mode: E_k is the energy of the update written, (I - P) D = 0 here (issue #10); P D kept it all
    assert res.energy.summary()["energy_kept"] == pytest.approx(0.0, abs=TOL)
    assert res.report["energy_kept_unrounded"]["energy_kept"] == pytest.approx(0.0, abs=TOL)
    recs = {x.name: x for x in res.records}
    assert recs[O0].selected and recs[O0].k == 1 and recs[O0].energy_random == 1 - 1 / 64
    assert not recs["model.layers.0.self_attn.k_proj.weight"].selected  # output width 32 != d_model
    assert recs["model.embed_tokens.weight"].selected and recs[Q].selected  # width-matched (q: 4 x 16 = 64)
    P = load_file(str(res.model_path / "model.safetensors"))
    A = load_file(str(planted["aligned"] / "model.safetensors"))
    assert torch.allclose(P[O0], A[O0], atol=TOL)  # orthogonal filtering removed the whole update
    writers = DirectionReference.from_file(str(path), residual_only=True)
    plan = _plan(planted, "aligned", "ft")
    assert {t.module for t in plan.tensors if writers.covers(t)} == {"embed", "o", "down"}
    with pytest.raises(WorkbenchError, match="RandomK needs a reference update"):
        project_checkpoint(al, open_checkpoint(ft, label="ft"), ref, ProjectionConfig(kind="randomk"),
                           tmp_path / "pk", progress=False)


def test_gpt2_conv1d_is_analysed_as_out_by_in(tmp_path):
    model, tok = build_tiny("gpt2")
    al = _save(model, tok, tmp_path / "al")
    r = _orthonormal(64, 1, seed=3)[:, 0]
    w = _orthonormal(128, 1, seed=4)[:, 0]
    name = "transformer.h.1.mlp.c_proj.weight"  # Conv1D stored [in=128, out=64]
    _add(model, {name: 2 * torch.outer(w, r)})  # writes along r in the output (residual) space
    ft = _save(model, tok, tmp_path / "ft")
    plan = match_checkpoints({"al": open_checkpoint(al, label="al"), "ft": open_checkpoint(ft, label="ft")})
    info = plan.by_name()[name]
    assert plan.conv1d and info.stored_shape == (128, 64) and info.shape == (64, 128) and info.module == "down"
    assert plan.by_name()["transformer.h.0.attn.c_attn.weight"].shape == (192, 64)
    assert load_f32(plan.checkpoints["al"], info).shape == (64, 128)
    ref = DirectionReference(r)
    res = project_checkpoint(plan.checkpoints["al"], plan.checkpoints["ft"], ref, ProjectionConfig("parallel"),
                             tmp_path / "p", progress=False)
    assert res.energy.summary()["energy_kept"] == pytest.approx(1.0, abs=TOL)
    from transformers import AutoModelForCausalLM

    sd = AutoModelForCausalLM.from_pretrained(str(res.model_path)).state_dict()
    assert torch.allclose(sd[name], load_file(str(ft / "model.safetensors"))[name], atol=TOL)


# -- CLI -----------------------------------------------------------------------------------------------------

def _parser():
    from weightspace.cli import register

    ap = argparse.ArgumentParser(prog="workbench")
    register(ap.add_subparsers(dest="command", required=True))
    return ap


def test_cli_overlap_and_project(planted, tmp_path, capsys):
    ap = _parser()
    out = tmp_path / "ov"
    args = ap.parse_args(["weightspace", "overlap", "--aligned", str(planted["aligned"]), "--base", str(planted["base"]),
                          "--model", f"ft={planted['ft']}", "--etas", "0.5,0.99", "--plot-eta", "0.99",
                          "--out", str(out), "--no-progress"])
    assert run_command(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mso"]["alignment~ft"]["0.99"]["mso_pooled"] == pytest.approx(0.5, abs=TOL)
    for f in ("overlap_tensors.csv", "overlap_groups.csv", "ranks.csv", "cosine.csv", "spectra.safetensors",
              "principal_angles.safetensors", "mso_vs_eta.png", "heatmap_alignment_vs_ft_eta0.99.png",
              "pairs_eta0.99.png", "spectra.png", "config.json", "environment.json"):
        assert (out / f).stat().st_size > 0, f
    assert "alignment~ft" in capsys.readouterr().out
    args = ap.parse_args(["weightspace", "project", "--aligned", str(planted["aligned"]), "--finetuned", str(planted["ft"]),
                          "--reference-base", str(planted["base"]), "--rho", "0.0625", "--mode", "orthogonal",
                          "--out", str(tmp_path / "pj"), "--no-progress"])
    assert run_command(args) == 0
    rep = json.loads((tmp_path / "pj" / "report.json").read_text())
    # orthogonal mode: the written update (I - P) D keeps 1 - 16 / 21.5 of the energy (issue #10; P D: 16 / 21.5)
    assert rep["energy_kept"]["energy_kept"] == pytest.approx(5.5 / 21.5, abs=TOL)
    assert "energy kept E_k = 0.2558" in capsys.readouterr().out


def test_cli_registers_the_finetune_hook_and_reports_errors(planted, tmp_path, monkeypatch, capsys):
    import weightspace.cli as wcli
    import workbench.cli as core

    ap = _parser()
    names = ap._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert "weightspace" in names and "finetune" in names
    monkeypatch.setattr(core, "_plugins", lambda: [wcli])
    rc = core.main(["weightspace", "project", "--aligned", str(planted["aligned"]), "--finetuned", str(planted["ft"]),
                    "--reference-base", str(planted["base"]), "--rho", "1.5", "--out", str(tmp_path / "x")])
    assert rc == 2 and "rho must be in (0, 1], got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
