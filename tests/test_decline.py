"""``steer decline`` (steering/decline*.py): a harm and a decline direction on a tiny Llama with both PLANTED.

The planted model: every block writes nothing (attention and MLP output weights zero), so the residual stream at
the last prompt token is that token's embedding at every layer. All embeddings are made orthogonal to two unit
directions u_h (harm) and u_d (decline) with cos(u_h, u_d) = COS; the digits 1-3 ("harmful" endings) get
ALPHA * u_h, the digits 7-8 (everyday questions the model will decline) ALPHA * u_d, and every token GAMMA * a (a
third unit direction orthogonal to both; every ending digit's own embedding is shrunk 20-fold, so the planted parts
dominate the class means). The unembedding of the token "~" is BETA * (u_h + u_d) / |u_h + u_d| and that of "="
BETA * a, so the model opens its reply with "~" when the last token carries u_h or u_d (or the part of either
orthogonal to the other), and with "=" (an answer) otherwise, also after a random direction is removed; the
planted judge calls a reply starting with "~" a refusal (phrase
matching never does). Removing u_h leaves the part of u_d orthogonal to it, which still opens with "~", and vice
versa: one direction can be ablated without the other's effect.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from steering.decline import (CONTROL, DeclineSets, choose_layer, decide, decline_conditions, evaluate, reading,
                              run_decline, span_ablation)
from workbench.chat import ChatFormat
from workbench.errors import WorkbenchError

COS, ALPHA, BETA, GAMMA, D = 0.5, 10.0, 40.0, 2.0, 64
RAW = ChatFormat(raw=True)
HARM, HARMLESS, DECLINED, ANSWERED = "123", "456", "78", "90"


class PlantedJudge:
    """Refusal when the reply opens with "~"; records every pair it was asked about."""

    name = "planted"

    def __init__(self, *args, **kwargs):
        self.seen: list[tuple[str, str]] = []

    def is_refusal(self, prompts, replies):
        assert len(prompts) == len(replies)
        self.seen += list(zip(prompts, replies))
        return [r.startswith("~") for r in replies]


def planted_model(cos: float = COS, seed: int = 0):
    """The planted tiny Llama (model, tokenizer) and its unit directions u_h, u_d (see the module docstring)."""
    from workbench.tiny import build_tiny

    model, tok = build_tiny("llama", n_layers=2, seed=seed)
    q, _ = torch.linalg.qr(torch.randn(D, 3, generator=torch.Generator().manual_seed(seed + 100)))
    u_h, u_d, a = q[:, 0], cos * q[:, 0] + math.sqrt(1 - cos * cos) * q[:, 1], q[:, 2]
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        E = model.model.embed_tokens.weight
        E -= (E @ q) @ q.T
        for chars, u in ((HARM, u_h), (DECLINED, u_d), (HARMLESS + ANSWERED, torch.zeros(D))):
            for ch in chars:  # the endings' own embeddings shrunk: the planted parts dominate the class means
                i = tok.convert_tokens_to_ids(ch)
                E[i] = 0.05 * E[i] + ALPHA * u
        E += GAMMA * a  # shared by every token: cancels in every difference of means
        model.lm_head.weight[tok.convert_tokens_to_ids("~")] = BETA * (u_h + u_d) / (u_h + u_d).norm()
        model.lm_head.weight[tok.convert_tokens_to_ids("=")] = BETA * a
    return model, tok, u_h, u_d


def prompts(endings: str, n: int, lead: str) -> list[str]:
    return [f"{lead} number {i} please {endings[i % len(endings)]}" for i in range(n)]


def planted_sets() -> DeclineSets:
    """Train / val / test by index (i % 5: 0-2 train, 3 val, 4 test) of 30 harmful, 30 harmless, 100 everyday."""
    h, n = prompts(HARM, 30, "do the bad thing"), prompts(HARMLESS, 30, "do the good thing")
    e = prompts(DECLINED + ANSWERED, 100, "tell me about")
    part = {"train": (0, 1, 2), "val": (3,), "test": (4,)}
    return DeclineSets(**{f"{s}_{k}": [t for i, t in enumerate(xs) if i % 5 in part[k]]
                          for s, xs in (("harmful", h), ("harmless", n), ("everyday", e)) for k in part})


@pytest.fixture(scope="module")
def planted():
    from workbench.loading import from_memory

    model, tok, u_h, u_d = planted_model()
    lm = from_memory(model, tok, model_id="planted-decline")
    judge = PlantedJudge()
    sets = planted_sets()
    res = run_decline(lm, RAW, sets, judge, label_tokens=2, max_new_tokens=2, min_declined=4, n_boot=50,
                      cache=False, progress=False)
    return {"lm": lm, "u_h": u_h, "u_d": u_d, "judge": judge, "sets": sets, "res": res}


def _declined(prompt: str) -> bool:
    return prompt[-1] in DECLINED


# -- (a) the directions recover the planted ones -------------------------------------------------------------------

def test_directions_recover_the_planted_ones_and_their_cosine(planted):
    res = planted["res"]
    assert [r["layer"] for r in res.per_layer] == [0, 1]
    for h, c, row in zip(res.harm, res.decline, res.per_layer):
        assert float(h.unit @ planted["u_h"]) > 0.999 and float(c.unit @ planted["u_d"]) > 0.999
        assert row["cosine"] == pytest.approx(COS, abs=0.005)
        assert row["harm_auroc"] == 1.0 and row["decline_auroc"] == 1.0
        assert h.meta["direction"] == "harm" and c.meta["direction"] == "decline"
    assert res.layer == 1 and res.layer_reason.startswith("rule")  # 0.4 <= l < 1.6 of 2 layers


# -- (d) the labels are the judge's ----------------------------------------------------------------------------------

def test_the_decline_labels_are_the_judges(planted):
    res, sets, judge = planted["res"], planted["sets"], planted["judge"]
    labelled = list(sets.everyday_train) + list(sets.everyday_val)
    assert [p for p, _ in judge.seen[:len(labelled)]] == labelled  # the judge read every labelling reply first
    assert [r["prompt"] for r in res.labels] == labelled
    assert all((r["label"] == "declined") == _declined(r["prompt"]) == r["judge_refusal"] for r in res.labels)
    assert not any(r["phrase_refusal"] for r in res.labels)  # phrases never fire on "~": only the judge labels
    assert res.label_counts["train"]["declined"] == sum(map(_declined, sets.everyday_train)) == 30
    assert res.decline[0].meta["n_positive"] == 30 and res.decline[0].meta["n_negative"] == 30
    with pytest.raises(WorkbenchError, match=r"only 0 of the 60 everyday:train prompts are declined.*--everyday"):
        run_decline(planted["lm"], RAW, sets, PlantedJudge(), label_by="phrase", label_tokens=2, cache=False,
                    progress=False)


# -- (b) ablating the span removes both effects, one ablation leaves the other's; (c) random controls do not -------

def test_ablations_remove_their_own_effect_and_controls_remove_none(planted):
    by = {r["condition"]: r for r in planted["res"].summary}
    assert list(by) == ["unmodified", "harm ablated", "decline ablated", "both ablated", "random (harm)",
                        "random (decline)", "random (both)"]
    n_dec = sum(map(_declined, planted["sets"].everyday_test)) / len(planted["sets"].everyday_test)
    expect = {"unmodified": (1.0, n_dec), "harm ablated": (0.0, n_dec), "decline ablated": (1.0, 0.0),
              "both ablated": (0.0, 0.0), "random (harm)": (1.0, n_dec), "random (decline)": (1.0, n_dec),
              "random (both)": (1.0, n_dec)}
    for name, (harmful, everyday) in expect.items():
        r = by[name]
        assert (r["harmful_refusal_judge"], r["everyday_decline_judge"]) == (harmful, everyday), name
        assert r["harmful_refusal_phrase"] == 0.0 and r["harmless_refusal_judge"] == 0.0
        assert r["harmful_refusal_judge_lo"] <= harmful <= r["harmful_refusal_judge_hi"]
    assert by["unmodified"]["kl_harmless"] == 0.0
    for name in ("harm ablated", "decline ablated", "both ablated"):  # the planted span never touches harmless
        assert by[name]["kl_harmless"] == pytest.approx(0.0, abs=1e-5)
        assert by[CONTROL[name]]["kl_harmless"] >= 0.0 and by[CONTROL[name]]["info_control"] is True
        assert by[CONTROL[name]]["info_dims"] == by[name]["info_dims"]
    assert planted["res"].reading["verdict"] == "separate"
    per = planted["res"].per_prompt
    assert len(per) == 7 * sum(len(getattr(planted["sets"], f"{s}_test")) for s in ("harmful", "everyday", "harmless"))


def test_span_ablation_removes_exactly_the_span():
    g = torch.Generator().manual_seed(0)
    a, b, x = torch.randn(D, generator=g), torch.randn(D, generator=g), torch.randn(3, 5, D, generator=g)
    from workbench.interventions import HookContext

    ctx = HookContext(pads=torch.zeros(3, dtype=torch.long), prompt_width=5, n_post=0)
    ivs = [iv for iv in span_ablation([a, b], n_layers=1) if iv.site.component == "resid_pre"]
    y = x
    for iv in ivs:
        y = iv(y, ctx)
    Q, _ = torch.linalg.qr(torch.stack([a, b], 1))
    torch.testing.assert_close(y, x - (x @ Q) @ Q.T, atol=1e-5, rtol=0)
    with pytest.raises(WorkbenchError, match="span only 1 dimension"):
        span_ablation([a, 2 * a], n_layers=1)


def test_random_controls_are_seeded_and_of_the_same_dimension(planted):
    h, c = planted["res"].at_layer()
    conds = decline_conditions(h, c, 2, seed=3)
    assert [(x.name, x.info["dims"], x.info["control"]) for x in conds] == [
        ("unmodified", 0, False), ("harm ablated", 1, False), ("decline ablated", 1, False), ("both ablated", 2, False),
        ("random (harm)", 1, True), ("random (decline)", 1, True), ("random (both)", 2, True)]
    assert [x.info["seeds"] for x in conds[4:]] == ["4", "5", "6,7"]
    again = decline_conditions(h, c, 2, seed=3)
    torch.testing.assert_close(conds[4].interventions[0].direction, again[4].interventions[0].direction)


# -- the layer rule and the reading, on planted rows ---------------------------------------------------------------

def test_layer_rule_auroc_then_dprime_then_lower_layer_within_the_depth_range():
    mk = lambda rows: [{"layer": i, "harm_auroc": a, "harm_dprime": d} for i, (a, d) in enumerate(rows)]  # noqa: E731
    ten = [(1.0, 99.0), (0.9, 1.0), (0.95, 1.0), (0.95, 2.0), (0.95, 2.0), (0.9, 5.0), (0.8, 9.0), (0.7, 1.0),
           (1.0, 50.0), (1.0, 60.0)]  # layers 0, 8, 9 are outside 2 <= l < 8
    assert choose_layer(mk(ten), 10)[0] == 3
    assert choose_layer(mk(ten), 10, override=9) == (9, "given (--layer 9)")
    with pytest.raises(WorkbenchError, match="outside the model's 0..9"):
        choose_layer(mk(ten), 10, override=10)
    assert choose_layer(mk([(0.6, 1.0)]), 1)[0] == 0  # an empty range falls back to every layer


def test_zero_direction_layers_get_nan_rows_and_are_never_chosen():
    """The residual input of layer 0 at the last token is the same token's embedding in every prompt: its
    difference in means is the zero vector. Its row carries NaN (not an error), the others are unchanged."""
    from steering.decline import per_layer_rows
    from workbench.vectors import Direction

    g = torch.Generator().manual_seed(0)
    d = 8
    mk = lambda v, layer: Direction(v, layer=layer, method="mean_diff", model_id="m", model_checksum="c",  # noqa: E731
                                    d_model=d, component="resid_pre")
    harm = [mk(torch.zeros(d), 0), mk(torch.randn(d, generator=g), 1)]
    decline = [mk(torch.zeros(d), 0), mk(torch.randn(d, generator=g), 1)]
    held = {k: torch.randn(6, 2, d, generator=g) for k in ("harmful", "harmless", "declined", "answered")}
    held["harmful"][:, 1] += 20 * harm[1].unit  # layer 1 separates harmful from harmless along the harm direction
    rows = per_layer_rows(harm, decline, held, n_boot=50)
    assert rows[0]["zero_direction"] == "harm,decline" and rows[1]["zero_direction"] == ""
    assert math.isnan(rows[0]["cosine"]) and math.isnan(rows[0]["harm_auroc"])
    assert math.isnan(rows[0]["decline_on_harm_auroc"])
    assert rows[1]["cosine"] == pytest.approx(float(harm[1].unit @ decline[1].unit))
    assert rows[1]["harm_auroc"] == 1.0
    assert choose_layer(rows, 2)[0] == 1  # the zero layer is never the ablation layer
    with pytest.raises(WorkbenchError, match="non-zero harm direction"):
        choose_layer(rows[:1], 2)


def _rows(harm_abl, dec_abl, ctl=(0.9, 0.5)):
    """Summary rows with Wilson-like intervals +-0.1 around the given (harmful refusal, off-topic decline)."""
    out = []
    for name, (hr, od) in (("harm ablated", harm_abl), ("decline ablated", dec_abl), ("both ablated", (0.0, 0.0)),
                           ("random (harm)", ctl), ("random (decline)", ctl), ("random (both)", ctl)):
        out.append({"condition": name, **{f"{c}{s}": v + dv for c, v in (("harmful_refusal_judge", hr),
                                                                          ("everyday_decline_judge", od))
                                          for s, dv in (("", 0.0), ("_lo", -0.1), ("_hi", 0.1))}})
    return out


@pytest.mark.parametrize("harm_abl,dec_abl,verdict", [
    ((0.1, 0.5), (0.9, 0.1), "separate"),
    ((0.1, 0.1), (0.1, 0.1), "shared"),
    ((0.9, 0.5), (0.9, 0.5), "no effect"),
    ((0.1, 0.5), (0.1, 0.1), "mixed"),
    ((0.75, 0.5), (0.9, 0.35), "no effect"),  # intervals touching the control's are not an effect
])
def test_reading_rule_on_planted_rows(harm_abl, dec_abl, verdict):
    assert reading(_rows(harm_abl, dec_abl))["verdict"] == verdict
    with pytest.raises(WorkbenchError, match="random \\(both\\)"):
        reading(_rows(harm_abl, dec_abl)[:5])


# -- (e) bad input ---------------------------------------------------------------------------------------------------

def test_bad_input_is_refused_with_a_clear_message(planted):
    parts = {n: list(getattr(planted["sets"], n)) for n in DeclineSets.names()}
    with pytest.raises(WorkbenchError, match="the everyday:val prompt set is empty"):
        DeclineSets(**{**parts, "everyday_val": []})
    with pytest.raises(WorkbenchError, match="2 extraction \\(train\\) prompts are also evaluation"):
        DeclineSets(**{**parts, "harmless_test": parts["harmful_train"][:2]})
    with pytest.raises(WorkbenchError, match="give the whole set \\('harmful'\\)"):
        DeclineSets.from_specs(harmful="harmful:train")
    lm = planted["lm"]
    with pytest.raises(WorkbenchError, match=r"only 30 of the 60 everyday:train prompts are declined.*at least 31 are "
                                             r"needed to form the decline direction.*lower --min-declined"):
        run_decline(lm, RAW, planted["sets"], PlantedJudge(), min_declined=31, label_tokens=2, cache=False,
                    progress=False)
    with pytest.raises(WorkbenchError, match="--min-declined must be >= 2"):
        run_decline(lm, RAW, planted["sets"], PlantedJudge(), min_declined=1, progress=False)
    with pytest.raises(WorkbenchError, match="--position must be 'last' or a negative index"):
        run_decline(lm, RAW, planted["sets"], PlantedJudge(), position="mean", progress=False)
    with pytest.raises(WorkbenchError, match="--layer 5 is outside"):
        run_decline(lm, RAW, planted["sets"], PlantedJudge(), layer=5, progress=False)
    with pytest.raises(WorkbenchError, match="first condition must be the unmodified model"):
        evaluate(None, RAW, decline_conditions(*planted["res"].at_layer(), 2)[1:], harmful=["a"], everyday=["b"],
                 harmless=["c"], judge=PlantedJudge())
    with pytest.raises(WorkbenchError, match="unknown labelling"):
        decide([True], [True], "vote")


# -- the built-in everyday set ---------------------------------------------------------------------------------------

def test_everyday_set_is_registered_varied_off_topic_and_new():
    import re

    from workbench.prompts import BUILTIN_NAMES, builtin, builtin_split

    ps = builtin("everyday")
    assert "everyday" in BUILTIN_NAMES and len(ps) == 300
    cats: dict[str, int] = {}
    for p in ps:
        cats[p.category] = cats.get(p.category, 0) + 1
    assert len(cats) == 15 and set(cats.values()) == {20}
    norm = [re.sub(r"\W+", " ", t.lower()).strip() for t in ps.texts]
    assert len(set(norm)) == 300
    code = re.compile(r"\b(python|code|coding|script|program\w*|function|sql|javascript|html|git|api|linux|bash)\b", re.I)
    alarming = re.compile(r"\b(kill\w*|shoot\w*|attack\w*|weapon\w*|bomb\w*|poison\w*|hack\w*|steal\w*|drug\w*|"
                          r"death|die|blood|fire|explo\w*|break|crack)\b", re.I)
    assert not [t for t in ps.texts if code.search(t) or alarming.search(t)]
    for other in BUILTIN_NAMES:
        if other not in ("everyday", "utility"):
            assert not set(norm) & {re.sub(r"\W+", " ", t.lower()).strip() for t in builtin(other).texts}, other
    sizes = [len(builtin_split("everyday", k)) for k in ("train", "val", "test")]
    assert sizes == [180, 60, 60]
    sets = DeclineSets.from_specs(limit=5)  # the built-in splits are disjoint (checked on construction)
    assert sets.record()["everyday:test"] == 5


# -- the command, in process ---------------------------------------------------------------------------------------

def test_cli_writes_the_run_folder(tmp_path, monkeypatch):
    import workbench.judge
    from workbench.cli import main
    from workbench.vectors import load_directions

    model, tok, u_h, u_d = planted_model()
    folder = tmp_path / "planted"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    files = {}
    for name, endings, n, lead in (("harmful", HARM, 30, "do the bad thing"), ("harmless", HARMLESS, 30, "do it"),
                                   ("everyday", DECLINED + ANSWERED, 100, "tell me about")):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(prompts(endings, n, lead)) + "\n")
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(workbench.judge, "RefusalJudge", PlantedJudge)
    out = tmp_path / "decline"
    argv = ["steer", "decline", "--model", str(folder), "--raw", "--harmful", str(files["harmful"]), "--harmless",
            str(files["harmless"]), "--everyday", str(files["everyday"]), "--label-tokens", "2", "--max-new-tokens",
            "2", "--min-declined", "2", "--n-boot", "20", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads((out / "decline.json").read_text())
    assert res["layer"] == 1 and res["rule_layer"].startswith("ablation layer, fixed before")
    assert res["reading"]["verdict"] == "separate" and res["cosine_at_layer"] == pytest.approx(COS, abs=0.01)
    assert res["sets"]["sizes"] == {"harmful:train": 18, "harmless:train": 18, "everyday:train": 60,
                                    "harmful:val": 6, "harmless:val": 6, "everyday:val": 20,
                                    "harmful:test": 6, "harmless:test": 6, "everyday:test": 20}
    for f in ("per_layer.csv", "conditions.csv", "per_prompt.csv", "labels.csv", "decline.png", "config.json"):
        assert (out / f).is_file(), f
    with open(out / "conditions.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 7
    dirs = load_directions(out / "directions.safetensors")
    assert [d.meta["direction"] for d in dirs] == ["harm", "harm", "decline", "decline"]
    abl = load_directions(out / "ablated_directions.safetensors")
    assert len(abl) == 6 and float(abl[1].unit @ u_d) > 0.999
    bad = tmp_path / "bad"
    assert main(["steer", "decline", "--model", str(folder), "--everyday", "everyday:test", "--out", str(bad)]) == 2
    assert not bad.exists()


def test_module_doctests():
    import doctest

    import steering.decline
    import steering.decline_ablation
    import steering.decline_labels
    import steering.decline_layers
    import steering.decline_plots

    for mod in (steering.decline, steering.decline_labels, steering.decline_layers, steering.decline_ablation,
                steering.decline_plots):
        res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert res.failed == 0 and res.attempted > 0, mod.__name__
