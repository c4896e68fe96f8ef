"""``workbench app``: start the Gradio app (steered generations and scores side by side).

    workbench app                                   # default model, http://127.0.0.1:7860
    workbench app --model smollm2-135m-instruct --port 8080 --max-new-tokens-limit 64
    workbench app --host 0.0.0.0                    # reachable from other machines (no auth!)

The server answers at once; the chosen model loads in a background thread meanwhile (``--lazy``: on
the first request instead), and every other zoo model loads when first picked in the UI. Requests queue
with at most ``--concurrency`` running at a time; forward passes on one model are serialised by a
lock, so concurrent users never see each other's interventions.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any

from workbench.errors import WorkbenchError



def register(sub: Any) -> None:
    from workbench.cli import add_model_args

    p = sub.add_parser("app", help="start the Gradio app: steered generations and scores side by side",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the app)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-new-tokens-limit", type=int, default=128, help="upper bound of 'max new tokens'")
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="longest accepted prompt (template included)")
    p.add_argument("--max-prompts", type=int, default=8, help="most prompts per Steer request")
    p.add_argument("--concurrency", type=int, default=2, help="requests running at once (the rest queue)")
    p.add_argument("--queue-size", type=int, default=32, help="most requests waiting in the queue")
    p.add_argument("--n-train", type=int, default=32,
                   help="prompts per class for the difference-in-means direction (built-in train split)")
    p.add_argument("--lazy", action="store_true", help="load the model on the first request, not at start")
    p.add_argument("--runs", default="runs", help="folder searched for probe and weight-space run folders")
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
    return AppState(models, args.model, max_new_tokens_limit=args.max_new_tokens_limit,
                    max_prompt_tokens=args.max_prompt_tokens, max_prompts=args.max_prompts, n_train=args.n_train,
                    runs_dir=f"{args.runs}/app", raw=args.raw, system_prompt=override)


def cmd_app(args: argparse.Namespace) -> int:
    """Serve first, then load the model in the background: the page answers as early as possible (the CPU
    is better spent on the server start than on a model load racing it), and a request that comes before
    the load has finished waits for it."""
    state = make_state(args)
    from apps.ui import build_app, launch

    demo = build_app(state=state, concurrency=args.concurrency, max_queue=args.queue_size, runs_roots=(args.runs,))
    try:
        launch(demo, host=args.host, port=args.port, block=False)
    except OSError as e:
        raise WorkbenchError(f"could not start the server on {args.host}:{args.port}: {e}. Is the port in use? "
                             f"Pick another with --port.") from e
    print(f"[app] serving on http://{args.host}:{args.port} (model '{args.model}'"
          f"{' loads on first use' if args.lazy else ' loading in the background'}); Ctrl+C stops it",
          file=sys.stderr, flush=True)
    if not args.lazy:
        state.preload(args.model)
    demo.block_thread()
    return 0


__all__ = ["register", "cmd_app", "make_state"]
