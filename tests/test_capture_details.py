"""capture() and Activations: the details surviving mutants showed untested (benchmarks/mutation.py, capture).

Positive token indices, the error naming the prompt that is too short, the order of the 'all' rows past 90
tokens, batch size 1, progress bar defaults, no unembedding during capture, Activations helpers (select, layer,
n_prompts, save twice, defaults) and the recorded format version and timing.
"""

from __future__ import annotations

import json
import time
import types

import pytest
import torch

from workbench.capture import Activations, capture
from workbench.chat import encode
from workbench.errors import WorkbenchError
from workbench.io import sha256_json
from workbench.sites import Site

PROMPTS = ["Hi", "How do I bake bread?", "Tell me a joke about computers and the people who use them."]
NC = dict(cache=False, progress=False)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_cache):
    return tmp_cache


@pytest.fixture
def lm(make_tiny):
    return make_tiny("llama")


def _real_rows(lm, prompts):
    """[prompt][token] -> resid_post at layer 0, each prompt run alone without padding (plain HF forward; the
    last entry of hidden_states has the final norm applied, so the first layer's output is used)."""
    out = []
    for p in prompts:
        b = encode(lm.tokenizer, [p])
        with torch.no_grad():
            hs = lm.model(input_ids=b.input_ids, output_hidden_states=True).hidden_states
        out.append(hs[1][0])  # hidden_states[0] is the embedding; [1] is layer 0's output
    return out


def test_positive_indices_count_from_the_first_real_token(lm):
    acts = capture(lm, PROMPTS, layers=[0], positions=[0, 2, 5], batch_size=3, **NC)
    assert acts.positions == ["pos0", "pos2", "pos5"]
    real = _real_rows(lm, PROMPTS)
    for i in range(len(PROMPTS)):
        for k in (0, 2, 5):
            torch.testing.assert_close(acts.get(f"pos{k}")[i, 0], real[i][k], atol=1e-4, rtol=0)


def test_an_index_outside_a_prompt_names_that_prompt_and_its_length(lm):
    n_hi = int(encode(lm.tokenizer, ["Hi"]).lengths[0])
    with pytest.raises(WorkbenchError, match=rf"position {n_hi + 3} is outside prompt 0 \({n_hi} tokens\); "
                                             rf"valid: -{n_hi}\.\.{n_hi - 1}"):
        capture(lm, PROMPTS[:2], positions=[n_hi + 3], **NC)
    with pytest.raises(WorkbenchError, match=rf"position -{n_hi + 1} is outside prompt 0"):
        capture(lm, PROMPTS[:2], positions=[-(n_hi + 1)], **NC)


def test_all_rows_stay_in_prompt_order_past_ninety_tokens(lm):
    long = " ".join(["The quick brown fox jumps over the lazy dog."] * 4)
    prompts = [long, "Hi", long + " Again."]
    lengths = encode(lm.tokenizer, prompts).lengths.tolist()
    assert min(lengths[0], lengths[2]) > 100
    acts = capture(lm, prompts, layers=[0], positions=["all"], batch_size=2, **NC)
    assert acts.token_index.tolist() == [[i, j] for i, n in enumerate(lengths) for j in range(n)]
    real = _real_rows(lm, prompts)
    torch.testing.assert_close(acts.get("all")[:, 0], torch.cat(real), atol=1e-4, rtol=0)


def test_batch_size_one(lm):
    one = capture(lm, PROMPTS, layers=[1], positions=["last", "mean"], batch_size=1, **NC)
    many = capture(lm, PROMPTS, layers=[1], positions=["last", "mean"], batch_size=3, **NC)
    for k in ("last", "mean"):
        torch.testing.assert_close(one.get(k), many.get(k), atol=1e-4, rtol=0)


def test_progress_is_shown_by_default_with_the_number_of_batches(lm, capsys):
    capture(lm, PROMPTS + ["List the planets.", "Hello there"], layers=[1], batch_size=2, cache=False)
    err = capsys.readouterr().err
    assert "capture tiny-llama-0" in err and "3/3" in err  # ceil(5 / 2) batches
    assert "3/4" not in err and "3.0" not in err


def test_capture_never_computes_the_unembedding(lm):
    calls = []
    h = lm.model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        capture(lm, PROMPTS, layers="all", positions=["last", "all"], **NC)
    finally:
        h.remove()
    assert calls == []


def test_recorded_seconds_and_format_version(lm, tmp_path):
    t0 = time.perf_counter()
    acts = capture(lm, PROMPTS, layers=[1], **NC)
    elapsed = time.perf_counter() - t0
    assert 0 <= acts.meta["seconds"] <= elapsed + 1e-3  # the capture's own time, not a budget
    assert acts.meta["seconds"] == round(acts.meta["seconds"], 3)
    # rounded to milliseconds, seen with a clock that moves by a known 1.2345678 s
    import workbench.capture as capture_mod

    ticks = iter([100.0])
    fake = types.SimpleNamespace(perf_counter=lambda: next(ticks, 101.2345678))
    real_time = capture_mod.time
    capture_mod.time = fake
    try:
        timed = capture(lm, PROMPTS, layers=[1], **NC)
    finally:
        capture_mod.time = real_time
    assert timed.meta["seconds"] == 1.235
    meta = json.loads((acts.save(tmp_path / "a") / "activations.json").read_text())
    assert meta["format_version"] == 1
    # provenance: the prompt set's hash is the first 16 hex digits of the JSON hash (directions record it too)
    assert meta["prompt_set_hash"] == sha256_json(PROMPTS)[:16]


def test_save_into_an_existing_folder_and_nested_folders(lm, tmp_path):
    acts = capture(lm, PROMPTS, layers=[1], **NC)
    acts.save(tmp_path / "x" / "y")
    acts.save(tmp_path / "x" / "y")  # again: replaced, no error
    back = Activations.load(tmp_path / "x" / "y")
    assert torch.equal(back.get("last"), acts.get("last"))


def test_select_rows(lm):
    acts = capture(lm, PROMPTS, layers=[0, 1], positions=["last", "mean"], **NC)
    assert acts.n_prompts == 3
    sub = acts.select(slice(1, 3))
    assert sub.n_prompts == 2 and sub.meta["n_prompts"] == 2
    assert sub.meta["prompt_hashes"] == acts.meta["prompt_hashes"][1:3]
    for k in ("last", "mean"):
        assert torch.equal(sub.get(k), acts.get(k)[1:3])
    assert sub.sites == acts.sites
    picked = acts.select([2, 0])
    assert picked.meta["prompt_hashes"] == [acts.meta["prompt_hashes"][2], acts.meta["prompt_hashes"][0]]
    assert torch.equal(picked.get("last"), acts.get("last")[[2, 0]])
    bare = Activations({"last": acts.get("last")}, list(acts.sites))  # no meta: nothing else to subset
    assert bare.meta == {} and bare.n_prompts == 3
    assert bare.select([1]).n_prompts == 1 and "prompt_hashes" not in bare.select([1]).meta
    with pytest.raises(WorkbenchError, match="'all'"):
        capture(lm, PROMPTS, layers=[1], positions=["all"], **NC).select([0])


def test_layer_without_metadata_counts_from_the_last_captured_layer(lm):
    acts = capture(lm, PROMPTS, layers=[0, 1], **NC)
    bare = Activations(dict(acts.data), list(acts.sites))
    assert bare.layers == [0, 1] and bare.n_prompts == 3
    assert torch.equal(bare.layer(-1), acts.get("last")[:, 1])
    assert torch.equal(bare.layer(-2), acts.get("last")[:, 0])
    assert torch.equal(bare.layer(1), acts.layer(-1))
    one = Activations({"last": acts.get("last")[:, :1]}, [Site(0)])
    assert torch.equal(one.layer(-1), acts.get("last")[:, 0])
