"""Tests written against deliberate breaks (issue #15): each one fails on a known broken version of the code.

Expected values are derived independently of the code under test: by hand on planted tensors, with a manual
forward pass and hand-written hooks, or from a hand-listed token set. The break each test is aimed at is named
in its docstring (``benchmarks/breaks.py`` re-applies them on a temporary copy of the sources).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workbench.backends import get_backend
from workbench.chat import ChatFormat, encode, position_ids_from_mask
from workbench.tiny import TINY_ARCHS, build_tiny, tiny_chat_prompts

from weightspace.checkpoints import open_checkpoint
from weightspace.deltas import DeltaSpec
from weightspace.overlap import OverlapConfig, update_overlap
from weightspace.plan import Selection, match_checkpoints
from weightspace.projection import ProjectionConfig, project_checkpoint
from weightspace.reference import DeltaReference, DirectionReference

from planted_weights import DN, O0, build_planted, weights  # noqa: E402  (tests/ is on sys.path)

TOL = 1e-5


# -- planted checkpoints (see tests/planted_weights.py for the exact updates) ------------------------------------

@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return build_planted(tmp_path_factory.mktemp("planted-breaks"))


def _weights(planted, name):
    return weights(planted, name)


def _cks(planted, *names):
    return {nm: open_checkpoint(planted["paths"][nm], label=nm) for nm in names}


# -- weightspace.overlap.update_overlap: the directions branch ------------------------------------------------

def test_overlap_directions_join_the_comparison(planted):
    """Break: ``directions.side == cfg.side`` flipped, so directions never join the comparison."""
    cks = _cks(planted, "aligned", "ft")
    plan = match_checkpoints(cks)
    spec = DeltaSpec("ft", cks["ft"], cks["aligned"])
    dirs = DirectionReference([planted["r"]])
    res = update_overlap([spec], plan, OverlapConfig(etas=(0.5, 0.99)), directions=dirs, progress=False)
    assert res.pairs == ["ft~directions"]
    rows = {(row["tensor"], row["eta"]): row for row in res.tensor_rows if row["pair"] == "ft~directions"}
    # O0: D = 4 n w2^T + 3 r w^T, energies 16 and 9 of 25 -> k(0.5) = 1 (span n), k(0.99) = 2 (span n, r).
    #     MSO with span(r): 0 at eta 0.5, ||[n r]^T r||^2 / min(2, 1) = 1 at eta 0.99.
    # DN: D = 2 a u^T + r u2^T, energies 4 and 1 of 5 -> k(0.5) = 1 (span a): MSO 0; k(0.99) = 2: MSO 1.
    # Every other covered matrix has a zero update: no pair there.
    assert set(rows) == {(DN, 0.5), (DN, 0.99), (O0, 0.5), (O0, 0.99)}
    assert rows[(O0, 0.5)]["mso"] == pytest.approx(0.0, abs=TOL)
    assert rows[(O0, 0.99)]["mso"] == pytest.approx(1.0, abs=TOL)
    assert rows[(DN, 0.5)]["mso"] == pytest.approx(0.0, abs=TOL)
    assert rows[(DN, 0.99)]["mso"] == pytest.approx(1.0, abs=TOL)
    assert (rows[(O0, 0.5)]["k_a"], rows[(O0, 0.5)]["k_b"], rows[(O0, 0.99)]["k_a"]) == (1, 1, 2)
    assert rows[(O0, 0.5)]["baseline"] == pytest.approx(1 / 64) and rows[(O0, 0.99)]["baseline"] == pytest.approx(2 / 64)
    assert rows[(O0, 0.99)]["angle_min_deg"] == pytest.approx(0.0, abs=1e-3)
    assert rows[(O0, 0.5)]["angle_min_deg"] == pytest.approx(90.0, abs=1e-3)
    model = {row["eta"]: row for row in res.table.rows("model") if row["pair"] == "ft~directions"}
    assert model[0.99]["mso_pooled"] == pytest.approx(1.0, abs=TOL)  # (1 + 1) / (1 + 1)
    assert model[0.5]["mso_pooled"] == pytest.approx(0.0, abs=TOL)
    # directions of the other side never join
    right = update_overlap([spec], plan, OverlapConfig(etas=(0.5,), side="right"), directions=dirs, progress=False)
    assert right.tensor_rows == [] and right.table.rows("model") == []


# -- weightspace.projection: unselected tensors and the SafeLoRA threshold --------------------------------------

def _project(planted, out, cfg, reference=None):
    cks = _cks(planted, "aligned", "ft", "base")
    ref = reference if reference is not None else DirectionReference([planted["r"]])
    res = project_checkpoint(cks["aligned"], cks["ft"], ref, cfg, out, progress=False)
    return res, {k: v.double() for k, v in load_file(str(res.model_path / "model.safetensors")).items()}


@pytest.mark.parametrize("unselected", ["aligned", "finetuned"])
def test_projection_unselected_tensors_follow_the_setting(planted, tmp_path, unselected):
    """Break: ``unselected`` ignored (always keep the fine-tuned weights)."""
    A, T = _weights(planted, "aligned"), _weights(planted, "ft")
    sel = Selection.parse("1", None, n_layers=2)  # layer 1 only: O0 (layer 0) is unselected
    res, P = _project(planted, tmp_path / "p", ProjectionConfig("parallel", selection=sel, unselected=unselected))
    keep = A if unselected == "aligned" else T
    assert not torch.allclose(A[O0], T[O0], atol=1e-3)  # the two choices really differ on O0
    torch.testing.assert_close(P[O0], keep[O0], atol=TOL, rtol=0)
    # DN is selected and covered: W_A + r r^T D = W_A + r u2^T (the 2 a u^T part is orthogonal to r)
    r, u2 = planted["r"], planted["u2"]
    torch.testing.assert_close(P[DN], A[DN] + torch.outer(r, u2), atol=TOL, rtol=0)
    recs = {x.name: x for x in res.records}
    assert not recs[O0].selected and recs[O0].operator == "unselected" and recs[DN].selected
    # tensors outside the selection that the update did not touch are the same either way
    k1 = "model.layers.0.self_attn.k_proj.weight"
    torch.testing.assert_close(P[k1], A[k1], atol=0, rtol=0)


def test_safelora_threshold_projects_only_low_cosine_tensors(planted, tmp_path):
    """Break: the ``cos(D, P D) < threshold`` comparison inverted."""
    A, T = _weights(planted, "aligned"), _weights(planted, "ft")
    cks = _cks(planted, "aligned", "base")
    ref = DeltaReference(DeltaSpec("alignment", cks["aligned"], cks["base"]))
    # SafeLoRA P D = V V^T D / ||V||_F with V the reference update of the tensor:
    #   O0: V = 2 r w1^T, D = 3 r w^T + 4 n w2^T -> P D = 2 r w1^T (2 w1 r^T D) / 2 = 6 r w^T;
    #       cos(D, P D) = <D, 6 r w^T> / (||D|| ||P D||) = 18 / (5 * 6) = 0.6
    #   DN: V = 2 a u1^T, D = 2 a u^T + r u2^T -> P D = 4 a u^T; cos = 8 / (sqrt 5 * 4) = 2 / sqrt 5 = 0.894
    r, w, a, u = planted["r"], planted["w"], planted["a"], planted["u"]
    res, P = _project(planted, tmp_path / "s", ProjectionConfig("parallel", operator="safelora",
                                                                  safelora_threshold=0.8), reference=ref)
    recs = {x.name: x for x in res.records}
    assert recs[O0].cos_update_projected == pytest.approx(0.6, abs=1e-5)
    assert recs[DN].cos_update_projected == pytest.approx(2 / math.sqrt(5), abs=1e-5)
    # 0.6 < 0.8: projected; 0.894 >= 0.8: the full update is kept
    assert recs[O0].applied and not recs[DN].applied
    torch.testing.assert_close(P[O0], A[O0] + 6 * torch.outer(r, w), atol=1e-4, rtol=0)
    torch.testing.assert_close(P[DN], T[DN], atol=TOL, rtol=0)
    assert res.report["n_not_applied_safelora"] == 1
    # a threshold above both cosines projects both
    res2, P2 = _project(planted, tmp_path / "s2", ProjectionConfig("parallel", operator="safelora",
                                                                   safelora_threshold=0.95), reference=ref)
    torch.testing.assert_close(P2[DN], A[DN] + 4 * torch.outer(a, u), atol=1e-4, rtol=0)
    assert res2.report["n_not_applied_safelora"] == 0


# -- weightspace.chain._paired: the higher / lower verdicts ------------------------------------------------------
# Verdict rule (weightspace.metrics.paired_difference): 'higher' when the 95 % percentile bootstrap interval of
# the mean per-item difference lies above 0, 'lower' when below, else 'no difference'. The cases below are chosen
# so that the verdict follows from the exact bootstrap distribution (enumerable by hand), not from Monte Carlo luck.

def _write_eval(folder: Path, cid: str, name: str, column: str, values) -> None:
    d = folder / "evals" / cid
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{name}.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["prompt", column])
        wr.writeheader()
        for i, v in enumerate(values):
            wr.writerow({"prompt": f"p{i}", column: v})


@pytest.mark.parametrize("a, b, negate, mean, se, verdict", [
    # d = a - b = [2, 3, 3, 4]: every resample mean lies in [2, 4] -> interval above 0: higher
    ([3, 4, 5, 6], [1, 1, 2, 2], False, 3.0, math.sqrt(2 / 3 / 4), "higher"),
    ([3, 4, 5, 6], [1, 1, 2, 2], True, -3.0, math.sqrt(2 / 3 / 4), "lower"),
    ([1, 1, 2, 2], [3, 4, 5, 6], False, -3.0, math.sqrt(2 / 3 / 4), "lower"),
    # d = [2, 0]: resample means 0 / 1 / 2 with probability 1/4, 1/2, 1/4 -> interval [0, 2] holds 0
    ([2, 0], [0, 0], False, 1.0, 1.0, "no difference"),
    # d = [1, -1, 1, -1]: symmetric around 0 -> no difference
    ([1, 0, 1, 0], [0, 1, 0, 1], False, 0.0, math.sqrt(4 / 3 / 4), "no difference"),
    # zero spread: every resample gives the mean, the interval is [mean, mean]: its sign decides
    ([2, 2, 2], [1, 1, 1], False, 1.0, 0.0, "higher"),
    ([1, 1, 1], [2, 2, 2], False, -1.0, 0.0, "lower"),
    ([1, 1, 1], [1, 1, 1], False, 0.0, 0.0, "no difference"),
    # d = [0, 1, 2, 3]: a resample mean <= 0 needs four zeros (p = 1/256 < 2.5 %), <= 0.25 has p = 5/256 < 2.5 %:
    # the 2.5 % point is > 0 (0.5 exactly, p(<= 0.5) = 15/256) -> higher
    ([0, 1, 2, 3], [0, 0, 0, 0], False, 1.5, math.sqrt(5 / 12), "higher"),
    ([0, 0, 0, 0], [0, 1, 2, 3], False, -1.5, math.sqrt(5 / 12), "lower"),
    # one prompt: every resample is that prompt, se 0, the sign decides
    ([3], [1], False, 2.0, 0.0, "higher"),
    # booleans are 1 / 0 (refusal columns); negated: fewer refusals in a = more compliance = higher
    # (d = [1, 1, 1, 0]: a resample mean of 0 needs four zeros, p = 1/256)
    (["False", "False", "False", "True"], ["True", "True", "True", "True"], True, 0.75, math.sqrt(0.25 / 4), "higher"),
])
def test_paired_verdicts_by_hand(tmp_path, a, b, negate, mean, se, verdict):
    """Break: higher / lower verdicts swapped."""
    from weightspace.chain import _paired

    _write_eval(tmp_path, "cfg-a", "harmful", "x", a)
    _write_eval(tmp_path, "cfg-b", "harmful", "x", b)
    got = _paired(tmp_path, "cfg-a", "cfg-b", "harmful", "x", negate=negate)
    assert got["verdict"] == verdict
    assert got["n"] == len(a)
    assert got["mean_diff"] == pytest.approx(mean, abs=1e-12)
    assert got["se"] == pytest.approx(se, abs=1e-12)
    lo, hi = got["ci"]
    assert lo <= mean <= hi


@pytest.mark.parametrize("a, b, ci", [
    ([2, 0], [0, 0], [0.0, 2.0]),  # resample means 0 / 1 / 2 (1/4, 1/2, 1/4): 2.5 % and 97.5 % points 0 and 2
    ([2, 2, 2], [1, 1, 1], [1.0, 1.0]),  # zero spread
    ([3], [1], [2.0, 2.0]),  # one item
    ([0, 1], [0, 0], [0.0, 1.0]),  # resample means 0 / 0.5 / 1
])
def test_paired_interval_by_hand(tmp_path, a, b, ci):
    from weightspace.chain import _paired

    _write_eval(tmp_path, "a", "harmful", "x", a)
    _write_eval(tmp_path, "b", "harmful", "x", b)
    assert _paired(tmp_path, "a", "b", "harmful", "x")["ci"] == pytest.approx(ci, abs=1e-12)


def test_paired_default_is_not_negated(tmp_path):
    from weightspace.chain import _paired

    _write_eval(tmp_path, "a", "utility", "correct", ["True", "True", "True"])
    _write_eval(tmp_path, "b", "utility", "correct", ["False", "False", "False"])
    assert _paired(tmp_path, "a", "b", "utility", "correct") == {"mean_diff": 1.0, "se": 0.0, "ci": [1.0, 1.0],
                                                                   "n": 3, "verdict": "higher"}


def test_paired_without_comparable_data_is_na(tmp_path):
    from weightspace.chain import _paired

    assert _paired(None, "a", "b", "harmful", "x")["verdict"] == "n/a"
    _write_eval(tmp_path, "a", "harmful", "x", [1, 2, 3])
    _write_eval(tmp_path, "b", "harmful", "x", [1, 2])
    assert _paired(tmp_path, "a", "b", "harmful", "x")["verdict"] == "n/a"  # not the same prompts
    assert _paired(tmp_path, "a", "missing", "harmful", "x")["verdict"] == "n/a"
    _write_eval(tmp_path, "c", "harmful", "x", [1, "oops", 3])
    assert _paired(tmp_path, "a", "c", "harmful", "x")["verdict"] == "n/a"
    d = tmp_path / "evals" / "other"  # the same length but other prompts: not paired
    d.mkdir(parents=True)
    (d / "harmful.csv").write_text("prompt,x\nq0,1\nq1,2\nq2,3\n")
    assert _paired(tmp_path, "a", "other", "harmful", "x")["verdict"] == "n/a"


@pytest.mark.parametrize("p, n, se", [
    (0.5, 4, 0.25),  # sqrt(0.25 / 4)
    (0.9, 10, math.sqrt(0.09 / 10)),
    (0.0, 4, 0.125),  # floored at the p = 1/2 ... 1/(4n) rule: sqrt((1/16) / 4)
    (1.0, 16, math.sqrt(1 / 64 / 16)),
    (0.5, 1, 0.5),  # one prompt: sqrt(0.25 / 1)
    (1.5, 4, 0.125),  # clamped to p = 1
    (-0.2, 4, 0.125),  # clamped to p = 0
])
def test_binomial_standard_error_by_hand(p, n, se):
    from weightspace.chain import _se

    assert _se(p, n) == pytest.approx(se, rel=1e-12)


def test_binomial_standard_error_of_no_prompts_is_nan():
    from weightspace.chain import _se

    assert math.isnan(_se(0.5, 0))


# -- apps/steer.score_column: every score against a manual teacher-forced pass ---------------------------------

def _manual_addition_hook(v: torch.Tensor, alpha: float):
    def pre(module, args, kwargs):
        if args:
            return (args[0] + alpha * v,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + alpha * v}

    return pre


def test_score_column_equals_a_manual_teacher_forced_pass(make_tiny):
    """Break: ``kl_reply`` takes the max over reply positions instead of the mean."""
    from apps.steer import ColumnSpec, Probe, build_interventions, score_column
    from workbench.vectors import Direction

    lm = make_tiny("llama")
    be = get_backend("native", lm)
    tok = lm.tokenizer
    g = torch.Generator().manual_seed(3)
    v = torch.randn(64, generator=g)
    d = Direction(v, layer=1, method="test", model_id=lm.model_id, model_checksum=lm.checksum, d_model=64,
                  component="resid_pre")
    alpha = 2.5
    ivs = build_interventions(ColumnSpec("add", "addition", d, strength=alpha), lm.n_layers)
    prompt = "Tell me a joke about the sea"
    batch = encode(tok, [prompt], ChatFormat())
    reply = tok("The sea is wide and blue, and the waves are calm.", add_special_tokens=False)["input_ids"]
    n = len(reply)
    assert n >= 5
    scores, proj, _ = score_column(be, be, batch, reply, interventions=ivs, probe=Probe.from_direction(d))

    # the manual pass: plain HF forward of prompt + reply, and one with a hand-written pre-hook on layer 1
    prompt_ids = tok(ChatFormat().render(tok, prompt), add_special_tokens=False)["input_ids"]
    t0 = len(prompt_ids)
    ids = torch.tensor([prompt_ids + reply])
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits[0].double()
        h1 = lm.model.model.layers[1].register_forward_pre_hook(_manual_addition_hook(v, alpha), with_kwargs=True)
        h2 = lm.model.model.layers[1].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            col = lm.model(input_ids=ids).logits[0].double()
        finally:
            h1.remove()
            h2.remove()
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(col, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)[t0 - 1:t0 - 1 + n]  # the positions that predicted the reply tokens
    assert len(kl) == n and float(kl.max() - kl.mean()) > 1e-3  # mean and max really differ here
    assert scores.kl_reply == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-6)
    assert scores.kl_next == pytest.approx(float(kl[0]), rel=1e-4, abs=1e-6)
    nll = -lp[torch.arange(t0 - 1, t0 - 1 + n), torch.tensor(reply)]
    assert scores.perplexity == pytest.approx(math.exp(float(nll.mean())), rel=1e-4)
    unit = v / v.norm()
    want_proj = (seen["h"][0, t0:t0 + n].double() @ unit.double()).tolist()
    assert proj == pytest.approx(want_proj, abs=1e-3)
    assert scores.mean_projection == pytest.approx(sum(want_proj) / n, abs=1e-3)
    refusal = _hand_refusal_ids(tok)
    p_r = lq[t0 - 1, refusal].exp().sum()
    assert scores.refusal_logit == pytest.approx(float(torch.log(p_r) - torch.log1p(-p_r)), abs=1e-4)
    assert scores.n_tokens == n


# -- workbench.scoring.refusal_token_ids: both the reply-initial and the space-prefixed forms ------------------

# The first byte-level BPE token of each refusal opening in the tiny tokenizer, read off its vocabulary:
# reply-initial "I'm sorry" ... -> I, "Sorry" -> S, "As an AI" -> A, "Unfortunately" -> U, "No," -> N;
# space-prefixed " I'm sorry" ... -> ĠI, " Sorry" / " As" / " Unfortunately" / " No," -> Ġ (a lone space token).
TINY_REFUSAL_TOKENS = ["A", "I", "N", "S", "U", "Ġ", "ĠI"]


def _hand_refusal_ids(tok) -> list[int]:
    return sorted(tok.convert_tokens_to_ids(TINY_REFUSAL_TOKENS))


def test_refusal_token_ids_include_the_space_prefixed_forms():
    """Break: the space-prefixed variants dropped."""
    from workbench.scoring import refusal_token_ids

    _, tok = build_tiny("llama")
    want = _hand_refusal_ids(tok)
    assert tok.unk_token_id not in want and len(set(want)) == len(want) == 7
    assert refusal_token_ids(tok) == want
    assert tok.convert_tokens_to_ids("ĠI") in refusal_token_ids(tok)


# -- position ids from the attention mask, as the model really receives them --------------------------------------

def test_position_ids_from_mask_by_hand():
    """Break: position ids shifted by one."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
    batch = encode(build_tiny("llama")[1], ["Hi", "Tell me a joke about computers and the people who use them."])
    for row in range(2):
        n, pad = int(batch.lengths[row]), int(batch.pads[row])
        assert batch.position_ids[row, pad:].tolist() == list(range(n))


def _rotary_positions(model):
    """Record the position ids every rotary embedding of ``model`` is called with (RoPE: llama, qwen2, gemma3)."""
    seen: list[torch.Tensor] = []
    mods = [m for m in model.modules() if "Rotary" in type(m).__name__]
    assert mods, type(model).__name__

    def pre(module, args, kwargs):
        pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        seen.append(pos.detach().clone())

    return seen, [m.register_forward_pre_hook(pre, with_kwargs=True) for m in mods]


@pytest.mark.parametrize("arch", [a for a in TINY_ARCHS if a != "gpt2"])
@pytest.mark.parametrize("backend", ["native", "nnsight", "transformer_lens"])
def test_rope_models_receive_positions_counted_from_the_first_real_token(make_tiny, arch, backend):
    """Break: position ids dropped from (or shifted in) the forward pass. RoPE models give the same outputs for
    any constant shift of a row's positions, so "batched equals one-by-one" cannot see it; the position ids the
    rotary embedding receives can."""
    lm = make_tiny(arch)
    be = get_backend(backend, lm)
    batch = encode(lm.tokenizer, tiny_chat_prompts()[:4])
    assert int(batch.pads.max()) > 0
    target = lm.model
    if backend == "transformer_lens":
        target = be.bridge.original_model
    seen, handles = _rotary_positions(target)
    try:
        be.run(batch)
    finally:
        for h in handles:
            h.remove()
    assert seen
    for pos in seen:
        pos = pos.expand(batch.size, -1) if pos.shape[0] == 1 else pos
        for row in range(batch.size):
            n, pad = int(batch.lengths[row]), int(batch.pads[row])
            assert pos[row, pad:].tolist() == list(range(n)), (row, pos[row].tolist())


def test_generation_decoding_steps_continue_the_row_positions(make_tiny):
    """The same on the native backend's cached decoding steps: token t of row i sits at position len_i + t."""
    lm = make_tiny("llama")
    be = get_backend("native", lm)
    batch = encode(lm.tokenizer, tiny_chat_prompts()[:3])
    seen, handles = _rotary_positions(lm.model)
    try:
        be.generate(batch, max_new_tokens=4)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) >= 2
    pre = seen[0]
    for row in range(batch.size):
        n, pad = int(batch.lengths[row]), int(batch.pads[row])
        assert pre[row, pad:].tolist() == list(range(n))
    for step, pos in enumerate(seen[1:], start=1):
        assert pos[:, -1].tolist() == [int(batch.lengths[r]) + step - 1 for r in range(batch.size)]

