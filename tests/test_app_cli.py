"""``workbench app``: options, the model registry it builds, and a real server process (a tiny model saved
to a folder) that binds 127.0.0.1 and answers."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest

from apps.cli import make_state, register
from workbench.errors import WorkbenchError
from workbench.zoo import DEFAULT_MODEL, ZOO

REPO = Path(__file__).resolve().parents[1]


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="workbench")
    sub = ap.add_subparsers(dest="command", required=True)
    register(sub)
    return ap.parse_args(["app"] + argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> list[str]:
    """Local addresses with a LISTEN socket on ``port`` (from /proc/net/tcp and tcp6)."""
    out = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(name):
            continue
        for line in Path(name).read_text().splitlines()[1:]:
            parts = line.split()
            addr, state = parts[1], parts[3]
            host, p = addr.rsplit(":", 1)
            if state == "0A" and int(p, 16) == port:
                if len(host) == 8:
                    out.append(".".join(str(int(host[i:i + 2], 16)) for i in (6, 4, 2, 0)))
                else:
                    out.append(host)
    return out


def test_options_and_defaults():
    a = parse([])
    assert a.host == "127.0.0.1" and a.port == 7860 and a.model == DEFAULT_MODEL
    assert a.max_new_tokens_limit == 128 and a.concurrency == 2 and not a.lazy
    a = parse(["--host", "0.0.0.0", "--port", "8123", "--max-new-tokens-limit", "32", "--concurrency", "3",
               "--model", "smollm2-135m-instruct", "--lazy"])
    assert (a.host, a.port, a.max_new_tokens_limit, a.concurrency, a.lazy) == ("0.0.0.0", 8123, 32, 3, True)


def test_registry_and_limits(tmp_path):
    st = make_state(parse(["--max-new-tokens-limit", "20"]))
    assert st.names == list(ZOO) and st.default_model == DEFAULT_MODEL
    assert not any(s.loaded for s in st.slots.values())  # nothing loads until asked
    assert st.max_new_tokens_limit == 20
    st = make_state(parse(["--model", str(tmp_path)]))
    assert st.names[0] == str(tmp_path) and st.default_model == str(tmp_path) and set(ZOO) <= set(st.names)
    with pytest.raises(WorkbenchError, match="native backend"):
        make_state(parse(["--backend", "nnsight"]))
    with pytest.raises(WorkbenchError, match="--max-new-tokens-limit must be >= 1"):
        make_state(parse(["--max-new-tokens-limit", "0"]))
    st = make_state(parse(["--system-prompt", "Be brief."]))
    assert st.default_system_prompt(DEFAULT_MODEL) == "Be brief."
    st = make_state(parse(["--model", "smollm2-135m-instruct"]))
    assert "harmless" in st.default_system_prompt("smollm2-135m-instruct")  # the zoo's safety prompt


def test_server_process_binds_localhost_and_answers(tmp_path):
    from workbench.tiny import build_tiny

    model, tok = build_tiny("llama")
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
               WORKBENCH_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    log = tmp_path / "app.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "apps", "--model", str(folder), "--port", str(port),
                                 "--max-new-tokens-limit", "16", "--runs", str(tmp_path / "runs")],
                                stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        t0 = time.perf_counter()
        while True:
            assert proc.poll() is None, f"the app exited:\n{log.read_text()[-3000:]}"
            assert time.perf_counter() - t0 < 180, f"no answer in 180 s:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        assert listening_addresses(port) == ["127.0.0.1"], listening_addresses(port)
        from gradio_client import Client

        out = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            model=str(folder), prompt="Tell me a joke", layer=1, a_strength=2.0, max_new_tokens=8, api_name="/steer")
        assert "done in" in out[0] and out[2] and out[6]
        text = log.read_text()
        assert f"model '{folder}' ready" in text and "serving on http://127.0.0.1" in text
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_bad_port_is_a_message(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
        r = subprocess.run([sys.executable, "-m", "apps", "--port", str(port), "--lazy"], capture_output=True,
                           text=True, env=env, cwd=tmp_path, timeout=180)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "could not start the server" in r.stderr and "Traceback" not in r.stderr


def test_workbench_plugin_entry_point():
    """``workbench app`` needs ``app = "apps.cli"`` under [project.entry-points."workbench.plugins"]."""
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="workbench.plugins")}
    if eps.get("app") != "apps.cli":
        pytest.fail('the app plugin is not registered: add  app = "apps.cli"  under '
                    '[project.entry-points."workbench.plugins"] in pyproject.toml and reinstall (scripts/setup.sh)',
                    pytrace=False)
    from workbench.cli import build_parser

    a = build_parser().parse_args(["app", "--port", "9999"])
    assert a.port == 9999 and a.host == "127.0.0.1"
