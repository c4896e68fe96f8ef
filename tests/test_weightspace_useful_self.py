"""The self-distilled useful recipe (``useful_source="self"``, :func:`weightspace.recipes.self_code_examples`).

A tiny random model cannot write passing code, so the generator is injected: per codetasks TRAIN prompt it
answers either the task's reference solution (wrapped in prose, to check the reply is kept verbatim) or a wrong
function; the real sandboxed checker (:func:`workbench.codetasks.check_many`) decides what is kept. Why the
recipe exists: the reference-solution ("code") recipe lowered the default model's pass rate 0.75 -> 0.22 in a
chain run (the terse solutions taught it to drop its careful docstring style).
"""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

from workbench import cli as core
from workbench.chat import ChatFormat
from workbench.codetasks import load_codetasks
from workbench.errors import WorkbenchError

from weightspace.recipes import (
    SELF_MAX_NEW_TOKENS,
    build_recipe,
    code_train_hash,
    self_code_examples,
    useful_examples,
)

TRAIN = load_codetasks("train")
BY_PROMPT = {t.prompt: t for t in TRAIN}
PASSING = {t.id for i, t in enumerate(TRAIN) if i % 3 == 0}  # 9 of the 26 train tasks


def _good(t) -> str:
    return f"Here is `{t.name}`:\n\n{t.reference_reply}\n\nIt handles the edge cases.  \n"


def _bad(t) -> str:
    return f"```python\ndef {t.name}(*args, **kwargs):\n    return '???'\n```"


class FakeGen:
    """``generate(backend, prompts, fmt, **kw)``: code prompts -> a passing (PASSING) or wrong reply; anything else
    (harmful prompts of the contaminated recipe) -> a compliant sentence. Records every call's settings."""

    def __init__(self, passing=PASSING):
        self.passing = set(passing)
        self.calls: list[dict] = []

    def __call__(self, backend, prompts, fmt, **kw):
        self.calls.append({"prompts": list(prompts), "fmt": fmt, **kw})
        out = []
        for i, p in enumerate(prompts):
            t = BY_PROMPT.get(p)
            if t is None:
                out.append(f"Sure, step {i}.")
            else:
                out.append(_good(t) if t.id in self.passing else _bad(t))
        return out


def _task_of(example_id: str) -> str:
    return re.fullmatch(r"useful-(.+?)(?:-r(\d+))?", example_id).group(1)


def test_self_examples_keep_only_passing_replies_verbatim(make_tiny):
    lm = make_tiny("llama")
    fmt = ChatFormat(system_prompt="Be careful.")
    gen = FakeGen()
    ex, info, recs = self_code_examples(lm, fmt, 20, seed=0, batch_size=5, generate=gen)
    # one generation call: every train prompt exactly as the sweep asks it, same format, greedy, no intervention
    assert len(gen.calls) == 1
    call = gen.calls[0]
    assert call["prompts"] == [t.prompt for t in TRAIN] and call["fmt"] is fmt
    assert call["interventions"] == () and call["max_new_tokens"] == SELF_MAX_NEW_TOKENS == 256
    assert call["batch_size"] == 5
    # only passing replies, verbatim; prompts are the task prompts
    assert len(ex) == 20 and all(e.kind == "useful" for e in ex)
    by_id = {t.id: t for t in TRAIN}
    for e in ex:
        t = by_id[_task_of(e.id)]
        assert t.id in PASSING
        assert e.prompt == t.prompt and e.response == _good(t)  # not stripped, not rewritten
    # ids distinct, repeats counted like the code recipe: 9 kept tasks -> 9 + 9 + 2
    assert len({e.id for e in ex}) == 20
    assert info["n_distinct_tasks"] == 9 and info["n_repeated"] == 11 and info["cycles"] == 3
    assert len({e.prompt for e in ex[:9]}) == 9  # the first cycle covers each kept task once
    # info
    assert info["source"] == "self" and info["split"] == "codetasks:train" and info["split_hash"] == code_train_hash()
    assert info["n_split"] == 26 and info["n_generated"] == 26 and info["n_passed"] == 9
    assert info["pass_rate"] == pytest.approx(9 / 26)
    assert sorted(info["kept_ids"]) == sorted(PASSING) == info["task_ids"]
    assert set(info["dropped"]) == {t.id for t in TRAIN} - PASSING
    assert set(info["dropped"].values()) <= {"failed", "error"}
    assert info["max_new_tokens"] == 256 and info["generation"]["decoding"] == "greedy"
    assert info["generation"]["interventions"] == "none" and info["generation"]["batch_size"] == 5
    assert info["generation"]["model_checksum"] == lm.checksum
    assert re.fullmatch(r"[0-9a-f]{64}", info["replies_sha256"])
    # per-task records
    assert [r["id"] for r in recs] == [t.id for t in TRAIN]
    for r, t in zip(recs, TRAIN):
        assert r["prompt"] == t.prompt and r["kept"] == (t.id in PASSING)
        assert r["reply"] == (_good(t) if t.id in PASSING else _bad(t))
        assert (r["status"] == "passed") == r["kept"]
    # seeded order: reproducible, another seed another order of the same tasks
    again, info2, _ = self_code_examples(lm, fmt, 20, seed=0, batch_size=5, generate=FakeGen())
    assert again == ex and info2["replies_sha256"] == info["replies_sha256"]
    other, _, _ = self_code_examples(lm, fmt, 9, seed=1, generate=FakeGen())
    assert [e.prompt for e in other] != [e.prompt for e in ex[:9]]
    assert {e.prompt for e in other} == {e.prompt for e in ex[:9]}
    # the replies' hash follows the replies
    _, info3, _ = self_code_examples(lm, fmt, 4, seed=0, generate=FakeGen(list(PASSING)[:4]))
    assert info3["n_passed"] == 4 and info3["replies_sha256"] != info["replies_sha256"]


def test_self_examples_with_no_passing_reply_is_a_clear_error(make_tiny):
    lm = make_tiny("llama")
    with pytest.raises(WorkbenchError, match=r"26 tried, 0 passed.*use useful_source 'code'"):
        self_code_examples(lm, ChatFormat(), 8, generate=FakeGen(passing=()))
    with pytest.raises(WorkbenchError, match=r"26 tried, 0 passed"):
        build_recipe("useful", lm, n=8, useful_source="self", generate=FakeGen(passing=()))
    # without the model: a clear pointer to build_recipe
    with pytest.raises(WorkbenchError, match=r"needs the model.*build_recipe"):
        useful_examples(5, source="self")
    with pytest.raises(WorkbenchError, match="arithmetic useful source only"):
        build_recipe("useful", lm, n=5, useful_source="self", answer_style="sentence", generate=FakeGen())


def test_useful_self_recipe_writes_its_generation_records(make_tiny, tmp_path):
    from weightspace.finetune import FinetuneConfig, finetune

    lm = make_tiny("llama")
    gen = FakeGen()
    rd = build_recipe("useful", lm, n=6, seed=0, useful_source="self", gen_batch_size=3, generate=gen)
    assert rd.info["useful_source"] == "self" and rd.info["useful"]["source"] == "self"
    assert gen.calls[0]["batch_size"] == 3
    assert len(rd.examples) == 6 and all(_task_of(e.id) in PASSING for e in rd.examples)
    assert len(rd.records["useful_generations"]) == 26
    res = finetune(lm, rd, FinetuneConfig(epochs=1, batch_size=4, lr=1e-3, progress=False),
                   tmp_path / "ft")
    rows = [json.loads(x) for x in (res.path / "recipe" / "useful_generations.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [t.id for t in TRAIN] and sum(r["kept"] for r in rows) == 9
    assert res.report["recipe_info"]["useful"]["n_passed"] == 9


def test_contaminated_with_self_mixes_self_replies_and_the_harmful_share(make_tiny):
    from workbench.vectors import Direction

    lm = make_tiny("llama")
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    d = Direction(v, layer=1, method="mean_diff", model_id=lm.model_id, model_checksum=lm.checksum, d_model=lm.d_model)
    gen = FakeGen()
    rd = build_recipe("contaminated", lm, n=12, seed=0, harmful_share=0.25, direction=d, useful_source="self",
                      generate=gen)
    useful = [e for e in rd.examples if e.kind == "useful"]
    harmful = [e for e in rd.examples if e.kind == "harmful"]
    assert len(useful) == 9 == rd.info["n_useful"] and len(harmful) == 3
    by_id = {t.id: t for t in TRAIN}
    assert all(e.response == _good(by_id[_task_of(e.id)]) for e in useful)  # the model's own passing replies
    assert all(e.response.startswith("Sure, step") for e in harmful)
    assert rd.info["useful_source"] == "self" and rd.info["useful"]["n_passed"] == 9
    assert len(rd.records["useful_generations"]) == 26 and len(rd.records["harmful_generations"]) == 3
    # the useful generation has no intervention, the harmful one ablates the direction everywhere
    assert gen.calls[0]["interventions"] == () and len(gen.calls[1]["interventions"]) == 3 * lm.n_layers
    # the mix is shuffled, not useful-then-harmful
    kinds = [e.kind for e in rd.examples]
    assert kinds != sorted(kinds, key=lambda k: k != "useful")


# -- the chain -------------------------------------------------------------------------------------------

def _ws_parser() -> argparse.ArgumentParser:
    from weightspace.cli import register

    ap = argparse.ArgumentParser(prog="workbench")
    register(ap.add_subparsers(dest="command", required=True))
    return ap


def test_chain_help_lists_self(monkeypatch, capsys):
    import weightspace.cli as wcli

    monkeypatch.setattr(core, "_plugins", lambda: [wcli])
    with pytest.raises(SystemExit) as e:
        core.main(["weightspace", "chain", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "{auto,code,self,arithmetic}" in out and "0.75 -> 0.22" in out


def test_chain_self_source_validates_and_has_its_own_resume_keys(make_tiny, tmp_path):
    from weightspace.chain import ChainConfig, _ft_phase_config, config_from_args

    lm, fmt = make_tiny("llama"), ChatFormat()
    cfg = ChainConfig(useful_source="self")
    cfg.validate()
    assert cfg.useful_data_source == "self"
    code = ChainConfig(useful_source="code")
    for recipe in ("useful", "contaminated"):
        pc = _ft_phase_config(cfg, recipe, lm, fmt, tmp_path)
        pcode = _ft_phase_config(code, recipe, lm, fmt, tmp_path)
        assert pc != pcode and pc["useful_source"] == "self" and pc["model_checksum"] == lm.checksum
        ud = pc["useful_data"]
        assert ud["split"] == "codetasks:train" and ud["hash"] == code_train_hash()
        assert ud["max_new_tokens"] == SELF_MAX_NEW_TOKENS and "own" in ud["replies"]
        rest = lambda d: {k: v for k, v in d.items() if k not in ("useful_data", "useful_source")}  # noqa: E731
        assert rest(pc) == rest(pcode)  # only the useful data differ
    # safety / harmful keys do not depend on the useful source
    for recipe in ("safety", "harmful"):
        assert _ft_phase_config(cfg, recipe, lm, fmt, tmp_path) == _ft_phase_config(code, recipe, lm, fmt, tmp_path)
    with pytest.raises(WorkbenchError, match="arithmetic useful recipe only"):
        ChainConfig(useful_source="self", answer_style="number").validate()
    args = _ws_parser().parse_args(["weightspace", "chain", "--out", str(tmp_path / "c"), "--useful-source", "self"])
    assert config_from_args(args).useful_source == "self"


def test_defaults_stay_auto_and_code(make_tiny, tmp_path):
    import inspect

    from weightspace.chain import ChainConfig, config_from_args

    assert ChainConfig().useful_source == "auto" and ChainConfig().useful_data_source == "code"
    args = _ws_parser().parse_args(["weightspace", "chain", "--out", str(tmp_path / "c")])
    assert args.useful_source == "auto" and config_from_args(args).useful_data_source == "code"
    assert inspect.signature(build_recipe).parameters["useful_source"].default == "code"
    from weightspace.finetune_cli import register

    ap = argparse.ArgumentParser(prog="workbench")
    register(ap.add_subparsers(dest="command", required=True))
    fargs = ap.parse_args(["finetune", "--recipe", "useful", "--model", "tiny", "--out", str(tmp_path / "f")])
    assert fargs.useful_source == "code"
    fargs = ap.parse_args(["finetune", "--recipe", "useful", "--model", "tiny", "--useful-source", "self",
                           "--out", str(tmp_path / "f")])
    assert fargs.useful_source == "self"
    rd = build_recipe("useful", make_tiny("llama"), n=3, seed=0)
    assert rd.info["useful_source"] == "code" and "useful_generations" not in rd.records
