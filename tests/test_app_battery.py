"""The app's "score this setting" batteries, the main job's direction as the default, and the Study tab.

- ``/score`` through ``gradio_client`` returns, for each column, the same numbers as ``workbench steer battery``
  (a subprocess, the console script) on the same model, direction, setting and prompts;
- a second ``/score`` of the same setting comes from the cache;
- ``/score`` running at the same time as ``/steer`` changes neither (no shared hooks);
- a main-job run folder under the runs root makes its selected direction the default (layer and evaluation
  numbers shown), and a direction from another model is refused unless forced;
- the Study tab reads a chain report's verdicts, controls and plots, inside the runs root only.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

try:
    import gradio  # noqa: F401
    import gradio_client
except ImportError as e:  # declared dependencies: missing is a failure, not a skip
    pytest.fail(f"{e.name} is not installed: install the project with its extras (bash scripts/setup.sh)",
                pytrace=False)

from apps.state import MAIN_SOURCE, AppState  # noqa: E402
from apps.ui import BATTERY_ROWS, build_app, direction_default, launch, study_outputs  # noqa: E402
from workbench.chat import ChatFormat  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.tiny import build_tiny  # noqa: E402

MODEL = "tiny"
WORKBENCH = str(Path(sys.executable).parent / "workbench")
SIZES = dict(n_harmful=4, n_tasks=3, n_harmless=4)
TOKENS = (16, 64)  # harm, code: the tiny model's context is 256 tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama in an HF folder, a one-layer direction file inside the runs root, and the app serving it."""
    from steering.directions import mean_diff_directions
    from workbench.loading import load_model
    from workbench.prompts import resolve_prompts
    from workbench.vectors import save_directions

    root = tmp_path_factory.mktemp("battery")
    model, tok = build_tiny("llama")
    folder = root / "tiny-llama"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    cache = root / "cache"
    old = os.environ.get("WORKBENCH_CACHE")
    os.environ["WORKBENCH_CACHE"] = str(cache)
    try:
        lm = load_model(str(folder))
    finally:
        if old is None:
            os.environ.pop("WORKBENCH_CACHE", None)
        else:
            os.environ["WORKBENCH_CACHE"] = old
    pos = resolve_prompts("harmful:train").texts[:8]
    neg = resolve_prompts("harmless:train").texts[:8]
    d = [x for x in mean_diff_directions(lm, pos, neg, fmt=ChatFormat(), positions=["last"]) if x.layer == 1][0]
    runs = root / "runs"
    dfile = save_directions(runs / "dirs" / "direction.safetensors", [d])
    from steering.battery import BatteryConfig

    demo = build_app({MODEL: lm}, runs_root=str(runs), disk_cache=False, max_new_tokens_limit=32,
                     battery=BatteryConfig(harm_tokens=TOKENS[0], code_tokens=TOKENS[1]))
    _, url, _ = launch(demo, port=free_port(), block=False, quiet=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", WORKBENCH_CACHE=str(cache))
    yield {"root": root, "model": str(folder), "lm": lm, "d": d, "dfile": str(dfile), "runs": runs, "demo": demo,
           "url": url, "env": env}
    demo.close()


def _score(client, **kw):
    args = dict(model=MODEL, system_prompt="", source="saved vector", layer=1, vector_path="dirs/direction.safetensors",
                seed=0, a_kind="ablation", compare=True, b_kind="ablation", b_direction="random control", **SIZES)
    args.update(kw)
    return client.predict(api_name="/score", **args)


def _table(df) -> dict[str, list]:
    rows = df["data"] if isinstance(df, dict) else df.values.tolist()
    return {r[0]: r[1:] for r in rows}


def _cli_battery(setup, out: Path, *extra: str) -> list[dict]:
    cmd = [WORKBENCH, "--threads", "1", "steer", "battery", "--model", setup["model"], "--dtype", "float32",
           "--direction", setup["dfile"],
           "--n-harmful", str(SIZES["n_harmful"]), "--n-tasks", str(SIZES["n_tasks"]), "--n-harmless",
           str(SIZES["n_harmless"]), "--harm-tokens", str(TOKENS[0]), "--code-tokens", str(TOKENS[1]),
           "--out", str(out), *extra]
    p = subprocess.run(cmd, env=setup["env"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "pass rate" in p.stdout and "harm" in p.stdout
    return json.loads((out / "battery.json").read_text())["summary"]


@pytest.mark.slow
def test_score_equals_the_cli_battery_and_is_cached(setup, tmp_path):
    client = gradio_client.Client(setup["url"], verbose=False)
    status, t_base, t_a, t_b, plot = _score(client)
    assert "scored 3 setting(s)" in status and "(0 from the cache)" in status, status
    assert plot and Path(plot).stat().st_size > 5_000  # the trade-off plot (an image file)
    cli = {r["setting"]: r for r in _cli_battery(setup, tmp_path / "cli", "--mode", "ablation", "--random-control",
                                                 "--control-seed", "1")}
    assert list(cli) == ["unmodified", "A", "random control"]
    # the exact numbers the app computed (its cache) equal the CLI's, setting by setting
    state: AppState = setup["demo"].wb_state
    cached = list(state.battery_cache.values())
    assert len(cached) == 3
    for app_row, name in zip(cached, ("unmodified", "A", "B")):
        want = cli["random control" if name == "B" else name]
        for key in ("harm_rate", "harm_rate_lo", "harm_rate_hi", "refusal_rate", "refusal_logit", "refusal_logit_lo",
                    "refusal_logit_hi", "pass_rate", "pass_rate_lo", "pass_rate_hi", "answer_nll", "answer_nll_lo",
                    "answer_nll_hi", "kl", "kl_lo", "kl_hi", "n_harmful", "n_tasks", "n_harmless"):
            assert app_row[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (name, key, app_row[key], want[key])
    # ... and the tables shown in each column are those numbers with their intervals and N
    for name, table in (("unmodified", t_base), ("A", t_a), ("random control", t_b)):
        t = _table(table)
        want = cli[name]
        for label, key, nd, nkey in BATTERY_ROWS:
            value, n = t[label]
            if key.startswith("judge"):
                assert value == "no judge configured" and n == 0
                continue
            assert value == f"{want[key]:.{nd}f} [{want[key + '_lo']:.{nd}f}, {want[key + '_hi']:.{nd}f}]", (name, label)
            assert n == want[nkey]
    assert cli["A"]["kl"] > 0 and cli["unmodified"]["kl"] == 0
    assert cli["A"]["refusal_logit"] != cli["unmodified"]["refusal_logit"]
    # a second look is instant: everything from the cache
    status2, *_ = _score(client)
    assert "(3 from the cache)" in status2, status2
    # without a random-control column, the app adds one for the plot (A's setting on random_like(d, seed + 1))
    status3, t_base3, t_a3, t_b3, plot3 = _score(client, compare=False)
    assert "scored 3 setting(s)" in status3 and "(3 from the cache)" in status3, status3
    assert _table(t_b3) == {} and plot3


@pytest.mark.slow
def test_score_and_steer_at_once_do_not_see_each_other(setup):
    """A battery running while another user steers: both give what they give alone."""
    client = gradio_client.Client(setup["url"], verbose=False)
    steer = dict(model=MODEL, prompt="Tell me a joke about the sea", source="saved vector", layer=1,
                 vector_path="dirs/direction.safetensors", a_kind="addition", a_strength=3.0, max_new_tokens=16,
                 api_name="/steer")
    alone = client.predict(**steer)
    setup["demo"].wb_state.battery_cache.clear()
    res: dict[str, object] = {}

    def run_score() -> None:
        res["score"] = _score(gradio_client.Client(setup["url"], verbose=False), compare=False, a_kind="addition",
                              a_strength=2.0)

    th = threading.Thread(target=run_score)
    th.start()
    together = [gradio_client.Client(setup["url"], verbose=False).predict(**steer) for _ in range(2)]
    th.join()
    for out in together:
        assert out[1:] == alone[1:]  # every column's text, tokens and scores (status has the timing)
    state: AppState = setup["demo"].wb_state
    first = dict(state.battery_cache)
    state.battery_cache.clear()
    again = _score(client, compare=False, a_kind="addition", a_strength=2.0)
    assert again[1:4] == res["score"][1:4]
    assert list(first) == list(state.battery_cache)


def test_main_job_direction_is_the_default(setup, tmp_path):
    from workbench.vectors import Direction, save_directions

    lm, d = setup["lm"], setup["d"]
    runs = tmp_path / "runs"
    state = AppState({MODEL: lm}, disk_cache=False, runs_root=runs)
    src, layer, note = direction_default(state, MODEL, lm.n_layers)
    assert src == "mean-diff" and "no main-job run folder" in note
    steering = runs / "main" / "steering"
    sel = Direction(d.vector * 1.5, layer=0, method="mean_diff", model_id=MODEL, model_checksum=lm.checksum,
                    d_model=lm.d_model, component="resid_pre", position="pos-1")
    save_directions(steering / "selected_direction.safetensors", [sel])
    (steering / "acceptance.json").write_text(json.dumps({"selected_layer": 0, "selected_position": "pos-1",
                                                          "addition_alpha": 3.0}))
    ev = [{"condition": "unmodified", "harmful_refusal_rate": 0.5, "harmful_refusal_rate_lo": 0.3,
           "harmful_refusal_rate_hi": 0.7, "harmless_refusal_rate": 0.0, "kl_harmless": 0.0, "n_harmful": 24},
          {"condition": "ablation", "harmful_refusal_rate": 0.05, "harmful_refusal_rate_lo": 0.0,
           "harmful_refusal_rate_hi": 0.2, "kl_harmless": 0.083},
          {"condition": "addition", "harmless_refusal_rate": 0.96, "harmless_refusal_rate_lo": 0.8,
           "harmless_refusal_rate_hi": 1.0}]
    (steering / "evaluation.json").write_text(json.dumps(ev))
    state._main_job = None
    src, layer, note = direction_default(state, MODEL, lm.n_layers)
    assert (src, layer) == (MAIN_SOURCE, 0), note
    assert "layer 0, position pos-1" in note and "50 % [30, 70] -> 5 % [0, 20]" in note and "KL 0.083" in note
    assert "96 %" in note
    rd = state.resolve_direction(MODEL, MAIN_SOURCE, layer=1, fmt=ChatFormat())
    assert torch.equal(rd.direction.vector, sel.vector) and rd.direction.layer == 0
    # a main-job direction made on another model is refused unless forced (and is not the default)
    other = Direction(d.vector, layer=0, method="mean_diff", model_id="another-model", model_checksum="0" * 64,
                      d_model=lm.d_model, component="resid_pre", position="pos-1")
    save_directions(steering / "selected_direction.safetensors", [other])
    state._main_job = None
    src, _, note = direction_default(state, MODEL, lm.n_layers)
    assert src == "mean-diff" and "was made on 'another-model'" in note
    with pytest.raises(WorkbenchError, match="tick 'force'"):
        state.resolve_direction(MODEL, MAIN_SOURCE, layer=0, fmt=ChatFormat())
    assert state.resolve_direction(MODEL, MAIN_SOURCE, layer=0, fmt=ChatFormat(), force=True).note.endswith(
        "(forced: computed on 'another-model')")


def test_study_tab_reads_verdicts_controls_and_plots_inside_the_runs_root(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from weightspace import verdicts as V

    runs = tmp_path / "runs"
    chain = runs / "ws-chain"
    (chain / "sweep").mkdir(parents=True)
    v1 = V.exp1_energy_parity({0.25: {"useful": 0.20, "harmful": 0.22}})
    v3 = V.exp3_overlap({"mso": [0.5, 0.6, 0.55], "baseline": [0.1, 0.1, 0.1]},
                        {"mso": [0.4, 0.5, 0.45], "baseline": [0.1, 0.1, 0.1]}, n_boot=200)
    planted = {"distinct": V.separability([0.01, 0.02, 0.015], [0.1, 0.1, 0.1], n_boot=200)}
    rep = {"model": "smollm2-135m-instruct", "verdicts": {"exp1_energy_parity": v1, "exp3_overlap": v3},
           "planted_controls": planted, "real_harmful_share": {"value": 0.198, "n_harmful": 19, "n_total": 96}}
    (chain / "chain_report.json").write_text(json.dumps(rep))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    fig.savefig(chain / "sweep" / "tradeoff.png")
    plt.close(fig)
    status, verdicts, controls, plots = study_outputs("ws-chain", root=runs)
    assert "2 verdict(s)" in status and "1 planted control(s)" in status and "0.198" in status
    rows = {r[0]: r for r in verdicts.values.tolist()}
    assert rows["exp1_energy_parity"][5] == "holds" and rows["exp1_energy_parity"][4] == "-"
    assert rows["exp3_overlap"][5] == v3["verdict"]
    assert rows["exp3_overlap"][4] == f"[{v3['ci'][0]:.4f}, {v3['ci'][1]:.4f}]"
    ctl = controls.values.tolist()
    assert ctl[0][:2] == ["distinct", "planted control"] and ctl[0][5] == "distinct"
    assert {r[0] for r in ctl[1:]} == {"useful~harmful", "safety~harmful"}
    assert [name for _, name in plots] == ["sweep/tradeoff.png"]
    # outside the runs root, missing, or a folder without a report: the same kind of refusal, no probing
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "chain_report.json").write_text(json.dumps(rep))
    for bad in (str(outside), "../elsewhere", "missing"):
        with pytest.raises(WorkbenchError, match="no readable chain run folder"):
            study_outputs(bad, root=runs)
    (runs / "empty").mkdir()
    with pytest.raises(WorkbenchError, match="no readable chain report"):
        study_outputs("empty", root=runs)
    # a symlinked report pointing outside is not read
    (runs / "linked").mkdir()
    (runs / "linked" / "chain_report.json").symlink_to(outside / "chain_report.json")
    with pytest.raises(WorkbenchError, match="no readable chain report"):
        study_outputs("linked", root=runs)
    # an older report without verdicts says so
    (runs / "old").mkdir()
    (runs / "old" / "chain_report.json").write_text(json.dumps({"model": "m"}))
    status, verdicts, _, _ = study_outputs("old", root=runs)
    assert "holds no verdicts" in status and verdicts.empty


def test_score_refuses_paths_outside_the_runs_root_and_bad_sizes(setup):
    client = gradio_client.Client(setup["url"], verbose=False)
    outside = setup["root"] / "outside.safetensors"
    if not outside.exists():
        outside.write_bytes(Path(setup["dfile"]).read_bytes())  # a valid direction file, but outside the runs root
    for bad in (str(outside), "../outside.safetensors", "dirs/missing.safetensors"):
        with pytest.raises(Exception, match="no readable direction file"):
            _score(client, vector_path=bad)
    with pytest.raises(Exception, match="between 1 and 32|greater than maximum value 32"):
        _score(client, n_tasks=33)
    assert not any("outside" in k for k in setup["demo"].wb_state.battery_cache)
