"""The nnsight backend agrees with the native (plain hooks) backend and leaves the model clean."""

from __future__ import annotations

import warnings

import pytest
import torch

from workbench.arch import count_hooks
from workbench.backends import get_backend
from workbench.backends.native import NativeBackend
from workbench.backends.nnsight_backend import NNsightBackend
from workbench.chat import encode
from workbench.errors import WorkbenchError
from workbench.interventions import Addition, FunctionIntervention, ablation_everywhere
from workbench.loading import from_memory
from workbench.sites import COMPONENTS, Site
from workbench.tiny import TINY_ARCHS, build_tiny

TOL = 1e-4
PROMPTS = ["Hi", "Explain how a transformer language model works.", "Tell me a joke about computers.", "Bake bread?"]


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a.float() - b.float()).abs().max())


@pytest.fixture(scope="module", params=TINY_ARCHS)
def tiny(request):
    lm = from_memory(*build_tiny(request.param))
    batch = encode(lm.tokenizer, PROMPTS)
    assert len(set(batch.lengths.tolist())) > 1 and int(batch.pads.max()) > 0  # really left-padded
    return lm, batch, NativeBackend(lm), NNsightBackend(lm)


def _vector(d: int, seed: int = 0, norm: float = 1.0) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


def test_registry_builds_it():
    lm = from_memory(*build_tiny("llama"))
    be = get_backend("nnsight", lm)
    assert isinstance(be, NNsightBackend) and be.name == "nnsight"


def test_capture_parity_every_site(tiny):
    lm, batch, nat, nns = tiny
    sites = [Site(i, c) for i in range(nat.n_layers) for c in COMPONENTS]
    a = nat.run(batch, capture=sites)
    b = nns.run(batch, capture=sites)
    assert set(b.acts) == set(sites)
    for s in sites:
        assert _maxdiff(a.acts[s], b.acts[s]) <= TOL, s
    assert _maxdiff(a.logits, b.logits) <= TOL


def test_negative_layers_and_no_logits(tiny):
    lm, batch, nat, nns = tiny
    sites = [Site(-1, "resid_post"), Site(-2, "resid_pre")]
    a = nat.run(batch, capture=sites, logits=False)
    b = nns.run(batch, capture=sites, logits=False)
    assert b.logits is None and set(b.acts) == set(sites)
    for s in sites:
        assert _maxdiff(a.acts[s], b.acts[s]) <= TOL


def test_addition_logits_parity(tiny):
    lm, batch, nat, nns = tiny
    ivs = [Addition(Site(0, "resid_post"), _vector(lm.d_model, norm=4.0), alpha=2.0)]
    plain = nat.run(batch).logits
    a = nat.run(batch, interventions=ivs, capture=[Site(1, "resid_pre")])
    b = nns.run(batch, interventions=ivs, capture=[Site(1, "resid_pre")])
    assert _maxdiff(plain, a.logits) > 1e-2  # the intervention does something
    assert _maxdiff(a.logits, b.logits) <= TOL
    assert _maxdiff(a.acts[Site(1, "resid_pre")], b.acts[Site(1, "resid_pre")]) <= TOL


def test_ablation_everywhere_parity(tiny):
    lm, batch, nat, nns = tiny
    ivs = ablation_everywhere(_vector(lm.d_model, seed=1), nat.n_layers)
    sites = [Site(i, c) for i in range(nat.n_layers) for c in COMPONENTS]
    a = nat.run(batch, interventions=ivs, capture=sites)
    b = nns.run(batch, interventions=ivs, capture=sites)
    assert _maxdiff(a.logits, b.logits) <= TOL
    for s in sites:
        assert _maxdiff(a.acts[s], b.acts[s]) <= TOL, s


@pytest.mark.parametrize("apply_to", ["all", "generated"])
def test_greedy_generation_parity(tiny, apply_to):
    lm, batch, nat, nns = tiny
    ivs = [Addition(Site(1, "resid_pre"), _vector(lm.d_model, seed=2, norm=8.0), apply_to=apply_to)]
    a = nat.generate(batch, max_new_tokens=8, interventions=ivs)
    b = nns.generate(batch, max_new_tokens=8, interventions=ivs)
    assert b.shape == (batch.size, 8) and b.dtype == a.dtype
    assert torch.equal(a, b)


def test_generation_without_interventions(tiny):
    lm, batch, nat, nns = tiny
    assert torch.equal(nat.generate(batch, max_new_tokens=5), nns.generate(batch, max_new_tokens=5))


def test_early_eos_padding_and_no_warning(tiny):
    """Every row ends after one token: the bounded iter loop is cut short, ids still come back."""
    lm, batch, nat, nns = tiny
    eos = nat.eos_ids()[0]
    w = lm.model.get_output_embeddings().weight[eos].detach().clone()
    ivs = [Addition(Site(-1, "resid_post"), w, alpha=200.0, apply_to="generated")]
    a = nat.generate(batch, max_new_tokens=8, interventions=ivs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = nns.generate(batch, max_new_tokens=8, interventions=ivs)
    assert torch.equal(a, b)
    assert (b[:, 1] == eos).all() and (b[:, 2:] == nat.pad_id()).all()


def test_seeded_sampling_parity():
    lm = from_memory(*build_tiny("llama"))
    batch = encode(lm.tokenizer, PROMPTS)
    nat, nns = NativeBackend(lm), NNsightBackend(lm)
    ivs = [Addition(Site(0, "mlp_out"), _vector(lm.d_model, seed=3, norm=2.0), apply_to="generated")]
    kw = dict(max_new_tokens=8, interventions=ivs, do_sample=True, temperature=0.9, top_p=0.95, seed=7)
    assert torch.equal(nat.generate(batch, **kw), nns.generate(batch, **kw))


def test_hooks_never_leak_and_model_stays_plain():
    lm = from_memory(*build_tiny("qwen2"))
    batch = encode(lm.tokenizer, PROMPTS)
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    with torch.no_grad():
        before = lm.model(**kw).logits
    side, pad = lm.tokenizer.padding_side, lm.tokenizer.pad_token
    n0 = count_hooks(lm.model)
    nns = NNsightBackend(lm)
    nns.run(batch, capture=[Site(0, "attn_out")], interventions=[Addition(Site(1), _vector(lm.d_model))])
    assert count_hooks(lm.model) == n0
    nns.generate(batch, max_new_tokens=3, interventions=[Addition(Site(1), _vector(lm.d_model))])
    assert count_hooks(lm.model) == n0

    class Boom(RuntimeError):
        pass

    def boom(a: torch.Tensor) -> torch.Tensor:
        raise Boom("from inside an intervention")

    with pytest.raises(Boom):
        nns.run(batch, interventions=[FunctionIntervention(Site(1, "mlp_out"), boom)])
    assert count_hooks(lm.model) == n0
    with pytest.raises(Boom):
        nns.generate(batch, max_new_tokens=4,
                     interventions=[FunctionIntervention(Site(0, "resid_pre"), boom, apply_to="generated")])
    assert count_hooks(lm.model) == n0
    with torch.no_grad():
        after = lm.model(**kw).logits
    assert torch.equal(before, after)
    assert (lm.tokenizer.padding_side, lm.tokenizer.pad_token) == (side, pad)
    # and the backend still works after the errors
    assert _maxdiff(nns.run(batch).logits, before) <= TOL


@pytest.mark.parametrize("component", ["resid_pre", "attn_out", "resid_post"])
def test_wrong_size_vector_is_a_workbench_error(tiny, component):
    lm, batch, nat, nns = tiny
    n0 = count_hooks(lm.model)
    bad = [Addition(Site(0, component), torch.ones(lm.d_model + 3))]
    with pytest.raises(WorkbenchError, match="size"):
        nns.run(batch, interventions=bad)
    with pytest.raises(WorkbenchError, match="size"):
        nns.generate(batch, max_new_tokens=2, interventions=bad)
    assert count_hooks(lm.model) == n0


# -- the real embedded model ---------------------------------------------------------------------

REAL_PROMPTS = [
    "How do I bake bread?",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Give me three tips for staying healthy in winter, please.",
]


@pytest.fixture(scope="module")
def real():
    from workbench.loading import load_model

    try:
        lm = load_model("smollm2-135m-instruct")
    except WorkbenchError as e:  # the model package is not installed here
        pytest.fail(f"smollm2-135m-instruct unavailable: {e}")
    batch = encode(lm.tokenizer, REAL_PROMPTS)
    assert int(batch.pads.max()) > 0
    return lm, batch, NativeBackend(lm), NNsightBackend(lm)


@pytest.mark.real_model
def test_real_resid_post_parity(real):
    lm, batch, nat, nns = real
    assert nat.n_layers == 30
    sites = [Site(i, "resid_post") for i in range(nat.n_layers)]
    b = nns.run(batch, capture=sites, logits=False)
    full = NativeBackend(lm)
    full.share_prefix = False  # one full forward: every column, pads included, agrees
    a = full.run(batch, capture=sites, logits=False)
    for s in sites:
        assert _maxdiff(a.acts[s], b.acts[s]) <= TOL, s
    # the default native path computes the rows' shared template start once: real positions agree to rounding
    assert nat.shared_prefix(batch, []) > 0
    a = nat.run(batch, capture=sites, logits=False)
    for s in sites:
        for i, p in enumerate(batch.pads.tolist()):
            ref = b.acts[s][i, p:]
            assert _maxdiff(a.acts[s][i, p:], ref) <= max(TOL, 1e-5 * float(ref.abs().max())), s


@pytest.mark.real_model
def test_real_greedy_generation_parity_with_addition(real):
    lm, batch, nat, nns = real
    ivs = [Addition(Site(10, "resid_post"), _vector(lm.d_model, seed=0), alpha=16.0)]
    plain = nat.generate(batch, max_new_tokens=8)
    a = nat.generate(batch, max_new_tokens=8, interventions=ivs)
    b = nns.generate(batch, max_new_tokens=8, interventions=ivs)
    assert not torch.equal(plain, a)  # the addition changes the text
    assert torch.equal(a, b)
