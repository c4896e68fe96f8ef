"""``workbench app``: start the Gradio app (steered generations and scores side by side).

    workbench app                                   # default model, http://127.0.0.1:7860
    workbench app --model smollm2-135m-instruct --port 8080 --max-new-tokens-limit 64
    WORKBENCH_APP_AUTH=alice:secret workbench app --host 0.0.0.0   # reachable from other machines, with a login
    workbench app --host 0.0.0.0 --auth-file creds.txt              # logins from a file (lines user:password)

A host other than 127.0.0.1 / localhost / ::1 serves the app to the network: that prints a warning and needs
credentials, from the environment variable WORKBENCH_APP_AUTH ("user:password") or from --auth-file (never
on the command line, where other users of the machine could read them); without any the app refuses to
start, unless --no-auth is given explicitly. On loopback credentials are optional.

The app reads and writes only inside the runs folder (--runs): every path typed into it (run folders to
load, a probe sweep's output folder, a vector file) is resolved, symlinks and '..' included, and refused
outside that folder; relative paths are relative to it. A direction file computed on another model (another
checksum) is refused unless 'force' is ticked, as with --force on the command line.

The server answers at once; the chosen model loads in a background thread meanwhile (``--lazy``: on
the first request instead), and every other zoo model loads when first picked in the UI. Requests queue
with at most ``--concurrency`` running at a time; forward passes on one model are serialised by a
lock, so concurrent users never see each other's interventions.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import os
import sys
from typing import Any

from workbench.errors import WorkbenchError

AUTH_ENV = "WORKBENCH_APP_AUTH"


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` only serves this machine (127.0.0.0/8, ::1, localhost)."""
    h = (host or "").strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _credential(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.strip().partition(":")
    if not sep or not user.strip() or not password:
        raise WorkbenchError(f"{where} is not of the form user:password")
    return user.strip(), password


def read_credentials(auth_file: str | None, environ: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """Logins from ``$WORKBENCH_APP_AUTH`` ("user:password") and ``auth_file`` (lines "user:password"; blank
    lines and lines starting with # ignored)."""
    env = os.environ if environ is None else environ
    creds: list[tuple[str, str]] = []
    if env.get(AUTH_ENV, "").strip():
        creds.append(_credential(env[AUTH_ENV], f"${AUTH_ENV}"))
    if auth_file:
        try:
            lines = open(auth_file, encoding="utf-8").read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise WorkbenchError(f"could not read --auth-file {auth_file}: {e}") from None
        n0 = len(creds)
        for i, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                creds.append(_credential(line, f"line {i} of --auth-file {auth_file}"))
        if len(creds) == n0:
            raise WorkbenchError(f"--auth-file {auth_file} holds no user:password line")
    return creds


def check_exposure(args: argparse.Namespace, environ: dict[str, str] | None = None) -> list[tuple[str, str]] | None:
    """The logins to serve with (None: no login). A non-loopback ``--host`` prints a warning and needs
    credentials unless ``--no-auth``; called before any model or Gradio is loaded."""
    creds = read_credentials(getattr(args, "auth_file", None), environ)
    no_auth = getattr(args, "no_auth", False)
    if no_auth and creds:
        raise WorkbenchError(f"--no-auth contradicts the credentials given (${AUTH_ENV} / --auth-file); drop one")
    if not is_loopback(args.host):
        print(f"[app] warning: --host {args.host} serves the app to the network: whoever can reach port "
              f"{args.port} can run the models and read the runs folder {args.runs} (credentials travel "
              f"unencrypted over plain http; use a TLS proxy on untrusted networks)", file=sys.stderr, flush=True)
        if not creds:
            if not no_auth:
                raise WorkbenchError(
                    f"--host {args.host} serves the app to the network and needs credentials: set "
                    f"{AUTH_ENV}=user:password or pass --auth-file FILE (lines user:password); --no-auth serves it "
                    f"without a login (not recommended)")
            print("[app] warning: --no-auth: no login at all; anyone on the network can use the app",
                  file=sys.stderr, flush=True)
    return creds or None


def register(sub: Any) -> None:
    from workbench.cli import add_model_args

    p = sub.add_parser("app", help="start the Gradio app: steered generations and scores side by side",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False)  # "--auth user:pw" must not pass for --auth-file (nor echo a password)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1: this machine only; any other host exposes the app "
                        f"to the network and needs credentials: ${AUTH_ENV}=user:password or --auth-file)")
    p.add_argument("--auth-file", default=None, metavar="FILE",
                   help="logins for the app, one user:password per line (required with a non-loopback --host "
                        f"unless ${AUTH_ENV} is set)")
    p.add_argument("--no-auth", action="store_true",
                   help="serve a non-loopback --host without any login (anyone on the network can use the app)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-new-tokens-limit", type=int, default=128, help="upper bound of 'max new tokens'")
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="longest accepted prompt (template included)")
    p.add_argument("--max-prompts", type=int, default=8, help="most prompts per Steer request")
    p.add_argument("--concurrency", type=int, default=2, help="requests running at once (the rest queue)")
    p.add_argument("--queue-size", type=int, default=32, help="most requests waiting in the queue")
    p.add_argument("--n-train", type=int, default=32,
                   help="prompts per class for the difference-in-means direction (built-in train split)")
    p.add_argument("--lazy", action="store_true", help="load the model on the first request, not at start")
    p.add_argument("--judge-url", default=None,
                   help="an OpenAI-compatible harm judge for the batteries (key from $WORKBENCH_JUDGE_KEY); without "
                        "one the batteries report refusal by phrase matching and the refusal logit only")
    p.add_argument("--judge-model", default=None, help="the judge's model name (with --judge-url)")
    p.add_argument("--runs", default="runs",
                   help="the only folder the app reads or writes: run folders to load, vector files, probe sweeps "
                        "(under <runs>/app); paths typed into the app are relative to it")
    p.set_defaults(func=cmd_app)


def make_state(args: argparse.Namespace) -> Any:
    """The app's model registry and limits from the command line (no Gradio import)."""
    from apps.state import AppState
    from workbench.loading import load_model
    from workbench.zoo import ZOO

    if args.backend not in ("native", None):
        raise WorkbenchError(f"the app streams through the native backend; --backend {args.backend} is not "
                             f"supported here (use the CLI commands for the other backends)")
    for name in ("max_new_tokens_limit", "max_prompt_tokens", "max_prompts", "concurrency", "queue_size", "n_train"):
        if getattr(args, name) < 1:
            raise WorkbenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    kw = dict(dtype=args.dtype, device=args.device, device_map=args.device_map,
              trust_remote_code=args.trust_remote_code)
    models: dict[str, Any] = {key: functools.partial(load_model, key, **kw) for key in ZOO}
    if args.model not in models:
        models = {args.model: functools.partial(load_model, args.model, **kw), **models}
    sp = args.system_prompt
    override = None if sp in (None, "default") else sp
    judge_url, judge_model = getattr(args, "judge_url", None), getattr(args, "judge_model", None)
    if bool(judge_url) != bool(judge_model):
        raise WorkbenchError("a judge needs both --judge-url and --judge-model")
    state = AppState(models, args.model, max_new_tokens_limit=args.max_new_tokens_limit,
                     max_prompt_tokens=args.max_prompt_tokens, max_prompts=args.max_prompts, n_train=args.n_train,
                     runs_root=args.runs, runs_dir="app", raw=args.raw, system_prompt=override)
    if judge_url:
        from workbench.scoring import OpenAICompatibleJudge

        state.judge = OpenAICompatibleJudge(judge_url, judge_model, os.environ.get("WORKBENCH_JUDGE_KEY"))
    return state


def cmd_app(args: argparse.Namespace) -> int:
    """Serve first, then load the model in the background: the page answers as early as possible (the CPU
    is better spent on the server start than on a model load racing it), and a request that comes before
    the load has finished waits for it."""
    auth = check_exposure(args)  # before any model or Gradio import: refuse an unprotected network host at once
    state = make_state(args)
    from apps.ui import build_app, launch

    demo = build_app(state=state, concurrency=args.concurrency, max_queue=args.queue_size)
    try:
        launch(demo, host=args.host, port=args.port, block=False, auth=auth, allow_no_auth=args.no_auth)
    except OSError as e:
        raise WorkbenchError(f"could not start the server on {args.host}:{args.port}: {e}. Is the port in use? "
                             f"Pick another with --port.") from e
    print(f"[app] serving on http://{args.host}:{args.port}{' with login' if auth else ''} (model '{args.model}'"
          f"{' loads on first use' if args.lazy else ' loading in the background'}); Ctrl+C stops it",
          file=sys.stderr, flush=True)
    if not args.lazy:
        state.preload(args.model)
    demo.block_thread()
    return 0


__all__ = ["register", "cmd_app", "make_state", "check_exposure", "read_credentials", "is_loopback", "AUTH_ENV"]
