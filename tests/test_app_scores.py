"""The Steer tab's numbers against a manual computation (no workbench code in the expected values).

``test_app_ui.py::test_steer_columns_and_scores`` checks the transport (Gradio client, streaming, table layout);
here the same Steer function's final output is checked value by value: the generated text of each column is a
manual greedy decode (plain HF forward passes, the addition written as a hand-made pre-hook), and every score in
the table (refusal logit, KL next, KL reply = the MEAN KL over reply positions, perplexity, mean projection,
tokens) and every token colour equals a manual teacher-forced computation, to the table's rounding.
"""

from __future__ import annotations

import math

import pytest
import torch

try:
    from apps.state import AppState
    from apps.ui import SCORE_NAMES, make_steer_fn
except ImportError as e:  # gradio is a declared dependency (the "app" extra): missing is a failure, not a skip
    pytest.fail(f"the app cannot be imported ({e}); install the project with its extras (bash scripts/setup.sh)",
                pytrace=False)

from workbench.chat import ChatFormat
from workbench.loading import from_memory
from workbench.scoring import is_refusal
from workbench.tiny import build_tiny

MODEL = "tiny-llama"
PROMPT = "Tell me a joke about the sea"
NEW = 12
ALPHA = 2.0
# refusal-opening tokens of the tiny tokenizer, read off its vocabulary by hand (see test_breakage.py)
REFUSAL_TOKENS = ["A", "I", "N", "S", "U", "Ġ", "ĠI"]


def _hooked(lm, v: torch.Tensor | None, layer: int, seen: dict):
    """Pre-hook on ``layer``: add ``v`` (None: nothing) to its input and keep the result (the probe site)."""

    def pre(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if v is not None:
            h = h + v
        seen["h"] = h.detach().clone()
        if args:
            return (h,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    return lm.model.model.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)


def _forward(lm, ids: list[int], v, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    seen: dict = {}
    h = _hooked(lm, v, layer, seen)
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0].double()
    finally:
        h.remove()
    return logits, seen["h"][0].double()


def _greedy(lm, prompt_ids: list[int], v, layer: int, eos: set[int]) -> list[int]:
    out: list[int] = []
    for _ in range(NEW):
        logits, _ = _forward(lm, prompt_ids + out, v, layer)
        nxt = int(logits[-1].argmax())
        if nxt in eos:
            break
        out.append(nxt)
    return out


def _table(df) -> dict:
    rows = df["data"] if isinstance(df, dict) else df.values.tolist()
    return {r[0]: r[1] for r in rows}


def test_steer_scores_equal_a_manual_computation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the app's default runs folder is relative
    lm = from_memory(*build_tiny("llama"), model_id=MODEL)
    state = AppState({MODEL: lm}, max_new_tokens_limit=40, disk_cache=False)
    steer = make_steer_fn(state)
    *_, final = steer(model=MODEL, prompt=PROMPT, layer=1, a_kind="addition", a_strength=ALPHA, max_new_tokens=NEW)
    assert "done in" in final[0]
    cols = [final[1 + 4 * j: 5 + 4 * j] for j in range(3)]
    d = state.resolve_direction(MODEL, "mean-diff", layer=1, fmt=state.chat_format("")).direction  # cached: the same
    assert d.layer == 1 and d.component == "resid_pre"
    unit = (d.vector / d.vector.norm()).double()

    tok = lm.tokenizer
    prompt_ids = tok(ChatFormat().render(tok, PROMPT), add_special_tokens=False)["input_ids"]
    t0 = len(prompt_ids)
    eos = set(lm.model.generation_config.eos_token_id)
    refusal = sorted(tok.convert_tokens_to_ids(REFUSAL_TOKENS))
    manual = []
    for v in (None, ALPHA * d.vector):
        reply = _greedy(lm, prompt_ids, v, 1, eos)
        n = len(reply)
        ref, _ = _forward(lm, prompt_ids + reply, None, 1)
        col, h = _forward(lm, prompt_ids + reply, v, 1)
        lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(col, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1).clamp(min=0)[t0 - 1:t0 - 1 + max(n, 1)]
        p_r = lq[t0 - 1, refusal].exp().sum()
        proj = (h[t0:t0 + n] @ unit).tolist()
        nll = -lp[torch.arange(t0 - 1, t0 - 1 + n), torch.tensor(reply)] if n else None
        text = tok.decode(reply, skip_special_tokens=True)
        manual.append({"text": text, "n": n, "proj": proj, "kl": kl,
                       "scores": {"refused": "yes" if is_refusal(text) else "no",
                                  "refusal logit": float(torch.log(p_r) - torch.log1p(-p_r)),
                                  "KL next": float(kl[0]), "KL reply": float(kl.mean()),
                                  "perplexity": math.exp(float(nll.mean())) if n else None,
                                  "mean proj": sum(proj) / n if n else None, "tokens": n}})
    assert manual[1]["n"] >= 3 and float(manual[1]["kl"].max() - manual[1]["kl"].mean()) > 1e-3  # mean != max
    assert manual[0]["text"] != manual[1]["text"]  # the addition changes the reply
    scale = max(abs(p) for m in manual for p in m["proj"]) or 1.0
    digits = {"refusal logit": 3, "KL next": 4, "KL reply": 4, "perplexity": 2, "mean proj": 3}
    for (title, text, tokens, df), m in zip(cols[:2], manual):
        assert text == m["text"], title
        got = _table(df)
        assert list(got) == SCORE_NAMES
        for name, want in m["scores"].items():
            if name in digits and want is not None:
                assert got[name] == pytest.approx(want, abs=1.01 * 10 ** -digits[name]), (title, name)
            else:
                assert got[name] == want, (title, name)
        colours = [t["class_or_confidence"] if isinstance(t, dict) else t[1] for t in tokens]
        assert colours == pytest.approx([max(-1.0, min(1.0, p / scale)) for p in m["proj"]], abs=2e-3), title
    assert _table(cols[0][3])["KL next"] == 0 and _table(cols[0][3])["KL reply"] == 0
