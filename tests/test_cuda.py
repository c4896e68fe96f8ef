"""CUDA checks: the same captures, interventions and generations on a GPU as on the CPU.

These run only where a CUDA GPU exists (CI machines have none; they were run on an H100/H200 lent to a
development session, see docs/results.md). Everything else in the suite is device-independent.
"""

from __future__ import annotations

import pytest
import torch

from workbench.backends import get_backend
from workbench.capture import capture
from workbench.chat import encode
from workbench.interventions import Addition, ablation_everywhere
from workbench.loading import from_memory, parse_device
from workbench.sites import Site
from workbench.tiny import build_tiny, tiny_chat_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on CI machines)")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_cuda_matches_cpu(arch: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = from_memory(*build_tiny(arch))
    gm, tok = build_tiny(arch)
    gpu = from_memory(gm.to(parse_device("cuda")), tok)
    prompts = tiny_chat_prompts()[:4]
    a_cpu = capture(cpu, prompts, positions=["last", "mean"], cache=False, progress=False)
    a_gpu = capture(gpu, prompts, positions=["last", "mean"], cache=False, progress=False)
    for k in ("last", "mean"):
        assert a_gpu.get(k).device.type == "cpu"  # results always come back to the CPU
        assert torch.allclose(a_cpu.get(k), a_gpu.get(k), atol=1e-4, rtol=1e-4)
    b = encode(tok, prompts)
    v = torch.randn(cpu.d_model, generator=torch.Generator().manual_seed(0))
    ivs = [Addition(Site(0, "resid_post"), v, 2.0)] + ablation_everywhere(v, cpu.n_layers)
    lc = get_backend("native", cpu).run(b, interventions=ivs).logits
    lg = get_backend("native", gpu).run(b, interventions=ivs).logits.cpu()
    m = b.attention_mask.bool()
    assert (lc - lg)[m].abs().max() < 1e-3
    gc = get_backend("native", cpu).generate(b, max_new_tokens=6, interventions=ivs[:1])
    gg = get_backend("native", gpu).generate(b, max_new_tokens=6, interventions=ivs[:1])
    assert gg.device.type == "cpu" and gg.shape == gc.shape
    assert (gc == gg).float().mean() > 0.9  # greedy ties may break differently on another device
