"""The main job's optimised-ablation fast path (``workbench main --optimize-trials N``) on a tiny model: the
stage runs, writes a ``steer optimize``-like folder the app can read, is timed in ``stage_times.json``, and its
kernel is evaluated beside the selected direction on the same prompts; off by default, where the outputs are
those of the main job without the stage. And the job's float32 linear kernels (``--linear``): oneDNN by default,
with the replies and numbers of PyTorch's default BLAS."""

from __future__ import annotations

import csv
import doctest
import json
from pathlib import Path

import pytest
import torch

import steering.optimize_stage
from steering.kernel import load_kernel_ablation, read_kernel_meta

ORIGINAL = ["unmodified", "ablation", "addition", "random ablation", "random addition"]


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _untimed(x):
    """``x`` without its timings (every key naming seconds)."""
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if "seconds" not in k}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


def _main(out: Path, *extra: str) -> Path:
    from workbench.cli import build_parser, run_command

    args = build_parser().parse_args(["--threads", "1", "main", "--model", "tiny", "--quick", "--skip", "probes",
                                      "--out", str(out), *extra])
    assert run_command(args) == 0
    return out


@pytest.fixture
def tiny_main(tmp_cache, monkeypatch):
    """An 8-layer tiny Llama (the quick selection's candidates: layers 0 and 4) as the main job's model."""
    import workbench.cli
    from workbench.loading import from_memory
    from workbench.tiny import build_tiny

    lm = from_memory(*build_tiny("llama", n_layers=8), model_id="tiny-llama-8")
    monkeypatch.setattr(workbench.cli, "load_from_args", lambda args: lm)
    return lm


def test_fast_path_runs_writes_its_files_and_is_evaluated_beside_the_direction(tiny_main, tmp_path):
    lm = tiny_main
    off = _main(tmp_path / "off")
    on = _main(tmp_path / "on", "--optimize-trials", "3")
    # default off: no stage, no folder, no extra conditions
    times_off = json.loads((off / "stage_times.json").read_text())
    assert [t["stage"] for t in times_off["stages"]] == ["load_model", "core", "probes", "steering"]
    assert not (off / "optimize").exists()
    assert [r["condition"] for r in _csv(off / "steering" / "evaluation.csv")] == ORIGINAL
    assert not any(k.startswith("optimised") for k in json.loads((off / "steering" / "acceptance.json").read_text()))
    # on: the stage is timed, before steering
    times_on = json.loads((on / "stage_times.json").read_text())
    stages = {t["stage"]: t for t in times_on["stages"]}
    assert [t["stage"] for t in times_on["stages"]] == ["load_model", "core", "probes", "optimize", "steering"]
    assert stages["optimize"]["status"] == "ran" and stages["optimize"]["seconds"] > 0
    # ... its folder holds a steer-optimize-like run the app reads
    opt = on / "optimize"
    for name in ("chosen_ablation.safetensors", "trials.csv", "pareto.csv", "optimize.json", "pareto.png",
                 "directions.safetensors", "model.json", "config.json"):
        assert (opt / name).is_file(), name
    trials = _csv(opt / "trials.csv")
    assert len(trials) == 3 and sum(r["chosen"] == "True" for r in trials) == 1
    summary = json.loads((opt / "optimize.json").read_text())
    assert summary["n_trials"] == 3 and summary["n_val"] == [8, 8] and summary["kl_max"] == 0.2
    ka = load_kernel_ablation(opt / "chosen_ablation.safetensors")
    meta = read_kernel_meta(opt / "chosen_ablation.safetensors")
    assert ka.direction.model_checksum == lm.checksum and meta["n_layers"] == lm.n_layers
    assert meta["trial"] == summary["chosen"]["number"]
    assert meta["kl_upper"] == pytest.approx(summary["chosen"]["kl_upper"])
    assert 1.4 <= ka.direction.meta["direction_index"] <= 6.3  # 0.2 .. 0.9 of the depth (layers 0 .. 7)
    from apps.optimised import find_optimised_runs

    assert find_optimised_runs(tmp_path) == [opt.resolve()]
    # ... and the chosen kernel is evaluated beside the selected direction, on the same prompts, with the same metrics
    ev_on = _csv(on / "steering" / "evaluation.csv")
    assert [r["condition"] for r in ev_on] == ORIGINAL + ["optimised ablation", "random optimised ablation"]
    ev_off = _csv(off / "steering" / "evaluation.csv")
    same = [k for k in ev_off[0] if k in ev_on[0]]
    assert set(ev_off[0]) <= set(ev_on[0])
    for a, b in zip(ev_off, ev_on):  # the original conditions' numbers do not move
        assert {k: a[k] for k in same} == {k: b[k] for k in same}, a["condition"]
    by = {r["condition"]: r for r in ev_on}
    assert by["optimised ablation"]["info_trial"] == str(meta["trial"])
    assert by["optimised ablation"]["n_harmful"] == by["ablation"]["n_harmful"] == "8"
    per = _csv(on / "steering" / "per_prompt.csv")
    prompts = {c: [r["prompt"] for r in per if r["condition"] == c and r["set"] == "harmful"] for c in by}
    assert prompts["optimised ablation"] == prompts["ablation"] == prompts["unmodified"]
    acc = json.loads((on / "steering" / "acceptance.json").read_text())
    base, o = by["unmodified"], by["optimised ablation"]
    assert acc["optimised_ablation_refusal_drop_pp"] == pytest.approx(
        100 * (float(base["harmful_refusal_rate"]) - float(o["harmful_refusal_rate"])))
    assert acc["optimised_ablation_kl"] == pytest.approx(float(o["kl_harmless"]))
    assert acc["optimised_trial"] == meta["trial"]
    from apps.state import find_main_job  # the app's main-job note shows the kernel's row too

    assert f"optimised ablation (main job, trial {meta['trial']})" in find_main_job(on).summary()


def test_default_off_leaves_the_outputs_unchanged(tiny_main, tmp_path, monkeypatch):
    """--optimize-trials 0 writes what the main job writes without the stage at all (the stage removed from the
    plugin list), file by file: same files, same tables, same directions (timings and the config aside)."""
    import workbench.cli
    from safetensors.torch import load_file

    off = _main(tmp_path / "off")
    real = workbench.cli.plugin_stages
    monkeypatch.setattr(workbench.cli, "plugin_stages",
                        lambda: [s for s in real() if s[2] is not steering.optimize_stage.optimize_stage])
    without = _main(tmp_path / "without")
    files = sorted(str(p.relative_to(off)) for p in off.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(without)) for p in without.rglob("*") if p.is_file())
    timing = {"stage_times.json", "environment.json", "config.json", "workbench_run.json"}
    for rel in files:
        a, b = off / rel, without / rel
        if Path(rel).name in timing or rel.endswith(".png"):
            continue
        if rel.endswith(".safetensors"):
            ta, tb = load_file(str(a)), load_file(str(b))
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), rel
        elif rel.endswith(".csv"):
            assert _untimed(_csv(a)) == _untimed(_csv(b)), rel
        elif rel.endswith(".json"):
            assert _untimed(json.loads(a.read_text())) == _untimed(json.loads(b.read_text())), rel
    cfg = json.loads((off / "config.json").read_text())
    assert cfg["optimize_trials"] == 0  # the one new key: the option's value
    t_off, t_wo = (json.loads((p / "stage_times.json").read_text()) for p in (off, without))
    assert [t["stage"] for t in t_off["stages"]] == [t["stage"] for t in t_wo["stages"]]


def test_stage_helpers_and_option():
    from workbench.cli import build_parser

    res = doctest.testmod(steering.optimize_stage, optionflags=doctest.ELLIPSIS)
    assert res.failed == 0 and res.attempted >= 2
    ap = build_parser()
    assert ap.parse_args(["main"]).optimize_trials == 0
    assert ap.parse_args(["main", "--optimize-trials", "20"]).optimize_trials == 20
    with pytest.raises(SystemExit):
        ap.parse_args(["main", "--optimize-trials", "-1"])
    assert steering.optimize_stage.kernel_conditions(None, 4, 0) == []
    from workbench.errors import WorkbenchError

    with pytest.raises(WorkbenchError, match="at least 2 layers"):
        steering.optimize_stage.index_fractions(1)


def test_main_job_linear_kernels_give_the_default_blas_results(tiny_main, tmp_path):
    fast = _main(tmp_path / "fast")
    plain = _main(tmp_path / "plain", "--linear", "default")
    from workbench.kernels import onednn_linear_available

    assert json.loads((fast / "stage_times.json").read_text())["linear"] == "onednn"
    assert onednn_linear_available()
    assert json.loads((plain / "stage_times.json").read_text())["linear"] == "default"
    a, b = _csv(fast / "steering" / "per_prompt.csv"), _csv(plain / "steering" / "per_prompt.csv")
    assert len(a) == len(b) > 0
    assert [r["completion"] for r in a] == [r["completion"] for r in b]
    for x, y in zip(a, b):
        for k in ("refusal_logit", "kl_last"):
            if x[k] and y[k]:
                assert float(x[k]) == pytest.approx(float(y[k]), rel=1e-4, abs=1e-5), k
    ea, eb = json.loads((fast / "steering" / "acceptance.json").read_text()), \
        json.loads((plain / "steering" / "acceptance.json").read_text())
    assert ea["selected_layer"] == eb["selected_layer"] and ea["selected_position"] == eb["selected_position"]
