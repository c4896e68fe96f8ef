"""The app's "optimised ablation" column: a planted kernel ablation, saved with the project's saver into a runs
folder, is offered for its model with its trial numbers, applied through the interventions ``steer removal``
applies (the same tokens and logits as applying the KernelAblation directly), scored by the batteries, and refused
outside the runs folder or when made on another model, with one-line messages."""

from __future__ import annotations

import doctest
import json
import math
import threading

import pytest
import torch

import apps.optimised
from apps.optimised import FILE, find_optimised_runs
from apps.state import AppState
from apps.steer import build_interventions
from apps.ui import column_specs, kind_choices, make_score_fn, make_steer_fn, optimised_default, optimised_note
from steering.directions import random_like
from steering.kernel import AblationProfile, Kernel, KernelAblation, save_kernel_ablation
from workbench.backends import get_backend
from workbench.chat import ChatFormat, encode
from workbench.errors import WorkbenchError
from workbench.loading import from_memory
from workbench.scoring import refusal_token_ids
from workbench.tiny import build_tiny
from workbench.vectors import Direction

MODEL = "tiny"
PROMPT = "Tell me a joke about the sea"
N_NEW = 12
META = {"trial": 5, "refusal_score": -1.25, "kl": 0.05, "kl_upper": 0.08, "kl_rule": "upper", "kl_max": 0.2,
        "within_kl_max": True, "model_id": MODEL, "n_layers": 3}


def _kernel(lm, *, checksum: str | None = None, model_id: str | None = None, seed: int = 3) -> KernelAblation:
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(seed))
    d = Direction(v, layer=1, method="interpolated(mean_diff)", model_id=model_id or lm.model_id,
                  model_checksum=checksum or lm.checksum, d_model=lm.d_model, component="resid_pre", position="pos-1",
                  meta={"direction_index": 1.4})
    prof = AblationProfile(attn=Kernel(peak=0.9, position=1.0, floor=0.1, width=1.5),
                           mlp=Kernel(peak=0.6, position=2.0, floor=0.0, width=1.0), embed=0.3)
    return KernelAblation(prof, d)


@pytest.fixture
def planted(tmp_path):
    lm = from_memory(*build_tiny("llama", n_layers=3), model_id=MODEL)
    ka = _kernel(lm)
    runs = tmp_path / "runs"
    save_kernel_ablation(runs / "opt" / FILE, ka, meta=META)
    (runs / "opt" / "optimize.json").write_text(json.dumps({"baseline_harmful_refusal_score": 0.5, "n_trials": 12}))
    state = AppState({MODEL: lm}, disk_cache=False, runs_root=runs, n_train=4)
    return {"lm": lm, "ka": ka, "runs": runs, "state": state, "be": get_backend("native", lm), "tmp": tmp_path}


def _last(gen):
    out = None
    for out in gen:
        pass
    return out


def _steer(state, **kw):
    args = dict(prompt=PROMPT, source="mean-diff", layer=1, a_kind="optimised", max_new_tokens=N_NEW)
    args.update(kw)
    return _last(make_steer_fn(state)(MODEL, **args))


def _generate(be, fmt, ivs) -> str:
    ids = be.generate(encode(be.lm.tokenizer, [PROMPT], fmt), max_new_tokens=N_NEW, interventions=ivs)
    return be.decode(ids)[0]


def test_app_column_equals_the_kernel_ablation_applied_directly(planted):
    lm, ka, be, state = planted["lm"], planted["ka"], planted["be"], planted["state"]
    n, fmt = lm.n_layers, ChatFormat()
    run = state.resolve_optimised(MODEL)  # empty path: the newest run made on this model
    assert run.folder == (planted["runs"] / "opt").resolve() and run.meta["trial"] == 5
    specs = column_specs(None, n, "optimised", 1.0, "", True, "optimised", 1.0, "", "random control", 0,
                         kernel=run.ablation)
    ivs, direct = build_interventions(specs[1], n), ka.interventions(n)
    # the same interventions as 'steer removal' builds (KernelAblation.interventions of the saved file)
    assert [(iv.site, iv.weight) for iv in ivs] == [(iv.site, iv.weight) for iv in direct]
    assert all(torch.equal(a.direction, b.direction) for a, b in zip(ivs, direct))
    # ... hence the same logits, exactly
    batch = encode(lm.tokenizer, [PROMPT], fmt)
    got = be.run(batch, logits=True, interventions=ivs).logits
    want = be.run(batch, logits=True, interventions=direct).logits
    assert torch.equal(got, want)
    assert not torch.allclose(want, be.run(batch, logits=True).logits)  # the planted kernel does something
    # the app function (the /steer generator): A's reply and refusal logit are those of the kernel applied directly
    out = _steer(state, compare=True, b_kind="optimised", b_direction="random control", seed=0)
    status, a_title, a_text, a_scores = out[0], out[5], out[6], out[8]
    assert "optimised ablation: `" in status and "trial 5" in status
    assert a_title.startswith("**A: optimised ablation of interpolated(mean_diff) @ layer index 1.40")
    assert a_text == _generate(be, fmt, direct)
    rows = {r[0]: r[1] for r in a_scores.values.tolist()}
    a_ids = be.generate(batch, max_new_tokens=N_NEW, interventions=direct)[0].tolist()
    eos = [i for i, t in enumerate(a_ids) if t in be.eos_ids()]
    a_ids = a_ids[:eos[0]] if eos else a_ids
    assert rows["tokens"] == len(a_ids)
    t0 = int(batch.lengths[0])
    ids = torch.cat([batch.input_ids, torch.tensor([a_ids], dtype=batch.input_ids.dtype)], dim=1)
    from workbench.chat import Batch, position_ids_from_mask

    mask = torch.ones_like(ids)
    logits = be.run(Batch(ids, mask, position_ids_from_mask(mask), mask.sum(-1), batch.n_post), logits=True,
                    interventions=direct).logits[0, t0 - 1].double()
    logp = torch.log_softmax(logits, -1)
    lp = torch.logsumexp(logp[torch.tensor(refusal_token_ids(lm.tokenizer))], -1)
    assert rows["refusal logit"] == round(float(lp - torch.log1p(-lp.exp())), 3)
    # B: the random control keeps the weights on a random direction (seed + 1), as 'steer removal' does
    b_title, b_text = out[9], out[10]
    assert "random control" in b_title
    assert b_text == _generate(be, fmt, KernelAblation(ka.profile, random_like(ka.direction, seed=1)).interventions(n))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in lm.model.modules())


def test_offered_with_its_trial_numbers_or_explained_with_the_command(planted, tmp_path):
    state = planted["state"]
    choices, value, note, ok = optimised_default(state, MODEL)
    assert ok and choices == [str((planted["runs"] / "opt").resolve())] and value == choices[0]
    for part in ("trial 5", "refusal score -1.250 (unmodified 0.500)", "KL 0.0500", "KL upper bound 0.0800",
                 "KL max 0.2 (upper rule): within", "12 trials", "attention [0.37 0.90 0.37]",
                 "MLP [0.00 0.00 0.60]", "embedding 0.30", "layer index 1.40"):
        assert part in note, (part, note)
    assert "unavailable" not in dict((v, k) for k, v in kind_choices(ok))["optimised"]
    assert optimised_note(state, MODEL, value).startswith("**Optimised ablation:** `")
    # no run under the runs folder: the choice says so, the note and the request give the command
    empty = AppState({MODEL: planted["lm"]}, disk_cache=False, runs_root=tmp_path / "empty")
    choices, value, note, ok = optimised_default(empty, MODEL)
    assert (choices, value, ok) == ([], None, False)
    assert "unavailable" in note and f"workbench steer optimize --model {MODEL} --out" in note
    assert "unavailable" in dict((v, k) for k, v in kind_choices(ok))["optimised"]
    with pytest.raises(Exception, match=f"no 'steer optimize' run for model '{MODEL}'.*workbench steer optimize"):
        _steer(empty)


def test_outside_the_runs_folder_and_another_model_are_refused(planted):
    import gradio as gr

    lm, state, runs, tmp = planted["lm"], planted["state"], planted["runs"], planted["tmp"]
    outside = tmp / "elsewhere"
    save_kernel_ablation(outside / FILE, planted["ka"], meta=META)  # a valid run, outside the runs folder
    (runs / "linked").mkdir()
    (runs / "linked" / FILE).symlink_to(outside / FILE)  # inside, but pointing outside
    for bad in (str(outside), "../elsewhere", f"../elsewhere/{FILE}", str(outside / FILE), "missing", f"linked/{FILE}"):
        with pytest.raises(WorkbenchError, match="no readable optimised-ablation run"):
            state.resolve_optimised(MODEL, bad)
        assert "cannot use this run" in optimised_note(state, MODEL, bad)
    (runs / "empty").mkdir()
    for folder in ("linked", "empty"):  # a folder whose file points outside reads like one without the file
        with pytest.raises(WorkbenchError, match=f"holds no {FILE}: not a 'steer optimize' run folder"):
            state.resolve_optimised(MODEL, folder)
    with pytest.raises(gr.Error, match="no readable optimised-ablation run '../elsewhere' inside the runs folder"):
        _steer(state, opt_run="../elsewhere")
    assert find_optimised_runs(runs) == [(runs / "opt").resolve()]  # the symlinked one is not listed
    # a run made on another model: refused with a one-line message, never offered
    save_kernel_ablation(runs / "other" / FILE, _kernel(lm, checksum="0" * 64, model_id="another-model"), meta=META)
    with pytest.raises(WorkbenchError, match="made on model 'another-model' .* create one on this model with "
                                             "`workbench steer optimize --model tiny"):
        state.resolve_optimised(MODEL, "other")
    with pytest.raises(gr.Error) as e:
        _steer(state, opt_run="other")
    assert "another-model" in e.value.message and "\n" not in e.value.message and "Traceback" not in e.value.message
    choices, *_ = optimised_default(state, MODEL)
    assert choices == [str((runs / "opt").resolve())]
    import shutil

    shutil.rmtree(runs / "opt")
    choices, value, note, ok = optimised_default(state, MODEL)
    assert not ok and "1 made on other models: another-model" in note
    # a file that is not a kernel ablation: a message, not a stack trace
    (runs / "junk").mkdir()
    (runs / "junk" / FILE).write_bytes(b"not safetensors")
    with pytest.raises(WorkbenchError, match="could not read"):
        state.resolve_optimised(MODEL, "junk")


def test_batteries_score_the_optimised_ablation(planted, empty_cache, monkeypatch, capsys):
    """'Score this setting' with an optimised A column: its numbers are run_battery's on make_setting('optimised')."""
    from steering.battery import BatteryConfig, BatterySetting, make_setting, run_battery

    lm, ka, be, state = planted["lm"], planted["ka"], planted["be"], planted["state"]
    state.battery = BatteryConfig(harm_tokens=4, code_tokens=8, n_boot=50)
    sizes = dict(n_harmful=2, n_tasks=1, n_harmless=2)
    out = make_score_fn(state)(MODEL, source="mean-diff", layer=1, a_kind="optimised",
                               progress=lambda *a, **k: None, **sizes)
    assert "scored 3 setting(s)" in out[0] and "Optimised ablation: `" in out[0]
    cfg = BatteryConfig(harm_tokens=4, code_tokens=8, n_boot=50, **sizes)
    rnd = KernelAblation(ka.profile, random_like(ka.direction, seed=1))
    want = run_battery(be, ChatFormat(), [BatterySetting("unmodified"),
                                          make_setting("A", "optimised", None, lm.n_layers, kernel=ka),
                                          make_setting("random control", "optimised", None, lm.n_layers, kernel=rnd)],
                       cfg).summary
    got = list(state.battery_cache.values())
    assert len(got) == 3
    for g, w in zip(got, want):
        for key in ("harm_rate", "refusal_logit", "refusal_logit_lo", "pass_rate", "answer_nll", "kl", "kl_hi"):
            a, b = g[key], w[key]
            assert a == b or (math.isnan(a) and math.isnan(b)), (w["setting"], key, a, b)
    assert got[1]["kl"] > 0 and got[0]["kl"] == 0
    with pytest.raises(WorkbenchError, match="needs a kernel ablation"):
        make_setting("A", "optimised", None, lm.n_layers)
    # the same numbers on the command line: workbench steer battery --mode optimised --kernel FILE --random-control
    import workbench.loading
    from workbench.cli import main

    monkeypatch.setattr(workbench.loading, "load_model", lambda name=None, **kw: lm)
    out = planted["tmp"] / "battery"
    assert main(["--threads", "1", "steer", "battery", "--model", "tiny", "--mode", "optimised", "--kernel",
                 str(planted["runs"] / "opt" / FILE), "--random-control", "--harm-tokens", "4", "--code-tokens", "8",
                 "--n-boot", "50", "--n-harmful", "2", "--n-tasks", "1", "--n-harmless", "2", "--out", str(out)]) == 0
    cli = json.loads((out / "battery.json").read_text())["summary"]
    assert [r["setting"] for r in cli] == ["unmodified", "A", "random control"]
    for g, c in zip(got, cli):
        for key in ("harm_rate", "refusal_logit", "pass_rate", "answer_nll", "kl", "kl_lo", "kl_hi"):
            assert g[key] == pytest.approx(c[key], rel=1e-6, abs=1e-9, nan_ok=True), (c["setting"], key)
    capsys.readouterr()
    assert main(["steer", "battery", "--model", "tiny", "--mode", "optimised", "--out", str(out) + "2"]) == 2
    assert "--mode optimised needs --kernel FILE" in capsys.readouterr().err


def test_concurrent_optimised_and_addition_columns_do_not_mix(planted):
    state = planted["state"]
    alone = {k: _steer(state, **kw)[1:] for k, kw in (("opt", {}), ("add", {"a_kind": "addition", "a_strength": 3.0}))}
    res: dict[str, list] = {"opt": [], "add": []}

    def user(key, kw):
        for _ in range(2):
            res[key].append(_steer(state, **kw)[1:])

    threads = [threading.Thread(target=user, args=("opt", {})),
               threading.Thread(target=user, args=("add", {"a_kind": "addition", "a_strength": 3.0}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key in res:
        assert len(res[key]) == 2
        for got in res[key]:
            assert got[5] == alone[key][5] and got[4] == alone[key][4]  # A's reply and title
            assert got[7].equals(alone[key][7])  # A's scores


def test_module_doctests():
    res = doctest.testmod(apps.optimised, optionflags=doctest.ELLIPSIS)
    assert res.failed == 0 and res.attempted >= 5
