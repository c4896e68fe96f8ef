"""NativeBackend: batched == one-by-one (positions from the mask), position masks of HookContext,
generation with the KV cache and interventions, and hooks that never leak."""

from __future__ import annotations

import pytest
import torch

from workbench.arch import count_hooks
from workbench.backends import get_backend
from workbench.backends.native import NativeBackend
from workbench.chat import Batch, ChatFormat, encode, position_ids_from_mask
from workbench.errors import WorkbenchError
from workbench.interventions import Addition, FunctionIntervention, HookContext
from workbench.sites import COMPONENTS, Site
from workbench.tiny import TINY_ARCHS

TOL = 1e-4
FMT = ChatFormat(system_prompt="You are a helpful assistant. Answer briefly and in plain words.")
PROMPTS = ["Hi", "Explain how a transformer language model works.", "How do I bake bread?",
           "Tell me a joke about computers."]


def _vec(d: int, seed: int = 0, norm: float = 1.0) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def _check_batched_equals_single(be: NativeBackend, prompts: list[str], sites: list[Site], rel: float = 0.0) -> None:
    """Batched rows equal one-by-one runs to ``TOL`` absolute, or (``rel``) to ``rel`` times the largest
    magnitude of the reference tensor: the shared-prefix path computes the common start of the rows in a
    separate batch-1 pass, so its rounding scales with the activations (|h| ~ 100 in a real model's last layer)."""
    tok = be.lm.tokenizer
    batch = encode(tok, prompts, FMT if rel else None)
    assert int(batch.pads.max()) > 0  # really padded
    assert (be.shared_prefix(batch, []) > 0) == bool(rel)
    out = be.run(batch, capture=sites)
    assert out.logits.shape[:2] == batch.input_ids.shape

    def tol(ref: torch.Tensor) -> float:
        return rel * float(ref.abs().max()) if rel else TOL

    for i, p in enumerate(prompts):
        one = be.run(encode(tok, [p], FMT if rel else None), capture=sites)
        n = int(batch.lengths[i])
        assert _maxdiff(out.logits[i, -n:], one.logits[0]) <= tol(one.logits[0]), (p, "logits")
        for s in sites:
            assert _maxdiff(out.acts[s][i, -n:], one.acts[s][0]) <= tol(one.acts[s][0]), (p, s)


# -- batched == one by one ----------------------------------------------------------------------

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_batched_run_equals_one_by_one(arch, make_tiny):
    be = NativeBackend(make_tiny(arch))
    sites = [Site(i, c) for i in range(be.n_layers) for c in COMPONENTS]
    be.share_prefix = False
    _check_batched_equals_single(be, PROMPTS, sites)
    if arch != "gemma3":  # sliding-window caches are never split
        be.share_prefix = True
        _check_batched_equals_single(be, PROMPTS, sites, rel=1e-5)


@pytest.mark.real_model
def test_smollm2_batched_run_equals_one_by_one(smollm2):
    be = NativeBackend(smollm2)
    sites = [Site(0, "resid_pre"), Site(10, "mlp_out"), Site(15, "attn_out"), Site(-1, "resid_post")]
    prompts = ["Hi", "How do I bake bread?", "Write a haiku about autumn leaves."]
    be.share_prefix = False
    _check_batched_equals_single(be, prompts, sites)
    be.share_prefix = True  # smollm2's template adds its own system prompt: the rows share it
    _check_batched_equals_single(be, prompts, sites, rel=1e-5)


def test_get_backend_and_unknown_backend(make_tiny):
    lm = make_tiny("llama")
    assert isinstance(get_backend("native", lm), NativeBackend)
    with pytest.raises(WorkbenchError, match="native"):
        get_backend("nope", lm)


def test_negative_layer_capture_and_no_logits(make_tiny):
    be = NativeBackend(make_tiny("qwen2"))
    batch = encode(be.lm.tokenizer, PROMPTS[:2])
    out = be.run(batch, capture=[Site(-1), Site(1), Site(-2, "mlp_out")], logits=False)
    assert out.logits is None
    assert torch.equal(out.acts[Site(-1)], out.acts[Site(1)])
    full = be.run(batch, capture=[Site(0, "mlp_out")])
    assert torch.equal(out.acts[Site(-2, "mlp_out")], full.acts[Site(0, "mlp_out")])


def test_layer_out_of_range_in_run(make_tiny):
    be = NativeBackend(make_tiny("llama"))
    batch = encode(be.lm.tokenizer, ["Hi"])
    for bad in (2, -3):
        with pytest.raises(WorkbenchError, match=r"0\.\.1"):
            be.run(batch, capture=[Site(bad)])
    with pytest.raises(WorkbenchError, match="out of range"):
        be.run(batch, interventions=[Addition(Site(7), torch.ones(64))])
    assert count_hooks(be.lm.model) == 0


# -- HookContext masks --------------------------------------------------------------------------

# Two rows, prompt width 5: row 0 has 2 left pads (real tokens at 2,3,4), row 1 has none; 2 post tokens.
CTX = dict(pads=torch.tensor([2, 0]), prompt_width=5, n_post=2)
F, T = False, True
PREFILL = {
    "all": [[F, F, T, T, T], [T, T, T, T, T]],
    "prompt": [[F, F, T, T, T], [T, T, T, T, T]],
    "generated": [[F, F, F, F, F], [F, F, F, F, F]],
    "last": [[F, F, F, F, T], [F, F, F, F, T]],
    "post_instruction": [[F, F, F, T, T], [F, F, F, T, T]],
    (0,): [[F, F, T, F, F], [T, F, F, F, F]],
    (-1,): [[F, F, F, F, T], [F, F, F, F, T]],
    (0, -2): [[F, F, T, T, F], [T, F, F, T, F]],
    (-4,): [[F, F, F, F, F], [F, T, F, F, F]],  # row 0 has only 3 tokens: -4 falls on a pad
    (4,): [[F, F, F, F, F], [F, F, F, F, T]],  # row 0: first real + 4 is past the prompt
}


@pytest.mark.parametrize("apply_to", list(PREFILL), ids=str)
def test_hook_context_masks_prefill(apply_to):
    ctx = HookContext(**CTX, offset=0)
    assert ctx.mask(list(apply_to) if isinstance(apply_to, tuple) else apply_to, 5, torch.device("cpu")).tolist() \
        == PREFILL[apply_to]


@pytest.mark.parametrize("offset", [5, 6, 9])
def test_hook_context_masks_cached_decoding_steps(offset):
    ctx = HookContext(**CTX, offset=offset)
    cpu = torch.device("cpu")
    assert ctx.mask("all", 1, cpu).tolist() == [[T], [T]]
    assert ctx.mask("generated", 1, cpu).tolist() == [[T], [T]]
    for name in ("prompt", "last", "post_instruction", [0], [-1], [0, -2]):
        assert ctx.mask(name, 1, cpu).tolist() == [[F], [F]], name


def test_hook_context_mask_full_forward_over_prompt_and_generated():
    ctx = HookContext(**CTX, offset=0)
    cpu = torch.device("cpu")
    assert ctx.mask("generated", 7, cpu).tolist() == [[F] * 5 + [T, T]] * 2
    assert ctx.mask("prompt", 7, cpu).tolist() == [[F, F, T, T, T, F, F], [T, T, T, T, T, F, F]]
    assert ctx.mask("all", 7, cpu).tolist() == [[F, F, T, T, T, T, T], [T] * 7]
    assert ctx.mask("last", 7, cpu).tolist() == [[F, F, F, F, T, F, F]] * 2


def test_hook_context_unknown_position_set():
    with pytest.raises(WorkbenchError, match="post_instruction"):
        HookContext(**CTX).mask("middle", 5, torch.device("cpu"))


def test_generated_addition_leaves_prefill_but_changes_generation(make_tiny):
    be = NativeBackend(make_tiny("llama"))
    batch = encode(be.lm.tokenizer, PROMPTS[:2])
    iv = Addition(Site(0), _vec(64, 1), alpha=8.0, apply_to="generated")
    assert torch.equal(be.run(batch, interventions=[iv]).logits, be.run(batch).logits)
    plain = be.generate(batch, max_new_tokens=8)
    steered = be.generate(batch, max_new_tokens=8, interventions=[iv])
    assert torch.equal(steered[:, 0], plain[:, 0])  # first token comes from the (unchanged) prefill
    assert not torch.equal(steered, plain)


def test_last_addition_changes_only_last_position(make_tiny):
    be = NativeBackend(make_tiny("gpt2"))
    batch = encode(be.lm.tokenizer, PROMPTS[:3])
    iv = Addition(Site(0), _vec(64, 2), alpha=4.0, apply_to="last")
    a, b = be.run(batch, interventions=[iv]).logits, be.run(batch).logits
    for r in range(batch.size):  # real positions before the last are untouched (pads carry no meaning)
        p = int(batch.pads[r])
        assert torch.equal(a[r, p:-1], b[r, p:-1])
    assert (a[:, -1] - b[:, -1]).abs().amax(-1).min() > 1e-3  # every row's last position moved


# -- generation with the KV cache ------------------------------------------------------------------

def _manual_greedy(be: NativeBackend, batch: Batch, n: int, interventions=()) -> torch.Tensor:
    """Greedy decoding without a KV cache: re-run the whole sequence every step."""
    ids, mask = batch.input_ids, batch.attention_mask
    out = []
    for _ in range(n):
        b = Batch(ids, mask, position_ids_from_mask(mask), mask.sum(-1), batch.n_post)
        nxt = be.run(b, interventions=interventions).logits[:, -1].argmax(-1)
        out.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
    return torch.stack(out, 1)


def _cut_at_eos(row: list[int], eos: set[int], pad: int) -> list[int]:
    for k, t in enumerate(row):
        if t in eos:
            return row[:k + 1] + [pad] * (len(row) - k - 1)
    return row


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_batched_generation_equals_alone(arch, make_tiny):
    be = NativeBackend(make_tiny(arch))
    tok = be.lm.tokenizer
    batch = encode(tok, PROMPTS)
    gen = be.generate(batch, max_new_tokens=8)
    assert gen.shape == (len(PROMPTS), 8) and gen.dtype == torch.long
    for i, p in enumerate(PROMPTS):
        assert gen[i].tolist() == be.generate(encode(tok, [p]), max_new_tokens=8)[0].tolist(), p


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_cached_generation_with_addition_equals_no_cache_loop(arch, make_tiny):
    be = NativeBackend(make_tiny(arch))
    batch = encode(be.lm.tokenizer, PROMPTS[:2])
    site = Site(0, "resid_pre")
    scale = float(be.run(batch, capture=[site]).acts[site].norm(dim=-1).mean())  # as large as the stream
    iv = Addition(site, _vec(be.lm.d_model, 3), alpha=scale, apply_to="all")
    cached = be.generate(batch, max_new_tokens=8, interventions=[iv])
    manual = _manual_greedy(be, batch, 8, [iv])
    eos, pad = set(be.eos_ids()), be.pad_id()
    for r in range(batch.size):
        assert cached[r].tolist() == _cut_at_eos(manual[r].tolist(), eos, pad)
    assert not torch.equal(cached, be.generate(batch, max_new_tokens=8))  # the addition matters


def test_generate_row_that_stops_early_is_padded(make_tiny):
    lm = make_tiny("llama")
    be = NativeBackend(lm)
    batch = encode(lm.tokenizer, PROMPTS[:2])
    plain = be.generate(batch, max_new_tokens=5)
    # push only row 0 towards end-of-sequence at the last prompt token (before the final norm)
    stop = lm.tokenizer.eos_token_id
    head = lm.model.get_output_embeddings().weight[stop].detach()
    push = torch.zeros(2, 1, 64)
    push[0, 0] = 500.0 * head / head.norm()
    iv = FunctionIntervention(Site(-1), lambda a: a + push, apply_to="last")
    gen = be.generate(batch, max_new_tokens=5, interventions=[iv])
    assert gen.shape == (2, 5)
    assert gen[0].tolist() == [stop] + [be.pad_id()] * 4
    assert gen[1].tolist() == plain[1].tolist()  # the other row is unaffected and keeps going
    assert plain[1, 0].item() != stop
    texts = be.decode(gen)
    assert texts[0] == "" and texts[1] == be.decode(plain[1:])[0] != ""


# -- hooks never leak ------------------------------------------------------------------------------

class _Boom(RuntimeError):
    pass


def test_hooks_never_leak_and_user_hooks_survive(make_tiny):
    lm = make_tiny("llama")
    be = NativeBackend(lm)
    batch = encode(lm.tokenizer, PROMPTS[:2])
    fired = {"n": 0}

    def user_hook(module, args, out):
        fired["n"] += 1

    handle = lm.model.model.layers[1].register_forward_hook(user_hook)
    try:
        base = count_hooks(lm.model)
        assert base == 1
        iv = Addition(Site(0), _vec(64), apply_to="all")
        be.run(batch, capture=[Site(0), Site(1, "attn_out"), Site(0, "resid_pre")], interventions=[iv])
        assert count_hooks(lm.model) == base and fired["n"] == 1
        be.generate(batch, max_new_tokens=3, interventions=[iv])
        assert count_hooks(lm.model) == base and fired["n"] == 4  # prefill + 2 cached steps

        def explode(a):
            raise _Boom("inside the intervention")

        bad = FunctionIntervention(Site(1, "mlp_out"), explode)
        with pytest.raises(_Boom, match="inside the intervention"):
            be.run(batch, interventions=[bad])
        assert count_hooks(lm.model) == base
        with pytest.raises(_Boom):
            be.generate(batch, max_new_tokens=3, interventions=[bad])
        assert count_hooks(lm.model) == base
        wrong = Addition(Site(0), torch.ones(10))
        with pytest.raises(WorkbenchError):
            be.run(batch, interventions=[wrong])
        assert count_hooks(lm.model) == base
        # the model is plain again: equal to a hook-free forward, and the user's hook still fires
        n = fired["n"]
        out = be.run(batch)
        assert fired["n"] == n + 1
        ref = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits
        assert torch.equal(out.logits, ref)
    finally:
        handle.remove()
    assert count_hooks(lm.model) == 0
