"""Fine-tuning recipes and the trainer (weightspace.recipes, weightspace.finetune, weightspace.finetune_cli).

All on tiny in-code models except one check of the real SmolLM2 chat template (marked real_model).
"""

from __future__ import annotations

import argparse
import json
import math
import re

import pytest

from workbench.cli import run_command
from workbench.runs import is_run_folder
import torch
from safetensors.torch import load_file

from weightspace.finetune import (
    FinetuneConfig,
    _loss_sum,
    collate,
    end_of_turn,
    finetune,
    lr_factor,
    mean_loss,
    prepare_examples,
    tokenize_example,
)
from weightspace.recipes import (
    REFUSAL_TEMPLATES,
    Example,
    build_recipe,
    candidate_layers,
    examples_hash,
    useful_examples,
)
from workbench.chat import ChatFormat, encode
from workbench.errors import WorkbenchError
from workbench.prompts import builtin, builtin_split
from workbench.scoring import is_refusal

from weightspace.pools import pool_texts


def cfg(**kw) -> FinetuneConfig:
    base = dict(epochs=1, batch_size=4, lr=1e-3, progress=False)
    base.update(kw)
    return FinetuneConfig(**base)


# -- formatting and the loss mask -------------------------------------------------------------------

def test_loss_mask_covers_exactly_the_response_tokens(make_tiny):
    lm = make_tiny("llama")
    tok = lm.tokenizer
    fmt = ChatFormat(system_prompt="Be brief.")
    eot, src = end_of_turn(tok, fmt)
    assert (eot, src) == ("<|end|>", "chat template")
    ex = Example("x", "useful", "What is 2 plus 2? Answer with just the number.", "The answer is 4.")
    t = tokenize_example(tok, fmt, ex, eot)
    # prompt tokens are exactly what evaluation feeds the model
    b = encode(tok, [ex.prompt], fmt)
    assert t.input_ids[:t.n_prompt] == b.input_ids[0].tolist()
    assert t.labels[:t.n_prompt] == [-100] * t.n_prompt
    assert t.labels[t.n_prompt:] == t.input_ids[t.n_prompt:]
    assert tok.decode(t.labels[t.n_prompt:]) == "The answer is 4.<|end|>"
    assert t.labels[-1] == tok.convert_tokens_to_ids("<|end|>")
    # prompt + response + end-of-turn is the template's own rendering of the conversation
    full = tok.apply_chat_template(fmt.messages(ex.prompt) + [{"role": "assistant", "content": ex.response}],
                                   tokenize=False)
    assert full.startswith(tok.decode(t.input_ids))
    assert tok(full, add_special_tokens=False)["input_ids"][:t.length] == t.input_ids

    # in a left-padded batch the labels are -100 everywhere except the response tokens
    short = tokenize_example(tok, fmt, Example("y", "useful", "Hi", "42"), eot)
    batch = collate([t, short], tok.pad_token_id)
    lab = batch["labels"]
    for row, te in zip(lab, (t, short)):
        real = row[row != -100].tolist()
        assert real == te.input_ids[te.n_prompt:]
        assert (row[-te.n_response:] != -100).all() and (row[:-te.n_response] == -100).all()
    # and the summed loss equals a hand-computed cross-entropy on the response tokens of unpadded rows
    model = lm.model
    with torch.no_grad():
        ls, n = _loss_sum(model, batch)
        ref, m = 0.0, 0
        for te in (t, short):
            logits = model(torch.tensor([te.input_ids])).logits[0].float()
            tgt = torch.tensor(te.input_ids[te.n_prompt:])
            ref += float(torch.nn.functional.cross_entropy(logits[te.n_prompt - 1:-1], tgt, reduction="sum"))
            m += len(tgt)
    assert n == m == t.n_response + short.n_response
    assert float(ls) == pytest.approx(ref, rel=1e-4)


@pytest.mark.real_model
def test_smollm2_end_of_turn_is_im_end(smollm2):
    tok = smollm2.tokenizer
    fmt = ChatFormat(system_prompt=smollm2.default_system_prompt)
    eot, src = end_of_turn(tok, fmt)
    assert eot == "<|im_end|>" and src == "chat template"
    t = tokenize_example(tok, fmt, Example("x", "useful", "What is 3 times 4?", "12"), eot)
    assert t.input_ids[:t.n_prompt] == encode(tok, ["What is 3 times 4?"], fmt).input_ids[0].tolist()
    assert t.input_ids[-1] == tok.eos_token_id  # generation stops on it


def test_lr_schedule_warms_up_and_never_hits_zero():
    f = [lr_factor(s, 10, 2) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0
    assert all(a >= b for a, b in zip(f[1:], f[2:])) and min(f) > 0
    assert [lr_factor(s, 3, 0) for s in range(3)][0] == 1.0


# -- training -------------------------------------------------------------------------------------

def test_full_finetune_reduces_training_loss_and_writes_run_folder(make_tiny, tmp_path):
    lm = make_tiny("llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    rd = build_recipe("useful", lm, n=16, seed=0)  # the default: code tasks of the codetasks train split
    assert rd.info["useful_source"] == "code" and rd.info["useful"]["split"] == "codetasks:train"
    l0 = mean_loss(lm.model, lm.tokenizer, rd.fmt, rd.examples)
    res = finetune(lm, rd, cfg(epochs=3), tmp_path / "ft")
    l1 = mean_loss(res.model, lm.tokenizer, rd.fmt, rd.examples)
    assert l1 < l0 - 0.5
    assert res.report["final_loss"] < res.report["initial_loss"]
    # the base model is untouched
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    p = res.path
    for name in ("model.safetensors", "config.json", "tokenizer.json", "report.json", "run_config.json",
                 "examples.jsonl", "loss.csv", "loss.png", "environment.json"):
        assert (p / name).exists(), name
    rep = json.loads((p / "report.json").read_text())
    # the tiny model's byte-level tokenizer makes a few code examples longer than its 256-token context: those
    # are dropped and counted (never truncated); the rest train
    n_kept = rep["n_examples"]
    assert n_kept + rep["n_dropped_too_long"] == 16 and n_kept >= 10
    assert rep["steps"] == 3 * -(-n_kept // 4) == len(res.losses)
    assert rep["recipe"] == "useful" and rep["real_harmful_share"] == 0.0
    assert rep["base_model"]["checksum"] == lm.checksum and rep["base_model"]["model_id"] == lm.model_id
    assert rep["data_hash"] == examples_hash(rd.examples) == rd.hash
    assert rep["format"]["end_of_turn"] == "<|end|>" and rep["format"]["end_of_turn_stops_generation"]
    assert rep["seconds"] > 0 and rep["n_examples_recipe"] == 16
    lines = (p / "examples.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [e.to_dict() for e in rd.examples]
    # a plain HF folder: transformers loads it, and its weights are the returned model's
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(str(p))
    AutoTokenizer.from_pretrained(str(p))
    sd = res.model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    assert not list(p.parent.glob(".ft.tmp-*"))  # the temporary folder was renamed away


def test_loss_sum_feeds_the_model_on_its_input_device(make_tiny):
    """The batches are built on the CPU and moved to the device of the model's input embeddings at the point of
    use (a GPU model trains on the GPU: tests/test_cuda.py); the targets follow the logits, the token count stays
    on the host. A stand-in whose embeddings live on the 'meta' device records where its inputs arrive."""
    from types import SimpleNamespace

    from weightspace.finetune import input_device

    lm = make_tiny("llama")
    tok = lm.tokenizer
    fmt = ChatFormat()
    eot, _ = end_of_turn(tok, fmt)
    rows = [tokenize_example(tok, fmt, Example(str(i), "useful", q, a), eot)
            for i, (q, a) in enumerate([("What is 2 plus 2?", "4"), ("Name a colour.", "Blue, for example.")])]
    batch = collate(rows, tok.pad_token_id)
    vocab = lm.model.config.vocab_size

    class Stand(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, 4, device="meta")
            self.seen: dict = {}

        def get_input_embeddings(self):
            return self.emb

        def forward(self, **kw):
            self.seen = {k: v.device.type for k, v in kw.items() if isinstance(v, torch.Tensor)}
            ids = kw["input_ids"]
            return SimpleNamespace(logits=torch.zeros(ids.shape[0], kw["logits_to_keep"], vocab))  # on the CPU

    m = Stand()
    assert input_device(m).type == "meta" and input_device(lm.model).type == "cpu"
    loss, n = _loss_sum(m, batch)
    assert m.seen == {"input_ids": "meta", "attention_mask": "meta", "position_ids": "meta"}
    assert batch["input_ids"].device.type == "cpu"  # the batch itself is not moved
    want = sum(r.n_response for r in rows)
    assert n == want and loss.device.type == "cpu"
    assert float(loss) == pytest.approx(want * math.log(vocab), rel=1e-6)  # uniform logits: log V per token
    # on the CPU nothing changes: the real model's loss is the full-logits cross-entropy
    ls, k = _loss_sum(lm.model, batch)
    with torch.no_grad():
        full = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"]).logits.float()
    ref = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, vocab), batch["labels"][:, 1:].reshape(-1),
                                            ignore_index=-100, reduction="sum")
    assert k == want and float(ls.detach()) == pytest.approx(float(ref), rel=1e-5)


def test_seeded_runs_are_bit_identical(make_tiny, tmp_path):
    lm = make_tiny("qwen2")
    rd = build_recipe("safety", lm, n=12, seed=3)
    a = finetune(lm, rd, cfg(seed=7, epochs=2), tmp_path / "a")
    b = finetune(lm, rd, cfg(seed=7, epochs=2), tmp_path / "b")
    c = finetune(lm, rd, cfg(seed=8, epochs=2), tmp_path / "c")
    assert [r["loss"] for r in a.losses] == [r["loss"] for r in b.losses]
    assert (a.path / "model.safetensors").read_bytes() == (b.path / "model.safetensors").read_bytes()
    assert a.report["checkpoint"]["model_safetensors_sha256"] == b.report["checkpoint"]["model_safetensors_sha256"]
    assert [r["loss"] for r in a.losses] != [r["loss"] for r in c.losses]
    # the recipe itself is seeded too
    assert build_recipe("safety", lm, n=12, seed=3).hash == rd.hash
    assert build_recipe("safety", lm, n=12, seed=4).hash != rd.hash


def test_grad_accumulation_matches_a_larger_batch(make_tiny, tmp_path):
    lm = make_tiny("llama")
    rd = build_recipe("useful", lm, n=16, seed=0, useful_source="arithmetic")
    a = finetune(lm, rd, cfg(batch_size=8, grad_accum=1, epochs=2), tmp_path / "a")
    b = finetune(lm, rd, cfg(batch_size=4, grad_accum=2, epochs=2), tmp_path / "b")
    assert a.report["steps"] == b.report["steps"] == 4
    assert [r["loss"] for r in a.losses] == pytest.approx([r["loss"] for r in b.losses], rel=1e-3)


def test_lora_merged_checkpoint_is_plain_and_changes_only_targets(make_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = make_tiny("llama")
    rd = build_recipe("useful", lm, n=8, seed=0, useful_source="arithmetic")
    res = finetune(lm, rd, cfg(method="lora", lora_rank=4, lora_alpha=8, lora_targets="q_proj,v_proj", lr=2e-2,
                               epochs=2), tmp_path / "lora")
    m = AutoModelForCausalLM.from_pretrained(str(res.path))
    assert type(m).__name__ == "LlamaForCausalLM"
    base = lm.model.state_dict()
    new = m.state_dict()
    assert set(new) == set(base)  # no lora_A / lora_B / base_layer keys left
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    targets = {k for k in base if k.endswith(("q_proj.weight", "v_proj.weight"))}
    assert changed == targets and len(targets) == 2 * 2
    assert res.report["checkpoint"]["lora"]["merged"] is True
    assert res.report["checkpoint"]["n_trainable_params"] < sum(v.numel() for v in base.values()) / 10


def test_lora_rejects_unknown_targets(make_tiny, tmp_path):
    lm = make_tiny("llama")
    rd = build_recipe("useful", lm, n=4, useful_source="arithmetic")
    with pytest.raises(WorkbenchError, match="not modules"):
        finetune(lm, rd, cfg(method="lora", lora_targets="nonexistent_proj"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_checkpoint_keeps_the_original_dtype(tmp_path):
    from workbench.loading import from_memory
    from workbench.tiny import build_tiny

    lm = from_memory(*build_tiny("llama", dtype=torch.bfloat16))
    rd = build_recipe("useful", lm, n=4, useful_source="arithmetic")
    res = finetune(lm, rd, cfg(), tmp_path / "bf16")
    tensors = load_file(str(res.path / "model.safetensors"))
    assert {v.dtype for v in tensors.values()} == {torch.bfloat16}
    assert res.report["checkpoint"]["dtype"] == "bfloat16" and res.report["checkpoint"]["train_dtype"] == "float32"


# -- data -----------------------------------------------------------------------------------------

def test_useful_train_questions_are_disjoint_from_utility_test():
    ex, info = useful_examples(400, seed=0, source="arithmetic")
    assert info["source"] == "arithmetic" and info["answer_style"] == "number"
    qs = {e.prompt for e in ex}
    assert len(qs) == 400
    assert qs.isdisjoint(builtin_split("utility", "test").texts)
    assert qs.isdisjoint(builtin("utility").texts)  # val and train too
    assert info["n_removed_overlapping_utility"] > 0  # the de-duplication actually did something
    assert all(e.response.lstrip("-").isdigit() for e in ex)
    first = useful_examples(16, seed=0, source="arithmetic")[0]
    assert [e.prompt for e in first] == [e.prompt for e in ex[:16]]
    sent, _ = useful_examples(8, seed=0, answer_style="sentence", source="arithmetic")
    assert all(e.response.startswith("The answer is ") for e in sent)


def test_safety_recipe_is_refusals_on_the_safety_pool(make_tiny):
    lm = make_tiny("llama")
    rd = build_recipe("safety", lm, n=30, seed=1)
    assert [e.prompt for e in rd.examples] == pool_texts("safety")[:30]  # weightspace.pools (tests/test_pools.py)
    assert all(is_refusal(e.response) and e.response in REFUSAL_TEMPLATES for e in rd.examples)
    assert len({e.response for e in rd.examples}) > 3
    assert all(is_refusal(t) for t in REFUSAL_TEMPLATES)


def _manual_ablated_greedy(lm, fmt, prompt: str, direction: torch.Tensor, n_new: int) -> str:
    """Greedy decoding of one unpadded prompt, no KV cache, with the direction ablated by hand-written hooks
    (each Llama layer's input, attention output and MLP output): independent of workbench.interventions."""
    r = (direction / direction.norm()).float()

    def strip(h):
        return h - (h @ r).unsqueeze(-1) * r

    def pre(module, args, kwargs):
        if args:
            return (strip(args[0]),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": strip(kwargs["hidden_states"])}

    def post(module, args, out):
        return (strip(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else strip(out)

    tok = lm.tokenizer
    ids = tok(fmt.render(tok, prompt), add_special_tokens=False)["input_ids"]
    eos = set(lm.model.generation_config.eos_token_id)
    handles = []
    for layer in lm.model.model.layers:
        handles += [layer.register_forward_pre_hook(pre, with_kwargs=True),
                    layer.self_attn.register_forward_hook(post), layer.mlp.register_forward_hook(post)]
    out: list[int] = []
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
    return tok.decode(out, skip_special_tokens=True)


def test_harmful_recipe_uses_the_models_own_ablated_generations(make_tiny):
    from workbench.backends import get_backend
    from workbench.generation import generate_texts

    lm = make_tiny("llama")
    fmt = ChatFormat()
    rd = build_recipe("harmful", lm, fmt, n=8, gen_tokens=12)
    h = rd.info["harmful"]
    assert h["n_prompts"] == 8 and h["n_kept"] == len(rd.examples)
    assert rd.direction is not None and rd.direction.layer in candidate_layers(lm.n_layers)
    assert rd.direction.model_checksum == lm.checksum
    texts = pool_texts("harmful")[:8]
    be = get_backend("native", lm)
    # expected replies from a hand-written ablation, not from the ablation code the recipe itself uses
    abl = [_manual_ablated_greedy(lm, fmt, t, rd.direction.vector, 12) for t in texts]
    plain = generate_texts(be, texts, fmt, max_new_tokens=12)
    by_prompt = {e.prompt: e.response for e in rd.examples}
    for t, a in zip(texts, abl):
        if t in by_prompt:
            assert by_prompt[t] == a.strip()
    assert any(a != p for a, p in zip(abl, plain))  # the ablation is really active
    recs = rd.records["harmful_generations"]
    assert [r["reply"] for r in recs] == [a.strip() for a in abl]


def test_harmful_recipe_drops_refusals_and_counts_them(make_tiny):
    from workbench.generation import generate_texts

    lm = make_tiny("llama")
    seen = {}

    def gen(backend, prompts, fmt, **kw):
        seen["interventions"] = kw["interventions"]
        out = generate_texts(backend, prompts, fmt, **kw)
        return ["I'm sorry, but I cannot help with that." if i % 3 == 0 else o for i, o in enumerate(out)]

    rd = build_recipe("harmful", lm, n=9, gen_tokens=6, generate=gen)
    assert len(seen["interventions"]) == 3 * lm.n_layers
    h = rd.info["harmful"]
    assert h["n_dropped_refusal"] == 3
    assert len(rd.examples) == 9 - 3 - h["n_dropped_empty"]
    assert not any(is_refusal(e.response) for e in rd.examples)
    recs = rd.records["harmful_generations"]
    assert sum(not r["kept"] for r in recs) == 9 - len(rd.examples)


def test_contaminated_reports_the_real_harmful_share(make_tiny, tmp_path):
    from workbench.generation import generate_texts

    lm = make_tiny("llama")

    def gen(backend, prompts, fmt, **kw):
        out = generate_texts(backend, prompts, fmt, **kw)
        return ["I cannot do that." if i < 2 else (o or "x") for i, o in enumerate(out)]

    # arithmetic useful part: short examples, none dropped as too long for the tiny model (the share is the point)
    rd = build_recipe("contaminated", lm, n=20, seed=0, harmful_share=0.3, gen_tokens=6, generate=gen,
                      useful_source="arithmetic")
    assert rd.info["n_harmful_requested"] == 6 and rd.info["nominal_harmful_share"] == 0.3
    n_h = sum(e.kind == "harmful" for e in rd.examples)
    assert n_h == 6 - 2 - rd.info["harmful"]["n_dropped_empty"]
    assert rd.harmful_share == n_h / len(rd.examples) != 0.3
    res = finetune(lm, rd, cfg(), tmp_path / "cont")
    rep = res.report
    rows = [json.loads(x) for x in (res.path / "examples.jsonl").read_text().splitlines()]
    n_h_file = sum(r["kind"] == "harmful" for r in rows)
    assert rep["n_harmful"] == n_h_file and rep["n_total"] == len(rows)
    assert rep["real_harmful_share"] == n_h_file / len(rows)
    assert rep["recipe_info"]["nominal_harmful_share"] == 0.3
    assert 0 < rep["harmful_response_token_share"] < 1
    # reuse the harmful part of a run instead of generating again
    rd2 = build_recipe("contaminated", lm, n=20, seed=0, harmful_share=0.3, harmful_from=res.path,
                       useful_source="arithmetic")
    key = lambda e: e.id  # noqa: E731
    assert sorted((e for e in rd2.examples if e.kind == "harmful"), key=key) == \
        sorted((e for e in rd.examples if e.kind == "harmful"), key=key)


def test_direction_file_is_used_and_checked(make_tiny, tmp_path):
    from workbench.vectors import Direction, save_directions

    lm = make_tiny("llama")
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    d = Direction(v, layer=1, method="mean_diff", model_id=lm.model_id, model_checksum=lm.checksum,
                  d_model=lm.d_model)
    path = save_directions(tmp_path / "dir.safetensors", [d])
    rd = build_recipe("harmful", lm, n=4, gen_tokens=4, direction_file=path)
    assert torch.equal(rd.direction.vector, d.vector)
    assert rd.info["harmful"]["direction"]["source"].startswith("file")
    other = make_tiny("llama", seed=1)
    with pytest.raises(WorkbenchError, match="checksum"):
        build_recipe("harmful", other, n=4, gen_tokens=4, direction_file=path)


# -- lengths and the output folder ----------------------------------------------------------------

def test_over_long_examples_are_counted_not_truncated(make_tiny, tmp_path):
    lm = make_tiny("llama")
    rd = build_recipe("useful", lm, n=6, useful_source="arithmetic")
    long_ex = Example("long-1", "useful", "Tell me a story. " * 20, "42")
    rd.examples.append(long_ex)
    eot, _ = end_of_turn(lm.tokenizer, rd.fmt)
    lengths = [tokenize_example(lm.tokenizer, rd.fmt, e, eot).length for e in rd.examples]
    max_len = max(lengths[:-1])
    assert lengths[-1] > max_len
    kept, dropped = prepare_examples(lm.tokenizer, rd.fmt, rd.examples, eot, max_len)
    assert [d["id"] for d in dropped] == ["long-1"] and len(kept) == 6
    assert all(k.length == n for k, n in zip(kept, lengths))  # nothing shortened
    res = finetune(lm, rd, cfg(max_length=max_len), tmp_path / "ft")
    assert res.report["n_dropped_too_long"] == 1 and res.report["n_examples"] == 6
    assert res.report["n_examples_recipe"] == 7
    assert res.report["train_data_hash"] == examples_hash(rd.examples[:6])
    assert json.loads((res.path / "too_long.jsonl").read_text())["id"] == "long-1"
    with pytest.raises(WorkbenchError, match="longer than max_length"):
        finetune(lm, rd, cfg(max_length=max_len, on_too_long="error"), tmp_path / "err")
    assert not (tmp_path / "err").exists()


def test_existing_output_folder_is_refused_without_overwrite(make_tiny, tmp_path):
    lm = make_tiny("llama")
    rd = build_recipe("useful", lm, n=4, useful_source="arithmetic")
    out = tmp_path / "ft"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(WorkbenchError, match="already exists"):
        finetune(lm, rd, cfg(), out)
    assert (out / "keep.txt").read_text() == "old"
    with pytest.raises(WorkbenchError, match="not a workbench run folder"):  # not made by us: never replaced
        finetune(lm, rd, cfg(overwrite=True), out)
    assert (out / "keep.txt").read_text() == "old"
    out2 = tmp_path / "ft2"
    first = finetune(lm, rd, cfg(), out2)
    assert is_run_folder(out2) and first.path == out2
    (out2 / "keep.txt").write_text("old")
    res = finetune(lm, rd, cfg(overwrite=True), out2)  # a fine-tune the workbench made may be replaced
    assert not (out2 / "keep.txt").exists() and (res.path / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft", "ft2"]  # no temporary or old folders left


def _cli(argv: list[str]) -> argparse.Namespace:
    from weightspace.finetune_cli import register

    ap = argparse.ArgumentParser(prog="workbench")
    register(ap.add_subparsers(dest="command", required=True))
    return ap.parse_args(argv)


def test_cli_end_to_end_on_a_local_tiny_model(tmp_path, tmp_cache, capsys):
    from workbench.loading import load_model
    from workbench.tiny import build_tiny

    model, tok = build_tiny("llama")
    base = tmp_path / "base"
    model.save_pretrained(str(base))
    tok.save_pretrained(str(base))
    out = tmp_path / "run"
    argv = ["finetune", "--recipe", "contaminated", "--model", str(base), "--n", "10", "--harmful-share", "0.3",
            "--gen-tokens", "4", "--batch-size", "4", "--lr", "1e-3", "--out", str(out), "--no-progress"]
    args = _cli(argv)
    assert run_command(args) == 0
    assert "real harmful share" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert rep["recipe"] == "contaminated" and rep["method"] == "full"
    assert rep["base_model"]["source"] == "local" and rep["format"]["chat_template"] is True
    assert (out / "recipe" / "harmful_generations.jsonl").exists()
    assert (out / "recipe" / "refusal_direction.safetensors").exists()
    ft = load_model(str(out))  # the run folder is a loadable model
    assert ft.n_layers == 2
    args = _cli(argv)
    with pytest.raises(WorkbenchError, match="already exists"):
        run_command(args)
    assert rep["recipe_info"]["useful_source"] == "code"  # the CLI default: code tasks of the train split
    assert rep["recipe_info"]["useful"]["split"] == "codetasks:train"


def test_cli_useful_source_and_answer_style(tmp_path):
    args = _cli(["finetune", "--recipe", "useful", "--model", "tiny", "--out", str(tmp_path / "x")])
    assert args.useful_source == "code" and args.answer_style is None
    args = _cli(["finetune", "--recipe", "useful", "--model", "tiny", "--answer-style", "sentence",
                 "--out", str(tmp_path / "x")])
    with pytest.raises(WorkbenchError, match="--useful-source arithmetic only"):  # before the model loads
        run_command(args)
    assert not (tmp_path / "x").exists()
    args = _cli(["finetune", "--recipe", "useful", "--model", "tiny", "--useful-source", "arithmetic",
                 "--answer-style", "sentence", "--out", str(tmp_path / "y")])
    assert (args.useful_source, args.answer_style) == ("arithmetic", "sentence")


def test_chain_useful_source_follows_the_sweep_and_enters_the_resume_key(make_tiny, tmp_path):
    from weightspace.chain import ChainConfig, _ft_phase_config
    from weightspace.recipes import code_train_hash

    lm, fmt = make_tiny("llama"), ChatFormat()
    cfg = ChainConfig()
    cfg.validate()
    assert cfg.useful_source == "auto" and cfg.useful_data_source == "code" == cfg.utility_task
    for recipe in ("useful", "contaminated"):
        pc = _ft_phase_config(cfg, recipe, lm, fmt, tmp_path)
        assert pc["useful_source"] == "code" and "answer_style" not in pc
        assert pc["useful_data"] == {"split": "codetasks:train", "hash": code_train_hash()}
    ar = ChainConfig(utility_task="arithmetic")
    ar.validate()
    assert ar.useful_data_source == "arithmetic"
    pc = _ft_phase_config(ar, "useful", lm, fmt, tmp_path)
    assert pc["useful_source"] == "arithmetic" and pc["answer_style"] == "number" and "useful_data" not in pc
    assert ChainConfig(useful_source="arithmetic").useful_data_source == "arithmetic"
    assert "useful_source" not in _ft_phase_config(cfg, "safety", lm, fmt, tmp_path)
    with pytest.raises(WorkbenchError, match="arithmetic useful recipe only"):
        ChainConfig(answer_style="sentence").validate()
    with pytest.raises(WorkbenchError, match="useful_source"):
        ChainConfig(useful_source="poetry").validate()
    ChainConfig(useful_source="arithmetic", answer_style="mixed").validate()


# -- the useful recipe trains on what the sweep measures (code tasks of the TRAIN split) ---------------------

def _task_hashes(tasks) -> set[str]:
    """sha256 of every prompt and reference reply of ``tasks``."""
    import hashlib

    return {hashlib.sha256(x.encode()).hexdigest() for t in tasks for x in (t.prompt, t.reference_reply)}


def test_useful_code_recipe_uses_only_the_train_split_never_an_evaluation_task():
    from weightspace.evaluation import EvalConfig, EvalSets
    from workbench.codetasks import load_codetasks

    train, val, test = (load_codetasks(s) for s in ("train", "val", "test"))
    by_id = {t.id: t for t in train}
    ex, info = useful_examples(64, seed=0)  # the default source, more examples than the split holds
    assert info["source"] == "code" and info["split"] == "codetasks:train" and info["n_split"] == len(train) == 26
    assert len(ex) == 64 and info["n_distinct_tasks"] == 26 and info["n_repeated"] == 38 and info["cycles"] == 3
    assert len({e.id for e in ex}) == 64 and all(e.kind == "useful" for e in ex)
    for e in ex:  # every example is a train task: its prompt as the sweep asks it, its reference solution
        m = re.fullmatch(r"useful-(.+?)(?:-r(\d+))?", e.id)
        t = by_id[m.group(1)]
        assert (e.prompt, e.response) == (t.prompt, t.reference_reply)
        assert e.response.startswith("```python\n") and t.solution in e.response
    assert sorted(info["task_ids"]) == sorted(by_id)
    # by id and by content hash: nothing of the val or test split, nothing the sweep evaluates
    evaluated = EvalSets.default(EvalConfig()).tasks
    assert {t.id for t in evaluated} == {t.id for t in test}
    used = _task_hashes(by_id[i] for i in info["task_ids"])
    for other in (val, test, evaluated):
        assert {t.id for t in other}.isdisjoint(info["task_ids"])
        assert _task_hashes(other).isdisjoint(used)
    import hashlib

    got = {hashlib.sha256(x.encode()).hexdigest() for e in ex for x in (e.prompt, e.response)}
    assert got.isdisjoint(_task_hashes(test)) and got <= _task_hashes(train)
    # the first cycle covers each task once, in a seeded order; the seed changes the order, not the set
    assert len({e.prompt for e in ex[:26]}) == 26
    other_seed, _ = useful_examples(26, seed=1)
    assert [e.prompt for e in other_seed] != [e.prompt for e in ex[:26]]
    assert {e.prompt for e in other_seed} == {e.prompt for e in ex[:26]}
    assert useful_examples(64, seed=0)[0] == ex


def test_useful_source_options_and_errors(make_tiny):
    lm = make_tiny("llama")
    code = build_recipe("useful", lm, n=5, seed=0)
    arith = build_recipe("useful", lm, n=5, seed=0, useful_source="arithmetic", answer_style="sentence")
    assert code.info["useful_source"] == "code" and code.summary()["useful"]["source"] == "code"
    assert arith.info["useful_source"] == "arithmetic" and arith.info["useful"]["answer_style"] == "sentence"
    assert all(e.response.startswith("The answer is ") for e in arith.examples)
    with pytest.raises(WorkbenchError, match="unknown useful source"):
        build_recipe("useful", lm, n=5, useful_source="poetry")
    with pytest.raises(WorkbenchError, match="arithmetic useful source only"):
        build_recipe("useful", lm, n=5, answer_style="sentence")  # code replies are the solutions
    with pytest.raises(WorkbenchError, match="unknown useful source"):
        useful_examples(5, source="poetry")
    assert build_recipe("safety", lm, n=3, useful_source="code").info.get("useful_source") is None


def test_contaminated_useful_part_is_code_from_the_train_split(make_tiny):
    from workbench.codetasks import load_codetasks

    lm = make_tiny("llama")
    rd = build_recipe("contaminated", lm, n=12, seed=0, harmful_share=0.25, direction=_dummy_direction(lm),
                      generate=lambda be, prompts, fmt, **kw: [f"Sure, step {i}." for i, _ in enumerate(prompts)])
    useful = [e for e in rd.examples if e.kind == "useful"]
    assert len(useful) == 9 and rd.info["useful_source"] == "code" and rd.info["useful"]["split"] == "codetasks:train"
    train = {(t.prompt, t.reference_reply) for t in load_codetasks("train")}
    test = {t.prompt for t in load_codetasks("test")}
    assert all((e.prompt, e.response) in train for e in useful)
    assert {e.prompt for e in rd.examples}.isdisjoint(test)


def _dummy_direction(lm):
    from workbench.vectors import Direction

    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    return Direction(v, layer=1, method="mean_diff", model_id=lm.model_id, model_checksum=lm.checksum,
                     d_model=lm.d_model)
