"""Loading: zoo models from the cache with verified checksums, local HF folders, and clear errors for
unknown names, offline hub ids, bad dtypes / devices and checksum mismatches."""

from __future__ import annotations

import dataclasses
import gc
import re

import pytest
import torch

from workbench.chat import encode
from workbench.errors import WorkbenchError
from workbench.loading import load_model, parse_device, parse_dtype, zoo_cached
from workbench.paths import models_cache
from workbench.tiny import build_tiny
from workbench.zoo import DEFAULT_MODEL, SAFETY_SYSTEM_PROMPT, ZOO, ZooEntry, get_entry, part_paths

SMOL = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"


@pytest.mark.real_model
def test_smollm2_from_cache(smollm2):
    assert smollm2.model_id == SMOL
    assert smollm2.source == "zoo"
    assert smollm2.checksum == ZOO[SMOL].sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert smollm2.n_layers == 30 and smollm2.d_model == 576
    assert smollm2.dtype == torch.float32 and smollm2.device.type == "cpu"
    assert smollm2.default_system_prompt == SAFETY_SYSTEM_PROMPT
    assert smollm2.config._attn_implementation == "eager"
    assert not any(p.requires_grad for p in smollm2.model.parameters())
    assert not smollm2.model.training
    d = smollm2.describe()
    assert d["n_layers"] == 30 and d["d_model"] == 576 and d["dtype"] == "float32" and d["arch"] == "LlamaForCausalLM"


@pytest.mark.real_model
def test_default_model_loads():
    assert DEFAULT_MODEL == QWEN
    if not zoo_cached(QWEN) and not _installed(QWEN):
        pytest.fail(f"{QWEN} is neither cached nor installed (the README test command installs it)")
    lm = load_model()  # the default
    try:
        assert lm.source == "zoo" and lm.checksum == ZOO[QWEN].sha256
        assert lm.n_layers == 24 and lm.d_model == 896
        assert lm.config.vocab_size == 151936
        assert lm.default_system_prompt is None
    finally:
        del lm
        gc.collect()


def test_unknown_model_lists_known_ones():
    with pytest.raises(WorkbenchError) as e:
        load_model("not-a-model")
    msg = str(e.value)
    assert "unknown model 'not-a-model'" in msg
    for key in ZOO:
        assert key in msg
    with pytest.raises(WorkbenchError, match="Known models: .*smollm2-135m-instruct"):
        get_entry("nope")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WorkbenchError) as e:
        load_model("some-org/some-model")
    msg = str(e.value)
    assert re.search("offline", msg, re.I) and "local folder" in msg
    assert SMOL in msg


@pytest.mark.parametrize("bad", ["float8", "int4", "double"])
def test_bad_dtype_lists_valid(bad):
    with pytest.raises(WorkbenchError) as e:
        load_model(SMOL, dtype=bad)
    msg = str(e.value)
    assert bad in msg and "float32" in msg and "bfloat16" in msg and "float16" in msg
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16


@pytest.mark.parametrize("bad", ["gpu", "banana", "cuda:x"])
def test_bad_device_lists_valid(bad):
    with pytest.raises(WorkbenchError) as e:
        load_model(SMOL, device=bad)
    assert bad in str(e.value) and "cpu" in str(e.value) and "cuda" in str(e.value)
    assert parse_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(WorkbenchError, match="CUDA is not available"):
        load_model(SMOL, device="cuda")


def _installed(key: str) -> bool:
    try:
        part_paths(ZOO[key])
        return True
    except WorkbenchError:
        return False


@pytest.mark.real_model
def test_checksum_mismatch_is_refused(empty_cache, monkeypatch):
    if not _installed(SMOL):
        pytest.fail(f"{SMOL} package not installed (the README test command installs it)")
    wrong = dataclasses.replace(ZOO[SMOL], sha256="0" * 64)
    monkeypatch.setitem(ZOO, SMOL, wrong)
    with pytest.raises(WorkbenchError, match="checksum mismatch"):
        load_model(SMOL)
    assert not zoo_cached(SMOL)
    assert [p.name for p in models_cache().iterdir()] == []  # nothing half-written left behind


@pytest.mark.real_model
def test_checksum_mismatch_is_refused_even_with_an_existing_cache(tmp_cache, monkeypatch):
    """A cache converted from other bytes than the zoo entry's sha256 is not used silently."""
    if not (tmp_cache / "models" / SMOL).exists() or not _installed(SMOL):
        pytest.fail("needs the converted smollm2 cache and its package")
    assert zoo_cached(SMOL)
    monkeypatch.setitem(ZOO, SMOL, dataclasses.replace(ZOO[SMOL], sha256="f" * 64))
    assert not zoo_cached(SMOL)
    with pytest.raises(WorkbenchError, match="checksum mismatch"):
        load_model(SMOL)
    monkeypatch.undo()
    assert zoo_cached(SMOL)  # the real cache is untouched


def _fake_entry(key: str, parts, sha256: str) -> ZooEntry:
    return ZooEntry(key=key, upstream="test", license="test", arch="llama", n_layers=1, d_model=1,
                    packages=("fake-pkg==1.0",), parts=parts, gguf_name="fake.gguf", gguf_bytes=0, sha256=sha256)


def test_multi_part_checksum_mismatch_is_refused(empty_cache, monkeypatch):
    # two small files of an installed package stand in for the parts of a split GGUF
    entry = _fake_entry("fake-multi", (("workbench", "errors.py"), ("workbench", "paths.py")), "1" * 64)
    monkeypatch.setitem(ZOO, "fake-multi", entry)
    with pytest.raises(WorkbenchError, match="checksum mismatch for zoo model 'fake-multi'"):
        load_model("fake-multi")
    assert list(models_cache().iterdir()) == []


def test_missing_package_says_what_to_install(empty_cache, monkeypatch):
    entry = _fake_entry("fake-missing", (("no_such_package_xyz", "model.gguf"),), "1" * 64)
    monkeypatch.setitem(ZOO, "fake-missing", entry)
    with pytest.raises(WorkbenchError, match=r"needs the PyPI package\(s\) fake-pkg==1.0.*pip install fake-pkg==1.0"):
        load_model("fake-missing")


def test_local_hf_folder(tmp_path, empty_cache):
    model, tok = build_tiny("llama", seed=3)
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    lm = load_model(str(folder))
    assert lm.source == "local"
    assert lm.model_id == str(folder.resolve())
    assert re.fullmatch(r"[0-9a-f]{64}", lm.checksum)
    assert lm.n_layers == 2 and lm.d_model == 64 and lm.max_positions == 256
    assert load_model(str(folder)).checksum == lm.checksum  # stable (and served from the checksum index)
    batch = encode(lm.tokenizer, ["How do I bake bread?"])
    assert torch.equal(batch.input_ids, encode(tok, ["How do I bake bread?"]).input_ids)
    with torch.no_grad():
        a = lm.model(input_ids=batch.input_ids).logits
        b = model(input_ids=batch.input_ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # other weights -> another checksum
    other = tmp_path / "other"
    build_tiny("llama", seed=4)[0].save_pretrained(str(other))
    tok.save_pretrained(str(other))
    assert load_model(str(other)).checksum != lm.checksum


def test_folder_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(WorkbenchError, match="no config.json"):
        load_model(str(tmp_path))
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(WorkbenchError, match="neither a model folder nor a .gguf"):
        load_model(str(f))
