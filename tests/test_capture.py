"""capture(): batched == one-by-one for every reading position, exact gathering, save / load round
trip with provenance, the content-addressed cache, and clear errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from workbench.backends.native import NativeBackend
from workbench.capture import Activations, capture
from workbench.chat import ChatFormat, encode
from workbench.errors import WorkbenchError
from workbench.io import sha256_text
from workbench.paths import activations_cache
from workbench.prompts import Prompt, PromptSet
from workbench.sites import Site
from workbench.tiny import TINY_ARCHS

TOL = 1e-4
# deliberately not sorted by length, so batching reorders them
PROMPTS = ["Explain how a transformer language model works.", "Hi", "How do I bake bread?",
           "Tell me a joke about computers and the people who use them.", "List the planets."]
POSITIONS = ["last", "mean", "post_instruction", -2, 0, "all"]
TINY_N_POST = 4


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_cache):
    """Every test here writes its activation cache into a temporary WORKBENCH_CACHE."""
    return tmp_cache


def _keys():
    return ["last", "mean", "pos-4", "pos-3", "pos-2", "pos-1", "pos0", "all"]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_batched_capture_equals_one_by_one(arch, make_tiny):
    lm = make_tiny(arch)
    kw = dict(layers="all", components=("resid_post", "attn_out"), positions=POSITIONS, cache=False,
              progress=False)
    acts = capture(lm, PROMPTS, batch_size=2, **kw)
    assert acts.positions == _keys()  # -2 is part of post_instruction's keys: stored once
    assert [s.name for s in acts.sites] == ["blocks.0.hook_resid_post", "blocks.0.hook_attn_out",
                                            "blocks.1.hook_resid_post", "blocks.1.hook_attn_out"]
    for k in _keys():
        if k != "all":
            assert acts.get(k).shape == (len(PROMPTS), 4, 64)
    start = 0
    for i, p in enumerate(PROMPTS):
        one = capture(lm, [p], **kw)
        for k in _keys():
            if k == "all":
                n = one.get("all").shape[0]
                got = acts.get("all")[start:start + n]
                start += n
                assert float((got - one.get("all")).abs().max()) <= TOL
            else:
                assert float((acts.get(k)[i] - one.get(k)[0]).abs().max()) <= _tol(one.get(k)[0]), (p, k)
    assert start == acts.get("all").shape[0]


def test_positions_gather_the_right_tokens(make_tiny):
    lm = make_tiny("llama")
    be = NativeBackend(lm)
    sites = [Site(0), Site(1)]
    acts = capture(lm, PROMPTS, layers=[0, -1], positions=POSITIONS, batch_size=16, cache=False, progress=False)
    assert acts.meta["n_post"] == TINY_N_POST
    batch = encode(lm.tokenizer, PROMPTS)
    run = be.run(batch, capture=sites, logits=False).acts
    full = torch.stack([run[s] for s in sites], dim=2)  # [B, T, sites, d]
    lengths = batch.lengths.tolist()
    expected_index = []
    for i, n in enumerate(lengths):
        real = full[i, -n:]  # the prompt's real tokens, in order
        torch.testing.assert_close(acts.get("last")[i], real[-1], atol=TOL, rtol=0)
        torch.testing.assert_close(acts.get("mean")[i], real.mean(0), atol=TOL, rtol=0)
        torch.testing.assert_close(acts.get("pos0")[i], real[0], atol=TOL, rtol=0)
        for k in range(1, TINY_N_POST + 1):
            torch.testing.assert_close(acts.get(f"pos-{k}")[i], real[-k], atol=TOL, rtol=0)
        expected_index += [[i, j] for j in range(n)]
    assert acts.token_index.tolist() == expected_index
    assert acts.get("all").shape == (sum(lengths), 2, 64)
    for row, (i, j) in enumerate(expected_index):
        torch.testing.assert_close(acts.get("all")[row], full[i, -lengths[i] + j], atol=TOL, rtol=0)
    # layer() picks the site, negative layers count from the model's last layer
    assert torch.equal(acts.layer(-1), acts.get("last")[:, 1])
    assert torch.equal(acts.layer(0, "mean"), acts.get("mean")[:, 0])
    with pytest.raises(WorkbenchError, match="not captured"):
        acts.get("pos-7")
    with pytest.raises(WorkbenchError, match="not captured"):
        acts.layer(0, component="mlp_out")


@pytest.mark.real_model
def _tol(ref: torch.Tensor) -> float:
    """``TOL``, or 1e-5 of the reference's largest magnitude where that is larger: batched rows share their
    template's system prompt, which the native backend computes once in a separate pass (rounding scales with
    |h|, ~100 in the last layer)."""
    return max(TOL, 1e-5 * float(ref.abs().max()))


def test_smollm2_capture_batched_equals_one_by_one(smollm2):
    prompts = ["Hi", "How do I bake bread?", "Write a haiku about autumn leaves."]
    kw = dict(layers="0,-1", positions=["last", "mean", "post_instruction", -2, 0, "all"], cache=False,
              progress=False)
    acts = capture(smollm2, prompts, batch_size=3, **kw)
    assert acts.positions == ["last", "mean", "pos-6", "pos-5", "pos-4", "pos-3", "pos-2", "pos-1", "pos0", "all"]
    assert [s.layer for s in acts.sites] == [0, 29]
    start = 0
    for i, p in enumerate(prompts):
        one = capture(smollm2, [p], **kw)
        for k in acts.positions:
            if k == "all":
                n = one.get("all").shape[0]
                assert float((acts.get("all")[start:start + n] - one.get("all")).abs().max()) <= _tol(one.get("all"))
                assert acts.token_index[start:start + n].tolist() == [[i, j] for j in range(n)]
                start += n
            else:
                assert float((acts.get(k)[i] - one.get(k)[0]).abs().max()) <= _tol(one.get(k)[0]), (p, k)
    assert torch.equal(acts.get("pos-1"), acts.get("last"))


def test_save_load_round_trip_and_provenance(make_tiny, tmp_path):
    lm = make_tiny("qwen2")
    fmt = ChatFormat(system_prompt="Be safe.")
    acts = capture(lm, PROMPTS[:3], layers="all", components=["resid_pre", "mlp_out"],
                   positions=["last", "all", -1], fmt=fmt, cache=False, progress=False)
    out = acts.save(tmp_path / "acts")
    assert sorted(p.name for p in out.iterdir()) == ["activations.json", "activations.safetensors"]
    meta = json.loads((out / "activations.json").read_text())
    assert meta["model_id"] == "tiny-qwen2-0"
    assert meta["model_checksum"] == lm.checksum and len(lm.checksum) == 64
    assert meta["sites"] == ["blocks.0.hook_resid_pre", "blocks.0.hook_mlp_out",
                             "blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out"]
    assert meta["positions"] == ["last", "all", "pos-1"]
    assert meta["template_hash"] == fmt.template_hash(lm.tokenizer)
    assert meta["system_prompt"] == "Be safe."
    assert meta["prompt_hashes"] == [sha256_text(t)[:16] for t in PROMPTS[:3]]
    assert meta["dtype"] == "float32"
    assert meta["n_prompts"] == 3 and meta["d_model"] == 64 and meta["n_layers"] == 2
    back = Activations.load(out)
    assert back.sites == acts.sites
    assert back.positions == acts.positions
    for k in acts.positions:
        assert torch.equal(back.get(k), acts.get(k))
    assert torch.equal(back.token_index, acts.token_index)
    for k, v in acts.meta.items():
        assert back.meta[k] == v, k
    with pytest.raises(WorkbenchError, match="activations.json"):
        Activations.load(tmp_path)


def test_repeated_capture_reads_from_cache(make_tiny, tmp_cache):
    lm = make_tiny("llama")
    kw = dict(layers=[0, 1], positions=["last", "all", "post_instruction"], progress=False)
    first = capture(lm, PROMPTS[:3], **kw)
    assert not first.meta.get("from_cache")
    folder = activations_cache() / first.meta["cache_key"]
    assert str(folder).startswith(str(tmp_cache))
    assert (folder / "activations.json").exists()
    second = capture(lm, PROMPTS[:3], **kw)
    assert second.meta["from_cache"] is True
    assert second.positions == first.positions and second.sites == first.sites
    for k in first.positions:
        assert torch.equal(second.get(k), first.get(k))
    assert torch.equal(second.token_index, first.token_index)
    # a different system prompt / prompt set / site is a different cache entry
    other = capture(lm, PROMPTS[:3], fmt=ChatFormat(system_prompt="Be safe."), **kw)
    assert not other.meta.get("from_cache")
    assert other.meta["template_hash"] != first.meta["template_hash"]
    assert not torch.equal(other.get("last"), first.get("last"))
    assert not capture(lm, PROMPTS[:2], **kw).meta.get("from_cache")
    assert not capture(lm, PROMPTS[:3], layers=[0], positions=["last"], progress=False).meta.get("from_cache")
    # a different model (other weights) never hits another model's cache
    assert not capture(make_tiny("llama", seed=1), PROMPTS[:3], **kw).meta.get("from_cache")
    # cache=False neither reads nor matters for the values
    fresh = capture(lm, PROMPTS[:3], cache=False, **kw)
    assert not fresh.meta.get("from_cache")
    assert torch.equal(fresh.get("last"), first.get("last"))


def test_progress_flag(make_tiny, capsys):
    lm = make_tiny("gpt2")
    quiet = capture(lm, PROMPTS, batch_size=2, cache=False, progress=False)
    err = capsys.readouterr().err
    assert "capture" not in err and "batch" not in err
    loud = capture(lm, PROMPTS, batch_size=2, cache=False, progress=True)
    assert "capture tiny-gpt2-0" in capsys.readouterr().err
    assert torch.equal(loud.get("last"), quiet.get("last"))


def test_prompt_set_input(make_tiny):
    lm = make_tiny("llama")
    ps = PromptSet("demo", (Prompt("a", "Hi"), Prompt("b", "How do I bake bread?")))
    a = capture(lm, ps, layers=1, cache=False, progress=False)
    b = capture(lm, ["Hi", "How do I bake bread?"], layers=[-1], cache=False, progress=False)
    assert torch.equal(a.get("last"), b.get("last"))
    assert a.meta["prompt_hashes"] == b.meta["prompt_hashes"]


# -- errors --------------------------------------------------------------------------------------

def test_layer_out_of_range_names_valid_range(make_tiny):
    lm = make_tiny("llama")
    for bad in (2, -3, "0,5", [0, 9]):
        with pytest.raises(WorkbenchError, match=r"valid: 0\.\.1, or -2\.\.-1"):
            capture(lm, ["Hi"], layers=bad, cache=False, progress=False)
    with pytest.raises(WorkbenchError, match="bad layer spec"):
        capture(lm, ["Hi"], layers="first", cache=False, progress=False)


def test_negative_layer_equals_last(make_tiny):
    lm = make_tiny("gemma3")
    a = capture(lm, PROMPTS[:2], layers=-1, cache=False, progress=False)
    b = capture(lm, PROMPTS[:2], layers=1, cache=False, progress=False)
    assert a.sites == b.sites == [Site(1)]
    assert torch.equal(a.get("last"), b.get("last"))


@pytest.mark.parametrize("prompts", [[], ["  "], ["Hi", ""], SimpleNamespace(texts=[])], ids=str)
def test_empty_prompt_set(make_tiny, prompts):
    lm = make_tiny("llama")
    with pytest.raises(WorkbenchError, match="empty"):
        capture(lm, prompts, cache=False, progress=False)


def test_prompt_longer_than_context(make_tiny):
    lm = make_tiny("gpt2")
    assert lm.max_positions == 256
    with pytest.raises(WorkbenchError, match="256"):
        capture(lm, ["Hi", "word " * 400], cache=False, progress=False)


def test_unknown_position_and_component(make_tiny):
    lm = make_tiny("llama")
    with pytest.raises(WorkbenchError, match="unknown reading position 'middle'.*last"):
        capture(lm, ["Hi"], positions=["middle"], cache=False, progress=False)
    with pytest.raises(WorkbenchError, match="unknown component 'resid_mid'.*resid_post"):
        capture(lm, ["Hi"], components=["resid_mid"], cache=False, progress=False)
    with pytest.raises(WorkbenchError, match="unknown site component"):
        Site(0, "resid_mid")
    with pytest.raises(WorkbenchError, match="position 40 is outside prompt"):
        capture(lm, ["Hi", "How do I bake bread?"], positions=[40], cache=False, progress=False)
    with pytest.raises(WorkbenchError, match="batch_size"):
        capture(lm, ["Hi"], batch_size=0, cache=False, progress=False)
