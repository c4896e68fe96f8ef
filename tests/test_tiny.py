"""Tests for workbench.tiny: tiny in-code HF causal LMs and their tokenizer."""
from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from workbench.tiny import (
    SPECIAL_TOKENS,
    TINY_ARCHS,
    build_tiny,
    tiny_chat_prompts,
    tiny_tokenizer,
)

EXPECTED_CLASS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


def _chat_batch(tok, prompts=None):
    """Left-padded batch of chat-formatted prompts (no doubled BOS)."""
    prompts = prompts if prompts is not None else tiny_chat_prompts()
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(params=TINY_ARCHS)
def arch(request):
    return request.param


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_basics():
    tok = tiny_tokenizer()
    assert 300 <= len(tok) <= 400
    assert tok.padding_side == "left"
    assert tok.pad_token == "<|pad|>" and tok.bos_token == "<|bos|>" and tok.eos_token == "<|eos|>"
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert len(set(ids)) == len(SPECIAL_TOKENS) and tok.unk_token_id not in ids
    # Special tokens are atomic and BOS is prepended to plain text.
    enc = tok("<|user|>\nhello<|end|>")["input_ids"]
    assert enc[0] == tok.bos_token_id
    assert enc[1] == tok.convert_tokens_to_ids("<|user|>")
    assert tok.convert_tokens_to_ids("<|end|>") in enc
    # Byte-level: arbitrary text round-trips.
    text = "Héllo wörld ✓ 123"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # The bridge needs these to avoid reloading from the hub.
    assert tok.init_kwargs["name_or_path"] == "tiny-bpe"
    assert tok.init_kwargs["add_bos_token"] is True


def test_tokenizer_fresh_copies():
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert a is not b
    a.padding_side = "right"
    assert b.padding_side == "left" and tiny_tokenizer().padding_side == "left"
    assert a.get_vocab() == b.get_vocab()


def test_chat_template():
    tok = tiny_tokenizer()
    s = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert s.endswith("<|assistant|>\n")
    assert s == "<|bos|><|user|>\nhi<|end|>\n<|assistant|>\n"
    s = tok.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ],
        tokenize=False,
    )
    assert s == (
        "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nhi<|end|>\n"
        "<|assistant|>\nhello<|end|>\n"
    )
    # Tokenized template has exactly one BOS.
    out = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=True, add_generation_prompt=True
    )
    ids = out["input_ids"] if not isinstance(out, list) else out
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_chat_prompts():
    prompts = tiny_chat_prompts()
    assert 6 <= len(prompts) <= 12
    assert len({len(p) for p in prompts}) > 4  # varied lengths
    assert all(isinstance(p, str) and p for p in prompts)


# --------------------------------------------------------------------------- models


def test_build(arch):
    model, tok = build_tiny(arch)
    assert type(model).__name__ == EXPECTED_CLASS[arch]
    assert model.config.architectures == [EXPECTED_CLASS[arch]]
    assert model.config._attn_implementation == "eager"
    assert not model.training
    assert model.config.vocab_size == len(tok)
    assert model.config.bos_token_id == tok.bos_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.hidden_size == 64
    assert model.config.num_hidden_layers == 2
    assert model.config.num_attention_heads == 4
    if arch != "gpt2":
        assert model.config.num_key_value_heads == 2  # GQA exercised
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_build_sizes_and_dtype(arch):
    model, _ = build_tiny(arch, n_layers=3, d_model=32, n_heads=2, dtype=torch.bfloat16)
    assert model.config.num_hidden_layers == 3
    assert model.config.hidden_size == 32
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(torch.tensor([[0, 10, 20, 30]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_deterministic_per_seed(arch):
    rng_before = torch.random.get_rng_state()
    m1, tok = build_tiny(arch, seed=0)
    m2, _ = build_tiny(arch, seed=0)
    m3, _ = build_tiny(arch, seed=1)
    # Building does not consume the caller's global RNG.
    assert torch.equal(rng_before, torch.random.get_rng_state())
    batch = _chat_batch(tok)
    with torch.no_grad():
        l1 = m1(**batch).logits
        l2 = m2(**batch).logits
        l3 = m3(**batch).logits
    assert torch.equal(l1, l2)
    assert not torch.allclose(l1, l3, atol=1e-3)


def test_forward_left_padded_batch(arch):
    model, tok = build_tiny(arch)
    prompts = tiny_chat_prompts()
    batch = _chat_batch(tok, prompts)
    B, T = batch["input_ids"].shape
    assert B == len(prompts)
    assert (batch["attention_mask"][:, 0] == 0).any()  # really left-padded
    assert (batch["input_ids"][:, -1] == batch["input_ids"][0, -1]).all()  # "\n" after <|assistant|>
    with torch.no_grad():
        logits = model(**batch, position_ids=_positions(batch["attention_mask"])).logits
    assert logits.shape == (B, T, len(tok))
    assert torch.isfinite(logits).all()
    # Outputs vary meaningfully between prompts (init is not near-degenerate).
    last = logits[:, -1]
    assert last.std(0).mean() > 0.1
    assert len({int(i) for i in last.argmax(-1)}) >= 2 or last.std(0).mean() > 0.3
    # Left padding (with mask-derived positions) matches the unpadded forward.
    for i in (0, B - 1):
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()][None]
        with torch.no_grad():
            alone = model(ids).logits[0, -1]
        torch.testing.assert_close(alone, last[i], atol=1e-4, rtol=1e-4)


def test_generate(arch):
    model, tok = build_tiny(arch)
    batch = _chat_batch(tok, tiny_chat_prompts()[:3])
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (3, batch["input_ids"].shape[1] + 5)
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    with torch.no_grad():
        again = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(out, again)


# --------------------------------------------------------------------------- hooking backends


def test_transformer_bridge_boots(arch):
    from transformer_lens.model_bridge import TransformerBridge

    model, tok = build_tiny(arch)
    batch = _chat_batch(tok, tiny_chat_prompts()[:3])
    mask = batch["attention_mask"]
    with torch.no_grad():
        ref = model(**batch, position_ids=_positions(mask)).logits

    bridge = TransformerBridge.boot_transformers("tiny-" + arch, hf_model=model, tokenizer=tok)
    assert bridge.cfg.n_layers == 2 and bridge.cfg.d_model == 64
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(batch["input_ids"], attention_mask=mask)
    assert logits.shape == ref.shape
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref[real], atol=1e-4, rtol=1e-4)
    assert cache["blocks.1.hook_resid_post"].shape == (3, mask.shape[1], 64)
    assert "blocks.0.attn.hook_pattern" in cache


def test_nnsight_wraps(arch):
    from nnsight import LanguageModel

    model, tok = build_tiny(arch)
    batch = _chat_batch(tok, tiny_chat_prompts()[:3])
    with torch.no_grad():
        ref = model(**batch, position_ids=_positions(batch["attention_mask"])).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LanguageModel is deprecated in nnsight 0.8
        lm = LanguageModel(model, tokenizer=tok)
    layers = lm.transformer.h if arch == "gpt2" else lm.model.layers
    with torch.no_grad(), lm.trace(dict(batch)):
        hidden = layers[0].output.save()
        logits = lm.lm_head.output.save()
    hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    assert hidden.shape == (3, batch["input_ids"].shape[1], 64)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], ref[real], atol=1e-4, rtol=1e-4)
