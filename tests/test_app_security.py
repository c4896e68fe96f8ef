"""The app as a hostile client sees it (issue #9): through ``gradio_client`` against one server per module
(a tiny in-memory model), every server path a request names must stay inside the runs root, reads must not
tell missing files from forbidden ones, a direction made on another model needs ``force``, and a network
host needs a login.

Layout of the module's folder::

    base/srv/runs/         the runs root (good/ a run folder, app/ the app's own outputs)
    base/secret/           outside: passwords.csv, a plot, a valid direction file, probe_directions
    base/home/.ssh/id_rsa  outside: a "private key"
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:  # declared dependencies (extras "app" and "test"): a missing one fails loudly instead of skipping
    import gradio  # noqa: F401
    import gradio_client
except ImportError as e:
    pytest.fail(f"{e.name} is not installed: install the project with its extras (bash scripts/setup.sh)",
                pytrace=False)

from apps.ui import build_app, launch  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.loading import from_memory  # noqa: E402
from workbench.tiny import build_tiny  # noqa: E402
from workbench.vectors import Direction, save_directions  # noqa: E402

MODEL = "tiny-llama"
SECRET = "hunter2-do-not-leak"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 30, 30)).save(path)


def _direction(lm, layer=1, checksum=None, seed=0) -> Direction:
    g = torch.Generator().manual_seed(seed)
    return Direction(torch.randn(lm.d_model, generator=g), layer=layer, method="test", model_id=lm.model_id,
                     model_checksum=lm.checksum if checksum is None else checksum, d_model=lm.d_model)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    lm = from_memory(*build_tiny("llama"), model_id=MODEL)
    base = tmp_path_factory.mktemp("sec")
    runs = base / "srv" / "runs"
    good = runs / "good"
    good.mkdir(parents=True)
    _png(good / "probe_auroc_vs_layer.png")
    (good / "probe_layers.csv").write_text("layer,logistic_auroc\n0,0.6\n1,0.9\n")
    secret = base / "secret"
    secret.mkdir()
    (secret / "passwords.csv").write_text(f"user,password\nalice,{SECRET}\n")
    (secret / "notes.json").write_text(f'{{"password": "{SECRET}"}}')
    _png(secret / "plot.png")
    save_directions(secret / "dir.safetensors", [_direction(lm)])
    save_directions(secret / "probe_directions.safetensors",
                    [Direction(_direction(lm).vector, layer=1, method="logistic", model_id=lm.model_id,
                               model_checksum=lm.checksum, d_model=lm.d_model)])
    key = base / "home" / ".ssh" / "id_rsa"
    key.parent.mkdir(parents=True)
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot really\n")
    # symlinks inside the runs root that point outside it
    (runs / "link-out").symlink_to(secret, target_is_directory=True)
    (good / "passwords.csv").symlink_to(secret / "passwords.csv")
    (runs / "dir-link.safetensors").symlink_to(secret / "dir.safetensors")
    save_directions(runs / "mine.safetensors", [_direction(lm)])
    save_directions(runs / "other-model.safetensors", [_direction(lm, checksum="0" * 64)])
    demo = build_app({MODEL: lm}, max_new_tokens_limit=16, max_prompt_tokens=64, disk_cache=False,
                     runs_roots=(str(runs),), runs_dir=str(runs / "app"))
    _, url, _ = launch(demo, port=free_port(), block=False, quiet=True)
    client = gradio_client.Client(url, verbose=False)
    yield dict(client=client, lm=lm, base=base, runs=runs, secret=secret, key=key, demo=demo)
    demo.close()


def steer(client, **kw):
    args = dict(model=MODEL, prompt="Tell me a joke", layer=1, a_kind="addition", a_strength=1.0, max_new_tokens=3)
    args.update(kw)
    return client.predict(api_name="/steer", **args)


def error_of(fn, *args, **kw) -> str:
    """The message a refused call shows (the call must fail)."""
    with pytest.raises(Exception) as ei:
        fn(*args, **kw)
    text = str(ei.value)
    assert "Traceback" not in text
    return text


def _tree(p: Path) -> set[str]:
    return {str(q.relative_to(p)) for q in p.rglob("*")}


# -- loading run folders --------------------------------------------------------------------------

@pytest.mark.parametrize("api", ["/probes_load", "/weights_load"])
def test_folder_outside_runs_root_is_not_listed_or_read(served, api):
    client, runs, secret = served["client"], served["runs"], served["secret"]
    root = str(runs.resolve())
    for path in (str(secret), "../../secret", str(runs / "good" / ".." / ".." / ".." / "secret"),
                 f"{root}/../../secret", str(secret / "passwords.csv")):
        msg = error_of(client.predict, path, api_name=api)
        assert f"no readable run folder {path!r} inside the runs folder {root}" in msg, msg
        rest = msg.replace(path, "")  # nothing beyond the path as typed: no file names, no contents
        assert SECRET not in rest and "passwords" not in rest and "notes.json" not in rest, msg
    # a missing folder outside the root gets the very same message
    missing = error_of(client.predict, str(secret.parent / "nope"), api_name=api)
    present = error_of(client.predict, str(secret), api_name=api)
    assert missing.replace(str(secret.parent / "nope"), "<p>") == present.replace(str(secret), "<p>")


def test_symlinks_inside_runs_root_pointing_outside_are_refused(served):
    client, runs = served["client"], served["runs"]
    root = str(runs.resolve())
    msg = error_of(client.predict, "link-out", api_name="/probes_load")
    assert f"no readable run folder 'link-out' inside the runs folder {root}" in msg and SECRET not in msg
    # a run folder inside the root, holding a symlinked file that points outside: that file is not listed
    status, main, gallery, pick, table, js = client.predict("good", api_name="/probes_load")
    assert "1 plot(s), 1 table(s)" in status, status
    assert "passwords.csv" not in repr(pick) and SECRET not in repr((status, pick, table, js))
    # a symlinked direction file pointing outside: refused like a missing one
    linked = error_of(steer, client, source="saved vector", vector_path="dir-link.safetensors")
    missing = error_of(steer, client, source="saved vector", vector_path="nope.safetensors")
    assert f"no readable direction file 'dir-link.safetensors' inside the runs folder {root}" in linked
    assert linked.replace("dir-link", "X") == missing.replace("nope", "X")


# -- writing: the probe sweep's output folder -------------------------------------------------------

def test_probe_sweep_out_outside_runs_root_writes_nothing(served, monkeypatch):
    client, base, runs = served["client"], served["base"], served["runs"]
    cwd = base / "a" / "b"  # so that '../../elsewhere' relative to the process's cwd is base/elsewhere too
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    before = _tree(base)
    root = str(runs.resolve())
    for out in ("../../elsewhere", str(base / "elsewhere-abs"), f"{root}/../x", "link-out/planted", "."):
        msg = error_of(client.predict, MODEL, 8, 50, False, out, api_name="/probe_sweep")
        assert root in msg and "runs folder" in msg, msg
    assert _tree(base) == before  # nothing written anywhere, inside or outside the root
    assert not (base / "elsewhere").exists() and not (base / "elsewhere-abs").exists()


def test_probe_sweep_relative_out_lands_in_runs_root(served, monkeypatch):
    client, base, runs = served["client"], served["base"], served["runs"]
    monkeypatch.chdir(base)
    msg, folder = client.predict(MODEL, 8, 50, False, "sweeps/s1", api_name="/probe_sweep")
    final = runs.resolve() / "sweeps" / "s1"
    assert folder == str(final) and (final / "probe_directions.safetensors").is_file(), (msg, folder)
    assert not (base / "sweeps").exists()
    status, main, *_ = client.predict("sweeps/s1", api_name="/probes_load")
    assert main is not None and "plot(s)" in status
    status = steer(client, source="probe direction", probe_folder="sweeps/s1")[0]
    assert "logistic probe direction" in status


# -- reading: vector_path and probe_folder give no existence oracle ----------------------------------

def test_vector_path_missing_and_existing_outside_root_give_the_same_error(served):
    client, base, runs, key = served["client"], served["base"], served["runs"], served["key"]
    root = str(runs.resolve())
    pairs = [(str(key), str(key.with_name("id_ed25519"))),
             ("../../home/.ssh/id_rsa", "../../home/.ssh/id_ed25519"),
             (str(served["secret"] / "dir.safetensors"), str(served["secret"] / "nope.safetensors"))]
    for existing, missing in pairs:
        a = error_of(steer, client, source="saved vector", vector_path=existing)
        b = error_of(steer, client, source="saved vector", vector_path=missing)
        assert f"no readable direction file {existing!r} inside the runs folder {root}" in a, a
        assert a.replace(existing, "<p>") == b.replace(missing, "<p>"), (a, b)
    # a valid direction file inside the root steers
    status = steer(client, source="saved vector", vector_path="mine.safetensors")[0]
    assert "loaded from" in status
    # a probes folder outside the root (with a valid probe_directions file) is refused like a missing one
    a = error_of(steer, client, source="probe direction", probe_folder=str(served["secret"]))
    b = error_of(steer, client, source="probe direction", probe_folder=str(base / "no-such-run"))
    assert f"no readable probes run folder {str(served['secret'])!r} inside the runs folder {root}" in a, a
    assert a.replace(str(served["secret"]), "<p>") == b.replace(str(base / "no-such-run"), "<p>")


# -- the direction-checksum rule ----------------------------------------------------------------------

def test_direction_from_another_model_needs_force(served):
    client, lm = served["client"], served["lm"]
    msg = error_of(steer, client, source="saved vector", vector_path="other-model.safetensors")
    assert re.search(r"computed on model .*checksum 000000000000.*tick 'force'", msg), msg
    status = steer(client, source="saved vector", vector_path="other-model.safetensors", force=True)[0]
    assert "forced" in status and lm.checksum[:12] in status
    # the same file on the model it was made on needs no force
    assert "loaded from" in steer(client, source="saved vector", vector_path="mine.safetensors")[0]


# -- network hosts need a login ----------------------------------------------------------------------

def test_launch_refuses_network_host_without_login_and_serves_with_one(served):
    runs = served["runs"]
    demo = build_app({MODEL: served["lm"]}, max_new_tokens_limit=8, disk_cache=False, runs_roots=(str(runs),),
                     runs_dir=str(runs / "app"))
    with socket.socket() as busy:  # were the refusal missing, the server could not bind here either
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        with pytest.raises(WorkbenchError, match="refusing to serve on 0.0.0.0 without a login"):
            launch(demo, host="0.0.0.0", port=busy.getsockname()[1], block=False, quiet=True)
    _, url, _ = launch(demo, port=free_port(), block=False, quiet=True, auth=[("alice", "s3cret")])
    try:
        with pytest.raises(Exception):
            gradio_client.Client(url, verbose=False).predict("good", api_name="/probes_load")
        with pytest.raises(Exception):
            gradio_client.Client(url, verbose=False, auth=("alice", "wrong")).predict("good", api_name="/probes_load")
        status, *_ = gradio_client.Client(url, verbose=False, auth=("alice", "s3cret")).predict(
            "good", api_name="/probes_load")
        assert "plot(s)" in status
    finally:
        demo.close()


def _run_cli(tmp_path: Path, *args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m apps --host 0.0.0.0 ...`` on a port that is busy on 127.0.0.1, so that nothing is ever served
    to the network: a missing refusal shows as 'could not start the server'."""
    env = {k: v for k, v in os.environ.items() if k != "WORKBENCH_APP_AUTH"}
    env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               WORKBENCH_CACHE=str(tmp_path / "cache"))
    env.update(env_extra or {})
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        return subprocess.run([sys.executable, "-m", "apps", "--host", "0.0.0.0", "--port",
                               str(busy.getsockname()[1]), "--lazy", "--model", str(tmp_path / "no-model"),
                               "--runs", str(tmp_path / "runs"), *args],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)


def test_cli_network_host_without_credentials_refuses_to_start(tmp_path):
    r = _run_cli(tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "warning: --host 0.0.0.0 serves the app to the network" in r.stderr, r.stderr[-2000:]
    assert "needs credentials" in r.stderr and "WORKBENCH_APP_AUTH" in r.stderr and "--auth-file" in r.stderr
    assert "could not start the server" not in r.stderr and "serving on" not in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("how", ["no-auth", "env", "file"])
def test_cli_network_host_warns_and_takes_credentials(tmp_path, how):
    args: list[str] = []
    env: dict[str, str] = {}
    if how == "no-auth":
        args = ["--no-auth"]
    elif how == "env":
        env = {"WORKBENCH_APP_AUTH": "alice:s3cret"}
    else:
        (tmp_path / "creds.txt").write_text("# logins\nalice:s3cret\n\nbob:pa:ss\n")
        args = ["--auth-file", str(tmp_path / "creds.txt")]
    r = _run_cli(tmp_path, *args, env_extra=env)
    assert "warning: --host 0.0.0.0 serves the app to the network" in r.stderr, r.stderr[-2000:]
    assert ("--no-auth: no login at all" in r.stderr) == (how == "no-auth")
    assert "needs credentials" not in r.stderr and "s3cret" not in r.stderr
    # it got as far as starting the server (the port is busy on purpose)
    assert r.returncode == 2 and "could not start the server" in r.stderr, r.stderr[-2000:]


def test_credentials_parsing(tmp_path, capsys):
    import argparse

    from apps.cli import check_exposure, register

    ap = argparse.ArgumentParser()
    register(ap.add_subparsers(dest="command"))

    def args(*a: str):
        return ap.parse_args(["app", *a])

    assert check_exposure(args(), {}) is None  # loopback: no login needed, no warning
    assert check_exposure(args("--host", "localhost"), {}) is None
    assert check_exposure(args("--host", "::1"), {}) is None
    assert "warning" not in capsys.readouterr().err
    assert check_exposure(args(), {"WORKBENCH_APP_AUTH": "alice:s3cret"}) == [("alice", "s3cret")]
    with pytest.raises(WorkbenchError, match="needs credentials"):
        check_exposure(args("--host", "192.168.1.5"), {})
    with pytest.raises(WorkbenchError, match=r"\$WORKBENCH_APP_AUTH is not of the form user:password"):
        check_exposure(args("--host", "0.0.0.0"), {"WORKBENCH_APP_AUTH": "alice"})
    bad = tmp_path / "bad.txt"
    bad.write_text("alice:ok\nbob-no-password\n")
    with pytest.raises(WorkbenchError, match="line 2 of --auth-file .* is not of the form user:password"):
        check_exposure(args("--host", "0.0.0.0", "--auth-file", str(bad)), {})
    with pytest.raises(WorkbenchError, match="could not read --auth-file"):
        check_exposure(args("--host", "0.0.0.0", "--auth-file", str(tmp_path / "missing")), {})
    with pytest.raises(WorkbenchError, match="contradicts"):
        check_exposure(args("--host", "0.0.0.0", "--no-auth"), {"WORKBENCH_APP_AUTH": "alice:s3cret"})
    with pytest.raises(SystemExit):  # credentials are never taken from the command line
        args("--auth", "alice:s3cret")
    capsys.readouterr()
