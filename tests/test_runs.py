"""Run folders and atomic writes."""

from __future__ import annotations

import csv
import json
import random
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.io import (
    _atomic,
    load_tensors,
    read_json,
    save_tensors,
    sha256_file,
    sha256_json,
    sha256_text,
    write_csv,
    write_json,
    write_text,
)
from workbench.runs import RunFolder, environment, seed_everything


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp"))


def test_run_folder_writes_config_and_environment(tmp_path):
    run = RunFolder(tmp_path / "a" / "run", config={"seed": 3, "layers": [0, -1], "func": print,
                                                    "out": tmp_path / "x"})
    assert run.path.is_dir()
    assert sorted(p.name for p in run.path.iterdir()) == ["config.json", "environment.json"]
    cfg = read_json(run.path / "config.json")
    assert cfg == {"seed": 3, "layers": [0, -1], "out": str(tmp_path / "x")}  # callables dropped
    env = read_json(run.path / "environment.json")
    assert env["packages"]["torch"] == metadata.version("torch")
    assert env["python"].count(".") == 2 and "time_utc" in env and env["torch_threads"] >= 1
    assert "safety-subspace-workbench" in env["packages"]
    assert _leftovers(tmp_path) == []


def test_run_folder_refuses_non_empty_unless_overwrite(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    RunFolder(target, config={})  # an existing empty folder is fine
    (target / "result.txt").write_text("old")
    with pytest.raises(WorkbenchError, match="already exists and is not empty.*--overwrite"):
        RunFolder(target, config={"x": 1})
    assert (target / "result.txt").read_text() == "old"  # untouched by the refusal
    assert read_json(target / "config.json") == {}
    run = RunFolder(target, config={"x": 2}, overwrite=True)
    assert not (run.path / "result.txt").exists()
    assert read_json(run.path / "config.json") == {"x": 2}


def test_run_folder_helpers(tmp_path):
    run = RunFolder(tmp_path / "run", config={})
    assert run.write_json("r.json", {"t": torch.tensor([1.0, 2.0]), "n": np.float32(0.5)}) == run.path / "r.json"
    assert read_json(run.path / "r.json") == {"t": [1.0, 2.0], "n": 0.5}
    run.write_text("notes.txt", "hello\n")
    assert (run.path / "notes.txt").read_text() == "hello\n"
    run.write_csv("rows.csv", [{"a": 1, "b": 2}, {"b": 3, "c": "x,y"}])
    with open(run.path / "rows.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["a", "b", "c"], ["1", "2", ""], ["", "3", "x,y"]]
    sub = run.sub("figs")
    assert sub.is_dir() and sub.parent == run.path
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    p = run.save_figure("fig.png", fig)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    class FakeLM:
        def describe(self):
            return {"model_id": "m", "checksum": "c"}

    run.record_model(FakeLM())
    assert read_json(run.path / "model.json") == {"model_id": "m", "checksum": "c"}
    assert _leftovers(tmp_path) == []


def test_atomic_writes_leave_no_temp_files(tmp_path):
    write_json(tmp_path / "a.json", {"x": [1, 2]})
    write_text(tmp_path / "deep" / "b.txt", "text")
    write_csv(tmp_path / "c.csv", [{"k": "v"}])
    save_tensors(tmp_path / "d.safetensors", {"w": torch.arange(6.0).reshape(2, 3)}, {"kind": "test"})
    assert torch.equal(load_tensors(tmp_path / "d.safetensors")["w"], torch.arange(6.0).reshape(2, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "c.csv", "d.safetensors", "deep"]
    assert _leftovers(tmp_path) == []


def test_failed_write_keeps_old_file_and_no_temp(tmp_path):
    target = tmp_path / "result.json"
    write_json(target, {"ok": True})

    def half_then_crash(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write('{"ok": fal')
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError, match="crash while writing"):
        _atomic(target, half_then_crash)
    assert read_json(target) == {"ok": True}
    assert _leftovers(tmp_path) == []
    with pytest.raises(TypeError, match="cannot serialise"):
        write_json(target, {"bad": object()})
    assert read_json(target) == {"ok": True}
    assert _leftovers(tmp_path) == []


def test_hashes(tmp_path):
    assert sha256_text("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    (tmp_path / "f").write_bytes(b"abc")
    assert sha256_file(tmp_path / "f") == sha256_text("abc")
    assert sha256_json({"b": 1, "a": 2}) == sha256_json({"a": 2, "b": 1})


def test_seed_everything_is_reproducible():
    seed_everything(123)
    a = (random.random(), float(np.random.rand()), torch.rand(3))
    seed_everything(123)
    b = (random.random(), float(np.random.rand()), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_environment_is_json_serialisable():
    env = environment()
    json.dumps(env)
    assert set(env) >= {"python", "platform", "packages", "torch_threads", "git_commit", "time_utc", "argv"}
