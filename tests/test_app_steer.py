"""The app's column computation without Gradio: streaming equals backend.generate, scores equal the
workbench scorers, hooks never stay on the model, concurrent columns do not mix."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from apps.state import AppState, direction_key
from apps.steer import (ColumnSpec, GreedyStream, Probe, build_interventions, compute_column, encode_prompt,
                        score_column)
from workbench.backends import get_backend
from workbench.chat import ChatFormat, encode
from workbench.errors import WorkbenchError
from workbench.interventions import Addition
from workbench.scoring import completion_nll, kl_divergence, perplexity, refusal_scores
from workbench.sites import Site
from workbench.vectors import Direction

PROMPT = "Tell me a joke about the sea"


def _direction(lm, layer=1, seed=0, component="resid_pre", scale=4.0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(lm.d_model, generator=g) * scale / math.sqrt(lm.d_model)
    return Direction(v, layer=layer, method="test", model_id=lm.model_id, model_checksum=lm.checksum,
                     d_model=lm.d_model, component=component)


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("kind", ["none", "addition", "ablation"])
def test_stream_equals_backend_generate(make_tiny, arch, kind):
    lm = make_tiny(arch)
    be = get_backend("native", lm)
    d = _direction(lm)
    spec = ColumnSpec("x", kind, d, strength=3.0)
    ivs = build_interventions(spec, lm.n_layers)
    batch = encode(lm.tokenizer, [PROMPT])
    ref = be.generate(batch, max_new_tokens=24, interventions=ivs)
    stream = GreedyStream(be, batch, interventions=ivs, max_new_tokens=24, probe=Probe.from_direction(d))
    steps = 0
    for s in stream:
        steps += 1
        assert s.text == lm.tokenizer.decode(s.token_ids, skip_special_tokens=True)
    assert stream.done
    n = len(stream.token_ids)
    assert stream.token_ids == ref[0, :n].tolist()
    if stream.stopped_by_eos:
        assert int(ref[0, n]) in be.eos_ids()
    else:
        assert n == 24
    assert stream.text == be.decode(ref)[0]
    assert "".join(stream.pieces) == stream.text
    assert _no_hooks(lm.model)


def test_stream_addition_at_several_layers_and_orthogonalised(make_tiny):
    lm = make_tiny("llama")
    be = get_backend("native", lm)
    d = _direction(lm, layer=0)
    spec = ColumnSpec("x", "addition", d, strength=-2.0, layers="0-1")
    ivs = build_interventions(spec, lm.n_layers)
    assert [iv.site.layer for iv in ivs] == [0, 1]
    batch = encode(lm.tokenizer, [PROMPT])
    ref = be.generate(batch, max_new_tokens=16, interventions=ivs)
    s = GreedyStream(be, batch, interventions=ivs, max_new_tokens=16).run()
    assert s.token_ids == ref[0, :len(s.token_ids)].tolist()

    # orthogonalised weights give the same tokens as runtime ablation everywhere
    before = lm.model.model.embed_tokens.weight.detach().clone()
    state = AppState({"tiny": lm})
    obe = state.slot("tiny").orthogonalised(d)
    assert obe.lm.model is not lm.model
    abl = build_interventions(ColumnSpec("a", "ablation", d), lm.n_layers)
    a = GreedyStream(be, batch, interventions=abl, max_new_tokens=16).run()
    o = GreedyStream(obe, batch, max_new_tokens=16).run()
    assert a.token_ids == o.token_ids
    # cached per direction, and the shared model is untouched
    assert state.slot("tiny").orthogonalised(d) is obe
    assert direction_key(d) == direction_key(Direction(d.vector.clone(), **{k: v for k, v in d.record().items()
                                                                            if k != "norm"}))
    assert torch.equal(lm.model.model.embed_tokens.weight, before)
    assert _no_hooks(lm.model) and _no_hooks(obe.lm.model)


def test_stream_projections_match_teacher_forced(make_tiny):
    lm = make_tiny("qwen2")
    be = get_backend("native", lm)
    d = _direction(lm, layer=1)
    probe = Probe.from_direction(d)
    spec = ColumnSpec("x", "addition", d, strength=2.0)
    ivs = build_interventions(spec, lm.n_layers)
    batch = encode(lm.tokenizer, [PROMPT])
    s = GreedyStream(be, batch, interventions=ivs, max_new_tokens=12, probe=probe).run()
    scores, proj, text = score_column(be, be, batch, s.token_ids, interventions=ivs, probe=probe)
    assert len(proj) == len(s.token_ids) and text == s.text
    known = [(a, b) for a, b in zip(s.projections, proj) if a is not None]
    assert len(known) >= len(proj) - 1  # only the last token's projection comes from the scoring pass
    for a, b in known:
        assert a == pytest.approx(b, abs=1e-3)
    assert scores.mean_projection == pytest.approx(sum(proj) / len(proj))


def test_scores_equal_workbench_scorers(make_tiny):
    lm = make_tiny("llama")
    be = get_backend("native", lm)
    fmt = ChatFormat()
    d = _direction(lm, layer=1)
    for kind in ("none", "addition", "ablation"):
        spec = ColumnSpec(kind, kind, d, strength=3.0)
        ivs = build_interventions(spec, lm.n_layers)
        res = compute_column(be, be, PROMPT, spec, fmt=fmt, probe=Probe.from_direction(d), max_new_tokens=10)
        s = res.scores
        assert s.refusal_logit == pytest.approx(float(refusal_scores(be, [PROMPT], fmt, interventions=ivs)[0]),
                                                abs=1e-4)
        assert s.kl_next == pytest.approx(float(kl_divergence(be, [PROMPT], fmt, interventions=ivs)[0]), abs=1e-5)
        assert s.n_tokens == len(res.token_ids)
        if kind == "none":
            assert s.kl_next == 0 and s.kl_reply == 0
            # perplexity of the model's own greedy reply, as in workbench.scoring
            if res.text and lm.tokenizer(res.text, add_special_tokens=False)["input_ids"] == res.token_ids:
                assert s.perplexity == pytest.approx(perplexity(completion_nll(be, [PROMPT], [res.text], fmt)),
                                                     rel=1e-4)
        else:
            assert s.kl_next > 0 and s.kl_reply > 0
        assert s.perplexity > 1 or s.n_tokens == 0
    assert _no_hooks(lm.model)


def test_errors_are_workbench_errors(make_tiny):
    lm = make_tiny("llama")
    be = get_backend("native", lm)
    d = _direction(lm)
    with pytest.raises(WorkbenchError, match="empty"):
        encode_prompt(be, "   ")
    with pytest.raises(WorkbenchError, match="at most 5 tokens"):
        encode_prompt(be, PROMPT, max_prompt_tokens=5)
    with pytest.raises(WorkbenchError, match="out of range"):
        build_interventions(ColumnSpec("x", "addition", d, layers="7"), lm.n_layers)
    with pytest.raises(WorkbenchError, match="unknown intervention"):
        ColumnSpec("x", "steer-harder", d)
    bad = Direction(torch.ones(32), layer=1, method="m", model_id="other", model_checksum="c", d_model=32)
    with pytest.raises(WorkbenchError, match="size 32"):
        compute_column(be, be, PROMPT, ColumnSpec("x", "addition", bad), max_new_tokens=2)
    assert _no_hooks(lm.model)


def test_concurrent_streams_do_not_mix(make_tiny):
    """Two threads stepping streams with different interventions on one model, sharing its lock, give the
    results of running them one after the other."""
    lm = make_tiny("llama")
    be = get_backend("native", lm)
    d = _direction(lm, layer=1)
    lock = threading.RLock()
    settings = [ColumnSpec("p", "addition", d, strength=4.0), ColumnSpec("n", "addition", d, strength=-4.0),
                ColumnSpec("a", "ablation", d), ColumnSpec("0", "none", d)]
    seq = [compute_column(be, be, PROMPT, s, probe=Probe.from_direction(d), max_new_tokens=20, lock=lock)
           for s in settings]
    assert len({tuple(r.token_ids) for r in seq}) >= 3  # the settings really differ
    out: dict[int, object] = {}
    barrier = threading.Barrier(len(settings))

    def work(i: int) -> None:
        barrier.wait()
        out[i] = compute_column(be, be, PROMPT, settings[i], probe=Probe.from_direction(d), max_new_tokens=20,
                                lock=lock)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(settings))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, r in enumerate(seq):
        c = out[i]
        assert c.token_ids == r.token_ids and c.text == r.text
        assert c.scores.refusal_logit == pytest.approx(r.scores.refusal_logit, abs=1e-5)
        assert c.scores.kl_reply == pytest.approx(r.scores.kl_reply, abs=1e-5)
        assert c.projections == pytest.approx(r.projections, abs=1e-4)
    assert _no_hooks(lm.model)


def test_state_directions_and_limits(make_tiny):
    lm = make_tiny("llama")
    state = AppState({"tiny": lm}, max_new_tokens_limit=16, disk_cache=False)
    fmt = state.chat_format("")
    rd = state.resolve_direction("tiny", "mean-diff", layer=1, fmt=fmt)
    assert rd.direction.layer == 1 and rd.direction.method == "mean_diff" and rd.direction.component == "resid_pre"
    again = state.resolve_direction("tiny", "mean-diff", layer=1, fmt=fmt)
    assert again.direction is rd.direction  # cached per model / format / layer
    rnd = state.resolve_direction("tiny", "random control", layer=1, fmt=fmt, seed=3)
    assert rnd.direction.norm == pytest.approx(rd.direction.norm, rel=1e-5)
    assert state.validate_max_new_tokens(16) == 16
    with pytest.raises(WorkbenchError, match="too many tokens"):
        state.validate_max_new_tokens(17)
    with pytest.raises(WorkbenchError, match="out of range"):
        state.resolve_direction("tiny", "mean-diff", layer=5, fmt=fmt)
    with pytest.raises(WorkbenchError, match="unknown model"):
        state.slot("nope")


def test_state_saved_vector_and_probe_folder(make_tiny, tmp_path):
    from workbench.vectors import save_directions

    lm = make_tiny("llama")
    state = AppState({"tiny": lm}, disk_cache=False, runs_root=tmp_path)
    fmt = state.chat_format("")
    good = _direction(lm, layer=0)
    p = save_directions(tmp_path / "v.safetensors", [good])
    rd = state.resolve_direction("tiny", "saved vector", layer=1, fmt=fmt, vector_file=str(p))
    assert torch.equal(rd.direction.vector, good.vector)
    wide = Direction(torch.ones(96), layer=0, method="m", model_id="x", model_checksum="y", d_model=96)
    pw = save_directions(tmp_path / "wide.safetensors", [wide])
    with pytest.raises(WorkbenchError, match="bad vector width"):
        state.resolve_direction("tiny", "saved vector", layer=0, fmt=fmt, vector_file=str(pw))
    with pytest.raises(WorkbenchError, match="no readable direction file"):
        state.resolve_direction("tiny", "saved vector", layer=0, fmt=fmt, vector_file=str(tmp_path / "nope"))
    # a probes run folder
    run = tmp_path / "probes"
    run.mkdir()
    dirs = [Direction(torch.randn(64), layer=i, method=m, model_id=lm.model_id, model_checksum=lm.checksum,
                      d_model=64) for i in range(2) for m in ("logistic", "mean_diff")]
    save_directions(run / "probe_directions.safetensors", dirs)
    rd = state.resolve_direction("tiny", "probe direction", layer=1, fmt=fmt, probe_folder=str(run),
                                 probe_method="mean_diff")
    assert rd.direction.layer == 1 and rd.direction.method == "mean_diff"
    with pytest.raises(WorkbenchError, match="no probe_directions"):
        state.resolve_direction("tiny", "probe direction", layer=1, fmt=fmt, probe_folder=str(tmp_path))


def test_interventions_built_per_call_not_left_on_model(make_tiny):
    lm = make_tiny("gemma3")
    be = get_backend("native", lm)
    d = _direction(lm, layer=1)
    iv = Addition(Site(1, "resid_pre"), d.vector, 5.0)
    batch = encode(lm.tokenizer, [PROMPT])
    s = GreedyStream(be, batch, interventions=[iv], max_new_tokens=3)
    s.step()
    assert _no_hooks(lm.model)  # between steps nothing is registered
    s.run()
    assert _no_hooks(lm.model)
