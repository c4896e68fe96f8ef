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
from workbench.runs import (
    RUN_MARKER,
    RunFolder,
    check_out,
    environment,
    is_run_folder,
    read_marker,
    seed_everything,
    write_marker,
)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp"))


def test_run_folder_writes_config_and_environment(tmp_path):
    run = RunFolder(tmp_path / "a" / "run", config={"seed": 3, "layers": [0, -1], "func": print,
                                                    "out": tmp_path / "x"})
    assert run.path.is_dir() and run.path != run.final and not run.final.exists()  # staged until complete
    assert run.path.parent == run.final.parent and run.path.name.startswith(".run.tmp-")
    final = run.commit()
    assert final == run.final == run.path == tmp_path / "a" / "run"
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "environment.json", RUN_MARKER]
    cfg = read_json(final / "config.json")
    assert cfg == {"seed": 3, "layers": [0, -1], "out": str(tmp_path / "x")}  # callables dropped
    env = read_json(final / "environment.json")
    assert env["packages"]["torch"] == metadata.version("torch")
    assert env["python"].count(".") == 2 and "time_utc" in env and env["torch_threads"] >= 1
    assert "safety-subspace-workbench" in env["packages"]
    assert read_marker(final)["complete"] is True and is_run_folder(final)
    assert _leftovers(tmp_path) == []


def test_run_folder_refuses_non_empty_unless_overwrite(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    RunFolder(target, config={}).commit()  # an existing empty folder is fine
    (target / "result.txt").write_text("old")
    with pytest.raises(WorkbenchError, match="already exists and is not empty.*--overwrite"):
        RunFolder(target, config={"x": 1})
    assert (target / "result.txt").read_text() == "old"  # untouched by the refusal
    assert read_json(target / "config.json") == {}
    run = RunFolder(target, config={"x": 2}, overwrite=True)
    assert (target / "result.txt").read_text() == "old"  # the old run stays until the new one completed
    run.commit()
    assert not (target / "result.txt").exists()
    assert read_json(target / "config.json") == {"x": 2}
    assert _leftovers(tmp_path) == []


def _decoy(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "important.txt").write_text("never delete me")
    return folder


def test_overwrite_never_replaces_a_folder_the_workbench_did_not_make(tmp_path):
    decoy = _decoy(tmp_path / "decoy")
    with pytest.raises(WorkbenchError, match="not a workbench run folder"):
        RunFolder(decoy, config={}, overwrite=True)
    with pytest.raises(WorkbenchError, match="not a workbench run folder"):
        check_out(decoy, overwrite=True)
    # a foreign marker file (another tool, or garbage) does not count
    (decoy / RUN_MARKER).write_text('{"tool": "something-else"}')
    with pytest.raises(WorkbenchError, match="not a workbench run folder"):
        RunFolder(decoy, config={}, overwrite=True)
    (decoy / RUN_MARKER).write_text("not json")
    with pytest.raises(WorkbenchError, match="not a workbench run folder"):
        RunFolder(decoy, config={}, overwrite=True)
    assert (decoy / "important.txt").read_text() == "never delete me"
    assert _leftovers(tmp_path) == []


def test_overwrite_refuses_the_current_folder_its_parents_and_inputs(tmp_path, monkeypatch):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    write_marker(work)  # even a marked folder: never the current folder or a parent of it
    write_marker(work.parent)
    monkeypatch.chdir(work)
    for out in (".", "..", str(work), "./"):
        with pytest.raises(WorkbenchError, match="current folder|parent of the current folder"):
            RunFolder(out, config={}, overwrite=True)
    with pytest.raises(WorkbenchError, match="root"):
        check_out("/", overwrite=True)
    # a folder that is, or holds, an input of the command
    ck = tmp_path / "ck" / "x"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(b"weights")
    write_marker(ck)
    for out in (ck, ck.parent):
        with pytest.raises(WorkbenchError, match="is or holds an input"):
            RunFolder(out, config={}, overwrite=True, inputs=[ck / "model.safetensors"])
    with pytest.raises(WorkbenchError, match="is or holds an input"):
        check_out(ck, overwrite=True, inputs=[ck])
    assert (ck / "model.safetensors").read_bytes() == b"weights"
    assert (work / "notes.txt").read_text() == "mine"
    with pytest.raises(WorkbenchError, match="not a folder"):
        check_out(ck / "model.safetensors", overwrite=True)


def test_a_failed_rerun_keeps_the_previous_result(tmp_path):
    target = tmp_path / "run"
    with RunFolder(target, config={"v": 1}) as run:
        run.write_text("result.txt", "complete result")
    with pytest.raises(RuntimeError, match="boom"):
        with RunFolder(target, config={"v": 2}, overwrite=True) as run:
            run.write_text("result.txt", "half")
            raise RuntimeError("boom")
    assert (target / "result.txt").read_text() == "complete result"
    assert read_json(target / "config.json") == {"v": 1}
    assert _leftovers(tmp_path) == []
    run = RunFolder(target, config={"v": 3}, overwrite=True)
    run.abort()
    assert (target / "result.txt").read_text() == "complete result" and _leftovers(tmp_path) == []


def test_keep_previous_and_nested_runs(tmp_path):
    target = tmp_path / "main"
    with RunFolder(target, config={"v": 1}, keep_previous=True) as run:
        with RunFolder(run.path / "stage", config={"stage": 1}, overwrite=True) as sub:  # in place, inside
            assert sub.path == sub.final == run.path / "stage"
            sub.write_text("s.txt", "stage output")
    assert (target / "stage" / "s.txt").read_text() == "stage output"
    with RunFolder(target, config={"v": 2}, keep_previous=True):
        pass
    prev = tmp_path / "main.previous"
    assert read_json(prev / "config.json") == {"v": 1} and read_json(target / "config.json") == {"v": 2}
    _decoy(tmp_path / "other.previous")
    (tmp_path / "other").mkdir()
    with pytest.raises(WorkbenchError, match="not a workbench run folder"):
        RunFolder(tmp_path / "other", config={}, keep_previous=True)
    assert _leftovers(tmp_path) == []


def test_stale_staging_folders_of_dead_processes_are_cleaned(tmp_path):
    stale = tmp_path / ".run.tmp-999999999-abc"  # no such pid
    stale.mkdir()
    write_marker(stale)
    foreign = tmp_path / ".run.tmp-999999999-def"  # no marker: not ours, left alone
    foreign.mkdir()
    RunFolder(tmp_path / "run", config={}).commit()
    assert not stale.exists() and foreign.exists()


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
    run.commit()
    assert read_json(tmp_path / "run" / "model.json") == {"model_id": "m", "checksum": "c"}
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
