"""Experiments 1 and 2 (``weightspace sweep``) end to end on a tiny planted model, and the benchmark helpers.

aligned = base + Delta_A with ``Delta_A(q, layer 0)`` of rank 4 (left space ``span(a0..a3)``); the fine-tunes:
useful = aligned + ``2 a0 s0^T + 1 n0 s1^T`` on q (E_k at k = 4: 4/5), harmful = aligned + ``3 n1 u0^T + 1 a3 u1^T``
on q (E_k: 1/10), contaminated = aligned + both.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from workbench.runs import RunFolder
from workbench.tiny import build_tiny

from weightspace.checkpoints import open_checkpoint
from weightspace.deltas import DeltaSpec
from weightspace.evaluation import EvalConfig
from weightspace.projection import ProjectionConfig, project_checkpoint
from weightspace.reference import DeltaReference, DirectionReference
from weightspace.sweep import SweepConfig, run_sweep

Q = "model.layers.0.self_attn.q_proj.weight"
TOL = 1e-5


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    F = _orthonormal(64, 64, 1)
    R = _orthonormal(64, 8, 2).T
    dA = sum(s * torch.outer(F[:, i], R[i]) for i, s in enumerate([4.0, 3.0, 2.0, 1.0]))
    du = 2 * torch.outer(F[:, 0], R[4]) + 1 * torch.outer(F[:, 4], R[5])
    dh = 3 * torch.outer(F[:, 5], R[6]) + 1 * torch.outer(F[:, 3], R[7])
    out = {}
    for name, upd in {"base": 0, "aligned": dA, "useful": dA + du, "harmful": dA + dh, "contaminated": dA + du + dh}.items():
        model, tok = build_tiny("llama", seed=0)
        with torch.no_grad():
            model.state_dict()[Q].add_(torch.as_tensor(upd, dtype=torch.float64).float())
        model.save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
        out[name] = root / name
    out["dirs_vec"] = F[:, 5]
    return out


def _ck(models, name):
    return open_checkpoint(models[name], label=name)


def test_sweep_experiments_1_and_2(models, tmp_path, empty_cache, monkeypatch):
    import weightspace.sweep as sweep_mod
    from workbench.loading import load_model

    captured = []
    real = sweep_mod.score_model

    def spy(backend, *a, **k):
        captured.append({n: p.detach().clone() for n, p in backend.lm.model.state_dict().items()})
        return real(backend, *a, **k)

    monkeypatch.setattr(sweep_mod, "score_model", spy)
    al = _ck(models, "aligned")
    ref = DeltaReference(DeltaSpec("alignment", al, _ck(models, "base")))
    roles = {r: _ck(models, r) for r in ("useful", "harmful", "contaminated")}
    ev = EvalConfig(n_harmful=2, n_tasks=2, max_new_tokens=3, task_tokens=2, batch_size=2)
    cfg = SweepConfig(rhos=(4 / 64, 0.5), eval=ev)
    lm = load_model(str(models["aligned"]))
    before = {n: p.clone() for n, p in lm.model.state_dict().items()}
    run = RunFolder(tmp_path / "sw", config={"test": True})
    res = run_sweep(al, ref, roles, cfg, run, lm=lm, progress=False)

    assert len(res.rows) == 3 * 2 * 3 and len(captured) == 4 + len(res.rows)  # 4 baselines, then the grid
    rows = {r["config"]: r for r in res.rows}
    u = rows["exp1-useful-topk-rho0.0625"]
    assert u["energy_kept"] == pytest.approx(4 / 5, abs=TOL) and u["energy_random"] == pytest.approx(4 / 64)
    assert "utility_accuracy" in u and "harm_compliance_phrase" not in u
    h = rows["exp1-harmful-topk-rho0.0625"]
    assert h["energy_kept"] == pytest.approx(1 / 10, abs=TOL) and "utility_accuracy" not in h
    assert {"harm_compliance_phrase", "harm_refusal_logit_mean"} <= set(h)
    c = rows["exp2-contaminated-topk-rho0.0625"]
    # orthogonal mode: E_k is the energy of the update written, (I - P) D: (1 + 9) / 15 (issue #10; P D: 5 / 15)
    assert c["mode"] == "orthogonal" and c["energy_kept"] == pytest.approx((1 + 9) / (5 + 10), abs=TOL)
    assert {"utility_accuracy", "harm_compliance_phrase", "harm_refusal_logit_mean"} <= set(c)
    assert set(res.baselines) == {"aligned", "useful (full update)", "harmful (full update)",
                                  "contaminated (full update)"}

    # The in-memory model scored for a config is exactly the checkpoint `project` writes for it.
    idx = 4 + list(rows).index("exp2-contaminated-topk-rho0.0625")
    proj = project_checkpoint(al, roles["contaminated"], ref, ProjectionConfig("orthogonal", rho=4 / 64),
                              tmp_path / "pj", progress=False)
    written = load_file(str(proj.model_path / "model.safetensors"))
    for name, w in written.items():
        assert torch.equal(captured[idx][name], w), name
    ft = load_file(str(models["contaminated"] / "model.safetensors"))
    assert torch.equal(captured[3]["model.layers.0.self_attn.q_proj.weight"], ft[Q])  # baseline: full update
    for n, p in lm.model.state_dict().items():  # the caller's model comes back as aligned
        assert torch.equal(p, before[n]), n

    out = run.path
    data = json.loads((out / "results.json").read_text())
    assert data["scorers"]["harm_compliance_phrase"].startswith("refusal_phrase")
    assert data["scorers"]["harm_refusal_logit_mean"].startswith("refusal_logit")
    with open(out / "evals" / "exp2-contaminated-topk-rho0.0625" / "harmful.csv") as f:
        hr = list(csv.DictReader(f))
    assert len(hr) == 2 and set(hr[0]) == {"prompt", "completion", "refusal_phrase", "refusal_logit"}
    with open(out / "evals" / "exp1-useful-random-rho0.5" / "utility.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    for f in ("results.csv", "baselines.csv", "energy.csv", "paired.csv", "exp1_parallel.png",
              "exp2_tradeoff_phrase.png", "exp2_tradeoff_logit.png"):
        assert (out / f).stat().st_size > 0, f
    # every sweep point carries a 95 % interval per metric; the compliance interval mirrors the refusal interval
    for r in res.rows:
        for m in ("utility_accuracy", "utility_answer_nll", "harm_compliance_phrase", "harm_refusal_logit_mean"):
            if m in r:
                assert r[m + "_lo"] - 1e-12 <= r[m] <= r[m + "_hi"] + 1e-12, (r["config"], m)
        if "harm_compliance_phrase" in r:
            assert r["harm_compliance_phrase_lo"] == pytest.approx(1 - r["harm_refusal_rate_phrase_hi"])
    # TopK vs each control at each rho, paired over the same items: the mean difference recomputed from the CSVs
    paired = data["paired"]
    assert {(p["experiment"], p["model"], p["rho"], p["kind_b"]) for p in paired} == {
        (e, m, rho, k) for e, m in (("exp1", "useful"), ("exp1", "harmful"), ("exp2", "contaminated"))
        for rho in (0.0625, 0.5) for k in ("randomk", "random")}
    assert all(p["verdict"] in ("higher", "lower", "no difference") for p in paired)
    p = next(p for p in paired if p["config_a"] == "exp2-contaminated-topk-rho0.5" and p["kind_b"] == "random"
             and p["metric"] == "harm_refusal_logit_mean")

    def col(cid, name, column):
        with open(out / "evals" / cid / f"{name}.csv") as f:
            return [float(r[column]) for r in csv.DictReader(f)]

    a, b = col(p["config_a"], "harmful", "refusal_logit"), col(p["config_b"], "harmful", "refusal_logit")
    assert p["mean_diff"] == pytest.approx(sum(x - y for x, y in zip(a, b)) / len(a), abs=1e-6)
    assert p["n"] == 2 and p["ci_lo"] <= p["mean_diff"] <= p["ci_hi"]
    with open(out / "paired.csv") as f:
        assert len(list(csv.DictReader(f))) == len(paired)


def test_sweep_with_directions_and_validation(models, tmp_path, empty_cache):
    from workbench.errors import WorkbenchError
    from workbench.loading import load_model

    al = _ck(models, "aligned")
    ref = DirectionReference(models["dirs_vec"].float())
    roles = {"harmful": _ck(models, "harmful")}
    ev = EvalConfig(n_harmful=1, n_tasks=1, max_new_tokens=2, task_tokens=2, batch_size=1)
    with pytest.raises(WorkbenchError, match="RandomK needs a reference update"):
        run_sweep(al, ref, roles, SweepConfig(eval=ev), None, check_only=True)  # type: ignore[arg-type]
    with pytest.raises(WorkbenchError, match="unknown roles"):
        run_sweep(al, ref, {"other": al}, SweepConfig(eval=ev), None, check_only=True)  # type: ignore[arg-type]
    run = RunFolder(tmp_path / "d", config={})
    res = run_sweep(al, ref, roles, SweepConfig(kinds=("topk", "random"), eval=ev), run,
                    lm=load_model(str(models["aligned"])), progress=False)
    rows = {r["config"]: r for r in res.rows}
    assert set(rows) == {"exp1-harmful-topk", "exp1-harmful-random"}
    # the harmful update on q is 3 n1 u0^T + 1 a3 u1^T and the direction is n1: E_k = 9/10 on q (q has width 64)
    assert rows["exp1-harmful-topk"]["energy_kept"] == pytest.approx(0.9, abs=TOL)
    assert rows["exp1-harmful-topk"]["rho"] is None


@pytest.mark.parametrize("task", ["code", "arithmetic"])
def test_answer_nll_utility_equals_a_manual_teacher_forced_nll(task):
    """The continuous utility score is the mean over tasks of the per-token NLL of each reference answer
    (the solution in a python block for code tasks, the number for arithmetic), computed padding-aware."""
    from workbench.backends import get_backend
    from workbench.chat import ChatFormat, encode
    from workbench.loading import from_memory
    from weightspace.evaluation import EvalSets, score_model

    lm = from_memory(*build_tiny("qwen2"))
    be = get_backend("native", lm)
    cfg = EvalConfig(n_harmful=1, n_tasks=3, max_new_tokens=2, task_tokens=2, batch_size=2, utility_task=task)
    sets = EvalSets.default(cfg)
    metrics, rows = score_model(be, sets, ChatFormat(), cfg, harm=False)
    per_item = []
    for t in sets.tasks:  # one prompt at a time, no padding: the reference
        prompt, answer = (t.prompt, t.reference_reply) if task == "code" else (t.text, str(t.answer))
        b = encode(lm.tokenizer, [prompt], ChatFormat())
        ans = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids = torch.cat([b.input_ids[0], torch.tensor(ans)]).unsqueeze(0)
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(ids).logits.float(), -1)[0]
        n = b.input_ids.shape[1]
        per_item.append(-sum(float(logp[n - 1 + i, t]) for i, t in enumerate(ans)) / len(ans))
    assert metrics["utility_answer_nll"] == pytest.approx(sum(per_item) / len(per_item), rel=1e-4)
    assert [r["answer_nll"] for r in rows["utility"]] == pytest.approx(per_item, rel=1e-4)
    assert len(rows["utility"]) == 3 and all("answer_nll" in r for r in rows["utility"])
