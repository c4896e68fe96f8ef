"""The native backend's shared-prefix path equals one full forward: captures, logits, every intervention
position rule, generation (tokens and the prefill's next-token logits), on tiny llama, qwen2 and gpt2 models
with a system prompt that every row shares. And it is not taken where it could change a result."""

from __future__ import annotations

import pytest
import torch

from workbench.backends import get_backend
from workbench.backends.native import MIN_SHARED
from workbench.chat import ChatFormat, encode
from workbench.interventions import Ablation, Addition, Clamp, FunctionIntervention
from workbench.loading import from_memory
from workbench.sites import Site
from workbench.tiny import build_tiny

FMT = ChatFormat(system_prompt="You are a careful assistant who answers every question in plain words.")
PROMPTS = ["Tell me about the sea", "hi", "What is the capital of France and why is it there?",
           "Write a poem", "Explain gradient descent to a child in two sentences"]


def _pair(arch: str):
    lm = from_memory(*build_tiny(arch, n_layers=3))
    shared, full = get_backend("native", lm), get_backend("native", lm)
    full.share_prefix = False
    return lm, shared, full


def _real(x: torch.Tensor, pads: torch.Tensor) -> list[torch.Tensor]:
    return [x[i, int(p):] for i, p in enumerate(pads)]


def _same_run(shared, full, batch, sites, ivs):
    """Both backends' run of ``batch``: the logits and captures of every row's real tokens agree."""
    a = shared.run(batch, capture=sites, interventions=ivs)
    b = full.run(batch, capture=sites, interventions=ivs)
    for x, y in zip(_real(a.logits, batch.pads), _real(b.logits, batch.pads)):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)
    for s in sites:
        for x, y in zip(_real(a.acts[s], batch.pads), _real(b.acts[s], batch.pads)):
            torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)
    return a, b


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_run_equals_full_forward(arch):
    lm, shared, full = _pair(arch)
    batch = encode(lm.tokenizer, PROMPTS, FMT)
    n = shared.shared_prefix(batch, [])
    assert n >= MIN_SHARED and full.shared_prefix(batch, []) == 0
    d = lm.model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    v = torch.randn(d, generator=g)
    sites = [Site(0, "resid_pre"), Site(1, "attn_out"), Site(1, "mlp_out"), Site(2, "resid_post")]
    cases = [[], [Ablation(Site(1, "resid_pre"), v)], [Addition(Site(0, "resid_post"), v, 0.7, apply_to="prompt")],
             [Addition(Site(1, "mlp_out"), v, 2.0, apply_to="last"), Clamp(Site(2, "resid_pre"), v, 1.5)],
             [Addition(Site(0, "attn_out"), v, 1.0, apply_to="post_instruction")],
             [Addition(Site(1, "resid_pre"), v, 1.0, apply_to=[0, 2, n + 1, -1, -2])]]
    for ivs in cases:
        assert shared.shared_prefix(batch, ivs) >= MIN_SHARED
        a, b = _same_run(shared, full, batch, sites, ivs)
        last_a = shared.run(batch, interventions=ivs, logits="last").logits
        torch.testing.assert_close(last_a, b.logits[:, -1:], atol=2e-5, rtol=1e-5)
        # the last K positions only: inside the suffix, reaching into the shared prefix, wider than the batch
        for k in (3, batch.width - n + 2, batch.width + 4):
            kept = min(k, batch.width)
            first = batch.width - kept  # the full layout's column of the first kept position
            for be in (shared, full):
                tail = be.run(batch, interventions=ivs, logits=k).logits
                assert tail.shape[1] == kept
                for i, p in enumerate(batch.pads.tolist()):  # each row's real (not padding) positions
                    start = max(first, int(p))
                    torch.testing.assert_close(tail[i, start - first:], b.logits[i, start:], atol=2e-5, rtol=1e-5)
        cap_only = shared.run(batch, capture=sites[:1], interventions=ivs, logits=False)
        assert cap_only.logits is None
        torch.testing.assert_close(cap_only.acts[sites[0]][:, -3:], b.acts[sites[0]][:, -3:], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_generate_equals_full(arch):
    lm, shared, full = _pair(arch)
    batch = encode(lm.tokenizer, PROMPTS, FMT)
    v = torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for ivs in ([], [Ablation(Site(1, "resid_pre"), v)], [Addition(Site(1, "resid_post"), v, 3.0, apply_to="generated")],
                [Addition(Site(0, "resid_post"), v, 3.0, apply_to="last")]):
        fa, fb = [], []
        ta = shared.generate(batch, max_new_tokens=6, interventions=ivs, first_step=fa)
        tb = full.generate(batch, max_new_tokens=6, interventions=ivs, first_step=fb)
        assert torch.equal(ta, tb)
        torch.testing.assert_close(fa[0], fb[0], atol=2e-5, rtol=1e-5)


def test_split_only_where_it_cannot_change_a_result():
    lm, shared, _ = _pair("llama")
    batch = encode(lm.tokenizer, PROMPTS, FMT)
    v = torch.ones(lm.model.config.hidden_size)
    n = shared.shared_prefix(batch, [])
    # a function of the whole chunk (not position-wise): never split
    assert shared.shared_prefix(batch, [FunctionIntervention(Site(0, "resid_pre"), lambda a: a - a.mean(1, keepdim=True))]) == 0
    # a negative index that reaches into the shortest row's prefix shortens the shared part (or turns it off)
    shortest = int(batch.lengths.min())
    reach = shortest - n + 3
    assert shared.shared_prefix(batch, [Addition(Site(0, "resid_pre"), v, apply_to=[-reach])]) in (0, shortest - reach - 1)
    # one prompt, or prompts without a common start of MIN_SHARED tokens: not split
    assert shared.shared_prefix(encode(lm.tokenizer, PROMPTS[:1], FMT), []) == 0
    assert shared.shared_prefix(encode(lm.tokenizer, PROMPTS), []) == 0
    # the shared part is the common start of the rendered prompts (here the system prompt and user header)
    rows = [lm.tokenizer(FMT.render(lm.tokenizer, p), add_special_tokens=False)["input_ids"] for p in PROMPTS]
    common = 0
    while all(len(r) > common and r[common] == rows[0][common] for r in rows):
        common += 1
    assert n == min(common, shortest - batch.n_post - 1)


def test_non_position_wise_intervention_gives_full_forward_result():
    lm, shared, full = _pair("qwen2")
    batch = encode(lm.tokenizer, PROMPTS, FMT)
    iv = [FunctionIntervention(Site(1, "resid_pre"), lambda a: a - a.mean(1, keepdim=True))]
    a = shared.run(batch, interventions=iv, logits="last").logits
    b = full.run(batch, interventions=iv, logits="last").logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_settings_on_their_own_rows_share_the_prefix_once_per_setting(arch):
    """OnRows around position-wise interventions (several settings in one batch): the prefix runs once per
    setting and every row's captures and logits equal one full forward; the battery's decoder takes the same
    path and gives the same replies and prefill log-probabilities as without a shared prefix."""
    from steering.battery import greedy_decode
    from workbench.backends.native import prefix_groups
    from workbench.interventions import OnRows

    lm, shared, full = _pair(arch)
    d = lm.model.config.hidden_size
    g = torch.Generator().manual_seed(3)
    v, w = torch.randn(d, generator=g), torch.randn(d, generator=g)
    k = len(PROMPTS)
    prompts = PROMPTS * 3  # unmodified, an addition, an ablation + addition on rows k.., 2k..
    ivs = [OnRows(Addition(Site(0, "resid_pre"), v, 3.0), range(k, 2 * k)),
           OnRows(Ablation(Site(1, "resid_pre"), w), range(2 * k, 3 * k)),
           OnRows(Addition(Site(2, "attn_out"), w, -2.0), range(2 * k, 3 * k))]
    reps, group = prefix_groups(ivs, torch.arange(3 * k))
    assert reps.tolist() == [0, k, 2 * k] and group.tolist() == [0] * k + [1] * k + [2] * k
    batch = encode(lm.tokenizer, prompts, FMT)
    assert shared.shared_prefix(batch, ivs) >= MIN_SHARED
    sites = [Site(0, "resid_post"), Site(2, "mlp_out")]
    a, _ = _same_run(shared, full, batch, sites, ivs)
    assert not torch.allclose(a.logits[k, -1], a.logits[0, -1])  # the settings differ
    # an intervention that is not position-wise inside OnRows keeps the whole batch in one pass
    fn = FunctionIntervention(Site(0, "resid_pre"), lambda x: x - x.mean(1, keepdim=True))
    assert shared.shared_prefix(batch, [OnRows(fn, range(k))]) == 0
    # the battery's decoder, rows in a shuffled order across two batches
    fs: list[torch.Tensor] = []
    ft: list[torch.Tensor] = []
    ra = greedy_decode(shared, prompts, FMT, max_new_tokens=8, interventions=ivs, batch_size=8, first_step=fs)
    rb = greedy_decode(full, prompts, FMT, max_new_tokens=8, interventions=ivs, batch_size=8, first_step=ft)
    assert ra == rb and ra[k:2 * k] != ra[:k]
    torch.testing.assert_close(fs[0], ft[0], atol=2e-5, rtol=1e-5)
