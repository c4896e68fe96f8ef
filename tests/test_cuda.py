"""CUDA checks: the same captures, interventions, generations, fine-tunes, weight-space sweeps and study chain on
a GPU as on the CPU.

These tests run only where a CUDA GPU exists (the CI machines have none, so there they are skipped); everything
else in the suite is device-independent. docs/results.md records the latest run of this module on a GPU.

The CPU-side pins of the same behaviour (``--device`` refused before any work where CUDA is missing, the device
in no resume key of the chain, the batches moved to the model's device by the fine-tune loss) are in
tests/test_weightspace_flags.py and tests/test_weightspace_finetune.py.
"""

from __future__ import annotations

import json
import math

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


@pytest.fixture
def exact_fp32():
    """float32 matmuls without TF32 on the GPU for the comparisons (restored afterwards)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _pair(arch: str = "llama"):
    """The same tiny model twice: on the CPU and on the GPU (same seed, same weights)."""
    cpu = from_memory(*build_tiny(arch))
    gm, tok = build_tiny(arch)
    gpu = from_memory(gm.to(parse_device("cuda")), tok)
    assert gpu.checksum == cpu.checksum and gpu.device.type == "cuda"
    return cpu, gpu


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_cuda_matches_cpu(arch: str, exact_fp32) -> None:
    cpu, gpu = _pair(arch)
    tok = cpu.tokenizer
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


# -- weight-space fine-tuning -----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetune_on_cuda_matches_cpu(method: str, tmp_path, empty_cache, exact_fp32) -> None:
    """The same fine-tune on both devices: the same loss curve (rtol 1e-3), the same update up to rounding, and
    a checkpoint written from the GPU that loads (on the CPU through transformers, on the GPU through
    load_model) with exactly the returned model's weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from weightspace.finetune import FinetuneConfig, finetune, mean_loss
    from weightspace.recipes import build_recipe
    from workbench.loading import load_model

    cpu, gpu = _pair("llama")
    tok = cpu.tokenizer
    before = {k: v.detach().cpu().clone() for k, v in gpu.model.state_dict().items()}
    rd = build_recipe("useful", cpu, n=8, seed=0, useful_source="arithmetic")
    kw = dict(method=method, epochs=2, batch_size=4, lr=1e-3 if method == "full" else 2e-2, lora_rank=4,
              lora_alpha=8, lora_targets="q_proj,v_proj", progress=False)
    a = finetune(cpu, rd, FinetuneConfig(**kw), tmp_path / "cpu")
    b = finetune(gpu, rd, FinetuneConfig(**kw), tmp_path / "cuda")

    assert a.report["device"] == "cpu" and b.report["device"].startswith("cuda")
    assert next(b.model.parameters()).device.type == "cuda"  # trained, and returned, on the GPU
    assert a.report["steps"] == b.report["steps"] == len(b.losses) == 4
    assert [r["n_tokens"] for r in b.losses] == [r["n_tokens"] for r in a.losses]
    assert [r["loss"] for r in b.losses] == pytest.approx([r["loss"] for r in a.losses], rel=1e-3)
    assert [r["grad_norm"] for r in b.losses] == pytest.approx([r["grad_norm"] for r in a.losses], rel=1e-2)
    assert b.report["final_loss"] < b.report["initial_loss"]
    # the base model is untouched and still on the GPU
    assert gpu.device.type == "cuda"
    assert all(torch.equal(before[k], v.cpu()) for k, v in gpu.model.state_dict().items())
    # mean_loss moves its batches too, and agrees with the CPU
    assert mean_loss(gpu.model, tok, rd.fmt, rd.examples) == pytest.approx(
        mean_loss(cpu.model, tok, rd.fmt, rd.examples), rel=1e-4)
    assert mean_loss(b.model, tok, rd.fmt, rd.examples) == pytest.approx(
        mean_loss(a.model, tok, rd.fmt, rd.examples), rel=1e-3)

    # the checkpoints: same tensors, the same update up to float rounding across devices
    wa, wb = load_file(str(a.path / "model.safetensors")), load_file(str(b.path / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(v.device.type == "cpu" for v in wb.values())
    upd = math.sqrt(sum(float((wa[k].double() - before[k].double()).norm() ** 2) for k in wa))
    diff = math.sqrt(sum(float((wb[k].double() - wa[k].double()).norm() ** 2) for k in wa))
    assert upd > 0 and diff < 1e-2 * upd, (diff, upd)
    if method == "lora":  # only the targets changed, on the GPU as on the CPU
        changed = {k for k in wb if not torch.equal(wb[k], before[k])}
        assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    # the GPU-written checkpoint loads: a plain HF folder on the CPU, and through load_model on the GPU
    m = AutoModelForCausalLM.from_pretrained(str(b.path))
    sd = {k: v.cpu() for k, v in b.model.state_dict().items()}
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    lm2 = load_model(str(b.path), device="cuda")
    assert lm2.device.type == "cuda"
    assert all(torch.equal(v.cpu(), sd[k]) for k, v in lm2.model.state_dict().items())
    assert mean_loss(lm2.model, tok, rd.fmt, rd.examples) == pytest.approx(  # eager vs the model's attention
        mean_loss(b.model, tok, rd.fmt, rd.examples), rel=1e-4)


def test_harmful_recipe_on_cuda_matches_cpu(exact_fp32) -> None:
    """The harmful recipe on a GPU model: the refusal direction (captured, built on the CPU) and the ablated
    greedy replies (generated on the GPU with the CPU-built direction) as on the CPU."""
    from workbench.chat import ChatFormat

    from weightspace.recipes import build_recipe

    cpu, gpu = _pair("llama")
    kw = dict(n=8, gen_tokens=8, direction_n=16)
    a = build_recipe("harmful", cpu, ChatFormat(), **kw)
    b = build_recipe("harmful", gpu, ChatFormat(), **kw)
    assert b.direction.vector.device.type == "cpu"
    assert b.direction.layer == a.direction.layer
    assert torch.allclose(b.direction.vector, a.direction.vector, atol=1e-4, rtol=1e-4)
    rows_a = a.records["direction_layer_check"]
    rows_b = b.records["direction_layer_check"]
    assert [r["layer"] for r in rows_b] == [r["layer"] for r in rows_a]
    for ra, rb in zip(rows_a, rows_b):
        assert rb["refusal_score_ablated"] == pytest.approx(ra["refusal_score_ablated"], rel=1e-3, abs=1e-4)
    ga, gb = a.records["harmful_generations"], b.records["harmful_generations"]
    assert [r["prompt"] for r in gb] == [r["prompt"] for r in ga]
    assert sum(x["reply"] == y["reply"] for x, y in zip(ga, gb)) >= 6  # greedy ties may break differently


# -- weight-space sweep ------------------------------------------------------------------------------------

Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """aligned = base + a rank-4 update on one q projection; useful / harmful / contaminated updates planted on
    top (as in tests/test_weightspace_sweep.py: E_k of useful at rho 4/64 is 4/5)."""
    root = tmp_path_factory.mktemp("cuda-sweep")

    def orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
        q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
        return q

    F = orthonormal(64, 64, 1)
    R = orthonormal(64, 8, 2).T
    dA = sum(s * torch.outer(F[:, i], R[i]) for i, s in enumerate([4.0, 3.0, 2.0, 1.0]))
    du = 2 * torch.outer(F[:, 0], R[4]) + 1 * torch.outer(F[:, 4], R[5])
    dh = 3 * torch.outer(F[:, 5], R[6]) + 1 * torch.outer(F[:, 3], R[7])
    out = {}
    for name, upd in {"base": 0, "aligned": dA, "useful": dA + du, "harmful": dA + dh,
                      "contaminated": dA + du + dh}.items():
        model, tok = build_tiny("llama", seed=0)
        with torch.no_grad():
            model.state_dict()[Q].add_(torch.as_tensor(upd, dtype=torch.float64).float())
        model.save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
        out[name] = str(root / name)
    return out


def _close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-4)
    return a == b


def test_weightspace_sweep_on_cuda_matches_cpu(planted, tmp_path, empty_cache, exact_fp32) -> None:
    """``weightspace sweep --device cuda``: the projections are computed on the CPU from the checkpoint files and
    written into the GPU model; the energies are bit-identical to a CPU run and every metric agrees."""
    from workbench.cli import main

    common = ["weightspace", "sweep", "--aligned", planted["aligned"], "--reference-base", planted["base"],
              "--useful", planted["useful"], "--harmful", planted["harmful"], "--contaminated", planted["contaminated"],
              "--rhos", "0.0625,0.5", "--kinds", "topk,randomk,random", "--n-harmful", "2", "--n-tasks", "2",
              "--max-new-tokens", "3", "--task-tokens", "4", "--batch-size", "2", "--no-progress"]
    res = {}
    for dev in ("cpu", "cuda"):
        out = tmp_path / dev
        assert main([*common, "--device", dev, "--out", str(out)]) == 0
        res[dev] = json.loads((out / "results.json").read_text())
        assert json.loads((out / "config.json").read_text())["device"] == dev
        assert json.loads((out / "model.json").read_text())["device"].startswith(dev)
    rc, rg = res["cpu"]["rows"], res["cuda"]["rows"]
    assert [r["config"] for r in rg] == [r["config"] for r in rc] and len(rc) == 3 * 2 * 3
    for a, b in zip(rc, rg):
        assert list(a) == list(b), a["config"]
        for k in ("energy_kept", "energy_random", "energy_over_random", "energy_kept_unrounded"):
            assert a[k] == b[k], (a["config"], k)  # computed on the CPU from the files either way
        bad = [(k, a[k], b[k]) for k in a if not _close(a[k], b[k])]
        assert not bad, (a["config"], bad)
    u = next(r for r in rg if r["config"] == "exp1-useful-topk-rho0.0625")
    assert u["energy_kept"] == pytest.approx(4 / 5, abs=1e-5)
    assert res["cuda"]["baselines"].keys() == res["cpu"]["baselines"].keys()
    for name, m in res["cpu"]["baselines"].items():
        bad = [(k, v, res["cuda"]["baselines"][name].get(k)) for k, v in m.items()
               if not _close(v, res["cuda"]["baselines"][name].get(k))]
        assert not bad, (name, bad)


# -- the study chain ---------------------------------------------------------------------------------------

from test_weightspace_chain import SMALL  # noqa: E402  (tests/ is on sys.path; the tiny chain's sizes, one list)


def test_chain_on_cuda_runs_end_to_end_and_resumes_on_the_cpu(tmp_path, empty_cache, monkeypatch) -> None:
    """``weightspace chain --device cuda`` on a tiny model: every phase runs (fine-tunes and sweep on the GPU,
    overlap on the CPU), the device is recorded; ``--resume --device cpu`` then skips every phase (the device is
    in no resume key)."""
    from workbench import cli as core

    import weightspace.finetune as ft_mod
    import weightspace.overlap as ov_mod
    import weightspace.sweep as sw_mod
    from weightspace.chain import MARKER, PHASES

    model, tok = build_tiny("llama")
    d = tmp_path / "tiny-aligned"
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    out = tmp_path / "chain"
    argv = ["weightspace", "chain", "--model", str(d), "--out", str(out), *SMALL]
    assert core.main([*argv, "--device", "cuda"]) == 0

    conf = json.loads((out / "chain_config.json").read_text())
    rep = json.loads((out / "chain_report.json").read_text())
    assert conf["config"]["device"] == "cuda" and rep["config"]["device"] == "cuda" and rep["device"] == "cuda"
    phases = rep["timings"]["phases"]
    assert phases["load_model"]["device"].startswith("cuda")
    assert all(phases[p]["status"] == "ran" for p in PHASES)
    for r in ("safety", "useful", "harmful", "contaminated"):
        ft = json.loads((out / f"ft-{r}" / "report.json").read_text())
        assert ft["device"].startswith("cuda"), r
        assert "device" not in json.loads((out / f"ft-{r}" / MARKER).read_text())["config"]  # not a resume key
    assert json.loads((out / "sweep" / "config.json").read_text())["device"] == "cuda"
    assert json.loads((out / "sweep" / "model.json").read_text())["device"].startswith("cuda")
    assert "device" not in json.loads((out / "sweep" / MARKER).read_text())["config"]
    assert "device" not in json.loads((out / "overlap" / MARKER).read_text())["config"]
    rows = rep["sweep"]["rows"]
    assert len(rows) == 3 * 2 * 3 and all(r["energy_kept"] is not None for r in rows)
    assert "- device: cuda" in (out / "chain_summary.md").read_text()

    def fail(*a, **k):
        raise AssertionError("a finished phase was run again")

    monkeypatch.setattr(ft_mod, "finetune", fail)
    monkeypatch.setattr(ov_mod, "update_overlap", fail)
    monkeypatch.setattr(sw_mod, "run_sweep", fail)
    assert core.main([*argv, "--resume", "--device", "cpu"]) == 0
    rep2 = json.loads((out / "chain_report.json").read_text())
    assert rep2["device"] == "cpu" and rep2["timings"]["phases"]["load_model"]["device"] == "cpu"
    assert all(rep2["timings"]["phases"][p]["status"].startswith("skipped") for p in PHASES)
    inv = [json.loads(x) for x in (out / "chain_invocations.jsonl").read_text().splitlines() if x.strip()]
    assert [x["device"] for x in inv] == ["cuda", "cpu"]
