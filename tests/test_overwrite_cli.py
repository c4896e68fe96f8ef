"""``--overwrite`` through the real console script: it replaces only folders the workbench made, never the
current folder or an input of the command, and an interrupted or failed rerun keeps the previous result."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workbench.runs import RUN_MARKER, is_run_folder, read_marker, write_marker
from workbench.tiny import build_tiny


def _exe() -> str:
    exe = Path(sys.executable).parent / "workbench"
    return str(exe) if exe.exists() else (shutil.which("workbench") or "workbench")


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([_exe(), "--threads", "1", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob(".*") if ".tmp" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny llama saved as an HF folder, a private cache and the environment for the console script."""
    root = tmp_path_factory.mktemp("ow")
    model, tok = build_tiny("llama")
    m = root / "tiny"
    model.save_pretrained(str(m))
    tok.save_pretrained(str(m))
    env = dict(os.environ, WORKBENCH_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return root, m, env


def _capture(model: Path, out: str, *extra: str) -> list[str]:
    return ["capture", "--model", str(model), "--raw", "--prompts", "harmless:test", "--layers", "0",
            "--position", "last", "--out", out, *extra]


def _one_line_error(r: subprocess.CompletedProcess, pattern: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errs) == 1 and re.search(pattern, errs[0]), r.stderr[-2000:]


def test_overwrite_refuses_a_folder_that_is_not_a_run(world, tmp_path):
    _, model, env = world
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "important.txt").write_text("keep")
    r = _run(_capture(model, "decoy", "--overwrite"), tmp_path, env)
    _one_line_error(r, "not a workbench run folder")
    assert sorted(p.name for p in decoy.iterdir()) == ["important.txt"]
    assert (decoy / "important.txt").read_text() == "keep" and _leftovers(tmp_path) == []


def test_overwrite_refuses_the_current_folder_even_a_run(world, tmp_path):
    root, model, env = world
    here = tmp_path / "here"
    r = _run(_capture(model, str(here)), tmp_path, env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert is_run_folder(here) and read_marker(here)["complete"] is True
    before = sorted(p.name for p in here.iterdir())
    for out in (".", str(here), ".."):
        r = _run(_capture(model, out, "--overwrite"), here, env)
        _one_line_error(r, "current folder")
    assert sorted(p.name for p in here.iterdir()) == before and _leftovers(tmp_path) == []


def test_out_holding_an_input_is_refused_before_reading_it(world, tmp_path):
    _, model, env = world
    ck = tmp_path / "ck"
    shutil.copytree(model, ck / "x")
    shutil.copytree(model, ck / "y")
    write_marker(ck / "x")  # as if the workbench had made it: --overwrite alone would allow it
    write_marker(ck)
    files = sorted(p.name for p in (ck / "x").iterdir())
    for out in ("ck/x", "ck"):
        r = _run(["weightspace", "overlap", "--aligned", "ck/y", "--model", "b=ck/x", "--model", "c=ck/y",
                  "--out", out, "--overwrite", "--no-progress"], tmp_path, env)
        _one_line_error(r, "input")
        assert sorted(p.name for p in (ck / "x").iterdir()) == files
    # the same rule for the model folder of a capture
    r = _run(_capture(ck / "x", "ck/x", "--overwrite"), tmp_path, env)
    _one_line_error(r, "input")
    assert sorted(p.name for p in (ck / "x").iterdir()) == files and _leftovers(tmp_path) == []


def test_sigterm_keeps_the_previous_result_and_leaves_no_temporary_folder(world, tmp_path):
    _, model, env = world
    out = tmp_path / "run"
    r = _run(_capture(model, str(out)), tmp_path, env)
    assert r.returncode == 0, r.stderr[-2000:]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # a slow rerun (every prompt, one by one, every layer and position, no cache), killed while it runs
    args = ["capture", "--model", str(model), "--raw", "--prompts", "harmful", "--layers", "all",
            "--components", "resid_pre,resid_post,attn_out,mlp_out", "--position", "all", "--batch-size", "1",
            "--no-cache", "--out", str(out), "--overwrite"]
    p = subprocess.Popen([_exe(), "--threads", "1", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not list(tmp_path.glob(".run.tmp-*")) and p.poll() is None and time.monotonic() - t0 < 60:
        time.sleep(0.02)
    assert p.poll() is None, "the rerun ended before it could be interrupted"
    assert list(tmp_path.glob(".run.tmp-*")), "no staging folder appeared"
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert {q.name: q.read_bytes() for q in out.iterdir()} == before
    assert _leftovers(tmp_path) == []


def test_failed_rerun_keeps_the_previous_result(world, tmp_path, monkeypatch):
    """A rerun that fails after its run folder was opened (in-process, the capture made to fail)."""
    import workbench.capture
    from workbench.cli import main
    from workbench.errors import WorkbenchError

    _, model, env = world
    monkeypatch.setenv("WORKBENCH_CACHE", env["WORKBENCH_CACHE"])
    out = tmp_path / "run"
    assert main(_capture(model, str(out))) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert RUN_MARKER in before

    def broken(*a, **k):
        raise WorkbenchError("capture failed on purpose")

    monkeypatch.setattr(workbench.capture, "capture", broken)
    assert main(_capture(model, str(out), "--overwrite")) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(tmp_path) == []
