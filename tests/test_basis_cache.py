"""The sweep's reference bases live on disk (:mod:`weightspace.basis_cache`), not in memory, and change no number.

Planted: a tiny Llama (6 layers, d_model 64) whose reference update ``aligned - base`` is dense on every tensor but
``lm_head`` and one ``k_proj``, so those tensors have a reference basis; the embedding (384 x 64) is the one big
tensor, the 60-odd layer tensors are the many small ones. Kept in memory (the design before issue #13), the bases of all tensors would be held for the whole
sweep (several times the largest tensor's); on disk, a worker holds none between tensors.
"""

from __future__ import annotations

import hashlib
import types

import pytest
import torch

from workbench.runs import RunFolder
from workbench.tiny import build_tiny

from weightspace.checkpoints import open_checkpoint
from weightspace.deltas import DeltaSpec
from weightspace.evaluation import EvalConfig
from weightspace.plan import match_checkpoints
from weightspace.reference import DeltaReference, Prepared
from weightspace.spectral import KINDS
from weightspace.sweep import SweepConfig, run_sweep

EMBED = "model.embed_tokens.weight"
ZERO = "model.layers.0.self_attn.k_proj.weight"  # no reference update here: a "zero" state


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    g = torch.Generator().manual_seed(11)
    model, _ = build_tiny("llama", seed=0, n_layers=6)
    ups = {n: {r: 0.05 * torch.randn(p.shape, generator=g) for r in ("base", "useful", "harmful")}
           for n, p in model.state_dict().items()}
    for n in (ZERO, "lm_head.weight"):  # lm_head: as big as the embedding; one big tensor is the point
        ups[n]["base"].zero_()
    out = {}
    for name in ("base", "aligned", "useful", "contaminated"):
        model, tok = build_tiny("llama", seed=0, n_layers=6)
        with torch.no_grad():
            for n, u in ups.items():
                p = model.state_dict()[n]
                if name == "base":
                    p.sub_(u["base"])
                elif name == "useful":
                    p.add_(u["useful"])
                elif name == "contaminated":
                    p.add_(u["useful"] + u["harmful"])
        model.save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
        out[name] = open_checkpoint(root / name, label=name)
    return out


def _reference(planted, **kw):
    return DeltaReference(DeltaSpec("alignment", planted["aligned"], planted["base"]), **kw)


def _same_state(a, b) -> None:
    assert type(a) is type(b)
    if a is None:
        return
    assert a.zero == b.zero
    for x, y in ((a.vector, b.vector), *(((a.spectrum.U, b.spectrum.U), (a.spectrum.S, b.spectrum.S))
                                         if a.spectrum is not None or b.spectrum is not None else ())):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride() and torch.equal(x, y)
    if a.spectrum is not None:
        sa, sb = a.spectrum, b.spectrum
        assert (sa.total, sa.m, sa.n, sa.method, sa.seed) == (sb.total, sb.m, sb.n, sb.method, sb.seed)


@pytest.mark.parametrize("ref_kw, kinds, operator", [
    ({}, KINDS, "projector"),
    ({"method": "randomized", "side": "right"}, ("topk",), "projector"),
    ({"svd_dtype": "float32"}, ("topk", "random"), "projector"),
    ({}, ("random",), "projector"),
    ({}, ("topk",), "safelora"),
], ids=["exact", "randomized-right", "float32", "random-only", "safelora"])
def test_a_state_read_back_is_the_state_computed(planted, tmp_path, ref_kw, kinds, operator):
    """Every tensor's state from the folder equals (values, dtype, strides, spectrum fields) the state computed."""
    from weightspace.basis_cache import BasisCache

    ref = _reference(planted, **ref_kw)
    plan = match_checkpoints({"aligned": planted["aligned"], "base": planted["base"]})
    cache = BasisCache(tmp_path / "bases", ref, plan.tensors, kinds=kinds, max_rho=0.75, operator=operator)
    with pytest.raises(Exception, match="does not exist"):
        cache.fill()
    (tmp_path / "bases").mkdir()
    cache.fill()
    assert len(list((tmp_path / "bases").glob("*.safetensors"))) == len(plan.tensors)
    seen = set()
    for t in plan.tensors:
        want = ref.prepare(t, operator=operator, kinds=kinds, max_rho=0.75)
        _same_state(cache[t.name], want)
        seen.add("zero" if want.zero else "U" if want.spectrum is not None else
                 "vector" if want.vector is not None else "shape only")
    assert cache[ZERO].zero
    assert seen == ({"zero", "shape only", "vector"} if kinds == ("random",) else
                    {"zero", "vector"} if operator == "safelora" else {"zero", "U", "vector"})
    # a worker that cannot see the folder (another machine) computes the same state and stores nothing
    away = BasisCache(tmp_path / "elsewhere", ref, plan.tensors, kinds=kinds, max_rho=0.75, operator=operator)
    _same_state(away[EMBED], cache[EMBED])
    assert not (tmp_path / "elsewhere").exists() and EMBED in away and "other" not in away
    # a folder filled lazily: the first read writes the file
    lazy = BasisCache(tmp_path / "bases", ref, plan.tensors, kinds=kinds, max_rho=0.75, operator=operator)
    lazy.path(EMBED).unlink()
    _same_state(lazy[EMBED], cache[EMBED])
    assert lazy.path(EMBED).is_file()


def _held_tensor_bytes(root, lm) -> int:
    """Bytes of the tensor storages reachable from ``root`` (attributes, containers), the model ``lm`` and its
    parameters left out: what a sweep worker keeps alive beyond the model it scores."""
    params = {p.untyped_storage().data_ptr() for p in lm.model.state_dict().values()}
    storages: dict[int, int] = {}
    seen: set[int] = set()
    stack = [root]
    while stack:
        o = stack.pop()
        if id(o) in seen or o is lm:
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            s = o.untyped_storage()
            if s.data_ptr() not in params:
                storages[s.data_ptr()] = s.nbytes()
        elif isinstance(o, (str, bytes, int, float, bool, type(None), type, types.ModuleType, types.FunctionType,
                            torch.nn.Module, torch.dtype)):
            continue
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif hasattr(o, "__dict__"):
            stack.extend(vars(o).values())
    return sum(storages.values())


def _state_bytes(p: Prepared) -> int:
    ts = [p.vector] + ([p.spectrum.U, p.spectrum.S] if p.spectrum is not None else [])
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def test_a_sweep_worker_holds_no_reference_basis_between_tensors(planted, tmp_path, empty_cache, monkeypatch):
    """Issue #13 item 3: the memory a sweep worker keeps beyond the model it scores is bounded by the largest
    tensor, not the model. Measured while every model is scored: the bytes of tensors reachable from the worker,
    the model's parameters left out. In memory (before), the bases of every tensor (the sum) were held."""
    import weightspace.sweep as sweep_mod
    from workbench.loading import load_model

    ref = _reference(planted)
    cfg = SweepConfig(rhos=(0.5,), kinds=("topk", "randomk"),
                      eval=EvalConfig(n_harmful=1, n_tasks=1, max_new_tokens=2, task_tokens=2, batch_size=1))
    plan = match_checkpoints({"aligned": planted["aligned"], "base": planted["base"]})
    sizes = {t.name: _state_bytes(ref.prepare(t, kinds=cfg.kinds, max_rho=0.5)) for t in plan.tensors}
    largest, total = max(sizes.values()), sum(sizes.values())
    assert max(sizes, key=sizes.get) == EMBED and total > 4 * largest  # one big tensor, many small ones

    lm = load_model(str(planted["aligned"].folder))
    held, folders = [], []
    real = sweep_mod._run_task

    def measured(worker, task):
        out = real(worker, task)
        held.append(_held_tensor_bytes(worker, lm))
        folders.append(getattr(worker, "bases", None))
        return out

    monkeypatch.setattr(sweep_mod, "_run_task", measured)
    run = RunFolder(tmp_path / "sw", config={})
    res = run_sweep(planted["aligned"], ref, {"useful": planted["useful"]}, cfg, run, lm=lm, progress=False)
    assert len(res.rows) == 2 and len(held) == 4
    assert max(held) <= largest, (max(held), largest, total)

    from weightspace.basis_cache import FOLDER_PREFIX

    cache = folders[0]
    assert cache.folder.parent == run.path and cache.folder.name.startswith(FOLDER_PREFIX)
    assert not cache.folder.exists()  # the bases are deleted with the sweep
    assert not list(run.commit().glob(FOLDER_PREFIX + "*"))


def test_bases_on_disk_change_no_number(planted, tmp_path, empty_cache, monkeypatch):
    """The same sweep with the bases kept in memory for the whole sweep (the design before issue #13: a dict of
    every tensor's state): the same rows, pairs, per-item rows and, bit for bit, the same models scored."""
    import weightspace.sweep as sweep_mod
    from workbench.loading import load_model

    cfg = SweepConfig(rhos=(0.25, 0.75), eval=EvalConfig(n_harmful=2, n_tasks=1, max_new_tokens=3, task_tokens=3,
                                                         batch_size=2))
    models = {"useful": planted["useful"], "contaminated": planted["contaminated"]}
    scored: list[list[str]] = []
    real_score = sweep_mod.score_model

    def spy(backend, *a, **k):
        scored.append([hashlib.sha256(p.detach().numpy().tobytes()).hexdigest()
                       for p in backend.lm.model.state_dict().values()])
        return real_score(backend, *a, **k)

    monkeypatch.setattr(sweep_mod, "score_model", spy)

    def sweep(tag):
        scored.clear()
        run = RunFolder(tmp_path / tag, config={})
        res = run_sweep(planted["aligned"], _reference(planted), models, cfg, run,
                        lm=load_model(str(planted["aligned"].folder)), progress=False)
        return res, list(scored), sweep_mod.load_evals(run.commit())

    on_disk = sweep("disk")

    def in_memory(folder, reference, plan, cfg):  # every tensor's state computed once and kept
        todo = [t for t in plan.select(cfg.selection) if reference.covers(t)]
        return _Dict({t.name: reference.prepare(t, kinds=cfg.kinds, max_rho=max(cfg.rhos)) for t in todo})

    monkeypatch.setattr(sweep_mod, "sweep_bases", in_memory)
    kept = sweep("memory")
    (ra, sa, ea), (rb, sb, eb) = on_disk, kept
    assert len(sa) == 1 + 2 + 2 * 2 * 3 and sa == sb  # baselines, then 2 models x 2 rho x 3 kinds
    assert ra.rows == rb.rows and ra.baselines == rb.baselines and ra.paired == rb.paired and ea == eb
    for f in ("results.csv", "energy.csv", "energy_tensors.csv", "paired.csv", "baselines.csv"):
        assert (tmp_path / "disk" / f).read_bytes() == (tmp_path / "memory" / f).read_bytes(), f


class _Dict(dict):
    """Bases kept in memory: what :class:`weightspace.basis_cache.BasisCache` replaced."""

    def fill(self, progress=None) -> None:
        pass


def test_module_doctest():
    import doctest

    import weightspace.basis_cache

    res = doctest.testmod(weightspace.basis_cache)
    assert res.failed == 0 and res.attempted > 0
