"""Directional ablation during generation, on all three backends: every decoding step is recorded and the
direction's projection is ~0 at every ablated site, at prompt AND generated positions; the generated tokens
equal a manual greedy decode with hand-written ablation hooks (no KV cache, no workbench code).

Aimed at the break "``ablation_everywhere`` no longer ablates generated tokens (``apply_to="prompt"``)".
"""

from __future__ import annotations

import pytest
import torch

from workbench.backends import get_backend
from workbench.chat import ChatFormat, encode
from workbench.interventions import HookContext, Intervention, ablation_everywhere
from workbench.sites import Site
from workbench.tiny import tiny_chat_prompts

PROMPTS = tiny_chat_prompts()[:3]  # different lengths: left padding matters
NEW = 6


class Recorder(Intervention):
    """Records the activation at its site after the interventions listed before it, chunk by chunk."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.apply_to = "all"
        self.chunks: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, act: torch.Tensor, ctx) -> torch.Tensor:
        n = act.shape[1]
        self.chunks.append((ctx.offset, act.detach().float().clone(), ctx.mask("all", n, act.device).cpu(),
                            ctx.mask("generated", n, act.device).cpu()))
        return act


def _direction(d: int) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(5))
    return v / v.norm()


def _manual_ablation_hooks(model, r: torch.Tensor) -> list:
    """Arditi-style ablation written out by hand on a Llama: each layer's input, attention and MLP output."""

    def strip(h: torch.Tensor) -> torch.Tensor:
        return h - (h @ r.to(h.dtype)).unsqueeze(-1) * r.to(h.dtype)

    def pre(module, args, kwargs):
        if args:
            return (strip(args[0]),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": strip(kwargs["hidden_states"])}

    def post(module, args, out):
        return (strip(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else strip(out)

    handles = []
    for layer in model.model.layers:
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(post))
        handles.append(layer.mlp.register_forward_hook(post))
    return handles


def _manual_greedy(lm, prompt: str, r: torch.Tensor, n_new: int, eos: set[int]) -> list[int]:
    ids = lm.tokenizer(ChatFormat().render(lm.tokenizer, prompt), add_special_tokens=False)["input_ids"]
    out: list[int] = []
    handles = _manual_ablation_hooks(lm.model, r)
    try:
        with torch.no_grad():
            for _ in range(n_new):
                nxt = int(lm.model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
                if nxt in eos:
                    break
                out.append(nxt)
    finally:
        for h in handles:
            h.remove()
    return out


@pytest.fixture(scope="module")
def tiny_llama():
    from workbench.loading import from_memory
    from workbench.tiny import build_tiny

    return from_memory(*build_tiny("llama", seed=0), model_id="tiny-llama-0")


@pytest.mark.parametrize("backend", ["native", "transformer_lens", "nnsight"])
def test_ablation_holds_at_every_generated_position(tiny_llama, backend):
    lm = tiny_llama
    be = get_backend(backend, lm)
    r = _direction(lm.d_model)
    ivs = ablation_everywhere(r, lm.n_layers)
    assert {(iv.site.layer, iv.site.component) for iv in ivs} == {
        (i, c) for i in range(lm.n_layers) for c in ("resid_pre", "attn_out", "mlp_out")}
    recorders = [Recorder(iv.site) for iv in ivs]
    batch = encode(lm.tokenizer, PROMPTS)
    plain = be.generate(batch, max_new_tokens=NEW)
    toks = be.generate(batch, max_new_tokens=NEW, interventions=ivs + recorders)
    assert not torch.equal(plain, toks)  # the ablation changes what is generated

    for rec in recorders:
        offsets = [c[0] for c in rec.chunks]
        widths = [c[1].shape[1] for c in rec.chunks]
        # one prefill over the padded prompt, then one cached decoding step per further token
        assert offsets[0] == 0 and widths[0] == batch.width
        assert len(rec.chunks) >= 3 and widths[1:] == [1] * (len(widths) - 1)
        assert offsets[1:] == list(range(batch.width, batch.width + len(widths) - 1))
        n_generated = 0
        for _, act, real, gen in rec.chunks:
            proj = act @ r
            scale = act.norm(dim=-1).clamp(min=1.0)
            assert float((proj.abs() / scale)[real].max()) < 1e-4, rec.site
            n_generated += int(gen.sum())
        assert n_generated >= batch.size * 2, rec.site  # generated positions really were checked

    # the tokens equal a manual greedy decode under hand-written ablation hooks, prompt by prompt
    eos = set(be.eos_ids())
    for i, p in enumerate(PROMPTS):
        want = _manual_greedy(lm, p, r, NEW, eos)
        got: list[int] = []
        for t in toks[i].tolist():
            if t in eos:
                break
            got.append(t)
        assert got == want, (backend, p)


def test_steering_ablation_is_ablation_everywhere_of_the_unit_direction(tiny_llama):
    from steering.interventions import ablation
    from workbench.vectors import Direction

    lm = tiny_llama
    v = 3.0 * _direction(lm.d_model)
    d = Direction(v, layer=1, method="t", model_id=lm.model_id, model_checksum=lm.checksum, d_model=lm.d_model)
    ivs = ablation(d, lm.n_layers)
    assert [iv.site for iv in ivs] == [iv.site for iv in ablation_everywhere(v, lm.n_layers)]
    assert all(iv.apply_to == "all" for iv in ivs)
    x = torch.randn(1, 4, lm.d_model)
    ctx = HookContext(pads=torch.tensor([0]), prompt_width=2, n_post=1, offset=0)  # 2 prompt + 2 generated
    for iv in ivs:
        out = iv(x, ctx)
        assert float((out @ (v / v.norm())).abs().max()) < 1e-5
