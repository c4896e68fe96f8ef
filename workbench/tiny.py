"""Tiny random Hugging Face causal LMs built entirely in code, for fast tests.

Nothing here touches the filesystem or the network: the tokenizer is a
byte-level BPE trained in memory on a few dozen built-in sentences, and the
models are randomly initialised from hand-written configs.

    >>> from workbench.tiny import build_tiny
    >>> model, tok = build_tiny("llama")
    >>> text = tok.apply_chat_template([{"role": "user", "content": "hi"}],
    ...                                tokenize=False, add_generation_prompt=True)

Conventions (shared by every arch):

* Tokenizer: vocab 384, special tokens ``<|bos|> <|eos|> <|pad|> <|user|>
  <|assistant|> <|system|> <|end|>`` (ids 0..6 in that order). It prepends
  ``<|bos|>`` when encoding plain text (``add_bos_token=True``, Llama-style), and
  the chat template *also* starts with ``<|bos|>``. So encode chat-formatted text
  with ``add_special_tokens=False`` (as ``apply_chat_template(tokenize=True)``
  does) to avoid a doubled BOS. ``padding_side="left"``.
* Models: eager attention, eval mode, deterministic weights for a given seed
  (the global torch RNG is left untouched), ``initializer_range=0.2`` so that
  activations/logits differ meaningfully between prompts.
"""
from __future__ import annotations

import copy
import functools

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

__all__ = [
    "TINY_ARCHS",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "tiny_tokenizer",
    "tiny_config",
    "build_tiny",
    "tiny_chat_prompts",
]

TINY_ARCHS = ("llama", "qwen2", "gemma3", "gpt2")

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
USER, ASSISTANT, SYSTEM, END = "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, SYSTEM, END)

TOKENIZER_NAME = "tiny-bpe"
VOCAB_SIZE = 384
INITIALIZER_RANGE = 0.2
MAX_POSITIONS = 256

# "<|bos|>" + for each message "<|{role}|>\n{content}<|end|>\n" + optional "<|assistant|>\n"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' ~ message['role']) }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>\n' ~ message['content'] ~ '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello! How are you doing today?",
    "I am fine, thank you. How can I help you?",
    "Please write a short poem about the sea.",
    "The sea is wide and blue, and the waves are calm tonight.",
    "Explain how a transformer language model works.",
    "A transformer reads tokens and predicts the next token with attention.",
    "What is the capital of France? The capital of France is Paris.",
    "Give me three tips for staying healthy.",
    "Drink water, sleep well, and take a walk every day.",
    "How do I bake a loaf of bread at home?",
    "Mix flour, water, salt and yeast, then let the dough rise.",
    "Tell me a joke about computers.",
    "Why did the computer go to the doctor? It had a virus.",
    "I cannot help with that request, but I can help with something else.",
    "Sorry, I can't assist with that. It could cause harm to other people.",
    "Sure, here is a step by step guide.",
    "Translate 'good morning' into Spanish: buenos dias.",
    "Summarize the following text in one sentence.",
    "The model refused because the request was unsafe.",
    "Write a Python function that adds two numbers: def add(a, b): return a + b",
    "Numbers like 1, 2, 3, 10, 42 and 2024 appear in text too.",
    "You are a helpful, honest and harmless assistant.",
    "Describe the color of the sky on a clear summer day.",
    "List the planets of the solar system in order.",
    "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune.",
    "Can you recommend a good book to read this weekend?",
    "What is the difference between weather and climate?",
    "The cat sat on the mat and looked out of the window.",
    "Thanks a lot for your help! Have a nice day.",
    f"{BOS}{SYSTEM}\nYou are a helpful assistant.{END}\n{USER}\nHi there!{END}\n"
    f"{ASSISTANT}\nHello! How can I help you today?{END}\n",
    f"{BOS}{USER}\nWhat is two plus two?{END}\n{ASSISTANT}\nTwo plus two is four.{END}\n",
    f"{BOS}{USER}\nHow do I pick a lock?{END}\n{ASSISTANT}\nI can't help with that.{END}\n",
    f"{BOS}{USER}\nWrite a haiku about autumn.{END}\n{ASSISTANT}\nLeaves fall, the wind sighs.{END}\n",
)

_CHAT_PROMPTS = (
    "Hi!",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Give me three tips for staying healthy and happy.",
    "Explain how a transformer language model works, in simple words.",
    "How do I bake bread?",
    "Tell me a joke about computers and the people who use them every day.",
    "List the planets.",
)


def tiny_chat_prompts() -> list[str]:
    """Eight short user instructions of varied length (a fresh list each call)."""
    return list(_CHAT_PROMPTS)


@functools.lru_cache(maxsize=1)
def _cached_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer=trainer)

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[USER, ASSISTANT, SYSTEM, END],
        add_bos_token=True,
        add_eos_token=False,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        name_or_path=TOKENIZER_NAME,
    )
    # TransformerLens' bridge (get_tokenizer_with_bos) reads init_kwargs: with
    # add_bos_token=True it keeps this object instead of re-loading
    # `name_or_path` from the Hub.
    tok.init_kwargs.update(name_or_path=TOKENIZER_NAME, add_bos_token=True)
    tok.name_or_path = TOKENIZER_NAME
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    return tok


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer (vocab ~384) trained in code; a fresh copy per call.

    The training is cached; each call deep-copies the cached tokenizer so callers
    (and the TransformerLens bridge, which mutates padding side etc.) can't leak
    state into each other.
    """
    return copy.deepcopy(_cached_tokenizer())


def tiny_config(
    arch: str,
    tok: PreTrainedTokenizerFast | None = None,
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
):
    """The Hugging Face config used by :func:`build_tiny` for ``arch``."""
    if tok is None:
        tok = _cached_tokenizer()
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS}")
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    head_dim = d_model // n_heads
    # GQA with 2 KV heads where it divides evenly; otherwise plain MHA.
    n_kv = 2 if (n_heads % 2 == 0 and n_heads > 2) else n_heads
    ids = dict(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    common_decoder = dict(
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=INITIALIZER_RANGE,
        rms_norm_eps=1e-6,
        use_cache=True,
        **ids,
    )
    if arch == "llama":
        from transformers import LlamaConfig

        cfg = LlamaConfig(hidden_act="silu", tie_word_embeddings=False, **common_decoder)
    elif arch == "qwen2":
        from transformers import Qwen2Config

        common_decoder.pop("head_dim")  # Qwen2 derives head_dim = hidden // heads
        cfg = Qwen2Config(
            hidden_act="silu",
            tie_word_embeddings=False,
            use_sliding_window=False,
            **common_decoder,
        )
    elif arch == "gemma3":
        from transformers import Gemma3TextConfig

        # Alternate sliding/full attention so both code paths are exercised; the
        # window is small enough to matter for the longer test prompts.
        layer_types = [
            "full_attention" if (i + 1) % 2 == 0 else "sliding_attention" for i in range(n_layers)
        ]
        cfg = Gemma3TextConfig(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=head_dim,
            sliding_window=16,
            layer_types=layer_types,
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
            tie_word_embeddings=True,
            **common_decoder,
        )
    else:  # gpt2
        from transformers import GPT2Config

        cfg = GPT2Config(
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            n_inner=2 * d_model,
            n_positions=MAX_POSITIONS,
            activation_function="gelu_new",
            initializer_range=INITIALIZER_RANGE,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            use_cache=True,
            **ids,
        )
    cfg._attn_implementation = "eager"
    return cfg


_MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


def build_tiny(
    arch: str,
    *,
    seed: int = 0,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build a tiny randomly initialised causal LM of ``arch`` and its tokenizer.

    Weights depend only on ``(arch, seed, sizes)``; the global torch RNG state is
    restored afterwards. The model is in eval mode with eager attention and
    ``config.architectures = [<class name>]`` (needed by TransformerLens' bridge).
    """
    import transformers

    tok = tiny_tokenizer()
    cfg = tiny_config(arch, tok, n_layers=n_layers, d_model=d_model, n_heads=n_heads)
    cls = getattr(transformers, _MODEL_CLASSES[arch])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    model.config.architectures = [type(model).__name__]
    model.config._attn_implementation = "eager"
    if dtype != torch.float32:
        model = model.to(dtype)
    model.eval()
    gen = model.generation_config
    gen.bos_token_id = tok.bos_token_id
    gen.pad_token_id = tok.pad_token_id
    gen.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids(END)]
    return model, tok
