"""Weight orthogonalisation: the written checkpoint loads with plain transformers and its logits equal
runtime directional ablation (tiny llama / qwen2 / gpt2 / tied llama, and the real SmolLM2)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from steering.orthogonalize import orthogonalize_model, write_orthogonalized
from workbench.arch import get_arch
from workbench.backends import get_backend
from workbench.chat import ChatFormat, encode
from workbench.errors import WorkbenchError
from workbench.interventions import ablation_everywhere
from workbench.loading import from_memory
from tiny_tied import lm_for, tied_llama  # noqa: E402

PROMPTS = ["Hi!", "Explain how a transformer language model works, in simple words.", "List the planets."]


_tied_llama, _lm = tied_llama, lm_for


def _direction(d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed)) * 3.0


def _logits_vs_runtime_ablation(lm, path, prompts, r):
    """max |logits(orthogonalised checkpoint) - logits(runtime ablation)| over real tokens, and the
    difference between ablated and unmodified logits (so the check is not vacuous)."""
    b = encode(lm.tokenizer, prompts, ChatFormat())
    assert int(b.pads.max()) > 0  # a genuinely left-padded batch
    be = get_backend("native", lm)
    ref = be.run(b, interventions=ablation_everywhere(r, lm.n_layers)).logits.float()
    plain = be.run(b).logits.float()
    m2 = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    m2.eval()
    with torch.no_grad():
        out = m2(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits.float()
    real = b.attention_mask.bool()
    return float((out - ref)[real].abs().max()), float((plain - ref)[real].abs().max()), m2


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "llama-tied"])
def test_orthogonalised_checkpoint_equals_runtime_ablation(arch, make_tiny, tmp_path):
    lm = _lm(arch, make_tiny)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    tied_before = lm.model.get_output_embeddings().weight is get_arch(lm.model).embed.weight
    assert tied_before == (arch in ("gpt2", "llama-tied"))
    r = _direction(lm.d_model)
    path = write_orthogonalized(lm, r, tmp_path / "ortho", report={"note": "test"})

    diff, effect, m2 = _logits_vs_runtime_ablation(lm, path, PROMPTS, r)
    assert effect > 1e-2  # the ablation changes the logits...
    assert diff <= 1e-4, (arch, diff)  # ...and the checkpoint reproduces it exactly (fp32)

    # the source model is untouched (a deep copy was edited), ties included
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert (lm.model.get_output_embeddings().weight is get_arch(lm.model).embed.weight) == tied_before

    # the checkpoint: residual writers are orthogonal to r, the unembedding is the original one
    rh = r / r.norm()
    arch2 = get_arch(m2)
    assert float((arch2.embed.weight.detach() @ rh).abs().max()) < 1e-5
    assert torch.equal(m2.get_output_embeddings().weight.detach(), before[
        "lm_head.weight" if "lm_head.weight" in before else next(k for k in before if k.endswith("wte.weight"))])
    assert m2.get_output_embeddings().weight is not arch2.embed.weight
    assert m2.config.tie_word_embeddings is False
    if arch == "gpt2":  # Conv1D [in, out] weights and biases, plus position embeddings
        for i in range(lm.n_layers):
            for proj in (arch2.attn_out_proj(i), arch2.mlp_out_proj(i)):
                assert float((proj.weight.detach() @ rh).abs().max()) < 1e-5
                assert abs(float(proj.bias.detach() @ rh)) < 1e-5
        assert float((m2.transformer.wpe.weight.detach() @ rh).abs().max()) < 1e-5
    else:  # nn.Linear [out, in]
        for i in range(lm.n_layers):
            for proj in (arch2.attn_out_proj(i), arch2.mlp_out_proj(i)):
                assert float((rh @ proj.weight.detach()).abs().max()) < 1e-5

    info = json.loads((path / "orthogonalization.json").read_text())
    assert info["source_model"] == lm.model_id and info["source_checksum"] == lm.checksum
    assert info["direction_norm"] == pytest.approx(float(r.norm()), rel=1e-6) and info["note"] == "test"
    expected = ["embed"] + (["pos_embed"] if arch == "gpt2" else []) + [
        f"layers.{i}.{c}" for i in range(lm.n_layers) for c in ("attn_out", "mlp_out")]
    assert info["edited"] == expected
    assert (path / "tokenizer.json").exists() and not list(tmp_path.glob(".ortho.*"))


def test_post_norm_architectures_are_refused_unless_allowed(make_tiny, tmp_path):
    lm = make_tiny("gemma3")
    r = _direction(lm.d_model)
    with pytest.raises(WorkbenchError, match="normalises block outputs before the residual add.*allow_post_norm"):
        write_orthogonalized(lm, r, tmp_path / "g")
    assert not (tmp_path / "g").exists() and not list(tmp_path.iterdir())
    path = write_orthogonalized(lm, r, tmp_path / "g", allow_post_norm=True)
    assert (path / "model.safetensors").exists()


def test_direction_errors(make_tiny, tmp_path):
    lm = make_tiny("llama")
    with pytest.raises(WorkbenchError, match="size 63 but the model's d_model is 64"):
        write_orthogonalized(lm, torch.randn(63), tmp_path / "a")
    with pytest.raises(WorkbenchError, match="finite and non-zero"):
        orthogonalize_model(lm.model, torch.zeros(64))
    bad = torch.randn(64)
    bad[0] = float("nan")
    with pytest.raises(WorkbenchError, match="finite and non-zero"):
        orthogonalize_model(lm.model, bad)
    assert not list(tmp_path.iterdir())


def test_existing_output_folder_is_refused_unless_overwrite(make_tiny, tmp_path):
    lm = make_tiny("qwen2")
    r = _direction(lm.d_model)
    out = tmp_path / "out"
    out.mkdir()
    write_orthogonalized(lm, r, out)  # an empty folder is fine
    (out / "keep.txt").write_text("precious")
    with pytest.raises(WorkbenchError, match="exists and is not empty.*overwrite"):
        write_orthogonalized(lm, r, out)
    assert (out / "keep.txt").read_text() == "precious"
    write_orthogonalized(lm, r, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    # missing parents are created, and the temporary folder lives beside the output (atomic rename)
    nested = tmp_path / "a" / "b" / "model"
    write_orthogonalized(lm, r, nested)
    assert (nested / "config.json").exists() and sorted(p.name for p in nested.parent.iterdir()) == ["model"]


@pytest.mark.real_model
def test_smollm2_orthogonalised_logits_equal_runtime_ablation(smollm2, tmp_path):
    """Acceptance: the orthogonalised SmolLM2 checkpoint reproduces runtime ablation (fp32 weights).

    The comparison is machine-independent: both sides run in float64 (the written fp32 checkpoint loaded
    as float64 vs runtime ablation on a float64 copy of the model), where the only difference left is
    the fp32 rounding of the edited weights: well under 1e-4. The fp32 comparison is also checked, but
    against a bound measured in the same test: SmolLM2's own fp32 noise floor (max |logits fp32 - fp64|
    of the unmodified model on these prompts), which differs between CPUs and sits near 1e-4, so a fixed
    1e-4 fails on some machines (1.03e-4 was seen)."""
    import copy

    lm = smollm2
    assert lm.dtype == torch.float32
    emb = get_arch(lm.model).embed.weight
    tied = lm.model.get_output_embeddings().weight is emb
    probe_before = emb[:50].detach().clone()
    r = _direction(lm.d_model, seed=1)
    path = write_orthogonalized(lm, r, tmp_path / "smol-ortho")
    prompts = ["Hi!", "Explain how to bake bread at home."]
    diff32, effect, m2 = _logits_vs_runtime_ablation(lm, path, prompts, r)
    del m2
    assert effect > 1e-2
    # float64 on both sides, one prompt at a time (no padding: fully masked pad rows are NaN in an fp64
    # eager forward and 0 * NaN would leak into real positions)
    lm64 = from_memory(copy.deepcopy(lm.model).to(torch.float64), lm.tokenizer, model_id="smollm2-fp64")
    be64, be32 = get_backend("native", lm64), get_backend("native", lm)
    m64 = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64, attn_implementation="eager").eval()
    diff64 = floor = 0.0
    for prompt in prompts:
        b = encode(lm.tokenizer, [prompt], ChatFormat())
        ref64 = be64.run(b, interventions=ablation_everywhere(r.to(torch.float64), lm.n_layers)).logits
        with torch.no_grad():
            out64 = m64(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
        diff64 = max(diff64, float((out64 - ref64).abs().max()))
        floor = max(floor, float((be32.run(b).logits.double() - be64.run(b).logits).abs().max()))
    assert diff64 <= 1e-4, diff64
    # fp32: within a small multiple of the fp32 noise floor measured here
    assert diff32 <= max(1e-4, 4 * floor), (diff32, floor)
    # the shared session model is untouched
    assert torch.equal(get_arch(lm.model).embed.weight[:50], probe_before)
    assert (lm.model.get_output_embeddings().weight is get_arch(lm.model).embed.weight) == tied
    print(f"diff64 {diff64:.2e}, diff32 {diff32:.2e}, fp32 noise floor {floor:.2e}")
