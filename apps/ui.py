"""The Gradio app: Steer (with "score this setting": harm and utility batteries and a trade-off plot per
column), Probes, Weight space and Study (a weight-space chain's verdicts) tabs.

``build_app`` takes the models to serve (a dict of name -> ``LoadedModel`` or zero-argument loader;
tests inject a tiny in-memory model) and returns a ``gr.Blocks`` with the queue configured; ``launch``
starts it (127.0.0.1 unless told otherwise).

The Steer tab's generate event is a generator: it streams every column one token at a time. Its API
name is ``/steer``; with ``gradio_client``::

    Client(url).predict(prompt="How do I bake bread?", source="mean-diff", layer=13, a_kind="addition",
                        a_strength=1.0, max_new_tokens=32, api_name="/steer")

returns ``(status, base_title, base_text, base_tokens, base_scores, a_title, ..., b_scores)``. ``/score`` takes
the same direction and column inputs (no prompt) plus ``n_harmful``, ``n_tasks``, ``n_harmless`` and returns
``(status, base_battery, a_battery, b_battery, tradeoff_plot)`` (:mod:`steering.battery`); ``/study_load`` takes
a chain run folder and returns ``(status, verdicts, controls, plots)``.

Server paths: the app reads and writes only inside its runs root (``runs_root``; ``workbench app --runs``).
Every path a request names (``vector_path``, ``probe_folder``, the folders of ``/probes_load`` and
``/weights_load``, the ``out`` of ``/probe_sweep``) is resolved, symlinks and ``..`` included, and refused
unless it lies inside that root; relative paths are relative to it (see :mod:`apps.paths`). A direction file
made on another model (another checksum) is refused unless ``force=True``. ``launch`` refuses a non-loopback
``host`` without ``auth`` unless ``allow_no_auth``.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline machines: no telemetry calls

import gradio as gr  # noqa: E402

from apps.folders import TABLE_EXTS, FolderView, find_run_folders, load_image, read_table, scan_folder  # noqa: E402
from apps.paths import confine, readable_file, readable_folder, resolve_root  # noqa: E402
from apps.state import MAIN_SOURCE, PROBE_METHODS, SOURCE_LABELS, SOURCES, AppState  # noqa: E402
from apps.steer import KIND_LABELS, Column, ColumnSpec, Probe, build_interventions, encode_prompt  # noqa: E402
from apps.steer import step_round_robin  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.loading import LoadedModel  # noqa: E402

# The scores table has one row per score and one column per prompt (plus "mean" over several prompts).
SCORE_NAMES = ["refused", "refusal logit", "KL next", "KL reply", "perplexity", "mean proj", "tokens"]
SCORE_HEADERS = ["score", "value"]
N_BUILTIN_CHOICES = 12
B_DIRECTIONS = ("same direction", "random control")
A_KINDS = ("addition", "ablation", "orthogonalised", "optimised")

CSS = """
.wb-col { min-width: 260px; }
.wb-tokens .textfield { line-height: 1.9; }
#wb-status textarea { font-family: ui-monospace, monospace; font-size: 0.85em; }
"""


# -- errors: messages in the UI, never stack traces -------------------------------------------------

def _as_gr_error(e: BaseException) -> gr.Error:
    """A user mistake (WorkbenchError) becomes its message, shown in the page (no traceback in the log
    either); anything else a one-line message, with the traceback in the server log only."""
    if isinstance(e, gr.Error):
        return e
    if isinstance(e, WorkbenchError):
        return gr.Error(str(e), duration=None, print_exception=False)
    traceback.print_exc(file=sys.stderr)
    first = str(e).splitlines()[0][:300] if str(e) else ""
    return gr.Error(f"internal error ({type(e).__name__}): {first}. The server log has the details.",
                    duration=None, print_exception=False)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn WorkbenchError (and anything unexpected) into ``gr.Error`` messages, for plain functions and
    generators alike."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                raise _as_gr_error(e) from None

        return gen

    @functools.wraps(fn)
    def plain(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise _as_gr_error(e) from None

    return plain


# -- helpers --------------------------------------------------------------------------------------

def _builtin_choices() -> list[tuple[str, str]]:
    from workbench.prompts import builtin_split

    out: list[tuple[str, str]] = []
    for name in ("harmful", "harmless"):
        for t in builtin_split(name, "test").texts[:N_BUILTIN_CHOICES]:
            short = t if len(t) <= 80 else t[:77] + "..."
            out.append((f"{name}: {short}", t))
    return out


def n_layers_hint(state: AppState, name: str | None, load: bool = True) -> int | None:
    """Layer count for the slider without loading the model when possible (None: unknown, not loaded)."""
    from workbench.zoo import ZOO

    slot = state.slot(name)
    if slot.loaded:
        return slot.get().n_layers
    if slot.name in ZOO:
        return ZOO[slot.name].n_layers
    return slot.get().n_layers if load else None


def max_layers(state: AppState) -> int:
    """The largest layer count among the served models (the layer slider's server-side bound; the exact
    bound per model is checked when a request runs)."""
    known = [n for n in (n_layers_hint(state, k, load=False) for k in state.names) if n]
    return max(known) if len(known) == len(state.names) else max(known + [128])


def default_layer(n_layers: int) -> int:
    """A middle-to-late layer, where refusal directions usually separate best."""
    return max(0, min(n_layers - 1, int(round(0.55 * n_layers))))


def _fmt(x: float, nd: int = 3) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return round(float(x), nd)


class Render:
    """Turns the columns of one request (over several prompts) into the components' values."""

    def __init__(self, labels: list[str], prompts: list[str]) -> None:
        self.labels = labels
        self.prompts = prompts
        self.done: list[list[Column]] = []  # finished columns of earlier prompts
        self.current: list[Column] = []

    def all_columns(self, j: int) -> list[Column]:
        return [cols[j] for cols in self.done] + ([self.current[j]] if self.current else [])

    def scale(self) -> float:
        m = 0.0
        for cols in self.done + ([self.current] if self.current else []):
            for c in cols:
                for p in c.projections():
                    if p is not None and math.isfinite(p):
                        m = max(m, abs(p))
        return m or 1.0

    def column_values(self, j: int, scale: float) -> tuple[str, list[tuple[str, float | None]], Any]:
        multi = len(self.prompts) > 1
        texts: list[str] = []
        tokens: list[tuple[str, float | None]] = []
        rows: list[list[Any]] = []
        for i, c in enumerate(self.all_columns(j)):
            reply = c.result.text if c.result is not None else c.stream.text
            if multi:
                head = f"[{i + 1}] {c.prompt if len(c.prompt) <= 90 else c.prompt[:87] + '...'}"
                texts.append(f"{head}\n{reply}")
                tokens.append((("\n\n" if i else "") + head + "\n", None))
            else:
                texts.append(reply)
            pieces = c.result.pieces if c.result is not None else c.stream.pieces
            for piece, p in zip(pieces, c.projections()):
                tokens.append((piece, None if p is None else round(max(-1.0, min(1.0, p / scale)), 3)))
            if c.result is not None:
                s = c.result.scores
                rows.append(["yes" if s.refusal else "no", _fmt(s.refusal_logit), _fmt(s.kl_next, 4),
                             _fmt(s.kl_reply, 4), _fmt(s.perplexity, 2), _fmt(s.mean_projection), s.n_tokens])
        return "\n\n".join(texts), tokens, score_table(rows, multi)


def score_table(rows: list[list[Any]], multi: bool) -> Any:
    """Scores as a table: one row per score, one column per finished prompt (and their mean)."""
    import pandas as pd

    if not rows:
        return pd.DataFrame([], columns=SCORE_HEADERS)
    headers = ["score"] + ([f"prompt {i + 1}" for i in range(len(rows))] if multi else ["value"])
    table = [[name] + [r[k] for r in rows] for k, name in enumerate(SCORE_NAMES)]
    if multi and len(rows) > 1:
        headers.append("mean")
        for k, line in enumerate(table):
            vals = [v for v in line[1:] if v is not None]
            if SCORE_NAMES[k] == "refused":
                line.append(f"{sum(v == 'yes' for v in vals)}/{len(rows)}")
            else:
                line.append(_fmt(sum(vals) / len(vals), 4) if vals else None)
    return pd.DataFrame(table, columns=headers)


def _empty_outputs() -> list[Any]:
    import pandas as pd

    empty = pd.DataFrame([], columns=SCORE_HEADERS)
    return ["", "", [], empty] * 3



# -- the direction and column settings of a request (shared by /steer and /score) -----------------------

def resolve_request_direction(state: AppState, model: str, fmt: Any, source: str, layer: Any, vector_file: str | None,
                              vector_path: str | None, probe_folder: str | None, probe_method: str, seed: Any,
                              force: bool) -> Any:
    """The request's direction (an upload is read from Gradio's upload folder, a typed path from the runs root)."""
    if vector_file:  # an upload: Gradio has checked it is in its upload folder; check again
        from gradio.utils import get_upload_folder

        vfile, upload_root = vector_file, get_upload_folder()
    else:  # a path on the server: inside the runs root only
        vfile, upload_root = vector_path or None, None
    return state.resolve_direction(model, source, layer=layer, fmt=fmt, vector_file=vfile,
                                   probe_folder=probe_folder, probe_method=probe_method, seed=int(seed or 0),
                                   force=bool(force), upload_root=upload_root)


def column_specs(d: Any, n_layers: int, a_kind: str, a_strength: Any, a_layers: str | None, compare: bool,
                 b_kind: str, b_strength: Any, b_layers: str | None, b_direction: str, seed: Any, *,
                 kernel: Any = None) -> list[ColumnSpec]:
    """unmodified | A | (B): the columns' settings; bad layers etc. fail here, before any generation. B's
    random control is the same setting on ``random_like(direction, seed + 1)`` (for an optimised ablation: the
    kernel's weights on a random direction). ``kernel``: the :class:`steering.kernel.KernelAblation` of the
    'optimised' kind (:meth:`apps.state.AppState.resolve_optimised`)."""
    if a_kind not in A_KINDS:
        raise WorkbenchError(f"unknown intervention '{a_kind}'. Valid: {', '.join(A_KINDS)}")
    if compare and b_direction not in B_DIRECTIONS:
        raise WorkbenchError(f"unknown second direction '{b_direction}'. Valid: {', '.join(B_DIRECTIONS)}")

    def spec(label: str, kind: str, strength: Any, layers: str | None) -> ColumnSpec:
        if kind == "optimised" and kernel is None:
            raise WorkbenchError("the optimised ablation needs a 'steer optimize' run (chosen_ablation.safetensors) "
                                 "inside the runs folder")
        return ColumnSpec(label, kind, d, float(strength), layers or None,
                          kernel=kernel if kind == "optimised" else None)

    specs = [ColumnSpec("unmodified", "none", d), spec("A", a_kind, a_strength, a_layers)]
    if compare:
        sb = spec("B", b_kind, b_strength, b_layers)
        if b_direction == "random control":
            sb = sb.with_random_direction(int(seed or 0) + 1)
        specs.append(sb)
    for sp in specs:
        build_interventions(sp, n_layers)
    return specs


def uses_optimised(a_kind: str, compare: bool, b_kind: str) -> bool:
    """Whether a request's columns need the optimised ablation."""
    return a_kind == "optimised" or (bool(compare) and b_kind == "optimised")


# -- the Steer tab's work -------------------------------------------------------------------------

def make_steer_fn(state: AppState) -> Callable[..., Iterator[list[Any]]]:
    @user_errors
    def steer(model: str, prompt: str = "", builtin_prompts: list[str] | None = None, system_prompt: str = "",
              source: str = "mean-diff", layer: float = 0, vector_file: str | None = None, vector_path: str = "",
              probe_folder: str = "", probe_method: str = "logistic", seed: float = 0,
              a_kind: str = "addition", a_strength: float = 1.0, a_layers: str = "",
              compare: bool = False, b_kind: str = "addition", b_strength: float = -1.0, b_layers: str = "",
              b_direction: str = "random control", max_new_tokens: float = 32,
              force: bool = False, opt_run: str = "") -> Iterator[list[Any]]:
        t_start = time.perf_counter()
        # -- validate everything cheap before touching the model
        n_new = state.validate_max_new_tokens(max_new_tokens)
        prompts = []
        if prompt is not None and str(prompt).strip():
            prompts.append(str(prompt))
        for p in builtin_prompts or []:
            if p and str(p).strip() and p not in prompts:
                prompts.append(str(p))
        if not prompts:
            raise WorkbenchError("the prompt is empty: type a prompt or pick one from the built-in sets")
        if len(prompts) > state.max_prompts:
            raise WorkbenchError(f"too many prompts: {len(prompts)} selected, at most {state.max_prompts} per run")
        for p in prompts:
            if len(p) > state.max_prompt_tokens * 16:
                raise WorkbenchError(f"a prompt is {len(p)} characters long; this app accepts at most "
                                     f"{state.max_prompt_tokens} tokens per prompt")
        if a_kind not in A_KINDS:
            raise WorkbenchError(f"unknown intervention '{a_kind}'. Valid: {', '.join(A_KINDS)}")
        if compare and b_direction not in B_DIRECTIONS:
            raise WorkbenchError(f"unknown second direction '{b_direction}'. Valid: {', '.join(B_DIRECTIONS)}")
        slot = state.slot(model)
        out = _empty_outputs()

        def emit(status: str) -> list[Any]:
            return [status] + out

        if not slot.loaded:
            yield emit(f"loading model '{slot.name}' ...")
        lm = slot.get()
        be = slot.backend()
        fmt = state.chat_format(system_prompt)
        if source in ("mean-diff", "random control"):
            yield emit(f"computing difference-in-means directions on '{slot.name}' (first time only) ...")
        opt = state.resolve_optimised(slot.name, opt_run) if uses_optimised(a_kind, compare, b_kind) else None
        rd = resolve_request_direction(state, slot.name, fmt, source, layer, vector_file, vector_path, probe_folder,
                                       probe_method, seed, force)
        d = rd.direction
        probe = Probe.from_direction(d)
        specs = column_specs(d, lm.n_layers, a_kind, a_strength, a_layers, compare, b_kind, b_strength, b_layers,
                             b_direction, seed, kernel=opt.ablation if opt is not None else None)
        backends = []
        for s in specs:
            if s.kind == "orthogonalised":
                yield emit(f"building the orthogonalised copy of '{slot.name}' (cached per direction) ...")
                backends.append(slot.orthogonalised(s.direction))
            else:
                backends.append(be)
        with slot.lock:
            batches = [encode_prompt(be, p, fmt, max_prompt_tokens=state.max_prompt_tokens, max_new_tokens=n_new)
                       for p in prompts]
        titles = ["**Unmodified**", f"**A: {specs[1].describe()}**", ""]
        if compare:
            titles[2] = f"**B: {specs[2].describe()}**"
            if b_direction == "random control" and b_kind != "none":
                titles[2] += " (random control direction, same norm)"
        head = (f"model {slot.name} (d={lm.d_model}, {lm.n_layers} layers); direction {d.method} at layer "
                f"{d.layer} ({d.component}), norm {d.norm:.3g}: {rd.note}\n"
                f"token colours: projection of each generated token's residual ({d.component}, layer {d.layer}) on "
                f"the unit direction, divided by the largest |projection| shown (red = along, blue = against)")
        if opt is not None:
            head += f"\noptimised ablation: {opt.summary(lm.n_layers)}"
        render = Render([s.label for s in specs], prompts)

        def values(status: str) -> list[Any]:
            scale = render.scale()
            vals: list[Any] = [f"{head}\nscale {scale:.3g}; {status}"]
            for j in range(3):
                if j < len(specs):
                    text, toks, df = render.column_values(j, scale)
                    vals += [titles[j], text, toks, df]
                else:
                    vals += out[4 * j:4 * j + 4]
            return vals

        for i, (p, b) in enumerate(zip(prompts, batches)):
            render.current = [Column(s, be, cbe, b, p, probe=probe, max_new_tokens=n_new, lock=slot.lock)
                              for s, cbe in zip(specs, backends)]
            tag = f"prompt {i + 1}/{len(prompts)}: " if len(prompts) > 1 else ""
            k = 0
            for _ in step_round_robin(render.current):
                k += 1
                yield values(f"{tag}generating ... {k} tokens")
            for c in render.current:
                c.finish()
            yield values(f"{tag}scored")
            render.done.append(render.current)
            render.current = []
        yield values(f"done in {time.perf_counter() - t_start:.1f} s")

    return steer



# -- "score this setting": the harm and utility batteries per column ------------------------------------

BATTERY_HEADERS = ["score", "value [95% CI]", "N"]
BATTERY_ROWS = (  # label, key, decimals, N key
    ("harm: 1 - refusal rate (phrase)", "harm_rate", 2, "n_harmful"),
    ("refusal rate (phrase)", "refusal_rate", 2, "n_harmful"),
    ("refusal rate (judge)", "judge_refusal_rate", 2, "n_judged"),
    ("refusal logit (mean)", "refusal_logit", 2, "n_harmful"),
    ("utility: pass rate (unit tests)", "pass_rate", 2, "n_tasks"),
    ("answer NLL (per token)", "answer_nll", 3, "n_tasks"),
    ("KL on harmless (next token)", "kl", 4, "n_harmless"),
)
BATTERY_LIMITS = {"n_harmful": 64, "n_tasks": 32, "n_harmless": 64}


def battery_frame(row: Mapping[str, Any] | None) -> Any:
    """One column's battery numbers: score, value, 95 % interval, N."""
    import pandas as pd

    if not row:
        return pd.DataFrame([], columns=BATTERY_HEADERS)
    lines = []
    for label, key, nd, nkey in BATTERY_ROWS:
        v = row.get(key)
        if v is None:
            note = "no judge configured" if key.startswith("judge") else "n/a"
            lines.append([label, note, int(row.get(nkey) or 0)])
            continue
        lo, hi = row.get(key + "_lo"), row.get(key + "_hi")
        lines.append([label, f"{v:.{nd}f} [{lo:.{nd}f}, {hi:.{nd}f}]", int(row.get(nkey) or 0)])
    return pd.DataFrame(lines, columns=BATTERY_HEADERS)


def _setting_key(spec: ColumnSpec) -> str:
    from apps.state import direction_key

    if spec.kind == "none":
        return "none"
    parts = [spec.kind, direction_key(spec.direction)]
    if spec.kind == "optimised":  # the kernel's direction (above) and its per-layer weights
        import json

        parts.append(json.dumps(spec.kernel.profile.record(), sort_keys=True))
    if spec.kind == "addition":
        parts += [f"{float(spec.strength)!r}", str(spec.layers or "")]
    return "|".join(parts)


def _figure_image(fig: Any) -> Any:
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    buf.seek(0)
    with Image.open(buf) as im:
        im.load()
        return im.copy()


def battery_config(n_harmful: Any, n_tasks: Any, n_harmless: Any, base: Any = None) -> Any:
    """The battery size of a request (``base``: the app's token limits etc., a ``BatteryConfig``)."""
    import dataclasses

    from steering.battery import BatteryConfig

    vals = {}
    for k, v in (("n_harmful", n_harmful), ("n_tasks", n_tasks), ("n_harmless", n_harmless)):
        try:
            i = int(v)
        except (TypeError, ValueError):
            raise WorkbenchError(f"battery {k.replace('_', ' ')} must be an integer, got {v!r}") from None
        if not 1 <= i <= BATTERY_LIMITS[k]:
            raise WorkbenchError(f"battery {k.replace('_', ' ')} must be between 1 and {BATTERY_LIMITS[k]}, got {i}")
        vals[k] = i
    return dataclasses.replace(base if base is not None else BatteryConfig(), **vals)


def make_score_fn(state: AppState) -> Callable[..., list[Any]]:
    """``/score``: the batteries for every column of the current setting (unmodified, A, B) plus a random
    control of A when no column is one; results cached per (model, chat format, setting, battery size)."""

    @user_errors
    def score(model: str, system_prompt: str = "", source: str = "mean-diff", layer: float = 0,
              vector_file: str | None = None, vector_path: str = "", probe_folder: str = "",
              probe_method: str = "logistic", seed: float = 0, a_kind: str = "addition", a_strength: float = 1.0,
              a_layers: str = "", compare: bool = False, b_kind: str = "addition", b_strength: float = -1.0,
              b_layers: str = "", b_direction: str = "random control", force: bool = False,
              n_harmful: float = 16, n_tasks: float = 12, n_harmless: float = 16, opt_run: str = "",
              progress: gr.Progress = gr.Progress()) -> list[Any]:
        from steering.battery import make_setting, run_battery, tradeoff_figure

        t0 = time.perf_counter()
        cfg = battery_config(n_harmful, n_tasks, n_harmless, state.battery)
        slot = state.slot(model)
        progress(0.0, desc=f"loading '{slot.name}' ..." if not slot.loaded else "resolving the direction ...")
        lm = slot.get()
        be = slot.backend()
        fmt = state.chat_format(system_prompt)
        opt = state.resolve_optimised(slot.name, opt_run) if uses_optimised(a_kind, compare, b_kind) else None
        rd = resolve_request_direction(state, slot.name, fmt, source, layer, vector_file, vector_path, probe_folder,
                                       probe_method, seed, force)
        d = rd.direction
        specs = column_specs(d, lm.n_layers, a_kind, a_strength, a_layers, compare, b_kind, b_strength, b_layers,
                             b_direction, seed, kernel=opt.ablation if opt is not None else None)
        control_col = compare and b_direction == "random control" and b_kind != "none"
        scored = list(specs)
        if not control_col:  # the random-control reference point of the trade-off plot
            scored.append(specs[1].with_random_direction(int(seed or 0) + 1, "random control"))
        with slot.lock:
            fkey = f"{fmt.template_hash(lm.tokenizer)}|{fmt.system_prompt!r}|{fmt.raw}"
        judge = getattr(state.judge, "name", None)
        keys = [f"{lm.checksum}|{fkey}|{_setting_key(sp)}|{cfg.key()}|judge={judge}" for sp in scored]
        rows: dict[int, dict[str, Any]] = {}
        todo = []
        for i, k in enumerate(keys):
            hit = state.battery_get(k)
            if hit is not None:
                rows[i] = hit
            else:
                todo.append(i)
        if todo:
            settings = []
            for i in todo:
                sp = scored[i]
                if sp.kind == "orthogonalised":
                    progress(0.0, desc=f"building the orthogonalised copy for {sp.label} ...")
                ob = slot.orthogonalised(sp.direction) if sp.kind == "orthogonalised" else None
                settings.append(make_setting(sp.label, sp.kind, sp.direction, lm.n_layers, strength=sp.strength,
                                             layers=sp.layers, ortho_backend=ob, kernel=sp.kernel,
                                             info={"kind": sp.kind, "control": sp.label == "random control"
                                                   or (sp.label == "B" and control_col)}))
            res = run_battery(be, fmt, settings, cfg, lock=slot.lock, judge=state.judge,
                              progress=lambda f, m: progress(f, desc=m))
            for i, row in zip(todo, res.summary):
                rows[i] = row
                state.battery_put(keys[i], row)
        shown = []
        for i, sp in enumerate(scored):
            r = dict(rows[i])
            r["setting"] = sp.label if sp.label != "B" or not control_col else "B (random control)"
            r["info_control"] = sp.label == "random control" or (sp.label == "B" and control_col)
            shown.append(r)
        fig = tradeoff_figure(shown, f"{slot.name} (95% intervals)")
        tables = [battery_frame(shown[j]) if j < len(specs) else battery_frame(None) for j in range(3)]
        n_cached = len(scored) - len(todo)
        extra = "" if control_col else (f"; the random control (A's setting on a random direction of the same norm, "
                                        f"seed {int(seed or 0) + 1}) is plotted for reference")
        ctrl = next(r for r in shown if r["info_control"])
        status = (f"scored {len(scored)} setting(s) in {time.perf_counter() - t0:.1f} s ({n_cached} from the cache); "
                  f"harm: {cfg.n_harmful} harmful:test prompts x {cfg.harm_tokens} tokens; utility: {cfg.n_tasks} code "
                  f"tasks (test split, unit tests in a sandbox) x up to {cfg.code_tokens} tokens; KL: {cfg.n_harmless} "
                  f"harmless:test prompts. Direction: {d.method} at layer {d.layer} ({rd.note}){extra}. "
                  + (f"Optimised ablation: {opt.summary(lm.n_layers)}. " if opt is not None else "") + f"Random "
                  f"control ({'column B' if control_col else 'plotted only'}): harm {ctrl['harm_rate']:.2f}, pass rate "
                  f"{ctrl['pass_rate']:.2f}.")
        return [status, *tables, _figure_image(fig)]

    return score

# -- folder viewers (Probes / Weight space) ---------------------------------------------------------

def folder_outputs(path: str, main_image: str | None = None, *,
                   root: str | Path) -> tuple[str, Any, list[Any], Any, Any, Any]:
    """(status, main image, gallery, table-dropdown update, first table, first JSON) for a run folder inside
    the runs root ``root``."""
    view: FolderView = scan_folder(path, root=root)
    main = view.find(main_image) if main_image else None
    gallery = [(load_image(p), view.rel(p)) for p in view.images if p != main]
    tables = [view.rel(p) for p in view.tables]
    first = _pick_first_table(view)
    df, js = table_outputs(str(view.root), first, root=root) if first else (None, None)
    status = (f"{view.root}: {len(view.images)} plot(s), {len(view.tables)} table(s)"
              + ("" if main or not main_image else f"; no {main_image} here"))
    return (status, load_image(main) if main else None, gallery,
            gr.update(choices=tables, value=first), df, js)


def _pick_first_table(view: FolderView) -> str | None:
    for name in ("probe_layers.csv", "probe_layers.json", "overlap.csv", "summary.json"):
        p = view.find(name)
        if p is not None:
            return view.rel(p)
    csvs = [p for p in view.tables if p.suffix == ".csv"]
    return view.rel((csvs or view.tables)[0]) if view.tables else None


def table_outputs(folder: str, rel: str | None, *, root: str | Path) -> tuple[Any, Any]:
    """One table of a loaded run folder (``folder``/``rel``, which must lie inside the runs root ``root``)."""
    if not rel:
        return None, None
    p = readable_file(Path(folder) / rel, root, "table")
    if p.suffix.lower() not in TABLE_EXTS:
        raise WorkbenchError(f"{rel} is not a table (.csv, .json)")
    t = read_table(p)
    import pandas as pd

    if isinstance(t, pd.DataFrame):
        return t.round(4), None
    return None, t


def _folder_viewer(state: AppState, markers: tuple[str, ...], main_image: str | None, roots: Sequence[str],
                   prefix: str, label: str) -> tuple[Any, Callable[[str], tuple]]:
    def choices() -> list[str]:
        return find_run_folders(list(roots), markers)

    with gr.Row():
        folder = gr.Dropdown(choices=choices(), value=None, allow_custom_value=True, label=label, scale=5,
                             elem_id=f"{prefix}-folder")
        refresh = gr.Button("Refresh list", scale=1, size="sm")
        load = gr.Button("Load", variant="primary", scale=1, elem_id=f"{prefix}-load")
    status = gr.Markdown(elem_id=f"{prefix}-status")
    main = gr.Image(label=main_image or "plot", type="pil", interactive=False, visible=main_image is not None,
                    elem_id=f"{prefix}-main")
    gallery = gr.Gallery(label="plots", columns=3, height="auto", format="png", elem_id=f"{prefix}-gallery")
    with gr.Row():
        table_pick = gr.Dropdown(choices=[], label="table", allow_custom_value=False)
    table = gr.Dataframe(label="table", interactive=False, wrap=True, elem_id=f"{prefix}-table")
    js = gr.JSON(label="JSON")
    root_state = gr.State("")

    @user_errors
    def do_load(path: str) -> tuple:
        st, im, gal, pick, df, j = folder_outputs(path, main_image, root=state.runs_root)
        return st, im, gal, pick, df, j, str(readable_folder(path, state.runs_root, "run folder"))

    @user_errors
    def do_table(folder: str, rel: str) -> tuple:
        return table_outputs(folder, rel, root=state.runs_root) if folder and rel else (None, None)

    refresh.click(lambda: gr.update(choices=choices()), None, folder, api_visibility="private")
    load.click(do_load, folder, [status, main, gallery, table_pick, table, js, root_state],
               api_name=f"{prefix}_load")
    table_pick.change(do_table, [root_state, table_pick], [table, js], api_visibility="private")
    return folder, do_load



def direction_default(state: AppState, name: str | None, n_layers: int) -> tuple[str, int, str]:
    """(source, layer, note) the Steer tab starts with for a model: the main job's selected direction when a
    main-job run folder for this model is under the runs root, else a fresh difference in means."""
    mj = state.main_job_for(name)
    if mj is not None:
        return (MAIN_SOURCE, int(mj.direction.layer),
                f"**Direction: the main job's selected direction** (`{mj.folder}`): {mj.summary()}")
    other = state.main_job()
    why = (f"the main-job run under the runs folder (`{other.folder}`) was made on '{other.direction.model_id}'"
           if other is not None else f"no main-job run folder under the runs folder `{state.runs_root}`")
    return ("mean-diff", default_layer(n_layers),
            f"**Direction: a fresh difference in means** ({state.slot(name).n_train}+{state.slot(name).n_train} "
            f"built-in train prompts, layer {default_layer(n_layers)} by default): {why}. Run `workbench main --out "
            f"{state.runs_root}/main` to use the direction the main job selects and evaluates.")


def kind_choices(optimised_ok: bool, with_none: bool = False) -> list[tuple[str, str]]:
    """The intervention radio's (label, kind) choices; the optimised ablation's label says when no run of it
    exists for the model (choosing it then gives the command that makes one)."""
    opt = KIND_LABELS["optimised"] + ("" if optimised_ok else " (unavailable here: see 'optimised ablation' below)")
    out = [(KIND_LABELS[k], k) for k in ("addition", "ablation", "orthogonalised")] + [(opt, "optimised")]
    return out + ([(KIND_LABELS["none"], "none")] if with_none else [])


def optimised_default(state: AppState, name: str | None) -> tuple[list[str], str | None, str, bool]:
    """(run folders, the newest, note, available) of the optimised-ablation choice for a model: the
    ``steer optimize`` runs under the runs root made on it (:meth:`AppState.optimised_runs`), newest first, the
    newest's trial numbers and per-layer weights; without one, why and the command that makes one."""
    from apps.optimised import no_run_message

    slot = state.slot(name)
    mine, other = state.optimised_runs(slot.name)
    if not mine:
        why = no_run_message(state.runs_root, slot.name, other)
        return [], None, f"**Optimised ablation: unavailable.** {why}", False
    n = n_layers_hint(state, slot.name, load=False)
    note = f"**Optimised ablation** (the newest of {len(mine)} run(s) made on this model): {mine[0].summary(n)}"
    return [str(r.folder) for r in mine], str(mine[0].folder), note, True


def optimised_note(state: AppState, name: str | None, path: str | None) -> str:
    """The note for the run picked in the dropdown (a refusal is shown as the note, not raised)."""
    from apps.optimised import load_optimised_run

    if path is None or not str(path).strip():
        return optimised_default(state, name)[2]
    slot = state.slot(name)
    try:
        if slot.loaded:
            run, extra = state.resolve_optimised(slot.name, path), ""
        else:  # not loading a model for a note: its checksum is checked when a request runs
            run, extra = load_optimised_run(path, state.runs_root), " (checked against the model when it runs)"
    except WorkbenchError as e:
        return f"**Optimised ablation: cannot use this run.** {e}"
    return f"**Optimised ablation:** {run.summary(n_layers_hint(state, slot.name, load=False))}{extra}"


# -- the Study tab: a weight-space chain's verdicts ----------------------------------------------------

VERDICT_HEADERS = ["claim", "statement", "statistic", "value", "95% CI", "verdict"]
CONTROL_HEADERS = ["control", "kind", "statistic", "value", "95% CI", "verdict"]


def _ci_text(ci: Any, nd: int = 4) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci):
        return f"[{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]"
    return "-"


def _val_text(v: Any, nd: int = 4) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, (int, float)):
        return f"{v:.{nd}f}" if math.isfinite(float(v)) else "-"
    return str(v)[:80]


def study_outputs(path: str, *, root: str | Path) -> tuple[str, Any, Any, list[Any]]:
    """(status, verdict table, controls table, plots) of a chain run folder inside the runs root."""
    import pandas as pd

    from workbench.io import read_json

    folder = readable_folder(path, root, "chain run folder")
    rpath = readable_file(folder / "chain_report.json", root, "chain report (chain_report.json)")
    try:
        rep = read_json(rpath)
    except (ValueError, OSError) as e:
        raise WorkbenchError(f"{rpath} is not a readable chain report: {e}") from None
    if not isinstance(rep, dict):
        raise WorkbenchError(f"{rpath} is not a chain report (expected a JSON object)")
    verdicts = rep.get("verdicts") or {}
    vrows = [[k, str(v.get("claim", "")), str(v.get("statistic", "")), _val_text(v.get("value")),
              _ci_text(v.get("ci")), str(v.get("verdict", ""))]
             for k, v in verdicts.items() if isinstance(v, dict)]
    crows: list[list[str]] = []
    for key in ("planted_controls", "controls"):
        ctl = rep.get(key)
        items = ctl.items() if isinstance(ctl, dict) else enumerate(ctl) if isinstance(ctl, list) else []
        for name, c in items:
            if isinstance(c, dict):
                crows.append([str(c.get("name", name)), "planted control", str(c.get("statistic", "")),
                              _val_text(c.get("value")), _ci_text(c.get("ci")),
                              str(c.get("verdict", c.get("expected", "")))])
    n_planted = len(crows)
    for k, v in verdicts.items():
        pairs = v.get("pairs") if isinstance(v, dict) else None
        if isinstance(pairs, dict):
            for pair, c in pairs.items():
                if isinstance(c, dict):
                    crows.append([pair, f"measured pair ({k}): separability", str(c.get("statistic", "")),
                                  _val_text(c.get("value")), _ci_text(c.get("ci")), str(c.get("verdict", ""))])
    view = None
    try:
        view = scan_folder(folder, root=root)
    except WorkbenchError:
        pass
    plots = [(load_image(p), view.rel(p)) for p in view.images] if view is not None else []
    share = rep.get("real_harmful_share") or {}
    status = (f"`{folder}`: model {rep.get('model', '?')}; {len(vrows)} verdict(s), "
              + (f"{n_planted} planted control(s)" if n_planted else
                 "no planted controls in this report (they are built and checked by `pytest tests/test_verdicts.py`)")
              + f", {len(crows) - n_planted} measured pair(s); {len(plots)} plot(s)"
              + (f"; real harmful share of the contaminated fine-tune {share.get('value'):.3f} "
                 f"({share.get('n_harmful')}/{share.get('n_total')})" if isinstance(share.get("value"), float) else ""))
    if not vrows:
        status += ". This report holds no verdicts (an older or unfinished chain: rerun it with --resume)."
    return (status, pd.DataFrame(vrows, columns=VERDICT_HEADERS), pd.DataFrame(crows, columns=CONTROL_HEADERS), plots)


def _study_viewer(state: AppState, roots: Sequence[str]) -> None:
    def choices() -> list[str]:
        return find_run_folders(list(roots), ("chain_report.json",))

    with gr.Row():
        folder = gr.Dropdown(choices=choices(), value=None, allow_custom_value=True, scale=5, elem_id="study-folder",
                             label="chain run folder inside the runs folder (holds chain_report.json)")
        refresh = gr.Button("Refresh list", scale=1, size="sm")
        load = gr.Button("Load", variant="primary", scale=1, elem_id="study-load")
    status = gr.Markdown(elem_id="study-status")
    verdicts = gr.Dataframe(headers=VERDICT_HEADERS, label="verdicts", interactive=False, wrap=True,
                            elem_id="study-verdicts")
    controls = gr.Dataframe(headers=CONTROL_HEADERS, label="controls (planted) and measured pair separability",
                            interactive=False, wrap=True, elem_id="study-controls")
    gallery = gr.Gallery(label="plots", columns=3, height="auto", format="png", elem_id="study-gallery")

    @user_errors
    def do_load(path: str) -> tuple:
        return study_outputs(path, root=state.runs_root)

    refresh.click(lambda: gr.update(choices=choices()), None, folder, api_visibility="private")
    load.click(do_load, folder, [status, verdicts, controls, gallery], api_name="study_load")


# -- the app ------------------------------------------------------------------------------------------

def default_registry(dtype: str = "float32", device: str = "cpu",
                     extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every zoo model as a lazy loader (plus ``extra`` entries)."""
    from workbench.loading import load_model
    from workbench.zoo import ZOO

    reg: dict[str, Any] = {key: functools.partial(load_model, key, dtype=dtype, device=device) for key in ZOO}
    reg.update(extra or {})
    return reg


def build_app(models: Mapping[str, LoadedModel | Callable[[], LoadedModel]] | None = None, *,
              state: AppState | None = None, default_model: str | None = None, max_new_tokens_limit: int = 128,
              max_prompt_tokens: int = 512, max_prompts: int = 8, concurrency: int = 2, max_queue: int = 32,
              n_train: int = 32, disk_cache: bool = True, runs_roots: Sequence[str] | None = None,
              runs_dir: str | None = None, system_prompt: str | None = None, raw: bool = False,
              runs_root: str | None = None, battery: Any = None) -> gr.Blocks:
    """The app's Blocks, queue configured. ``models`` maps names to ``LoadedModel`` s or loaders (default: the
    zoo, loaded lazily); or pass a ready ``state``.

    ``runs_root`` is the only folder the app reads or writes (default: the first of ``runs_roots``, else
    ``runs``; a ready ``state`` brings its own); ``runs_roots`` are the folders searched for run folders to
    list (default: the runs root; each must lie inside it; ``()``: list none); ``runs_dir`` is where the app's
    own probe sweeps go (default ``<runs root>/app``); ``battery``: a ``steering.battery.BatteryConfig`` with the
    batteries' token limits, batch size and bootstrap size (the sizes come from each request)."""
    if state is None:
        if runs_root is None:
            runs_root = runs_roots[0] if runs_roots else "runs"
        state = AppState(models if models is not None else default_registry(), default_model,
                         max_new_tokens_limit=max_new_tokens_limit, max_prompt_tokens=max_prompt_tokens,
                         max_prompts=max_prompts, n_train=n_train, disk_cache=disk_cache, runs_dir=runs_dir,
                         system_prompt=system_prompt, raw=raw, runs_root=runs_root)
    elif runs_root is not None and resolve_root(runs_root) != state.runs_root:
        raise WorkbenchError(f"runs_root {runs_root} differs from the state's runs root {state.runs_root}")
    runs_roots = [str(confine(r, state.runs_root, "a folder to list run folders from"))
                  for r in (runs_roots if runs_roots is not None else (state.runs_root,))]
    if concurrency < 1:
        raise WorkbenchError(f"concurrency must be >= 1, got {concurrency}")
    if battery is not None:
        state.battery = battery
    steer_fn = make_steer_fn(state)
    n0 = n_layers_hint(state, state.default_model, load=False) or max_layers(state)
    n_max = max(n0, max_layers(state))
    limit = state.max_new_tokens_limit

    with gr.Blocks(title="safety-subspace workbench") as demo:
        demo.wb_state = state  # type: ignore[attr-defined]
        gr.Markdown("## safety-subspace workbench\nSteer a model along a direction and compare with the "
                    "unmodified model: replies, refusal and utility scores side by side.")
        with gr.Tab("Steer", id="steer"):
            with gr.Row():
                with gr.Column(scale=2):
                    model = gr.Dropdown(choices=state.names, value=state.default_model, label="model",
                                        elem_id="wb-model")
                    prompt = gr.Textbox(value="", label="prompt", lines=3, placeholder="type a prompt ...",
                                        elem_id="wb-prompt")
                    builtin = gr.Dropdown(choices=_builtin_choices(), multiselect=True, value=[],
                                          max_choices=state.max_prompts, elem_id="wb-builtin",
                                          label="... and/or pick prompts from the built-in sets (test split)")
                    system_prompt = gr.Textbox(label="system prompt (empty = none)", lines=2,
                                               value=state.default_system_prompt(state.default_model))
                with gr.Column(scale=2):
                    src0, layer0, note0 = direction_default(state, state.default_model, n0)
                    source = gr.Radio(choices=[(SOURCE_LABELS[s], s) for s in SOURCES], value=src0,
                                      label="direction source", elem_id="wb-source")
                    direction_note = gr.Markdown(note0, elem_id="wb-direction-note")
                    layer = gr.Slider(0, n_max - 1, value=layer0, step=1, label="direction layer",
                                      elem_id="wb-layer")
                    with gr.Group(visible=False) as vec_group:
                        vector_file = gr.File(label="vector file (.safetensors, workbench format)",
                                              file_types=[".safetensors"], type="filepath")
                        vector_path = gr.Textbox(value="", lines=1,
                                                 label=f"... or a file inside the runs folder {state.runs_root} "
                                                       f"(relative to it)")
                    with gr.Group(visible=False) as probe_group:
                        probe_folder = gr.Dropdown(
                            choices=find_run_folders(list(runs_roots), ("probe_directions.safetensors",)),
                            allow_custom_value=True, value="",
                            label="probes run folder inside the runs folder (holds probe_directions.safetensors)")
                        probe_method = gr.Radio(choices=list(PROBE_METHODS), value="logistic", label="probe method")
                    force = gr.Checkbox(value=False, visible=False, elem_id="wb-force",
                                        label="force: use a direction file computed on another model (its recorded "
                                              "checksum differs from this model's)")
                    seed = gr.Number(value=0, precision=0, label="seed (random controls)")
                with gr.Column(scale=2):
                    opt_choices0, opt_value0, opt_note0, opt_ok0 = optimised_default(state, state.default_model)
                    a_kind = gr.Radio(choices=kind_choices(opt_ok0), value="addition", label="intervention A",
                                      elem_id="wb-a-kind")
                    a_strength = gr.Slider(-4, 4, value=1.0, step=0.05, label="A: strength (x the direction vector)",
                                           elem_id="wb-a-strength")
                    a_layers = gr.Textbox(value="", label="A: addition layer(s) (empty = the direction's layer; e.g. 10, 8-12)",
                                          lines=1, elem_id="wb-a-layers")
                    with gr.Accordion("optimised ablation: the 'steer optimize' run it applies", open=False,
                                      elem_id="wb-opt") as opt_box:
                        with gr.Row():
                            opt_run = gr.Dropdown(
                                choices=opt_choices0, value=opt_value0 or "", allow_custom_value=True, scale=5,
                                elem_id="wb-opt-run",
                                label=f"run folder inside the runs folder {state.runs_root} (holds "
                                      f"chosen_ablation.safetensors; empty = the newest made on this model)")
                            opt_refresh = gr.Button("Refresh list", scale=1, size="sm")
                        opt_note = gr.Markdown(opt_note0, elem_id="wb-opt-note")
                    compare = gr.Checkbox(value=False, label="compare a second setting (B)", elem_id="wb-compare")
                    with gr.Group(visible=False) as b_group:
                        b_kind = gr.Radio(choices=kind_choices(opt_ok0, with_none=True), value="addition",
                                          label="intervention B")
                        b_direction = gr.Radio(choices=list(B_DIRECTIONS), value="random control",
                                               label="B uses")
                        b_strength = gr.Slider(-4, 4, value=1.0, step=0.05, label="B: strength")
                        b_layers = gr.Textbox(value="", label="B: addition layer(s)", lines=1)
                    max_new = gr.Slider(1, limit, value=min(48, limit), step=1, label="max new tokens",
                                        elem_id="wb-max-new")
                    go = gr.Button("Generate", variant="primary", elem_id="wb-generate")
            status = gr.Textbox(label="status", lines=3, interactive=False, elem_id="wb-status")
            col_outputs: list[Any] = []
            battery_outputs: list[Any] = []
            col_groups = []
            with gr.Row(equal_height=False):
                for key, title in (("base", "**Unmodified**"), ("a", "**A**"), ("b", "**B**")):
                    with gr.Column(visible=key != "b", elem_classes=["wb-col"]) as col:
                        t = gr.Markdown(title, elem_id=f"wb-{key}-title")
                        text = gr.Textbox(label="reply", lines=8, max_lines=24, interactive=False,
                                          elem_id=f"wb-{key}-text")
                        toks = gr.HighlightedText(label="tokens (colour = projection on the direction)",
                                                  show_legend=False, show_inline_category=False,
                                                  combine_adjacent=False, elem_id=f"wb-{key}-tokens",
                                                  elem_classes=["wb-tokens"])
                        scores = gr.Dataframe(headers=SCORE_HEADERS, label="scores", interactive=False,
                                              wrap=True, elem_id=f"wb-{key}-scores")
                        battery = gr.Dataframe(headers=BATTERY_HEADERS, label="batteries (Score this setting)",
                                               interactive=False, wrap=True, elem_id=f"wb-{key}-battery")
                    col_outputs += [t, text, toks, scores]
                    battery_outputs.append(battery)
                    col_groups.append(col)
            gr.Markdown(
                "Scores: **refused** = refusal phrase in the reply; **refusal logit** = log-odds of refusal-opening "
                "tokens at the last prompt position under this setting; **KL next** = KL(unmodified || setting) "
                "of the next-token distribution there; **KL reply** = the same KL averaged over every position that "
                "produced a reply token (teacher-forced on this column's reply); **perplexity** = of this column's "
                "reply under the unmodified model; **mean proj** = mean projection of the reply tokens on the unit "
                "direction. Greedy decoding.")
            with gr.Row(equal_height=True):
                n_harmful = gr.Slider(1, BATTERY_LIMITS["n_harmful"], value=16, step=1, elem_id="wb-n-harmful",
                                      label="battery: harmful prompts (harmful:test)")
                n_tasks = gr.Slider(1, BATTERY_LIMITS["n_tasks"], value=12, step=1, elem_id="wb-n-tasks",
                                    label="battery: code tasks (test split, unit tests)")
                n_harmless = gr.Slider(1, BATTERY_LIMITS["n_harmless"], value=16, step=1, elem_id="wb-n-harmless",
                                       label="battery: harmless prompts (KL)")
                score_go = gr.Button("Score this setting (harm + utility batteries, every column)", variant="primary",
                                     elem_id="wb-score")
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    score_status = gr.Textbox(label="batteries", lines=4, interactive=False, elem_id="wb-score-status")
                    gr.Markdown(
                        "Batteries: **harm** = 1 - refusal rate (refusal-phrase matching on greedy replies to held-out "
                        "harmful prompts; a judge's refusal rate too when the app has one); **refusal logit** = mean "
                        "log-odds of refusal-opening tokens; **pass rate** = share of function-writing tasks whose "
                        "unit tests pass (code run in a sandbox); **answer NLL** = mean per-token NLL of the reference "
                        "solution; **KL** = KL(unmodified || setting) of the next token on harmless prompts. Rates: "
                        "95% Wilson intervals; means: 95% bootstrap intervals. Cached per model and setting. The "
                        "same numbers on the command line: `workbench steer battery`.")
                with gr.Column(scale=2):
                    tradeoff = gr.Image(label="trade-off: utility vs harm per column (random control for reference)",
                                        type="pil", interactive=False, elem_id="wb-tradeoff")

            def on_source(s: str) -> tuple:
                return (gr.update(visible=s == "saved vector"), gr.update(visible=s == "probe direction"),
                        gr.update(visible=s in ("saved vector", "probe direction", MAIN_SOURCE)))

            source.change(on_source, source, [vec_group, probe_group, force], api_visibility="private")
            compare.change(lambda c: (gr.update(visible=c), gr.update(visible=c)), compare, [b_group, col_groups[2]],
                           api_visibility="private")

            def opt_updates(name: str) -> tuple:
                choices, value, note, ok = optimised_default(state, name)
                return (gr.update(choices=choices, value=value or ""), gr.update(value=note),
                        gr.update(choices=kind_choices(ok)), gr.update(choices=kind_choices(ok, with_none=True)))

            @user_errors
            def on_model(name: str) -> tuple:
                n = n_layers_hint(state, name)
                src, lay, note = direction_default(state, name, n)
                return (gr.update(maximum=n - 1, value=lay), gr.update(value=state.default_system_prompt(name)),
                        gr.update(value=src), gr.update(value=note), *opt_updates(name))

            model_outputs = [layer, system_prompt, source, direction_note, opt_run, opt_note, a_kind, b_kind]
            model.change(on_model, model, model_outputs, api_visibility="private")
            demo.load(on_model, model, model_outputs, api_visibility="private")
            opt_refresh.click(user_errors(opt_updates), model, [opt_run, opt_note, a_kind, b_kind],
                              api_visibility="private")
            opt_run.change(user_errors(lambda name, path: gr.update(value=optimised_note(state, name, path))),
                           [model, opt_run], opt_note, api_visibility="private")
            for kind in (a_kind, b_kind):
                kind.change(lambda a, c, b: gr.update(open=uses_optimised(a, c, b)), [a_kind, compare, b_kind],
                            opt_box, api_visibility="private")
            go.click(steer_fn,
                     [model, prompt, builtin, system_prompt, source, layer, vector_file, vector_path, probe_folder,
                      probe_method, seed, a_kind, a_strength, a_layers, compare, b_kind, b_strength, b_layers,
                      b_direction, max_new, force, opt_run],
                     [status] + col_outputs, api_name="steer")
            score_go.click(make_score_fn(state),
                           [model, system_prompt, source, layer, vector_file, vector_path, probe_folder, probe_method,
                            seed, a_kind, a_strength, a_layers, compare, b_kind, b_strength, b_layers, b_direction,
                            force, n_harmful, n_tasks, n_harmless, opt_run],
                           [score_status] + battery_outputs + [tradeoff], api_name="score")

        with gr.Tab("Probes", id="probes"):
            gr.Markdown("Load a probes run folder (`workbench probe --out ...`, `workbench overlap --out ...`, or a "
                        "main-job folder) or run a quick per-layer sweep here.")
            probe_folder_dd, probe_load = _folder_viewer(
                state, ("probe_layers.json", "probe_layers.csv", "overlap.csv"), "probe_auroc_vs_layer.png",
                runs_roots, "probes", "probes / overlap run folder")
            with gr.Accordion("Run a per-layer probe sweep (harmful vs harmless)", open=False):
                with gr.Row():
                    sweep_model = gr.Dropdown(choices=state.names, value=state.default_model, label="model")
                    sweep_n = gr.Slider(8, 96, value=24, step=8, label="prompts per class and split")
                    sweep_boot = gr.Slider(50, 1000, value=100, step=50, label="bootstrap resamples (AUROC CI)")
                with gr.Row():
                    sweep_overlap = gr.Checkbox(value=False, label="also run the activation-overlap analysis")
                    sweep_out = gr.Textbox(lines=1, label=f"output folder inside the runs folder {state.runs_root} "
                                                          f"(relative to it; empty = {state.runs_dir}/probes-<time>)")
                    sweep_go = gr.Button("Run sweep", variant="primary")
                sweep_status = gr.Markdown()

            @user_errors
            def run_sweep(name: str, n: float, n_boot: float, overlap: bool, out: str) -> tuple:
                path = run_probe_sweep(state, name, int(n), int(n_boot), bool(overlap), out, system_prompt=None)
                return f"sweep written to `{path}`; press Load", str(path)

            sweep_go.click(run_sweep, [sweep_model, sweep_n, sweep_boot, sweep_overlap, sweep_out],
                           [sweep_status, probe_folder_dd], api_name="probe_sweep")

        with gr.Tab("Weight space", id="weightspace"):
            gr.Markdown("Load a weight-space run folder: its overlap heatmaps, projection trade-off plots and "
                        "tables.")
            _folder_viewer(state, ("*.png",), None, runs_roots, "weights", "weight-space run folder")

        with gr.Tab("Study", id="study"):
            gr.Markdown("The weight-space study's verdicts: pick a chain run folder (`workbench weightspace chain "
                        "--out ...`) to see each claim's statistic, 95% interval and verdict (rules fixed in advance: "
                        "`weightspace/verdicts.py`), the controls and the plots.")
            _study_viewer(state, runs_roots)

    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    return demo


def run_probe_sweep(state: AppState, name: str, n: int, n_boot: int, overlap: bool, out: str | None,
                    system_prompt: str | None = None) -> Path:
    """A quick probe sweep (and optionally the overlap analysis) into a run folder inside the runs root (``out``
    relative to it; default ``<runs_dir>/probes-<time>``); returns its final path."""
    from probes.cli import default_overlap_sets, run_overlap
    from probes.cli import run_probe_sweep as sweep
    from workbench.runs import RunFolder

    if not 4 <= n <= 400:
        raise WorkbenchError(f"prompts per class must be between 4 and 400, got {n}")
    # checked before anything is loaded or written
    if out and out.strip():
        path = confine(out, state.runs_root, "an output folder", allow_root=False)
    else:
        path = state.runs_dir / time.strftime("probes-%Y%m%d-%H%M%S")
    slot = state.slot(name)
    lm = slot.get()
    fmt = state.chat_format(system_prompt if system_prompt is not None else state.default_system_prompt(name))
    with _run_folder(RunFolder(path, config={"command": "app-probe-sweep", "model": slot.name, "n": n,
                                             "n_boot": n_boot}, overwrite=False)) as run:
        run.record_model(lm)
        with slot.lock:
            sweep(lm, fmt, run, "harmful", "harmless", n_boot=max(0, n_boot), limit=n)
            if overlap:
                sets = {k: v[:n] for k, v in default_overlap_sets().items()}
                with _run_folder(RunFolder(run.path / "overlap", config={"stage": "overlap"},
                                           overwrite=True)) as sub:
                    run_overlap(lm, fmt, sub, sets, n_boot=5)
    return Path(getattr(run, "final", run.path))


def _run_folder(run: Any) -> Any:
    """``with`` for a RunFolder: the RunFolder itself where it is a context manager (it writes into a staging
    folder and moves it into place on success), else the folder as is."""
    from contextlib import nullcontext

    return run if hasattr(run, "__enter__") else nullcontext(run)


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = None, block: bool = True,
           quiet: bool = False, auth: Sequence[tuple[str, str]] | None = None, allow_no_auth: bool = False) -> Any:
    """Start the server (127.0.0.1 unless ``host`` says otherwise). Offline-friendly theme: system fonts.

    ``auth``: logins ``[(user, password), ...]`` (Gradio's login page). A host other than loopback needs them
    unless ``allow_no_auth``."""
    from apps.cli import is_loopback

    if not is_loopback(host) and not auth and not allow_no_auth:
        raise WorkbenchError(f"refusing to serve on {host} without a login: a non-loopback host exposes the app to "
                             f"the network; pass auth=[(user, password)] (or allow_no_auth=True)")
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    return demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=quiet,
                       theme=theme, css=CSS, footer_links=["api"], show_error=True,
                       auth=[tuple(a) for a in auth] if auth else None)


__all__ = ["build_app", "launch", "make_steer_fn", "make_score_fn", "study_outputs", "battery_frame",
           "direction_default", "column_specs", "optimised_default", "optimised_note", "kind_choices", "default_registry", "folder_outputs", "run_probe_sweep",
           "user_errors", "Render", "SCORE_HEADERS", "SCORE_NAMES", "score_table"]
