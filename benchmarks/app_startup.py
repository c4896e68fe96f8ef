"""How long `workbench app` takes to be ready: from process start to the server answering HTTP, and to the
model being loaded (the app loads it in a background thread while the server already answers).

    python benchmarks/app_startup.py                       # default model (must be in the zoo cache)
    python benchmarks/app_startup.py --model smollm2-135m-instruct --repeat 3 --generate

It starts ``workbench app`` as a subprocess (through a two-line shim that adds the app plugin if its entry
point is not registered yet, so every plugin is imported as in the real command), polls http://127.0.0.1:PORT/ and watches the app's log for "model '...' ready"; with
``--generate`` it also times the first steered generation through ``gradio_client`` (includes computing the
difference-in-means directions on first use). Prints one JSON line per run and a summary; stops the
process it started.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from importlib import metadata


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `workbench app` before the plugin entry point is registered: the same CLI, plugins loaded the same way.
SHIM = ("import sys, workbench.cli as c, apps.cli as a; p = c._plugins; "
        "c._plugins = lambda: p() + ([a] if a not in p() else []); sys.exit(c.main(sys.argv[1:]))")


def app_command() -> list[str]:
    eps = metadata.entry_points(group="workbench.plugins")
    if any(ep.name == "app" for ep in eps):
        return [sys.executable, "-m", "workbench.cli", "app"]
    return [sys.executable, "-c", SHIM, "app"]


def one_run(model: str, timeout: float, generate: bool, lazy: bool) -> dict:
    port = free_port()
    cmd = app_command() + ["--model", model, "--port", str(port)] + (["--lazy"] if lazy else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    marks: dict[str, float] = {}
    log: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            if re.search(r"\[app\] model '.*' ready", line) and "model_ready_s" not in marks:
                marks["model_ready_s"] = time.perf_counter() - t0

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}/"
    out = {"command": "workbench " + " ".join(cmd[cmd.index("app"):]), "model": model, "lazy": lazy}
    try:
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError("the app exited early:\n" + "".join(log[-20:]))
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        out["server_answers_s"] = round(time.perf_counter() - t0, 2)
                        break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"no answer within {timeout} s")
        if not lazy:
            while "model_ready_s" not in marks and time.perf_counter() - t0 < timeout:
                if proc.poll() is not None:
                    raise RuntimeError("the app exited early:\n" + "".join(log[-20:]))
                time.sleep(0.1)
            out["model_ready_s"] = round(marks.get("model_ready_s", float("nan")), 2)
        if generate:
            from gradio_client import Client

            t1 = time.perf_counter()
            res = Client(url, verbose=False).predict(model=model, prompt="How do I bake bread?", a_strength=1.0,
                                                     max_new_tokens=16, api_name="/steer")
            out["first_generation_s"] = round(time.perf_counter() - t1, 2)
            out["ready_to_first_reply_s"] = round(time.perf_counter() - t0, 2)
            out["status"] = res[0].splitlines()[-1]
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def main() -> int:
    from workbench.loading import zoo_cached
    from workbench.zoo import DEFAULT_MODEL, ZOO

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--generate", action="store_true", help="also time the first steered generation")
    ap.add_argument("--lazy", action="store_true", help="start with --lazy (no model load at start)")
    args = ap.parse_args()
    if args.model in ZOO and not zoo_cached(args.model):
        print(f"note: '{args.model}' is not in the zoo cache yet; the first run includes converting it",
              file=sys.stderr)
    runs = []
    for _ in range(args.repeat):
        r = one_run(args.model, args.timeout, args.generate, args.lazy)
        print(json.dumps(r), flush=True)
        runs.append(r)
    keys = [k for k in ("server_answers_s", "model_ready_s", "first_generation_s") if k in runs[0]]
    summary = {k: round(statistics.median(r[k] for r in runs), 2) for k in keys}
    print(json.dumps({"summary_median": summary, "runs": len(runs), "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
