"""The saved-direction format: round trip with provenance, compatibility checks, refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from workbench.errors import WorkbenchError
from workbench.loading import from_memory
from workbench.tiny import build_tiny
from workbench.vectors import Direction, load_directions, pick, save_directions


def _dir(vec, layer=1, method="mean_diff", **kw) -> Direction:
    vec = torch.as_tensor(vec, dtype=torch.float32)
    base = dict(model_id="tiny-llama-0", model_checksum="abc123", d_model=vec.numel())
    return Direction(vec, layer=layer, method=method, **{**base, **kw})


def test_round_trip_keeps_values_and_provenance(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = _dir(torch.randn(16, generator=g), layer=3, position="pos-2", component="resid_pre", dtype="bfloat16",
             prompt_set_hashes={"positive": "p" * 16, "negative": "n" * 16}, template_hash="t" * 16,
             meta={"n_positive": 4, "nested": {"seed": 7, "list": [1, 2.5, "x"]}, "control": False})
    b = _dir(torch.randn(16, generator=g), layer=5, method="pca")
    path = save_directions(tmp_path / "dirs.bin", [a, b])
    assert path == tmp_path / "dirs.safetensors" and path.exists()  # the suffix is enforced
    back = load_directions(path)
    assert len(back) == 2
    for orig, got in zip((a, b), back):
        assert torch.equal(got.vector, orig.vector) and got.vector.dtype == torch.float32
        assert got.record() == orig.record()
    assert back[0].meta["nested"] == {"seed": 7, "list": [1, 2.5, "x"]}
    assert back[0].position == "pos-2" and back[0].component == "resid_pre"
    assert back[0].record()["norm"] == pytest.approx(float(a.vector.norm()))
    torch.testing.assert_close(back[1].unit.norm(), torch.tensor(1.0))
    # saving again to the same path replaces the file
    save_directions(path, [b])
    assert [d.method for d in load_directions(path)] == ["pca"]


def test_vectors_are_normalised_to_flat_float32_cpu():
    d = _dir(torch.ones(2, 4, dtype=torch.float64))
    assert d.vector.shape == (8,) and d.vector.dtype == torch.float32 and d.norm == pytest.approx(8 ** 0.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_vectors_are_refused(bad):
    v = torch.ones(8)
    v[3] = bad
    with pytest.raises(WorkbenchError, match="non-finite"):
        _dir(v)


def test_wrong_size_and_zero_vector():
    with pytest.raises(WorkbenchError, match="d_model is 9"):
        Direction(torch.ones(8), layer=0, method="m", model_id="x", model_checksum="c", d_model=9)
    z = _dir(torch.zeros(8))
    assert z.norm == 0.0
    with pytest.raises(WorkbenchError, match="zero vector"):
        _ = z.unit


def test_save_and_load_errors(tmp_path):
    with pytest.raises(WorkbenchError, match="no directions"):
        save_directions(tmp_path / "x.safetensors", [])
    with pytest.raises(WorkbenchError, match="no such vector file"):
        load_directions(tmp_path / "missing.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.ones(3)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(WorkbenchError, match="not a workbench direction file"):
        load_directions(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(WorkbenchError, match="could not read"):
        load_directions(junk)


@pytest.fixture(scope="module")
def tiny_models():
    return {
        "a": from_memory(*build_tiny("llama", seed=0), model_id="tiny-a"),
        "b": from_memory(*build_tiny("llama", seed=1), model_id="tiny-b"),
        "narrow": from_memory(*build_tiny("llama", seed=0, d_model=32), model_id="tiny-narrow"),
    }


def test_check_compatible(tiny_models):
    a, b, narrow = tiny_models["a"], tiny_models["b"], tiny_models["narrow"]
    assert a.checksum != b.checksum and a.d_model == b.d_model == 64 and narrow.d_model == 32
    d = _dir(torch.randn(64), layer=1, model_id=a.model_id, model_checksum=a.checksum)
    d.check_compatible(a)  # its own model: fine
    with pytest.raises(WorkbenchError, match="has size 64 but model 'tiny-narrow' has d_model 32"):
        d.check_compatible(narrow)
    with pytest.raises(WorkbenchError, match="d_model 32"):
        d.check_compatible(narrow, force=True)  # another width is refused even when forced
    with pytest.raises(WorkbenchError, match="computed on model 'tiny-a'.*force"):
        d.check_compatible(b)
    d.check_compatible(b, force=True)
    out_of_range = _dir(torch.randn(64), layer=5, model_checksum=a.checksum)
    with pytest.raises(WorkbenchError, match="layer 5 is outside"):
        out_of_range.check_compatible(a)


def test_pick_selects_or_lists_what_is_available():
    ds = [_dir(torch.ones(4), layer=1, method="mean_diff"), _dir(torch.ones(4) * 2, layer=2, method="mean_diff"),
          _dir(torch.ones(4) * 3, layer=2, method="logistic")]
    assert pick(ds) is ds[0]
    assert pick(ds, layer=2) is ds[1]
    assert pick(ds, layer=2, method="logistic") is ds[2]
    assert pick(ds, method="logistic") is ds[2]
    with pytest.raises(WorkbenchError) as e:
        pick(ds, layer=7, method="pca")
    msg = str(e.value)
    assert "layer=7" in msg and "method=pca" in msg
    assert "available: logistic@2, mean_diff@1, mean_diff@2" in msg
