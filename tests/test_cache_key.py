"""The activation cache key, field by field.

Everything that changes what ``capture`` returns must be part of the key: the prompts (and their order), the
chat template (template text, system prompt, raw mode), the sites (layers and components), the reading
positions, the model's dtype and its checksum. The hooking backend must not be: the three backends return the
same numbers, so a capture made with one is reused by the others.

Each test changes exactly one field between two captures and fails when that field is left out of
:func:`workbench.capture.cache_key` (the second capture would silently return the first one's data).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import workbench.capture as capture_mod
from workbench.capture import cache_key, capture
from workbench.chat import ChatFormat
from workbench.loading import from_memory
from workbench.sites import Site
from workbench.tiny import build_tiny

PROMPTS = ["Explain how a transformer language model works.", "Hi", "How do I bake bread?"]
KW = dict(layers=[0, 1], positions=["last"], progress=False)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_cache):
    return tmp_cache


@pytest.fixture
def lm(make_tiny):
    return make_tiny("llama")


def _fresh(lm, prompts=PROMPTS, **kw):
    """The same capture without the cache: what a correct cache must return."""
    return capture(lm, prompts, **(KW | kw | {"cache": False}))


def _pair(lm_a, lm_b=None, a=None, b=None):
    """Capture twice with the cache on: first with settings ``a``, then with ``b`` (prompts via 'prompts')."""
    a, b = dict(KW) | (a or {}), dict(KW) | (b or {})
    pa, pb = a.pop("prompts", PROMPTS), b.pop("prompts", PROMPTS)
    first = capture(lm_a, pa, **a)
    second = capture(lm_b or lm_a, pb, **b)
    assert not first.meta.get("from_cache")
    return first, second


def _same_data(x, y) -> bool:
    return x.positions == y.positions and all(torch.equal(x.get(k), y.get(k)) for k in x.positions)


# -- the behaviour: a changed field is a cache miss and returns its own data ---------------------------------

def test_same_request_hits_and_a_new_object_with_the_same_weights_hits(lm):
    first, second = _pair(lm)
    assert second.meta["from_cache"] is True and _same_data(first, second)
    twin = from_memory(*build_tiny("llama", seed=0), model_id="another-name")  # same weights, same checksum
    assert twin.checksum == lm.checksum
    assert capture(twin, PROMPTS, **KW).meta["from_cache"] is True


def test_positions_are_in_the_key(lm):
    # the reported break: with positions left out, 'mean' after 'last' returned the cached 'last' data
    first, second = _pair(lm, a={"positions": ["last"]}, b={"positions": ["mean"]})
    assert not second.meta.get("from_cache")
    assert second.positions == ["mean"]
    assert torch.equal(second.get("mean"), _fresh(lm, positions=["mean"]).get("mean"))
    assert not torch.allclose(second.get("mean"), first.get("last"))
    # an index, post_instruction and 'all' are positions too
    for pos in ([-2], ["post_instruction"], ["all"]):
        again = capture(lm, PROMPTS, **(KW | {"positions": pos}))
        assert not again.meta.get("from_cache"), pos
        assert again.positions == _fresh(lm, positions=pos).positions != ["last"]


def test_prompts_are_in_the_key(lm):
    other = ["Tell me a joke.", "Hi", "How do I bake bread?"]  # same count, one text differs
    _, second = _pair(lm, b={"prompts": other})
    assert not second.meta.get("from_cache")
    assert _same_data(second, _fresh(lm, prompts=other))
    # the order matters too: rows come back in prompt order
    rev = list(reversed(PROMPTS))
    first = capture(lm, PROMPTS, **KW)
    back = capture(lm, rev, **KW)
    assert not back.meta.get("from_cache")
    assert torch.equal(back.get("last"), first.get("last").flip(0))


@pytest.mark.parametrize("fmt", [ChatFormat(system_prompt="Be safe."), ChatFormat(raw=True)], ids=["system", "raw"])
def test_template_is_in_the_key(lm, fmt):
    _, second = _pair(lm, a={"fmt": ChatFormat()}, b={"fmt": fmt})
    assert not second.meta.get("from_cache")
    assert _same_data(second, _fresh(lm, fmt=fmt))


def test_layers_are_in_the_key(lm):
    first, second = _pair(lm, a={"layers": [0]}, b={"layers": [1]})
    assert not second.meta.get("from_cache")
    assert [s.layer for s in second.sites] == [1]
    assert _same_data(second, _fresh(lm, layers=[1]))
    assert not torch.allclose(first.get("last"), second.get("last"))


def test_components_are_in_the_key(lm):
    first, second = _pair(lm, a={"components": ("resid_post",)}, b={"components": ("attn_out",)})
    assert not second.meta.get("from_cache")
    assert [s.component for s in second.sites] == ["attn_out", "attn_out"]
    assert _same_data(second, _fresh(lm, components=("attn_out",)))
    assert not torch.allclose(first.get("last"), second.get("last"))


def test_dtype_is_in_the_key(lm):
    # a bfloat16 copy with the SAME checksum (as load_model(folder, dtype="bfloat16") gives: the checksum is
    # the weights file's), so only the dtype field tells the two apart
    model, tok = build_tiny("llama", seed=0)
    half = dataclasses.replace(lm, model=model.to(torch.bfloat16), tokenizer=tok)
    assert half.checksum == lm.checksum and half.dtype == torch.bfloat16
    first, second = _pair(lm, half)
    assert not second.meta.get("from_cache")
    assert second.meta["dtype"] == "bfloat16"
    assert not torch.equal(first.get("last"), second.get("last"))  # bf16 rounding shows


def test_model_checksum_is_in_the_key(lm):
    other = from_memory(*build_tiny("llama", seed=1), model_id=lm.model_id)  # same id, other weights
    assert other.checksum != lm.checksum
    first, second = _pair(lm, other)
    assert not second.meta.get("from_cache")
    assert second.meta["model_checksum"] == other.checksum
    assert not torch.allclose(first.get("last"), second.get("last"))


def test_backend_is_not_in_the_key(lm, monkeypatch):
    capture(lm, PROMPTS, backend="native", **KW)

    def no_backend(*a, **k):
        raise AssertionError("a cached capture must not run any backend")

    monkeypatch.setattr(capture_mod, "get_backend", no_backend)
    for be in ("nnsight", "transformer_lens"):
        again = capture(lm, PROMPTS, backend=be, **KW)
        assert again.meta["from_cache"] is True
        assert again.meta["backend"] == "native"  # provenance: who actually computed it


# -- the key itself, one field at a time ---------------------------------------------------------------------

def test_cache_key_changes_with_every_field_and_only_with_them(lm):
    sites = [Site(0), Site(1)]
    thash = ChatFormat().template_hash(lm.tokenizer)
    base = cache_key(lm, PROMPTS, sites, ["last"], thash)
    assert base == cache_key(lm, list(PROMPTS), [Site(0), Site(1)], ["last"], thash)  # deterministic
    changed = {
        "prompts": cache_key(lm, PROMPTS[:2] + ["Other"], sites, ["last"], thash),
        "order": cache_key(lm, PROMPTS[::-1], sites, ["last"], thash),
        "sites": cache_key(lm, PROMPTS, [Site(0), Site(0, "attn_out")], ["last"], thash),
        "layers": cache_key(lm, PROMPTS, [Site(1), Site(0)], ["last"], thash),
        "positions": cache_key(lm, PROMPTS, sites, ["mean"], thash),
        "template": cache_key(lm, PROMPTS, sites, ["last"], ChatFormat(system_prompt="x").template_hash(lm.tokenizer)),
        "checksum": cache_key(dataclasses.replace(lm, checksum="0" * 64), PROMPTS, sites, ["last"], thash),
    }
    model, tok = build_tiny("llama", seed=0)
    changed["dtype"] = cache_key(dataclasses.replace(lm, model=model.to(torch.float16)), PROMPTS, sites, ["last"],
                                 thash)
    for field, key in changed.items():
        assert key != base, f"{field} is not part of the cache key"
    assert len(set(changed.values())) == len(changed)
    # things that do not change the numbers are not in it: the model's name, the tokenizer object
    assert cache_key(dataclasses.replace(lm, model_id="renamed"), PROMPTS, sites, ["last"], thash) == base
