"""Steering: details surviving mutants showed untested (benchmarks/mutation.py, steering).

PCA of paired differences on planted activations (the FIRST component, sign and scale by hand), the
random-control seeds and flags of sweep conditions, the unmodified point of the trade-off plot, the default
GGUF strength, which architectures count as post-norm, and the orthogonalisation of biases and tied heads.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import steering.directions as directions_mod
import steering.orthogonalize as ortho_mod
from steering.directions import pca_directions, random_like
from steering.gguf_export import export_control_vector
from steering.interventions import ablation
from steering.sweep import ablation_conditions, addition_conditions, tradeoff_plot
from workbench.backends import get_backend
from workbench.capture import Activations
from workbench.chat import encode
from workbench.sites import Site
from workbench.vectors import Direction


def _acts(x: torch.Tensor) -> Activations:
    return Activations({"last": x.unsqueeze(1)}, [Site(1, "resid_pre")], {"template_hash": "t"})


def test_pca_direction_is_the_first_component_sign_aligned_and_scaled(make_tiny, monkeypatch):
    lm = make_tiny("llama")
    d = lm.d_model
    e0, e1 = torch.eye(d)[0], torch.eye(d)[1]
    s = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0, 11.0])  # spread along e0, mean 6
    pos = s[:, None] * e0 + 0.5 * e1  # every positive row: s_i e0 + 0.5 e1
    neg = torch.zeros(6, d)  # the paired differences are the positive rows themselves
    monkeypatch.setattr(directions_mod, "_capture_pair", lambda *a, **k: (_acts(pos), _acts(neg)))
    (dr,) = pca_directions(lm, ["p"] * 6, ["n"] * 6, layers=[1], positions=["last"], seed=3)
    # centred differences vary only along e0: the first component is e0, explaining all the variance; its sign
    # follows the mean difference 6 e0 + 0.5 e1 and it is scaled to that mean's projection, 6
    torch.testing.assert_close(dr.vector, 6.0 * e0, atol=1e-5, rtol=0)
    assert dr.meta["explained_variance_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert dr.meta["n_pairs"] == 6 and dr.meta["seed"] == 3
    monkeypatch.setattr(directions_mod, "_capture_pair", lambda *a, **k: (_acts(-pos), _acts(neg)))
    (flip,) = pca_directions(lm, ["p"] * 6, ["n"] * 6, layers=[1], positions=["last"])
    torch.testing.assert_close(flip.vector, -6.0 * e0, atol=1e-5, rtol=0)


def test_sweep_controls_use_seed_plus_layer_and_are_flagged():
    mk = lambda layer: Direction(torch.arange(1.0, 9.0) * layer, layer=layer, method="m", model_id="m",  # noqa: E731
                                 model_checksum="c", d_model=8, component="resid_pre")
    dirs = {1: mk(1), 3: mk(3)}
    for seed in (None, 5):
        kw = {} if seed is None else {"seed": seed}
        s = 0 if seed is None else seed
        add = addition_conditions(dirs, [2.0], **kw)
        assert [c.info for c in add] == [
            {"mode": "addition", "layer": 1, "alpha": 2.0, "control": False},
            {"mode": "addition", "layer": 1, "alpha": 2.0, "control": True},
            {"mode": "addition", "layer": 3, "alpha": 2.0, "control": False},
            {"mode": "addition", "layer": 3, "alpha": 2.0, "control": True}]
        assert torch.equal(add[1].interventions[0].vector, random_like(dirs[1], seed=s + 1).vector)
        assert torch.equal(add[3].interventions[0].vector, random_like(dirs[3], seed=s + 3).vector)
        abl = ablation_conditions(dirs, n_layers=4, **kw)
        assert [c.name for c in abl] == ["ablate L1", "random ablate L1", "ablate L3", "random ablate L3"]
        assert [c.info for c in abl] == [{"mode": "ablation", "layer": layer, "control": c}
                                         for layer in (1, 3) for c in (False, True)]
        unit = random_like(dirs[3], seed=s + 3).unit
        torch.testing.assert_close(abl[3].interventions[0].direction, unit)


def test_addition_conditions_pass_the_positions_on():
    d = Direction(torch.ones(8), layer=1, method="m", model_id="m", model_checksum="c", d_model=8,
                  component="resid_pre")
    for apply_to in ("generated", "all"):
        conds = addition_conditions({1: d}, [1.0], apply_to=apply_to)
        assert {iv.apply_to for c in conds for iv in c.interventions} == {apply_to}


def test_tradeoff_plot_points_and_error_bars():
    import matplotlib.pyplot as plt

    def row(name, mode, control, x, y, lo, hi):
        return {"condition": name, "info_mode": mode, "info_layer": 1, "info_control": control, "kl_harmless": x,
                "harmful_refusal_rate": y, "harmful_refusal_rate_lo": lo, "harmful_refusal_rate_hi": hi}

    rows = [row("ablate L1", "ablation", False, 0.3, 0.2, 0.15, 0.4),
            row("random ablate L1", "ablation", True, 0.1, 0.8, 0.7, 0.85),
            row("add L1 x1", "addition", False, 0.9, 0.5, 0.4, 0.6)]  # another mode: not on this plot
    fig = tradeoff_plot(rows, "ablation", "t")
    ax = fig.axes[0]
    lines = {c.get_label(): c for c in ax.containers}
    assert set(lines) == {"direction", "random control (equal norm)"}
    for label, (x, y, lo, hi) in (("direction", (0.3, 0.2, 0.15, 0.4)),
                                  ("random control (equal norm)", (0.1, 0.8, 0.7, 0.85))):
        data, _, (bars,) = lines[label]
        assert list(zip(*data.get_data())) == [(x, y)]
        (seg,) = bars.get_segments()
        np.testing.assert_allclose(np.asarray(seg), [[x, lo], [x, hi]], atol=1e-12)
    plt.close(fig)


def test_tradeoff_plot_marks_the_unmodified_point():
    import matplotlib.pyplot as plt

    rows = [{"condition": "ablate L1", "info_mode": "ablation", "info_layer": 1, "info_control": False,
             "kl_harmless": 0.3, "harmful_refusal_rate": 0.2, "harmful_refusal_rate_lo": 0.1,
             "harmful_refusal_rate_hi": 0.3},
            {"condition": "unmodified", "kl_harmless": 0.0, "harmful_refusal_rate": 0.9,
             "harmful_refusal_rate_lo": 0.8, "harmful_refusal_rate_hi": 1.0}]
    fig = tradeoff_plot(rows, "ablation", "t")
    ax = fig.axes[0]
    stars = [c for c in ax.collections if c.get_label() == "unmodified"]
    assert len(stars) == 1 and [tuple(p) for p in stars[0].get_offsets()] == [(0.0, 0.9)]
    plt.close(fig)


def test_gguf_export_default_strength_is_one(tmp_path):
    import gguf

    d = Direction(torch.arange(1.0, 5.0), layer=3, method="m", model_id="m", model_checksum="c", d_model=4)
    path = export_control_vector([d], tmp_path / "cv.gguf", model_hint="llama")
    (t,) = gguf.GGUFReader(str(path)).tensors
    np.testing.assert_array_equal(np.array(t.data), d.vector.numpy())


@pytest.mark.parametrize("names, post", [
    ((), False),
    (("post_attention_norm",), True),
    (("post_feedforward_layernorm",), True),
    (("post_mlp_layernorm",), True),
    (("post_attention_layernorm",), False),  # Llama's pre-MLP norm has this name: not a post-norm
    (("pre_feedforward_layernorm", "post_attention_layernorm"), True),  # Gemma's naming
])
def test_which_layers_count_as_post_norm(monkeypatch, names, post):
    layer = types.SimpleNamespace(**{n: object() for n in names})
    monkeypatch.setattr(ortho_mod, "get_arch", lambda model: types.SimpleNamespace(layers=[layer]))
    assert ortho_mod._has_post_norms(object()) is post


def test_orthogonalisation_projects_biases_and_unties_a_frozen_head(make_tiny):
    lm = make_tiny("gpt2")  # tied embeddings, biases on every residual writer
    model = lm.model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)  # HF initialises them to 0
    r = torch.randn(lm.d_model, generator=g)
    batch = encode(lm.tokenizer, ["Hi", "How do I bake bread?"])
    ref = get_backend("native", lm).run(batch, interventions=ablation(
        Direction(r, layer=0, method="m", model_id="m", model_checksum="c", d_model=lm.d_model), lm.n_layers)).logits
    emb = model.transformer.wte.weight.detach().clone()
    edited = ortho_mod.orthogonalize_model(model, r)
    unit = r / r.norm()
    for name, module in model.named_modules():
        if name in edited and getattr(module, "bias", None) is not None:
            assert float((module.bias @ unit).abs()) < 1e-5, name
    head = model.get_output_embeddings().weight
    assert head is not model.transformer.wte.weight and not head.requires_grad
    assert torch.equal(head, emb)  # the unembedding keeps the original weights
    out = get_backend("native", lm).run(batch).logits
    real = batch.attention_mask.bool()
    assert float((out - ref)[real].abs().max()) < 1e-4


# -- selection (steering/selection.py) ---------------------------------------------------------------------------

def test_calibrate_strength_default_grid_and_share_above_zero(monkeypatch):
    import steering.selection as sel

    d = Direction(torch.ones(8), layer=1, method="m", model_id="m", model_checksum="c", d_model=8,
                  component="resid_pre")
    seen = []

    def fake_scores(backend, prompts, fmt, *, interventions=(), batch_size=16):
        a = interventions[0].alpha
        seen.append(a)
        return torch.tensor([a - 2.7, a - 1.5, a - 3.5])  # mean a - 2.567: positive from alpha 3 on

    monkeypatch.setattr(sel, "refusal_scores", fake_scores)
    alpha, rows = sel.calibrate_strength(None, None, d, ["x", "y", "z"])
    assert seen == [1.0, 1.5, 2.0, 3.0] and alpha == 3.0  # the default grid, stopped at the first success
    # share of prompts whose score is above 0, by hand: alpha 1.5 -> [-1.2, 0, -2] -> 0; 2 -> [-.7, .5, -1.5] -> 1/3
    assert [r["share_score_above_0"] for r in rows] == pytest.approx([0.0, 0.0, 1 / 3, 2 / 3])
    # nothing positive: the whole default grid is tried and the strongest effect is taken
    seen.clear()
    monkeypatch.setattr(sel, "refusal_scores", lambda b, p, f, *, interventions=(), batch_size=16: (
        seen.append(interventions[0].alpha) or torch.tensor([-10.0 + interventions[0].alpha])))
    alpha, rows = sel.calibrate_strength(None, None, d, ["x"])
    assert seen == [1.0, 1.5, 2.0, 3.0, 4.0, 6.0] and alpha == 6.0 and rows[-1]["chosen"]


@pytest.fixture(scope="module")
def selection_setup():
    from steering.directions import mean_diff_directions
    from workbench.loading import from_memory
    from workbench.prompts import builtin_split
    from workbench.tiny import build_tiny

    lm = from_memory(*build_tiny("llama"), model_id="tiny-llama")
    harm, harmless = builtin_split("harmful", "train").texts[:4], builtin_split("harmless", "train").texts[:4]
    cands = [d for d in mean_diff_directions(lm, harm, harmless, layers=[1], positions=["last", -2], cache=False)]
    val_h, val_b = builtin_split("harmful", "val").texts[:3], builtin_split("harmless", "val").texts[:3]
    return lm, cands, val_h, val_b


@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_selection_estimates_are_baseline_plus_first_order_delta(selection_setup, alpha):
    from steering.screening import screen_candidates
    from steering.selection import select_direction

    lm, cands, val_h, val_b = selection_setup
    be = get_backend("native", lm)
    res = select_direction(be, None, cands, harmful_val=val_h, harmless_val=val_b, kl_max=10.0, progress=False,
                           estimate=True, alpha=alpha)
    est = screen_candidates(be, None, cands, harmful=val_h, harmless=val_b, alpha=alpha)
    for i, r in enumerate(res.rows):
        assert r["ablation_score_est"] == pytest.approx(float(est.harmful_scores.mean() + est.ablation_delta[i]),
                                                        abs=1e-5)
        assert r["steering_score_est"] == pytest.approx(float(est.harmless_scores.mean() + est.addition_delta[i]),
                                                        abs=1e-5)


def test_selection_reports_how_much_was_scored_exactly(selection_setup):
    import warnings

    from steering.selection import select_direction

    lm, cands, val_h, val_b = selection_setup
    be = get_backend("native", lm)
    nz = sum(d.norm > 1e-6 for d in cands)
    full = select_direction(be, None, cands, harmful_val=val_h, harmless_val=val_b, kl_max=10.0, progress=False,
                            estimate=False)
    s = full.screening
    assert (s["mode"], s["n_exact_ablation"], s["n_exact_filters"], s["n_nonzero"]) == ("exhaustive", nz, nz, nz)
    assert s["screen_batch_size"] is None and s["top_k"] is None
    # screened, every candidate failing the KL filter: one group, then the fallback scores the rest exactly
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = select_direction(be, None, cands, harmful_val=val_h, harmless_val=val_b, kl_max=0.0, progress=False,
                               screen=True, top_k=1, screen_batch_size=4)
    assert any("failed a filter" in str(w.message) for w in caught)
    s = res.screening
    assert (s["mode"], s["top_k"], s["screen_batch_size"]) == ("screened", 1, 4)
    assert s["n_exact_ablation"] == sum(r["exact"] in ("ablation", "full") for r in res.rows) == nz
    assert s["n_exact_filters"] == sum(r["exact"] == "full" for r in res.rows) == nz
    assert [r["selected_despite_filters"] for r in res.rows if r["selected"]] == [True]


def test_screened_selection_when_every_candidate_is_too_deep(selection_setup):
    import warnings

    from steering.selection import select_direction

    lm, cands, val_h, val_b = selection_setup  # all at layer 1 of 2: >= 50 % of the depth
    be = get_backend("native", lm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = select_direction(be, None, cands, harmful_val=val_h, harmless_val=val_b, kl_max=10.0,
                               max_layer_frac=0.5, progress=False, screen=True, top_k=1)
    nonzero = [r for r in res.rows if r["norm"] > 1e-6]
    assert all(r["exact"] == "full" and r["filtered"].startswith("layer >= 50%") for r in nonzero)
    best = min(nonzero, key=lambda r: r["ablation_score"])  # the fallback: lowest exact ablation score
    assert best["selected"] and best["selected_despite_filters"]
    assert res.screening["groups"] == 0 and res.screening["n_exact_filters"] == len(nonzero)


def test_screened_selection_with_a_single_exact_candidate(selection_setup):
    from steering.selection import select_direction
    from workbench.errors import WorkbenchError

    lm, cands, val_h, val_b = selection_setup
    be = get_backend("native", lm)
    res = select_direction(be, None, cands, harmful_val=val_h, harmless_val=val_b, kl_max=10.0, progress=False,
                           screen=True, top_k=1)
    assert sum(r["selected"] for r in res.rows) == 1
    with pytest.raises(WorkbenchError, match="top_k"):
        select_direction(be, None, cands, harmful_val=val_h, harmless_val=val_b, screen=True, top_k=0)


def _recording_runs(be) -> list[int]:
    """Wrap ``be.run`` so every forward pass records its batch size (rows)."""
    sizes: list[int] = []
    real = be.run

    def run(batch, **kw):
        sizes.append(batch.size)
        return real(batch, **kw)

    be.run = run
    return sizes


@pytest.mark.parametrize("screen", [False, True])
def test_selection_forward_passes_respect_batch_size(selection_setup, screen):
    """``batch_size`` bounds the rows of every exact scoring pass (memory), and the scores do not depend on it."""
    from steering.selection import select_direction

    lm, cands, val_h, val_b = selection_setup
    kw = dict(harmful_val=val_h, harmless_val=val_b, kl_max=10.0, progress=False, screen=screen, top_k=2,
              estimate=False, screen_batch_size=3)
    wide = select_direction(get_backend("native", lm), None, cands, batch_size=16, **kw)
    be = get_backend("native", lm)
    sizes = _recording_runs(be)
    narrow = select_direction(be, None, cands, batch_size=2, **kw)
    assert sizes and max(sizes) <= 2 and 1 in sizes  # 3 prompts in batches of 2 -> 2 + 1
    if not screen:  # the addition-strength calibration too
        from steering.selection import calibrate_strength

        sizes.clear()
        calibrate_strength(be, None, narrow.best, val_b, alphas=(1.0,), batch_size=2)
        assert sizes == [2, 1]
    assert [r["candidate"] for r in narrow.rows if r["selected"]] == [r["candidate"] for r in wide.rows if r["selected"]]
    for a, b in zip(narrow.rows, wide.rows):
        for key in ("ablation_score", "kl", "steering_score"):
            if not (np.isnan(a[key]) and np.isnan(b[key])):
                assert a[key] == pytest.approx(b[key], abs=1e-4), key


def test_selection_and_evaluation_show_progress_by_default(selection_setup, capsys):
    """Long work shows progress: a tqdm bar on stderr unless ``progress=False``."""
    from steering.evaluate import evaluate_conditions
    from steering.selection import select_direction

    lm, cands, val_h, val_b = selection_setup
    be = get_backend("native", lm)
    select_direction(be, None, cands, harmful_val=val_h, harmless_val=val_b, kl_max=10.0, estimate=False)
    err = capsys.readouterr().err
    n = sum(d.norm > 1e-6 for d in cands)
    assert "select" in err and "candidate" in err and f" {n}/{n} " in err  # one step per candidate scored
    import warnings

    with warnings.catch_warnings():  # screened, one candidate per group, all failing: the total grows per group
        warnings.simplefilter("ignore")
        select_direction(be, None, cands, harmful_val=val_h, harmless_val=val_b, kl_max=0.0, max_layer_frac=1.0,
                         screen=True, top_k=1)
    err = capsys.readouterr().err
    import re

    counters = [(int(a), int(b)) for a, b in re.findall(r"\| *(\d+)/(\d+) \[", err)]
    assert counters and counters[-1] == (n, n) and all(a <= b for a, b in counters), counters
    evaluate_conditions(be, None, [], harmful=val_h[:1], harmless=val_b[:1], max_new_tokens=2, n_boot=10)
    assert "unmodified" in capsys.readouterr().err
    select_direction(be, None, cands, harmful_val=val_h, harmless_val=val_b, kl_max=10.0, estimate=False,
                     progress=False)
    evaluate_conditions(be, None, [], harmful=val_h[:1], harmless=val_b[:1], max_new_tokens=2, n_boot=10,
                        progress=False)
    assert capsys.readouterr().err == ""


def test_evaluation_generates_32_new_tokens_by_default(selection_setup, monkeypatch):
    """The documented default length of the evaluation generations (docs/results.md: 32 new tokens)."""
    import steering.evaluate as ev_mod

    lm, _, val_h, val_b = selection_setup
    seen: list[int] = []
    real = ev_mod.generate_with_first_logprobs

    def gen(*a, max_new_tokens, **kw):
        seen.append(max_new_tokens)
        return real(*a, max_new_tokens=2, **kw)

    monkeypatch.setattr(ev_mod, "generate_with_first_logprobs", gen)
    ev_mod.evaluate_conditions(get_backend("native", lm), None, [], harmful=val_h[:1], harmless=val_b[:1], n_boot=10,
                               progress=False)
    assert seen == [32, 32]


def test_selection_does_not_repeat_forward_passes(selection_setup):
    """Exhaustive: 3 baseline passes (harmful and harmless scores, the reference log-probs) then 3 per candidate
    (ablation score, KL against that reference, steering score); screened: a candidate whose KL already fails
    the filter gets no steering pass (NaN)."""
    import warnings

    from steering.selection import select_direction

    lm, cands, val_h, val_b = selection_setup  # 3 + 3 validation prompts: one batch per pass
    nz = sum(d.norm > 1e-6 for d in cands)
    be = get_backend("native", lm)
    sizes = _recording_runs(be)
    select_direction(be, None, cands, harmful_val=val_h, harmless_val=val_b, kl_max=10.0, progress=False,
                     estimate=False)
    assert len(sizes) == 3 + 3 * nz
    be = get_backend("native", lm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = select_direction(be, None, cands, harmful_val=val_h, harmless_val=val_b, kl_max=0.0, progress=False,
                               screen=True, top_k=1)
    full = [r for r in res.rows if r["exact"] == "full"]
    assert full and all(r["kl"] > 0.0 and np.isnan(r["steering_score"]) for r in full)


def test_evaluation_scores_equal_separate_prompt_only_passes(selection_setup):
    """The evaluation reads the refusal score and KL of the harmless prompts from the teacher-forced perplexity
    pass (last prompt position); they must equal separate forwards over the prompts alone, for interventions
    on all positions (shared pass) and on the last prompt token only (separate passes)."""
    from steering.evaluate import Condition, evaluate_conditions
    from steering.interventions import addition
    from workbench.scoring import completion_nll, kl_divergence, refusal_scores

    lm, cands, val_h, val_b = selection_setup
    d = max(cands, key=lambda c: c.norm)
    be = get_backend("native", lm)
    conds = [Condition("ablation", ablation(d, lm.n_layers)), Condition("addition", addition(d, 2.0)),
             Condition("last only", addition(d, 4.0, apply_to="last"))]
    ev = evaluate_conditions(be, None, conds, harmful=val_h, harmless=val_b, max_new_tokens=4, n_boot=10,
                             progress=False)
    ref_text = [r["completion"] for r in ev.per_prompt if r["condition"] == "unmodified" and r["set"] == "harmless"]
    for c in [Condition("unmodified")] + conds:
        rows = [r for r in ev.per_prompt if r["condition"] == c.name]
        sb = refusal_scores(be, val_b, None, interventions=c.interventions)
        sh = refusal_scores(be, val_h, None, interventions=c.interventions)
        kl = kl_divergence(be, val_b, None, interventions=c.interventions)
        got_b = [r["refusal_logit"] for r in rows if r["set"] == "harmless"]
        got_h = [r["refusal_logit"] for r in rows if r["set"] == "harmful"]
        assert got_b == pytest.approx(sb.tolist(), abs=1e-4) and got_h == pytest.approx(sh.tolist(), abs=1e-4)
        assert [r["kl_last"] for r in rows if r["set"] == "harmless"] == pytest.approx(kl.tolist(), abs=1e-5)
        nll = completion_nll(be, val_b, ref_text, None, interventions=c.interventions)
        want = float(np.exp(sum(n for n, _ in nll) / sum(k for _, k in nll)))
        assert next(s for s in ev.summary if s["condition"] == c.name)["perplexity"] == pytest.approx(want, rel=1e-5)
    assert sum(r["kl_last"] for r in ev.per_prompt
               if r["condition"] == "last only" and r["set"] == "harmless") > 1e-4  # the check can fail


def test_orthogonalized_checkpoint_is_staged_next_to_its_destination(make_tiny, tmp_path, monkeypatch):
    """The temporary folder lives in the destination's parent (same filesystem, so the final rename is atomic)
    and is gone afterwards, also when saving fails."""
    import tempfile

    lm = make_tiny("llama")
    seen: list[dict] = []
    real = tempfile.mkdtemp

    def spy(*a, **kw):
        seen.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(ortho_mod.tempfile, "mkdtemp", spy)
    r = torch.zeros(lm.d_model)
    r[0] = 1.0
    out = tmp_path / "sub" / "ortho"
    ortho_mod.write_orthogonalized(lm, r, out)
    assert seen and seen[0]["dir"] == out.parent and (out / "config.json").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".ortho.")]
    monkeypatch.setattr(lm.tokenizer, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        ortho_mod.write_orthogonalized(lm, r, tmp_path / "other")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ortho.")] and not (tmp_path / "other").exists()


def test_selection_default_filters_the_last_fifth_of_the_layers(selection_setup):
    """Default ``max_layer_frac=0.8``: on a 5-layer model layers 0-3 pass and layer 4 (>= 4.0) is filtered;
    on the 2-layer model with 0.5 every candidate (all at layer 1) is too deep and the fallback scores all."""
    import warnings

    from steering.directions import mean_diff_directions
    from steering.selection import select_direction
    from workbench.loading import from_memory
    from workbench.tiny import build_tiny

    lm, cands, val_h, val_b = selection_setup
    deep = from_memory(*build_tiny("llama", n_layers=5), model_id="tiny-llama-5")
    dirs = mean_diff_directions(deep, val_h, val_b, layers=[3, 4], positions=["last"], cache=False)
    res = select_direction(get_backend("native", deep), None, dirs, harmful_val=val_h, harmless_val=val_b,
                           kl_max=1e9, progress=False, estimate=False)
    reasons = {r["layer"]: r["filtered"] for r in res.rows}
    assert reasons[4].startswith("layer >= 80%") and "layer >=" not in reasons[3]
    be = get_backend("native", lm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        too_deep = select_direction(be, None, cands, harmful_val=val_h, harmless_val=val_b, kl_max=10.0,
                                    max_layer_frac=0.5, progress=False, estimate=False, screen=True, top_k=1)
    nz = [r for r in too_deep.rows if r["norm"] > 1e-6]
    # the fallback scores every candidate exactly (finite ablation scores), none was screened out
    assert nz and all(np.isfinite(r["ablation_score"]) and r["filtered"].startswith("layer >= 50%") for r in nz)


@pytest.mark.parametrize("backend", ["native", "transformer_lens", "nnsight"])
def test_first_step_logprobs_equal_a_forward_over_the_prompts(selection_setup, backend):
    """The generation's prefill gives the next-token distribution of a prompt-only forward, under interventions
    on every position, on the last prompt token only, and on generated tokens only (not at the prefill)."""
    from steering.interventions import addition
    from workbench.generation import generate_texts, generate_with_first_logprobs
    from workbench.scoring import next_token_logprobs

    lm, cands, val_h, _ = selection_setup
    d = max(cands, key=lambda c: c.norm)
    be = get_backend(backend, lm)
    for ivs in ([], ablation(d, lm.n_layers), addition(d, 4.0, apply_to="last"),
                addition(d, 4.0, apply_to="generated")):
        texts, lp = generate_with_first_logprobs(be, val_h, None, max_new_tokens=3, interventions=ivs, batch_size=2)
        assert torch.allclose(lp, next_token_logprobs(be, val_h, None, interventions=ivs), atol=1e-4)
        assert texts == generate_texts(be, val_h, None, max_new_tokens=3, interventions=ivs, batch_size=2)
    # the check can fail: a last-token addition moves the distribution
    assert not torch.allclose(next_token_logprobs(be, val_h, None, interventions=addition(d, 4.0, apply_to="last")),
                              next_token_logprobs(be, val_h, None), atol=1e-3)


def test_mean_diff_directions_of_another_component(selection_setup):
    """``component="resid_post"``: the directions record it and equal the difference of the means of that
    component's activations, captured here directly."""
    from steering.directions import mean_diff_directions
    from workbench.capture import capture

    lm, _, val_h, val_b = selection_setup
    dirs = mean_diff_directions(lm, val_h, val_b, layers=[0], positions=["last"], component="resid_post", cache=False)
    assert [d.component for d in dirs] == ["resid_post"]
    kw = dict(layers=[0], components=("resid_post",), positions=["last"], cache=False, progress=False)
    a, b = capture(lm, val_h, **kw), capture(lm, val_b, **kw)
    assert a.sites == [Site(0, "resid_post")]
    want = a.data["last"][:, 0].mean(0) - b.data["last"][:, 0].mean(0)
    assert torch.allclose(dirs[0].vector.float(), want.float(), atol=1e-5)


def test_evaluation_generations_respect_batch_size(selection_setup):
    """``batch_size`` bounds every generation of the evaluation (harmful, harmless and task prompts)."""
    from steering.evaluate import evaluate_conditions

    lm, cands, val_h, val_b = selection_setup
    be = get_backend("native", lm)
    sizes: list[int] = []
    real = be.generate

    def gen(batch, **kw):
        sizes.append(batch.size)
        return real(batch, **kw)

    be.generate = gen
    d = max(cands, key=lambda c: c.norm)
    from steering.evaluate import Condition

    evaluate_conditions(be, None, [Condition("ablation", ablation(d, lm.n_layers))], harmful=val_h, harmless=val_b,
                        tasks=(["What is 2 + 3?", "What is 4 + 4?", "What is 1 + 6?"], ["5", "8", "7"]),
                        max_new_tokens=2, batch_size=2, n_boot=10, progress=False)
    # 2 conditions x 3 prompt sets of 3 prompts, in batches of 2 + 1
    assert sizes == [2, 1] * 6
