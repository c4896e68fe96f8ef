"""What the app shares between users: models (loaded lazily), their locks, and caches of directions and
orthogonalised copies.

PyTorch module hooks are global to a module, so two threads running hooked forwards on one model at
once would see each other's interventions. Every forward pass the app makes on a model (or on a copy
derived from it) therefore runs under that model's :attr:`ModelSlot.lock`; hooks are registered after
taking it and removed before releasing it.

Paths: every server path a request names (a saved vector file, a probes run folder) is resolved and must
lie inside :attr:`AppState.runs_root` (see :mod:`apps.paths`); a direction file computed on another model
(another checksum) is refused unless the request sets ``force``, as on the command line.

>>> from workbench.tiny import build_tiny
>>> from workbench.loading import from_memory
>>> state = AppState({"tiny": from_memory(*build_tiny("llama"))})
>>> state.slot("tiny").get().n_layers
2
"""

from __future__ import annotations

import copy
import hashlib
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from apps.paths import confine, readable_file, readable_folder, resolve_root
from workbench.backends import get_backend
from workbench.backends.base import Backend
from workbench.chat import ChatFormat
from workbench.errors import WorkbenchError
from workbench.loading import LoadedModel
from workbench.vectors import Direction, load_directions

if TYPE_CHECKING:
    from apps.optimised import OptimisedRun

SOURCES = ("main-job direction", "mean-diff", "saved vector", "probe direction", "random control")
MAIN_SOURCE = "main-job direction"
SOURCE_LABELS = {
    "main-job direction": "the main job's selected direction (runs folder: <main run>/steering)",
    "mean-diff": "difference in means (built-in harmful vs harmless, train split)",
    "saved vector": "a saved vector file (.safetensors)",
    "probe direction": "a probe direction (probes run folder)",
    "random control": "random control (same norm as the difference in means)",
}
PROBE_METHODS = ("logistic", "mean_diff")

@dataclass
class MainJobDirection:
    """The direction a main-job run selected and evaluated (``<run>/steering/selected_direction.safetensors``)
    with its evaluation numbers (``acceptance.json``, ``evaluation.json``), read inside the runs root."""

    folder: Path  # the steering sub-folder
    direction: Direction
    acceptance: dict[str, Any]
    evaluation: list[dict[str, Any]]

    def summary(self) -> str:
        d, a = self.direction, self.acceptance
        rows = {r.get("condition"): r for r in self.evaluation if isinstance(r, dict)}
        parts = [f"layer {d.layer}, position {d.position}, {d.component}, norm {d.norm:.3g}, model {d.model_id}"]
        base, abl, add = rows.get("unmodified"), rows.get("ablation"), rows.get("addition")

        def rate(r: dict[str, Any], k: str) -> str:
            lo, hi = r.get(k + "_lo"), r.get(k + "_hi")
            ci = f" [{100 * lo:.0f}, {100 * hi:.0f}]" if lo is not None and hi is not None else ""
            return f"{100 * r[k]:.0f} %{ci}"

        if base and abl and "harmful_refusal_rate" in base:
            parts.append(f"main-job evaluation (harmful:test, N={base.get('n_harmful', '?')}): ablation takes harmful "
                         f"refusal {rate(base, 'harmful_refusal_rate')} -> {rate(abl, 'harmful_refusal_rate')} at KL "
                         f"{abl.get('kl_harmless', float('nan')):.3f}")
        if base and add and "harmless_refusal_rate" in add:
            parts.append(f"addition (alpha {a.get('addition_alpha', '?')}) makes {rate(add, 'harmless_refusal_rate')} "
                         f"of harmless prompts refused")
        for k in ("random ablation", "random addition"):
            r = rows.get(k)
            if r and base:
                key = "harmful_refusal_rate" if k == "random ablation" else "harmless_refusal_rate"
                parts.append(f"{k} control: {rate(r, key)}")
        opt = rows.get("optimised ablation")  # the fast path (workbench main --optimize-trials N)
        if opt and base and "harmful_refusal_rate" in opt:
            parts.append(f"optimised ablation (main job, trial {opt.get('info_trial', '?')}): harmful refusal "
                         f"{rate(opt, 'harmful_refusal_rate')} at KL {opt.get('kl_harmless', float('nan')):.3f}")
        if len(parts) == 1:
            parts.append("no evaluation numbers in this run folder")
        return "; ".join(parts)


def find_main_job(root: str | Path) -> MainJobDirection | None:
    """The newest main-job steering folder under the runs root (a ``steering`` folder holding
    ``selected_direction.safetensors`` and ``acceptance.json`` or ``evaluation.json``), or None."""
    from apps.folders import find_run_folders
    from workbench.io import read_json

    r = resolve_root(root)
    for folder in find_run_folders([r], ("selected_direction.safetensors",)):
        f = Path(folder)
        if f.name != "steering":
            continue
        try:
            dfile = readable_file(f / "selected_direction.safetensors", r, "direction file")
            dirs = load_directions(dfile)
            acc, ev = {}, []
            for name in ("acceptance.json", "evaluation.json"):
                try:
                    obj = read_json(readable_file(f / name, r, name))
                except (WorkbenchError, OSError, ValueError):
                    continue
                if name == "acceptance.json" and isinstance(obj, dict):
                    acc = obj
                elif isinstance(obj, list):
                    ev = obj
            if not acc and not ev:
                continue
        except (WorkbenchError, OSError, ValueError):
            continue
        return MainJobDirection(f, dirs[0], acc, ev)
    return None


def direction_key(d: Direction) -> str:
    """Content hash of a direction (vector, layer, component)."""
    h = hashlib.sha256(d.vector.detach().float().contiguous().numpy().tobytes())
    h.update(f"{d.layer}|{d.component}".encode())
    return h.hexdigest()[:24]


class ModelSlot:
    """One named model: loaded on first use, with its lock, backend and caches."""

    def __init__(self, name: str, source: LoadedModel | Callable[[], LoadedModel], *, n_train: int = 32,
                 ortho_cache_size: int = 2, disk_cache: bool = True) -> None:
        self.name = name
        self.lock = threading.RLock()  # every forward pass on this model or a copy derived from it
        self._load_lock = threading.Lock()
        self._lm: LoadedModel | None = source if isinstance(source, LoadedModel) else None
        self._loader = None if isinstance(source, LoadedModel) else source
        self._backend: Backend | None = None
        self.n_train = int(n_train)
        self.disk_cache = disk_cache
        self._dirs: dict[str, dict[int, Direction]] = {}
        self._dirs_lock = threading.Lock()
        self._ortho: OrderedDict[str, Backend] = OrderedDict()
        self._ortho_lock = threading.Lock()
        self.ortho_cache_size = max(1, int(ortho_cache_size))
        self.load_seconds: float | None = None
        self.load_error: str | None = None

    @property
    def loaded(self) -> bool:
        return self._lm is not None

    def get(self) -> LoadedModel:
        """The model, loading it on first use (concurrent callers wait for one load)."""
        if self._lm is not None:
            return self._lm
        with self._load_lock:
            if self._lm is None:
                assert self._loader is not None
                t0 = time.perf_counter()
                try:
                    lm = self._loader()
                except WorkbenchError as e:
                    self.load_error = str(e)
                    raise
                self.load_seconds = time.perf_counter() - t0
                self.load_error = None
                self._lm = lm
                print(f"[app] model '{self.name}' ready (loaded in {self.load_seconds:.1f} s)", file=sys.stderr,
                      flush=True)
        return self._lm

    def backend(self) -> Backend:
        lm = self.get()
        if self._backend is None:
            self._backend = get_backend("native", lm)
        return self._backend

    # -- directions ---------------------------------------------------------------------------------

    def mean_diff_all_layers(self, fmt: ChatFormat) -> dict[int, Direction]:
        """Difference-in-means directions at every layer (resid_pre, last prompt token) from the first
        ``n_train`` prompts of the built-in harmful / harmless train splits; computed once per model and
        chat format (one capture pass gives every layer)."""
        from steering.directions import mean_diff_directions
        from workbench.prompts import builtin_split

        lm = self.get()
        key = f"{lm.checksum}|{fmt.template_hash(lm.tokenizer)}|{self.n_train}"
        with self._dirs_lock:
            if key not in self._dirs:
                pos = builtin_split("harmful", "train").texts[: self.n_train]
                neg = builtin_split("harmless", "train").texts[: self.n_train]
                t0 = time.perf_counter()
                with self.lock:
                    dirs = mean_diff_directions(lm, pos, neg, fmt=fmt, layers="all", positions=["last"],
                                                component="resid_pre", cache=self.disk_cache)
                print(f"[app] mean-diff directions for '{self.name}' ({len(dirs)} layers, {len(pos)}+{len(neg)} "
                      f"prompts) in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
                self._dirs[key] = {d.layer: d for d in dirs}
            return self._dirs[key]

    def mean_diff(self, fmt: ChatFormat, layer: int) -> Direction:
        lm = self.get()
        layer = _check_layer(layer, lm.n_layers)
        d = self.mean_diff_all_layers(fmt)[layer]
        if d.norm == 0:
            raise WorkbenchError(
                f"the difference-in-means direction at layer {layer} is zero: the residual input there is the same "
                f"for every prompt's last token (at layer 0 it is just that token's embedding). Pick a later layer."
            )
        return d

    # -- orthogonalised copies -------------------------------------------------------------------

    def orthogonalised(self, direction: Direction) -> Backend:
        """A backend over an in-memory copy of the model with its residual-writing weights orthogonalised
        to ``direction`` (cached per direction, least recently used copies dropped)."""
        from steering.orthogonalize import orthogonalize_model
        from workbench.loading import LoadedModel as LM

        lm = self.get()
        _check_width(direction, lm)
        key = direction_key(direction)
        with self._ortho_lock:
            if key in self._ortho:
                self._ortho.move_to_end(key)
                return self._ortho[key]
            t0 = time.perf_counter()
            with self.lock:  # deepcopy copies module hooks too: copy only while no other call has any
                model = copy.deepcopy(lm.model)
            model.requires_grad_(False)
            try:
                orthogonalize_model(model, direction.vector)
            except WorkbenchError:
                del model
                raise
            model.eval()
            olm = LM(model, lm.tokenizer, f"{lm.model_id}+ortho[{key[:8]}]", f"{lm.checksum}+ortho:{key}",
                     "memory", lm.default_system_prompt, {"orthogonalised_against": direction.record()})
            be = get_backend("native", olm)
            self._ortho[key] = be
            while len(self._ortho) > self.ortho_cache_size:
                self._ortho.popitem(last=False)
            print(f"[app] orthogonalised copy of '{self.name}' in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
                  flush=True)
            return be


def _check_layer(layer: Any, n_layers: int) -> int:
    try:
        i = int(layer)
    except (TypeError, ValueError):
        raise WorkbenchError(f"layer must be an integer, got {layer!r}") from None
    if not 0 <= i < n_layers:
        raise WorkbenchError(f"layer {i} is out of range: this model has {n_layers} layers (0..{n_layers - 1})")
    return i


def _check_width(d: Direction, lm: LoadedModel) -> None:
    if d.d_model != lm.d_model or d.vector.numel() != lm.d_model:
        raise WorkbenchError(
            f"bad vector width: this direction has {d.vector.numel()} values but model '{lm.model_id}' has "
            f"d_model {lm.d_model}"
        )


@dataclass
class ResolvedDirection:
    direction: Direction
    note: str  # shown in the status box


class AppState:
    """Models by name (``LoadedModel`` or a zero-argument loader), limits and caches.

    ``runs_root``: the only folder whose files requests may name (resolved; see :mod:`apps.paths`);
    ``runs_dir``: where the app writes its own run folders, relative to ``runs_root`` unless absolute, and
    inside it (default ``<runs_root>/app``)."""

    def __init__(self, models: Mapping[str, LoadedModel | Callable[[], LoadedModel]], default_model: str | None = None,
                 *, max_new_tokens_limit: int = 128, max_prompt_tokens: int = 512, max_prompts: int = 8,
                 n_train: int = 32, ortho_cache_size: int = 2, disk_cache: bool = True,
                 runs_dir: str | Path | None = None, raw: bool = False,
                 system_prompt: str | None = None, runs_root: str | Path = "runs") -> None:
        if not models:
            raise WorkbenchError("the app needs at least one model")
        if max_new_tokens_limit < 1:
            raise WorkbenchError(f"max_new_tokens_limit must be >= 1, got {max_new_tokens_limit}")
        self.slots = {name: ModelSlot(name, src, n_train=n_train, ortho_cache_size=ortho_cache_size,
                                      disk_cache=disk_cache) for name, src in models.items()}
        self.default_model = default_model or next(iter(self.slots))
        if self.default_model not in self.slots:
            raise WorkbenchError(f"default model '{self.default_model}' is not among {', '.join(self.slots)}")
        self.max_new_tokens_limit = int(max_new_tokens_limit)
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.max_prompts = int(max_prompts)
        # every server path a request names must lie inside runs_root; the app's own outputs go to runs_dir
        self.runs_root = resolve_root(runs_root)
        self.runs_dir = confine(runs_dir if runs_dir is not None else "app", self.runs_root, "the app's output folder")
        self.raw = raw
        self.system_prompt_override = system_prompt
        self.judge: Any = None  # an optional harm judge for the batteries (workbench.scoring.Judge)
        from steering.battery import BatteryConfig

        self.battery = BatteryConfig()  # token limits, batch size, bootstrap size of the batteries
        self.battery_cache: OrderedDict[str, dict[str, Any]] = OrderedDict()  # (model, format, setting, size) -> row
        self.battery_cache_size = 256
        self._battery_lock = threading.Lock()
        self._main_job: tuple[float, MainJobDirection | None] | None = None

    def main_job(self, max_age: float = 10.0) -> MainJobDirection | None:
        """The main job's selected direction under the runs root (re-scanned at most every ``max_age`` s)."""
        now = time.monotonic()
        if self._main_job is None or now - self._main_job[0] > max_age:
            self._main_job = (now, find_main_job(self.runs_root))
        return self._main_job[1]

    def main_job_for(self, name: str | None) -> MainJobDirection | None:
        """The main job's direction when it was made on model ``name`` (its recorded model id is the zoo key or
        the loaded model's id, or its checksum is the loaded model's), else None."""
        mj = self.main_job()
        if mj is None:
            return None
        slot = self.slot(name)
        if mj.direction.model_id == slot.name:
            return mj
        if slot.loaded:
            lm = slot.get()
            if mj.direction.model_checksum == lm.checksum or mj.direction.model_id == lm.model_id:
                return mj
        return None

    def optimised_runs(self, name: str | None) -> tuple[list[OptimisedRun], list[OptimisedRun]]:
        """The ``steer optimize`` runs under the runs root (:mod:`apps.optimised`), newest first: those made on
        model ``name`` (its checksum once loaded; before that, its recorded model id is the slot's name) and the
        others."""
        from apps.optimised import scan_optimised_runs

        slot = self.slot(name)
        lm = slot.get() if slot.loaded else None
        mine, other = [], []
        for run in scan_optimised_runs(self.runs_root):
            ok = run.made_on(lm) if lm is not None else run.direction.model_id == slot.name
            (mine if ok else other).append(run)
        return mine, other

    def resolve_optimised(self, name: str | None, user_path: str | None = None) -> OptimisedRun:
        """The optimised ablation a request uses: the run in ``user_path`` (inside the runs root only), or the
        newest one made on this model; refused with a one-line message when made on another model or when there
        is none (with the command that makes one)."""
        from apps.optimised import load_optimised_run, no_run_message

        slot = self.slot(name)
        lm = slot.get()
        if user_path is None or not str(user_path).strip():
            mine, other = self.optimised_runs(slot.name)
            if not mine:
                raise WorkbenchError(no_run_message(self.runs_root, slot.name, other))
            return mine[0]
        run = load_optimised_run(user_path, self.runs_root)
        run.check_model(lm, slot.name, self.runs_root)
        return run

    def battery_get(self, key: str) -> dict[str, Any] | None:
        with self._battery_lock:
            row = self.battery_cache.get(key)
            if row is not None:
                self.battery_cache.move_to_end(key)
            return row

    def battery_put(self, key: str, row: dict[str, Any]) -> None:
        with self._battery_lock:
            self.battery_cache[key] = row
            while len(self.battery_cache) > self.battery_cache_size:
                self.battery_cache.popitem(last=False)

    @property
    def names(self) -> list[str]:
        return list(self.slots)

    def slot(self, name: str | None) -> ModelSlot:
        name = name or self.default_model
        if name not in self.slots:
            raise WorkbenchError(f"unknown model '{name}'. Available here: {', '.join(self.slots)}")
        return self.slots[name]

    def preload(self, name: str | None = None) -> threading.Thread:
        """Load a model in a background thread (the server answers meanwhile; calls wait for the load)."""
        slot = self.slot(name)

        def run() -> None:
            try:
                slot.get()
            except Exception as e:  # reported to the user on first use
                print(f"[app] could not load '{slot.name}': {e}", file=sys.stderr, flush=True)

        t = threading.Thread(target=run, name=f"preload-{slot.name}", daemon=True)
        t.start()
        return t

    def default_system_prompt(self, name: str | None) -> str:
        """The system prompt the Steer tab starts with for a model (the zoo's recommendation, if any)."""
        if self.system_prompt_override is not None:
            return self.system_prompt_override
        from workbench.zoo import ZOO

        slot = self.slot(name)
        if slot.loaded:
            return slot.get().default_system_prompt or ""
        entry = ZOO.get(slot.name)
        return (entry.default_system_prompt or "") if entry is not None else ""

    def chat_format(self, system_prompt: str | None) -> ChatFormat:
        sp = (system_prompt or "").strip() or None
        return ChatFormat(system_prompt=None if self.raw else sp, raw=self.raw)

    def validate_max_new_tokens(self, n: Any) -> int:
        try:
            v = int(n)
        except (TypeError, ValueError):
            raise WorkbenchError(f"max new tokens must be an integer, got {n!r}") from None
        if float(n) != v:
            raise WorkbenchError(f"max new tokens must be an integer, got {n!r}")
        if not 1 <= v <= self.max_new_tokens_limit:
            raise WorkbenchError(
                f"too many tokens: max new tokens must be between 1 and {self.max_new_tokens_limit} "
                f"(got {v}); the limit is set with --max-new-tokens-limit"
            )
        return v

    def resolve_direction(self, model: str | None, source: str, *, layer: Any, fmt: ChatFormat,
                          vector_file: str | None = None, probe_folder: str | None = None,
                          probe_method: str = "logistic", seed: int = 0, force: bool = False,
                          upload_root: str | Path | None = None) -> ResolvedDirection:
        """The direction a Steer request uses, checked against the model.

        ``vector_file`` and ``probe_folder`` must lie inside :attr:`runs_root` (relative paths are relative
        to it), or, for a file the user uploaded, inside ``upload_root`` (Gradio's upload folder). A direction
        file made on a model with another checksum is refused unless ``force``."""
        slot = self.slot(model)
        lm = slot.get()
        if source not in SOURCES:
            raise WorkbenchError(f"unknown direction source '{source}'. Valid: {', '.join(SOURCES)}")
        if source == MAIN_SOURCE:
            mj = self.main_job()
            if mj is None:
                raise WorkbenchError(f"no main-job run folder under the runs folder {self.runs_root} (run `workbench "
                                     f"main --out {self.runs_root}/main` first, or pick another direction source)")
            d = mj.direction
            note = f"the main job's selected direction from {mj.folder}: {mj.summary()}"
            if d.model_checksum != lm.checksum:
                if not force:
                    raise WorkbenchError(
                        f"the main job's direction in {mj.folder} was computed on model '{d.model_id}' (checksum "
                        f"{d.model_checksum[:12]}) but this is '{lm.model_id}' (checksum {lm.checksum[:12]}); pick "
                        f"another direction source, or tick 'force' if that is intended")
                note += f" (forced: computed on '{d.model_id}')"
        elif source == "mean-diff":
            d = slot.mean_diff(fmt, layer)
            note = f"difference in means of {slot.n_train}+{slot.n_train} built-in train prompts"
        elif source == "random control":
            from steering.directions import random_like

            d = random_like(slot.mean_diff(fmt, layer), seed=int(seed))
            note = f"random direction (seed {int(seed)}) with the norm of the difference in means"
        elif source == "saved vector":
            path = readable_file(vector_file, upload_root if upload_root is not None else self.runs_root,
                                 "direction file")
            dirs = load_directions(path)
            d = _pick_layer(dirs, layer, str(path))
            note = f"loaded from {path}"
        else:
            if probe_folder is not None and str(probe_folder).strip().endswith(".safetensors"):
                path = folder = readable_file(probe_folder, self.runs_root, "probes run folder")
            else:
                folder = readable_folder(probe_folder, self.runs_root, "probes run folder")
                path = folder / "probe_directions.safetensors"
            if not path.is_file() or _outside(path, self.runs_root):
                raise WorkbenchError(f"{folder} has no probe_directions.safetensors; run `workbench probe` (or the "
                                     f"Probes tab) first, or give the folder of such a run")
            if probe_method not in PROBE_METHODS:
                raise WorkbenchError(f"unknown probe method '{probe_method}'. Valid: {', '.join(PROBE_METHODS)}")
            dirs = [x for x in load_directions(path) if x.method == probe_method]
            if not dirs:
                raise WorkbenchError(f"{path} holds no '{probe_method}' directions")
            d = _pick_layer(dirs, layer, str(path))
            note = f"{probe_method} probe direction from {path}"
        _check_width(d, lm)
        _check_layer(d.layer, lm.n_layers)
        if d.model_checksum != lm.checksum and source in ("saved vector", "probe direction"):
            # the rule of workbench.vectors.Direction.check_compatible (the CLI's --force)
            if not force:
                raise WorkbenchError(
                    f"this direction was computed on model '{d.model_id}' (checksum {d.model_checksum[:12]}) but "
                    f"is being applied to '{lm.model_id}' (checksum {lm.checksum[:12]}); tick 'force' if that is "
                    f"intended"
                )
            note += (f" (forced: computed on '{d.model_id}', checksum {d.model_checksum[:12]}, not on this model "
                     f"{lm.checksum[:12]})")
        return ResolvedDirection(d, note)


def _outside(path: Path, root: Path) -> bool:
    """True when ``path`` resolves outside ``root`` (e.g. a symlinked probe_directions.safetensors)."""
    try:
        confine(path, root)
    except WorkbenchError:
        return True
    return False


def _pick_layer(dirs: list[Direction], layer: Any, where: str) -> Direction:
    if len(dirs) == 1:
        return dirs[0]
    try:
        want = int(layer)
    except (TypeError, ValueError):
        want = None
    for d in dirs:
        if d.layer == want:
            return d
    have = ", ".join(str(x) for x in sorted({d.layer for d in dirs}))
    raise WorkbenchError(f"{where} has no direction at layer {layer}; it has layers {have}")


__all__ = ["AppState", "ModelSlot", "SOURCES", "SOURCE_LABELS", "PROBE_METHODS", "ResolvedDirection",
           "direction_key", "MAIN_SOURCE", "MainJobDirection", "find_main_job"]
