"""Parametrised ablation (steering/kernel.py): kernel weights by hand, the interpolated direction, runtime
weighted ablation equal to the baked (weighted-orthogonalised) weights on tiny models, the two ends (weight 1:
the full ablation and orthogonalisation; weight 0: the unmodified model) and the artefact's round trip."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from steering.kernel import (AblationProfile, Kernel, KernelAblation, interpolate_direction, load_kernel_ablation,
                             read_kernel_meta, save_kernel_ablation)
from steering.orthogonalize import orthogonalize_model, write_orthogonalized
from workbench.backends import get_backend
from workbench.chat import ChatFormat, encode
from workbench.errors import WorkbenchError
from workbench.interventions import Ablation, HookContext, ablation_everywhere
from workbench.loading import from_memory
from workbench.sites import Site
from workbench.vectors import Direction
from tiny_tied import lm_for, tied_llama  # noqa: E402

PROMPTS = ["Hi!", "Explain how a transformer language model works, in simple words.", "List the planets."]

# distinct weights on every layer and component (tiny models have 2 layers): attn 0.9 / 0.5, mlp 0.3 / 0.7
DISTINCT = AblationProfile(attn=Kernel(peak=0.9, position=0.0, floor=0.1, width=2.0),
                           mlp=Kernel(peak=0.7, position=1.0, floor=0.3, width=1.0), embed=0.6)


def _direction(lm, seed: int = 0, layer: int = 1) -> Direction:
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(seed)) * 3.0
    return Direction(v, layer=layer, method="mean_diff", model_id=lm.model_id, model_checksum=lm.checksum,
                     d_model=lm.d_model, component="resid_pre")


_tied_llama, _lm = tied_llama, lm_for


def _logits(lm, interventions=(), model=None):
    b = encode(lm.tokenizer, PROMPTS, ChatFormat())
    target = lm if model is None else from_memory(model, lm.tokenizer, model_id="baked")
    out = get_backend("native", target).run(b, interventions=list(interventions)).logits.float()
    return out[b.attention_mask.bool()]


# -- the kernel, by hand ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel, n, expected", [
    (Kernel(peak=1.0, position=2.0, floor=0.25, width=2.0), 5, [0.25, 0.625, 1.0, 0.625, 0.25]),
    (Kernel(peak=1.0, position=1.5, floor=0.0, width=1.0), 4, [0.0, 0.5, 0.5, 0.0]),  # fractional peak
    (Kernel(peak=0.8, position=0.0, floor=0.2, width=4.0), 6, [0.8, 0.65, 0.5, 0.35, 0.2, 0.2]),  # floor beyond
    (Kernel(peak=0.5, position=10.0, floor=0.5, width=0.5), 3, [0.5, 0.5, 0.5]),  # floor == peak: constant
    (Kernel(peak=1.0, position=-1.0, floor=0.0, width=2.0), 3, [0.5, 0.0, 0.0]),  # peak outside the layers
    (Kernel.constant(0.0), 3, [0.0, 0.0, 0.0]),
])
def test_kernel_weights_by_hand(kernel, n, expected):
    assert kernel.weights(n) == pytest.approx(expected, abs=1e-12)
    assert all(kernel.floor <= w <= kernel.peak for w in kernel.weights(n))


def test_profile_weights_interventions_and_module_names(make_tiny):
    p = AblationProfile(attn=Kernel(1.0, 0.0, 0.0, 1.0), mlp=Kernel(0.5, 1.0, 0.25, 1.0), embed=0.0)
    assert p.layer_weights(2) == {"attn_out": [1.0, 0.0], "mlp_out": [0.25, 0.5]}
    ivs = p.interventions(torch.ones(64), 2)  # zero weights are left out, the embedding (0) too
    assert [(iv.site, iv.weight) for iv in ivs] == [(Site(0, "attn_out"), 1.0), (Site(0, "mlp_out"), 0.25),
                                                    (Site(1, "mlp_out"), 0.5)]
    lm = make_tiny("gpt2")
    assert DISTINCT.module_weights(lm.model) == {
        "embed": 0.6, "pos_embed": 0.6, "layers.0.attn_out": 0.9, "layers.0.mlp_out": 0.3,
        "layers.1.attn_out": 0.5, "layers.1.mlp_out": 0.7}
    assert AblationProfile.from_record(DISTINCT.record()) == DISTINCT


@pytest.mark.parametrize("kw, match", [
    (dict(peak=1.2, position=0, floor=0, width=1), r"peak must be in \[0, 1\], got 1.2"),
    (dict(peak=0.5, position=0, floor=0.6, width=1), r"floor must be in \[0, peak\] = \[0, 0.5\], got 0.6"),
    (dict(peak=0.5, position=0, floor=-0.1, width=1), r"floor must be in \[0, peak\]"),
    (dict(peak=0.5, position=0, floor=0, width=0), r"width must be > 0 layers, got 0.0"),
    (dict(peak=0.5, position=math.nan, floor=0, width=1), "position must be a finite number"),
    (dict(peak="x", position=0, floor=0, width=1), "peak must be a finite number"),
])
def test_kernel_validation(kw, match):
    with pytest.raises(WorkbenchError, match=match):
        Kernel(**kw)


def test_profile_and_ablation_weight_validation():
    with pytest.raises(WorkbenchError, match=r"embedding weight must be in \[0, 1\], got 1.5"):
        AblationProfile(Kernel.constant(1), Kernel.constant(1), embed=1.5)
    with pytest.raises(WorkbenchError, match="ablation weight must be a finite number"):
        Ablation(Site(0, "attn_out"), torch.ones(4), weight=float("inf"))
    with pytest.raises(WorkbenchError, match="not an ablation profile record"):
        AblationProfile.from_record({"attn": {"peak": 1}})


def test_weighted_ablation_intervention_removes_that_fraction():
    r = torch.tensor([0.6, 0.8, 0.0])
    act = torch.tensor([[[1.0, 2.0, 3.0]]])
    ctx = HookContext(pads=torch.tensor([0]), prompt_width=1, n_post=1)
    for w in (0.0, 0.25, 1.0):
        out = Ablation(Site(0, "attn_out"), r * 5, weight=w)(act, ctx)
        assert float(out[0, 0] @ r) == pytest.approx((1 - w) * 2.2, abs=1e-6)  # act . r = 0.6 + 1.6
        assert torch.allclose(out - (out @ r).unsqueeze(-1) * r, act - (act @ r).unsqueeze(-1) * r)
    assert torch.equal(Ablation(Site(0, "attn_out"), r, weight=0.0)(act, ctx), act)


# -- the direction ---------------------------------------------------------------------------------------

def _dirs(vectors):
    return [Direction(torch.tensor(v), layer=i, method="mean_diff", model_id="m", model_checksum="c", d_model=2,
                      position="pos-1", component="resid_pre") for i, v in enumerate(vectors)]


def test_interpolated_direction_normalises_both_ends_and_the_mix():
    dirs = _dirs([[2.0, 0.0], [0.0, 10.0], [-3.0, 0.0]])
    r = interpolate_direction(dirs, 0.25)  # 0.75 * (1, 0) + 0.25 * (0, 1), normalised: norms do not matter
    assert r.vector.tolist() == pytest.approx([0.75 / math.hypot(0.75, 0.25), 0.25 / math.hypot(0.75, 0.25)])
    assert r.norm == pytest.approx(1.0) and r.method == "interpolated(mean_diff)" and r.layer == 0
    assert r.meta == {"direction_index": 0.25, "layers": [0, 1], "mix": 0.25}
    assert r.position == "pos-1" and r.component == "resid_pre"
    assert interpolate_direction(dirs, 1.0).vector.tolist() == pytest.approx([0.0, 1.0])  # integer: that layer
    assert interpolate_direction(dirs, 2.0).vector.tolist() == pytest.approx([-1.0, 0.0])  # the last layer
    with pytest.raises(WorkbenchError, match=r"outside the layers with a direction \(0..2\)"):
        interpolate_direction(dirs, 2.5)
    with pytest.raises(WorkbenchError, match="are opposite"):
        interpolate_direction(_dirs([[1.0, 0.0], [-1.0, 0.0]]), 0.5)
    with pytest.raises(WorkbenchError, match=r"needs the direction of layer\(s\) \[1\]"):
        interpolate_direction([dirs[0], dirs[2]], 0.5)
    with pytest.raises(WorkbenchError, match="two directions for layer 0"):
        interpolate_direction([dirs[0], dirs[0]], 0.0)


# -- runtime equals baked ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "llama-tied"])
def test_baked_weights_equal_runtime_weighted_ablation(arch, make_tiny):
    lm = _lm(arch, make_tiny)
    ka = KernelAblation(DISTINCT, _direction(lm))
    lw = DISTINCT.layer_weights(lm.n_layers)
    assert len({*lw["attn_out"], *lw["mlp_out"]}) == 4  # distinct per layer and per component
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    runtime = _logits(lm, ka.interventions(lm.n_layers))
    plain = _logits(lm)
    full = _logits(lm, ablation_everywhere(ka.direction.unit, lm.n_layers))
    baked_model = copy.deepcopy(lm.model)
    edited = ka.bake(baked_model)
    assert edited == list(DISTINCT.module_weights(lm.model))  # every writer has a non-zero weight here
    baked = _logits(lm, model=baked_model)
    assert float((baked - runtime).abs().max()) <= 1e-4, arch
    # not vacuous: the weighted ablation differs from both the unmodified model and the full ablation
    assert float((runtime - plain).abs().max()) > 1e-2 and float((runtime - full).abs().max()) > 1e-2
    for k, v in lm.model.state_dict().items():  # the source model is untouched
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama-tied"])
def test_weight_one_is_the_full_ablation_and_weight_zero_the_unmodified_model(arch, make_tiny):
    lm = _lm(arch, make_tiny)
    r = _direction(lm).unit
    plain = _logits(lm)
    full = _logits(lm, ablation_everywhere(r, lm.n_layers))
    one, zero = AblationProfile.uniform(1.0), AblationProfile.uniform(0.0)
    # runtime: weight 1 everywhere = ablation_everywhere (its extra residual-input ablations are no-ops there)
    assert float((_logits(lm, one.interventions(r, lm.n_layers)) - full).abs().max()) <= 1e-4
    assert zero.interventions(r, lm.n_layers) == []
    # baked: weight 1 = today's orthogonalisation, exactly; weight 0 = the unmodified weights, exactly
    m1, m_full, m0 = copy.deepcopy(lm.model), copy.deepcopy(lm.model), copy.deepcopy(lm.model)
    orthogonalize_model(m1, r, weights=one.module_weights(m1))
    orthogonalize_model(m_full, r)
    for (k, a), (_, b) in zip(m1.state_dict().items(), m_full.state_dict().items()):
        assert torch.equal(a, b), k
    assert orthogonalize_model(m0, r, weights=zero.module_weights(m0)) == []
    for k, v in m0.state_dict().items():
        assert torch.equal(v, lm.model.state_dict()[k]), k
    tied = lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight
    assert (m0.get_output_embeddings().weight is m0.get_input_embeddings().weight) == tied  # not untied at 0
    assert float((_logits(lm, model=m0) - plain).abs().max()) == 0.0


def test_written_weighted_checkpoint_loads_and_equals_runtime(make_tiny, tmp_path):
    """Through write_orthogonalized: a plain HF checkpoint (the tied embedding untied, the unembedding kept)."""
    lm = _tied_llama()
    ka = KernelAblation(DISTINCT, _direction(lm, seed=3))
    path = write_orthogonalized(lm, ka.direction.unit, tmp_path / "ortho", weights=DISTINCT.module_weights(lm.model))
    m2 = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    assert m2.get_output_embeddings().weight is not m2.get_input_embeddings().weight
    assert torch.equal(m2.get_output_embeddings().weight, lm.model.get_output_embeddings().weight)
    diff = float((_logits(lm, model=m2) - _logits(lm, ka.interventions(lm.n_layers))).abs().max())
    assert diff <= 1e-4
    import json

    info = json.loads((path / "orthogonalization.json").read_text())
    assert info["weights"]["layers.1.mlp_out"] == pytest.approx(0.7)


def test_orthogonalisation_weights_must_name_every_writer(make_tiny):
    lm = make_tiny("llama")
    r = torch.randn(64)
    good = DISTINCT.module_weights(lm.model)
    with pytest.raises(WorkbenchError, match="no weight for layers.1.mlp_out"):
        orthogonalize_model(copy.deepcopy(lm.model), r, weights={k: v for k, v in good.items() if k != "layers.1.mlp_out"})
    with pytest.raises(WorkbenchError, match="unknown writer"):
        orthogonalize_model(copy.deepcopy(lm.model), r, weights={**good, "layers.9.attn_out": 1.0})
    with pytest.raises(WorkbenchError, match="must be finite"):
        orthogonalize_model(copy.deepcopy(lm.model), r, weights={**good, "embed": math.nan})


# -- the artefact -------------------------------------------------------------------------------------------

def test_kernel_ablation_file_round_trip(make_tiny, tmp_path):
    lm = make_tiny("qwen2")
    d = interpolate_direction([_direction(lm, 0, layer=1), _direction(lm, 1, layer=2)], 1.5)
    ka = KernelAblation(DISTINCT, d)
    p = save_kernel_ablation(tmp_path / "chosen", ka, meta={"trial": 7})
    assert p.name == "chosen.safetensors"
    back = load_kernel_ablation(p)
    assert back.profile == DISTINCT and torch.equal(back.direction.vector, d.vector)
    assert back.direction.meta == d.meta and back.direction.method == "interpolated(mean_diff)"
    back.direction.check_compatible(lm)
    assert read_kernel_meta(p) == {"trial": 7}
    assert torch.equal(_logits(lm, back.interventions(lm.n_layers)), _logits(lm, ka.interventions(lm.n_layers)))
    # a directions file is not a kernel-ablation file, and the other way round
    from workbench.vectors import load_directions, save_directions

    dfile = save_directions(tmp_path / "dirs.safetensors", [d])
    with pytest.raises(WorkbenchError, match="not a kernel-ablation file"):
        load_kernel_ablation(dfile)
    with pytest.raises(WorkbenchError, match="not a workbench direction file"):
        load_directions(p)
    with pytest.raises(WorkbenchError, match="no such kernel-ablation file"):
        load_kernel_ablation(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_every_backend_runs_the_weighted_ablation_alike(backend, make_tiny):
    """The per-site weights travel in the Intervention objects, so the other backends agree with native."""
    pytest.importorskip("transformer_lens" if backend == "transformer_lens" else "nnsight")
    lm = make_tiny("llama")
    ivs = KernelAblation(DISTINCT, _direction(lm)).interventions(lm.n_layers)
    b = encode(lm.tokenizer, PROMPTS, ChatFormat())
    ref = get_backend("native", lm).run(b, interventions=ivs).logits.float()
    out = get_backend(backend, lm).run(b, interventions=ivs).logits.float()
    real = b.attention_mask.bool()
    assert float((out - ref)[real].abs().max()) <= 1e-4


def test_module_doctests():
    import doctest

    import steering.kernel

    res = doctest.testmod(steering.kernel, optionflags=doctest.ELLIPSIS)
    assert res.attempted >= 8 and res.failed == 0
