"""Interventions: details surviving mutants showed untested (benchmarks/mutation.py, interventions).

Half-precision models keep their dtype through an addition, ``Clamp`` defaults to ablation (value 0), and the
cached unit direction stays out of the objects' repr.
"""

from __future__ import annotations

import torch

from workbench.backends import get_backend
from workbench.chat import encode
from workbench.interventions import Ablation, Addition, Clamp, HookContext
from workbench.loading import from_memory
from workbench.sites import Site
from workbench.tiny import build_tiny


def test_addition_keeps_a_bfloat16_model_in_bfloat16():
    lm = from_memory(*build_tiny("llama", dtype=torch.bfloat16), model_id="tiny-bf16")
    be = get_backend("native", lm)
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))  # float32 vector
    batch = encode(lm.tokenizer, ["Hi", "How do I bake bread?"])
    site = Site(1, "resid_pre")
    plain = be.run(batch, capture=[site])
    out = be.run(batch, capture=[site], interventions=[Addition(site, v, alpha=2.0)])
    assert out.acts[site].dtype == torch.bfloat16 and out.logits.dtype == torch.bfloat16
    real = batch.attention_mask.bool()
    diff = (out.acts[site] - plain.acts[site]).float()[real]
    torch.testing.assert_close(diff, (2.0 * v).bfloat16().float().expand_as(diff), atol=0.1, rtol=0.02)


def test_clamp_defaults_to_zero_like_ablation():
    r = torch.zeros(8)
    r[0] = 2.0
    x = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(1)) + 5.0
    ctx = HookContext(pads=torch.tensor([0]), prompt_width=3, n_post=1)
    site = Site(0, "resid_pre")
    c = Clamp(site, r)
    assert c.value == 0.0
    out = c(x, ctx)
    assert float(out[..., 0].abs().max()) == 0.0
    assert torch.equal(out, Ablation(site, r)(x, ctx))
    assert torch.equal(out[..., 1:], x[..., 1:])


def test_cached_unit_direction_is_not_in_the_repr():
    for iv in (Ablation(Site(0), torch.ones(4)), Clamp(Site(0), torch.ones(4), value=1.0)):
        assert "_unit_dir" not in repr(iv) and "direction=" in repr(iv)


def test_weighted_ablation_by_hand_and_weight_one_bit_identical_to_earlier_runs():
    """``act - w (act . r) r`` written out here; ``w = 1`` gives exactly (bit for bit) what full ablation gave
    before weights existed (``act + (0 - act . r) r``), so earlier runs reproduce; bfloat16 activations stay
    bfloat16."""
    g = torch.Generator().manual_seed(0)
    act = torch.randn(2, 3, 8, generator=g)
    v = torch.randn(8, generator=g)
    r = v / v.norm()
    for w in (0.0, 0.25, 0.7):
        got = Ablation(Site(0, "resid_pre"), v, weight=w).edit(act)
        want = act - w * (act @ r).unsqueeze(-1) * r
        assert torch.allclose(got, want, atol=1e-6)
        assert torch.allclose(got @ r, (1 - w) * (act @ r), atol=1e-5)  # the fraction w of the projection removed
    one = Ablation(Site(0, "resid_pre"), v).edit(act)
    assert torch.equal(one, act + (0.0 - act @ r).unsqueeze(-1) * r)
    half = Ablation(Site(0, "resid_pre"), v, weight=0.5).edit(act.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), act - 0.5 * (act @ r).unsqueeze(-1) * r, atol=0.1)
