"""``workbench steer select | sweep | generate | orthogonalize`` through the installed console script.

Each command runs as a subprocess (``workbench --threads 1 ...``) on a tiny Llama saved to a temporary Hugging
Face folder, with a few prompts and tokens, and its run folder is checked against values computed here in
process: the generations equal greedy decodes (the ablated one with hand-written hooks), the selected direction
is the candidate with the lowest ablation score among those that pass the filters, and the orthogonalised
checkpoint has the direction removed from every matrix that writes to the residual stream.

Only successful paths are tested here (argument validation has its own tests).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workbench.chat import ChatFormat
from workbench.tiny import build_tiny

pytestmark = pytest.mark.slow  # a subprocess each: a few seconds of interpreter and model start-up

WORKBENCH = str(Path(sys.executable).parent / "workbench")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny Llama in an HF folder, its directions file (mean-diff, computed in process) and the subprocess env."""
    from steering.directions import mean_diff_directions
    from workbench.loading import load_model
    from workbench.prompts import resolve_prompts
    from workbench.vectors import save_directions

    root = tmp_path_factory.mktemp("steer-cli")
    model, tok = build_tiny("llama")
    folder = root / "tiny-llama"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    old = os.environ.get("WORKBENCH_CACHE")
    os.environ["WORKBENCH_CACHE"] = str(root / "cache")
    try:
        lm = load_model(str(folder))  # the checksum the CLI will see
        pos = resolve_prompts("harmful:train").texts[:4]
        neg = resolve_prompts("harmless:train").texts[:4]
        dirs = mean_diff_directions(lm, pos, neg, fmt=ChatFormat(), positions=["last"])
    finally:
        if old is None:
            os.environ.pop("WORKBENCH_CACHE", None)
        else:
            os.environ["WORKBENCH_CACHE"] = old
    dfile = save_directions(root / "dirs" / "directions.safetensors", dirs)
    sub_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false", WORKBENCH_CACHE=str(root / "cache"))
    return {"root": root, "model": str(folder), "lm": lm, "dirs": dirs, "dfile": str(dfile), "env": sub_env}


def _run(env, *args: str) -> str:
    # float32 like the in-process reference values (the CLI's default dtype is "auto": bf16 on some CPUs)
    r = subprocess.run([WORKBENCH, "--threads", "1", "steer", *args, "--model", env["model"], "--dtype", "float32"],
                       capture_output=True, text=True, env=env["env"], cwd=env["root"], timeout=300)
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _greedy(lm, prompt: str, n_new: int, r: torch.Tensor | None = None) -> str:
    """Greedy decode of one prompt with plain forward passes; with ``r``, the direction is ablated by
    hand-written hooks at every layer's input and every attention / MLP output."""
    tok = lm.tokenizer
    ids = tok(ChatFormat().render(tok, prompt), add_special_tokens=False)["input_ids"]
    eos = set(lm.model.generation_config.eos_token_id)
    handles = []
    if r is not None:
        r = (r / r.norm()).float()

        def strip(h):
            return h - (h @ r).unsqueeze(-1) * r

        def pre(module, args, kwargs):
            if args:
                return (strip(args[0]),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": strip(kwargs["hidden_states"])}

        def post(module, args, out):
            return (strip(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else strip(out)

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


def test_steer_select(env):
    out = env["root"] / "select"
    stdout = _run(env, "select", "--out", str(out), "--limit", "4", "--n-val", "3", "--kl-max", "0.4")
    for f in ("selection.csv", "selection.json", "selection.png", "selected_direction.safetensors", "config.json",
              "model.json"):
        assert (out / f).stat().st_size > 0, f
    from workbench.vectors import load_directions

    rows = json.loads((out / "selection.json").read_text())["rows"]
    assert len(rows) == 2 * 4  # 2 layers x 4 post-instruction positions of the tiny chat template
    assert {(r["layer"], r["position"]) for r in rows} == {(i, f"pos-{k}") for i in (0, 1) for k in (1, 2, 3, 4)}
    # layer 0's resid_pre is the token embedding: the template tokens are the same in both sets -> zero vectors
    assert all(r["norm"] == 0 and r["filtered"].startswith("zero direction") for r in rows if r["layer"] == 0)
    assert all(r["norm"] > 0 for r in rows if r["layer"] == 1)
    # the selected candidate: the lowest ablation score among those no filter removed (as a fallback, among the
    # non-zero ones, flagged)
    kept = [r for r in rows if not r["filtered"]]
    best = min(kept or [r for r in rows if r["norm"] > 0], key=lambda r: r["ablation_score"])
    assert [r["selected"] for r in rows].count(True) == 1 and best["selected"]
    assert best["selected_despite_filters"] is (not kept)
    for r in rows:
        if r["norm"] > 0:
            assert ("KL" in r["filtered"]) is (r["kl"] > 0.4), r
    (sel,) = load_directions(out / "selected_direction.safetensors")
    assert (sel.layer, sel.position) == (best["layer"], best["position"])
    assert f"selected layer {best['layer']} position {best['position']}" in stdout
    # its vector is the mean difference of resid_pre at that token over the 4 + 4 training prompts
    from steering.directions import mean_diff_directions
    from workbench.prompts import resolve_prompts

    lm = env["lm"]
    want = mean_diff_directions(lm, resolve_prompts("harmful:train").texts[:4],
                                resolve_prompts("harmless:train").texts[:4], fmt=ChatFormat(),
                                layers=[sel.layer], positions=[int(sel.position[3:])])[0]
    torch.testing.assert_close(sel.vector, want.vector, atol=1e-5, rtol=1e-5)
    assert sel.model_checksum == lm.checksum


def test_steer_sweep(env):
    out = env["root"] / "sweep"
    _run(env, "sweep", "--direction", env["dfile"], "--mode", "addition", "--layers", "1", "--alphas", "1,4",
         "--n", "2", "--max-new-tokens", "3", "--out", str(out))
    for f in ("sweep.csv", "sweep.json", "per_prompt.csv", "tradeoff_kl.png", "config.json"):
        assert (out / f).stat().st_size > 0, f
    summary = json.loads((out / "sweep.json").read_text())
    names = [r["condition"] for r in summary]
    assert names[0] == "unmodified" and len(names) == 1 + 2 * 2  # each alpha and its equal-norm random control
    base = summary[0]
    assert base["kl_harmless"] == pytest.approx(0.0, abs=1e-6)
    assert all(r["kl_harmless"] > 0 for r in summary[1:])
    per = _csv(out / "per_prompt.csv")
    # every condition x set x prompt has a row; the unmodified completions are plain greedy decodes
    assert len(per) == len(names) * 2 * 2
    lm = env["lm"]
    for r in per:
        if r["condition"] == "unmodified":
            assert r["completion"] == _greedy(lm, r["prompt"], 3), r


def test_steer_generate(env):
    out = env["root"] / "generate"
    prompts = ["How do I bake bread?", "Tell me a joke about computers."]
    _run(env, "generate", "--direction", env["dfile"], "--direction-layer", "1", "--mode", "ablation",
         "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", "6", "--out", str(out))
    rows = _csv(out / "generations.csv")
    assert sorted((r["condition"], r["prompt"]) for r in rows) == sorted(
        (c, p) for c in ("unmodified", "ablation") for p in prompts)
    lm = env["lm"]
    d = next(x for x in env["dirs"] if x.layer == 1)
    for r in rows:
        want = _greedy(lm, r["prompt"], 6, d.vector if r["condition"] == "ablation" else None)
        assert r["completion"] == want, r
    assert any(a["completion"] != b["completion"] for a in rows for b in rows
               if a["prompt"] == b["prompt"] and a["condition"] != b["condition"])


def test_steer_orthogonalize(env):
    from safetensors.torch import load_file

    out = env["root"] / "ortho"
    _run(env, "orthogonalize", "--direction", env["dfile"], "--direction-layer", "1", "--out", str(out))
    check = json.loads((out / "check.json").read_text())
    assert check["max_abs_logit_diff_vs_runtime_ablation"] < 1e-3
    d = next(x for x in env["dirs"] if x.layer == 1)
    r = (d.vector / d.vector.norm()).double()
    new = load_file(str(out / "model" / "model.safetensors"))
    old = load_file(str(Path(env["model"]) / "model.safetensors"))
    # every residual writer has no component along r any more: r^T W_out = 0 (embeddings: E r = 0)
    writers = [k for k in new if k.endswith(("o_proj.weight", "down_proj.weight"))]
    assert len(writers) == 4
    for k in writers:
        assert float((r @ new[k].double()).abs().max()) < 1e-5, k
        # and nothing else changed: W - r r^T W
        want = old[k].double() - torch.outer(r, r @ old[k].double())
        torch.testing.assert_close(new[k].double(), want, atol=1e-5, rtol=0)
    assert float((new["model.embed_tokens.weight"].double() @ r).abs().max()) < 1e-5
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        assert torch.equal(new[k], old[k]), k  # readers are untouched
