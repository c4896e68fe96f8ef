"""The ``workbench`` command line, run in-process: ``models``, ``capture`` and its errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import workbench.loading
import workbench.prompts
from workbench.capture import Activations
from workbench.cli import main
from workbench.io import sha256_text
from workbench.zoo import ZOO

SMOL = "smollm2-135m-instruct"


def test_models_lists_the_zoo(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for key, entry in ZOO.items():
        assert key in out
        assert entry.sha256[:16] in out
    assert "*qwen2.5-coder-0.5b-instruct" in out  # the default is starred


@pytest.fixture
def cli_env(smollm2, tmp_cache, monkeypatch):
    """Serve the session's SmolLM2 instead of reloading it, and cut 'harmless:test' to 4 prompts to keep
    the test fast on 2 cores (the CLI still resolves the built-in name itself)."""
    loaded = []

    def fake_load(name=None, **kw):
        loaded.append((name, kw))
        assert name == SMOL
        return smollm2

    real_resolve = workbench.prompts.resolve_prompts

    def small_resolve(spec):
        return real_resolve(spec).subset(range(4))

    monkeypatch.setattr(workbench.loading, "load_model", fake_load)
    monkeypatch.setattr(workbench.prompts, "resolve_prompts", small_resolve)
    return loaded, real_resolve


@pytest.mark.real_model
def test_capture_writes_a_complete_run_folder(cli_env, tmp_path, capsys):
    loaded, real_resolve = cli_env
    out = tmp_path / "run"
    rc = main(["capture", "--model", SMOL, "--prompts", "harmless:test", "--layers", "0,-1",
               "--position", "last,mean", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert loaded and loaded[0][1]["dtype"] == "float32" and loaded[0][1]["device"] == "cpu"  # the default
    names = {p.name for p in out.iterdir()}
    assert {"activations.safetensors", "activations.json", "prompts.csv", "config.json", "environment.json",
            "model.json"} <= names
    acts = Activations.load(out)
    assert [s.name for s in acts.sites] == ["blocks.0.hook_resid_post", "blocks.29.hook_resid_post"]
    assert acts.positions == ["last", "mean"]
    assert acts.get("last").shape == (4, 2, 576) and acts.get("mean").shape == (4, 2, 576)
    assert torch.isfinite(acts.get("mean")).all()
    assert acts.meta["model_id"] == SMOL and acts.meta["model_checksum"] == ZOO[SMOL].sha256
    with open(out / "prompts.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expected = real_resolve("harmless:test").texts[:4]
    assert [r["text"] for r in rows] == expected
    assert [r["index"] for r in rows] == ["0", "1", "2", "3"]
    assert acts.meta["prompt_hashes"] == [sha256_text(t)[:16] for t in expected]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["command"] == "capture" and cfg["model"] == SMOL and cfg["layers"] == "0,-1"
    assert cfg["position"] == "last,mean" and "func" not in cfg
    model_json = json.loads((out / "model.json").read_text())
    assert model_json["checksum"] == ZOO[SMOL].sha256 and model_json["n_layers"] == 30
    assert "captured 4 prompts" in capsys.readouterr().out
    # the same --out again is refused (exit code 2, one line) unless --overwrite
    rc = main(["capture", "--model", SMOL, "--prompts", "harmless:test", "--layers", "0", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "already exists" in err and "Traceback" not in err


@pytest.mark.real_model
@pytest.mark.parametrize("layers", ["30", "-31", "0,99"])
def test_capture_bad_layer_is_a_one_line_error(cli_env, tmp_path, capsys, layers):
    out = tmp_path / "bad"
    rc = main(["capture", "--model", SMOL, "--prompts", "harmless:test", "--layers", layers,
               "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: layer ") and "out of range" in err and "0..29" in err
    assert not out.exists() or not any(out.iterdir())  # no half-made run folder left behind


def test_bad_prompt_set_is_a_one_line_error(tmp_path, capsys):
    rc = main(["capture", "--prompts", "harmless:nope", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1
