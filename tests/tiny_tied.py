"""A tiny Llama with tied embedding and unembedding (like SmolLM2), shared by the orthogonalisation tests."""

from __future__ import annotations

import torch

from workbench.loading import LoadedModel, from_memory


def tied_llama() -> LoadedModel:
    """Seeded tiny Llama whose embedding and unembedding are one matrix (eager attention)."""
    import transformers

    from workbench.tiny import tiny_config, tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = tiny_config("llama", tok)
    cfg.tie_word_embeddings = True  # like SmolLM2: one matrix for embedding and unembedding
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    return from_memory(model.eval(), tok, model_id="tiny-llama-tied")


def lm_for(arch: str, make_tiny) -> LoadedModel:
    """``"llama-tied"`` -> :func:`tied_llama`, anything else -> the ``make_tiny`` fixture's model."""
    return tied_llama() if arch == "llama-tied" else make_tiny(arch)
