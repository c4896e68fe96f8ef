"""Executors (:mod:`workbench.executors`): the local one and Ray, unit by unit and end to end.

Unit tests: results come back in task order (Ray workers finish out of order on purpose), ``init`` runs once
per worker (counted in a file every worker appends to), errors reach the driver with the task's number, bad
options are refused before any work. End to end, ``workbench weightspace sweep``, ``workbench steer select`` and
``workbench probe`` / ``workbench overlap`` across two models run with ``--executor local`` and ``--executor ray``
(a local Ray of 2 CPUs, 2 workers) on tiny models saved to Hugging Face folders, and every row they write (CSV and
JSON) is the same to 1e-6. ``workbench weightspace chain`` on Ray writes the fine-tunes of a local chain (tensor for
tensor) and resumes after a kill without running them again.

Ray starts once for the module (:func:`ray_up`); the executor uses a Ray already initialised in the process
and leaves it running. One test lets the executor start and stop a local Ray of its own.
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.executors import (LocalExecutor, ModelSpec, RayExecutor, get_executor, parse_ray_address)

import ray  # noqa: E402  (a dependency: scripts/setup.sh installs it; never skipped)

# The task functions below live in this test module, which Ray workers cannot import by name (the project's
# own task functions can): ship them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TOL = 1e-6


# -- task functions (module level: Ray workers import them by name) ----------------------------------------

def _init(log: str, offset: int = 100) -> dict:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    return {"offset": offset, "pid": os.getpid()}


def _add(state: dict, task: int) -> tuple[int, int, int]:
    time.sleep(0.05 * (task % 3))  # uneven task times: results arrive out of order
    return state["offset"] + task, state["pid"], torch.get_num_threads()


def _fail(state: dict, task: int) -> int:
    if task == 1:
        raise WorkbenchError("task one is bad")
    if task == 2:
        raise KeyError("missing key")
    return task


def _bad_init() -> None:
    raise RuntimeError("could not load the model")


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


# -- Ray for the module --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def _ray_module():
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_up(_ray_module):
    """A local Ray of 2 CPUs in this process (started once, shut down at the end of the module)."""
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            ray.init(num_cpus=2, include_dashboard=False, logging_level="warning",
                     object_store_memory=200 * 1024 * 1024)
        except BaseException:
            ray.shutdown()  # no half-started Ray left behind
            raise
    return ray


# -- unit tests ------------------------------------------------------------------------------------------------

def test_local_executor_runs_in_task_order_with_one_init(tmp_path):
    log = tmp_path / "init.log"
    ex = get_executor("local")
    assert isinstance(ex, LocalExecutor) and ex.in_process and ex.workers == 1
    seen = []
    with ex.pool(partial(_init, str(log))) as pool:
        out = pool.map(_add, [3, 1, 2], on_result=lambda i, r: seen.append(i))
        out2 = pool.map(_add, [5])
        stats = pool.stats()
    assert [r[0] for r in out] == [103, 101, 102] and out2[0][0] == 105
    assert seen == [0, 1, 2]
    assert _lines(log) == [str(os.getpid())]  # once, in this process
    assert stats[0]["tasks"] == 4 and stats[0]["pid"] == os.getpid()
    with pytest.raises(KeyError, match="missing key"):  # an error propagates unchanged
        ex.map(_fail, [0, 2])
    with pytest.raises(RuntimeError, match="could not load"):
        ex.map(_add, [1], init=_bad_init)
    assert ex.map(_add, []) == []


@pytest.mark.parametrize("name, address, workers, message", [
    ("spark", None, None, "unknown executor 'spark'; valid: local, ray"),
    ("local", None, 2, "--workers and --ray-address need --executor ray"),
    ("local", "auto", None, "--workers and --ray-address need --executor ray"),
    ("ray", "10.0.0.5", None, "--ray-address must be 'auto' or HOST:PORT"),
    ("ray", "host:99999", None, "--ray-address must be 'auto' or HOST:PORT"),
    ("ray", "http://host:6379", None, "--ray-address must be 'auto' or HOST:PORT"),
    ("ray", None, 0, "--workers must be >= 1"),
])
def test_bad_executor_options_are_refused(name, address, workers, message):
    with pytest.raises(WorkbenchError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        get_executor(name, address, workers)


def test_ray_addresses_parse():
    assert parse_ray_address(None) is None and parse_ray_address("") is None
    assert parse_ray_address("auto") == "auto"
    assert parse_ray_address("10.0.0.5:6379") == "10.0.0.5:6379"
    assert parse_ray_address("ray://head.example:10001") == "ray://head.example:10001"


def test_a_silent_host_port_is_refused_in_seconds(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process
    with socket.socket() as s:  # a free port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(WorkbenchError, match=rf"no Ray cluster answers at 127.0.0.1:{port} .*ray start --head"):
        get_executor("ray", f"127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 10


def test_missing_ray_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(WorkbenchError, match=r"--executor ray needs the 'ray' package \(pip install 'ray==2.60.0'"):
        get_executor("ray")


def test_ray_executor_starts_and_stops_its_own_local_ray(tmp_path):
    """No Ray in the process: the executor starts one (2 CPUs here, one per worker) and shuts it down after."""
    if ray.is_initialized():  # left by another test's fixture: this test needs a process without Ray
        ray.shutdown()
    log = tmp_path / "init.log"
    ex = RayExecutor(workers=2)
    with ex.pool(partial(_init, str(log))) as pool:
        out = pool.map(_add, list(range(6)))
        assert ray.is_initialized() and int(ray.cluster_resources()["CPU"]) == max(2, os.cpu_count() or 1)
        stats = pool.stats()
    assert not ray.is_initialized()
    assert [r[0] for r in out] == [100 + i for i in range(6)]
    assert len(stats) == 2 and sum(s["tasks"] for s in stats) == 6
    cpus = max(2, os.cpu_count() or 1) // 2
    assert {r[2] for r in out} == {cpus} and all(s["threads"] == cpus for s in stats)  # torch threads = CPU share
    assert sorted(_lines(log)) == sorted(str(s["pid"]) for s in stats)  # init once per worker
    assert str(os.getpid()) not in _lines(log)


def test_ray_pool_keeps_order_inits_once_per_worker_and_reports_errors(ray_up, tmp_path):
    log = tmp_path / "init.log"
    ex = get_executor("ray", workers=2)
    arrived = []
    with ex.pool(partial(_init, str(log), offset=10)) as pool:
        assert pool.size == 2
        out = pool.map(_add, list(range(9)), on_result=lambda i, r: arrived.append(i))
        out2 = pool.map(_add, [20, 21, 22])  # same workers, no second init
        stats = pool.stats()
        with pytest.raises(WorkbenchError, match=r"^task one is bad \(task 2 of 3 on a Ray worker\)$"):
            pool.map(_fail, [0, 1, 0])
        with pytest.raises(KeyError, match="missing key") as e:
            pool.map(_fail, [2])
        assert "task 1 of 1 on a Ray worker" in "\n".join(getattr(e.value, "__notes__", []))
    assert ray.is_initialized()  # a Ray the executor did not start stays up
    assert [r[0] for r in out] == [10 + i for i in range(9)] and [r[0] for r in out2] == [30, 31, 32]
    assert sorted(arrived) == list(range(9))
    pids = {r[1] for r in out + out2}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes, not the driver
    assert sorted(_lines(log)) == sorted(str(p) for p in pids)  # init once per worker for all 12 tasks
    assert sum(s["tasks"] for s in stats) == 12 and all(s["threads"] == 1 for s in stats)

    with pytest.raises(RuntimeError, match="could not load the model") as e:  # a failing init, named as such
        ex.map(_add, [1, 2], init=_bad_init)
    assert "raised by the worker's init" in "\n".join(e.value.__notes__)
    assert ex.map(_add, [], init=_bad_init) == []  # no task, no worker


def test_fewer_tasks_than_workers_start_fewer_workers(ray_up, tmp_path):
    log = tmp_path / "init.log"
    assert [r[0] for r in get_executor("ray", workers=2).map(_add, [7], init=partial(_init, str(log)))] == [107]
    assert len(_lines(log)) == 1


def test_gpu_workers_on_a_cluster_without_the_gpus_are_refused_at_once(ray_up, tmp_path):
    """Workers that reserve more GPUs than the cluster has would stay pending forever: refused in seconds when the
    pool opens, no worker started (the module's Ray of 2 CPUs has no GPU on a CPU-only machine; on a GPU machine
    one more GPU than it has is asked for)."""
    have = ray.cluster_resources().get("GPU", 0)
    need = int(have) + 1
    log = tmp_path / "init.log"
    t0 = time.perf_counter()
    with pytest.raises(WorkbenchError, match=rf"^--ray-gpus-per-worker {need}: a worker needs {need} GPU\(s\) but the "
                                             rf"Ray cluster has {have:g} \(CPU 2.*\); "
                                             rf"Ray would keep the workers pending forever. Start the Ray nodes on "
                                             rf"machines with GPUs"):
        RayExecutor(workers=2, gpus_per_worker=need).map(_add, [1, 2], init=partial(_init, str(log)))
    if have == 0:  # --device cuda on Ray reserves one GPU per worker by default: the same refusal
        with pytest.raises(WorkbenchError, match=r"^--ray-gpus-per-worker 1: a worker needs 1 GPU\(s\)"):
            get_executor("ray", workers=2, device="cuda").map(_add, [1], init=partial(_init, str(log)))
    assert time.perf_counter() - t0 < 10
    assert not _lines(log)  # no worker started
    for _ in range(50):  # the actors of earlier tests are released asynchronously
        if ray.available_resources().get("CPU") == 2:
            break
        time.sleep(0.1)
    assert ray.is_initialized() and ray.available_resources().get("CPU") == 2  # nothing pending, nothing held


# -- end to end: the same rows from both executors ----------------------------------------------------------

def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _same_value(a, b) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        try:
            fa, fb = float(a), float(b)
        except ValueError:
            return a == b
        return (math.isnan(fa) and math.isnan(fb)) or math.isclose(fa, fb, rel_tol=TOL, abs_tol=TOL)
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=TOL, abs_tol=TOL)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b


def _assert_same_rows(a: list, b: list, what: str) -> None:
    assert len(a) == len(b) and a, f"{what}: {len(a)} vs {len(b)} rows"
    for i, (ra, rb) in enumerate(zip(a, b)):
        assert list(ra) == list(rb), f"{what} row {i}: columns differ"
        bad = [k for k in ra if not _same_value(ra[k], rb[k])]
        assert not bad, f"{what} row {i}: {[(k, ra[k], rb[k]) for k in bad]}"


def _assert_same_csvs(local: Path, remote: Path) -> int:
    files = sorted(p.relative_to(local) for p in local.rglob("*.csv"))
    assert files == sorted(p.relative_to(remote) for p in remote.rglob("*.csv"))
    for rel in files:
        ra, rb = _read_csv(local / rel), _read_csv(remote / rel)
        if ra or rb:
            _assert_same_rows(ra, rb, str(rel))
    return len(files)


def _main(*argv: str) -> None:
    from workbench.cli import main

    assert main(["--threads", "1", *argv]) == 0


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """aligned, base and three fine-tunes of a tiny Llama in HF folders (low-rank updates on two q projections)."""
    from workbench.tiny import build_tiny

    root = tmp_path_factory.mktemp("exec-sweep")
    g = torch.Generator().manual_seed(3)

    def low_rank(k: int, scale: float) -> torch.Tensor:
        return scale * torch.randn(64, k, generator=g) @ torch.randn(k, 64, generator=g) / 8

    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)]
    ups = {"base": {n: -low_rank(4, 1.0) for n in names}, "aligned": {},
           "useful": {n: low_rank(2, 0.6) for n in names}, "harmful": {n: low_rank(2, 0.6) for n in names}}
    ups["contaminated"] = {n: ups["useful"][n] + ups["harmful"][n] for n in names}
    out = {}
    for name, upd in ups.items():
        model, tok = build_tiny("llama", seed=0)
        with torch.no_grad():
            for n, u in upd.items():
                model.state_dict()[n].add_(u)
        model.save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
        out[name] = str(root / name)
    out["root"] = root
    return out


def test_weightspace_sweep_on_ray_writes_the_rows_of_a_local_run(ray_up, planted, tmp_cache, monkeypatch):
    common = ["weightspace", "sweep", "--aligned", planted["aligned"], "--reference-base", planted["base"],
              "--useful", planted["useful"], "--harmful", planted["harmful"], "--contaminated", planted["contaminated"],
              "--rhos", "0.25,0.5", "--kinds", "topk,random", "--n-harmful", "2", "--n-tasks", "2",
              "--max-new-tokens", "3", "--task-tokens", "4", "--batch-size", "2", "--no-progress"]
    local, remote = planted["root"] / "local", planted["root"] / "ray"
    _main(*common, "--out", str(local))
    _main(*common, "--out", str(remote), "--executor", "ray", "--workers", "2")
    n = _assert_same_csvs(local, remote)
    assert n == 5 + (2 + 1 + 1 + 2) + 4 * (1 + 1 + 2)  # 5 tables; per model scored, utility.csv and / or harmful.csv
    ja, jb = (json.loads((p / "results.json").read_text()) for p in (local, remote))
    _assert_same_rows(ja["rows"], jb["rows"], "results.json rows")
    _assert_same_rows(ja["paired"], jb["paired"], "results.json paired")
    assert _same_value(ja["baselines"], jb["baselines"])
    assert ja["executor"]["executor"] == "local" and jb["executor"]["executor"] == "ray"
    stats = jb["executor"]["worker_stats"]
    assert len(stats) == 2 and sum(s["tasks"] for s in stats) == 4 + 12  # every model scored once, on a worker
    assert all(s["pid"] != os.getpid() for s in stats)
    cfg = json.loads((remote / "config.json").read_text())
    assert cfg["executor"] == "ray" and cfg["workers"] == 2

    # Interrupted while the workers score (Ctrl-C / SIGTERM on the driver): as locally, the earlier result stays,
    # no staging folder is left, and the workers are released (their CPUs free again).
    import weightspace.sweep as sweep_mod

    before = (remote / "results.csv").read_bytes()
    calls = []

    def interrupt(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(sweep_mod, "_save_eval", interrupt)
    from workbench.cli import main

    assert main(["--threads", "1", *common, "--out", str(remote), "--overwrite", "--executor", "ray"]) == 130
    assert (remote / "results.csv").read_bytes() == before
    assert not [p for p in remote.parent.iterdir() if p.name.startswith(".ray.tmp")]
    for _ in range(50):
        if ray.available_resources().get("CPU") == 2:
            break
        time.sleep(0.1)
    assert ray.available_resources().get("CPU") == 2


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from workbench.tiny import build_tiny

    root = tmp_path_factory.mktemp("exec-select")
    model, tok = build_tiny("llama", n_layers=4)
    model.save_pretrained(str(root / "tiny"))
    tok.save_pretrained(str(root / "tiny"))
    return root


@pytest.mark.parametrize("mode", [["--top-k", "2", "--kl-max", "0.7"], ["--top-k", "3", "--kl-max", "0.4"], ["--exhaustive", "--kl-max", "0.4"]],
                         ids=["screened", "screened-none-passes", "exhaustive"])
def test_steer_select_on_ray_writes_the_rows_of_a_local_run(ray_up, tiny_folder, tmp_cache, mode):
    common = ["steer", "select", "--model", str(tiny_folder / "tiny"), "--dtype", "float32", "--limit", "4",
              "--n-val", "3", *mode]
    tag = "-".join(m.strip("-") for m in mode)
    local, remote = tiny_folder / f"local-{tag}", tiny_folder / f"ray-{tag}"
    _main(*common, "--out", str(local))
    _main(*common, "--out", str(remote), "--executor", "ray", "--workers", "2")
    _assert_same_rows(_read_csv(local / "selection.csv"), _read_csv(remote / "selection.csv"), "selection.csv")
    ja, jb = (json.loads((p / "selection.json").read_text()) for p in (local, remote))
    _assert_same_rows(ja["rows"], jb["rows"], "selection.json rows")
    assert _same_value(ja["baseline"], jb["baseline"]) and ja["selected"] == jb["selected"]
    for k in ("n_exact_ablation", "n_exact_filters", "groups", "n_nonzero"):
        assert ja["screening"][k] == jb["screening"][k], k
    assert jb["screening"]["executor"]["executor"] == "ray"
    assert sum(s["tasks"] for s in jb["screening"]["executor"]["worker_stats"]) >= 1
    from safetensors.torch import load_file

    a, b = (load_file(str(p / "selected_direction.safetensors")) for p in (local, remote))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Two tiny Llamas (seeds 0 and 1) and two 20-prompt files (tests/tiny_models.py)."""
    from tiny_models import save_tiny_pair

    return save_tiny_pair(tmp_path_factory.mktemp("exec-across"))


TIMING = ("capture_seconds", "fit_seconds", "fit_over_capture")


@pytest.mark.parametrize("command", ["probe", "overlap"])
def test_probe_and_overlap_across_models_on_ray_write_the_rows_of_a_local_run(ray_up, tiny_pair, tmp_cache, command):
    """Each model one task: two tasks on two Ray workers write the rows (per model and combined) of a local run."""
    options = (["--positive", str(tiny_pair["pos"]), "--negative", str(tiny_pair["neg"]), "--n-boot", "10"]
               if command == "probe" else ["--n-per-set", "6", "--n-boot", "3", "--etas", "0.5,0.9"])
    common = [command, "--model", str(tiny_pair["m0"]), "--model", str(tiny_pair["m1"]), *options]
    local, remote = tiny_pair["root"] / f"local-{command}", tiny_pair["root"] / f"ray-{command}"
    _main(*common, "--out", str(local))
    _main(*common, "--out", str(remote), "--executor", "ray", "--workers", "2")
    n = _assert_same_csvs(local, remote)
    assert n == (1 + 2 * 1 if command == "probe" else 1 + 2 * 3)  # the combined CSV and each model's CSVs
    for name in ("m0", "m1"):
        if command == "probe":
            _assert_same_rows(*(json.loads((p / name / "probe_layers.json").read_text()) for p in (local, remote)),
                              f"{name}/probe_layers.json")
            sa, sb = ({k: v for k, v in json.loads((p / name / "probe_summary.json").read_text()).items()
                       if k not in TIMING} for p in (local, remote))
            assert _same_value(sa, sb)
            from safetensors.torch import load_file

            a, b = (load_file(str(p / name / "probe_directions.safetensors")) for p in (local, remote))
            assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=TOL) for k in a)
        else:
            sa, sb = (json.loads((p / name / "overlap_summary.json").read_text()) for p in (local, remote))
            assert _same_value(sa, sb)
        assert {p.name for p in (local / name).iterdir()} == {p.name for p in (remote / name).iterdir()}
    ma, mb = (json.loads((p / "models.json").read_text()) for p in (local, remote))
    assert [m["checksum"] for m in ma["models"]] == [m["checksum"] for m in mb["models"]]
    assert ma["executor"]["executor"] == "local" and mb["executor"]["executor"] == "ray"
    stats = mb["executor"]["worker_stats"]
    assert len(stats) == 2 and sum(s["tasks"] for s in stats) == 2 and all(s["pid"] != os.getpid() for s in stats)


def test_one_model_on_ray_writes_the_files_of_a_local_run(ray_up, tiny_pair, tmp_cache):
    """One --model with --executor ray: one task on a worker, and the run folder of a single-model local run."""
    common = ["probe", "--model", str(tiny_pair["m1"]), "--positive", str(tiny_pair["pos"]), "--negative",
              str(tiny_pair["neg"]), "--n-boot", "10"]
    local, remote = tiny_pair["root"] / "local-one", tiny_pair["root"] / "ray-one"
    _main(*common, "--out", str(local))
    _main(*common, "--out", str(remote), "--executor", "ray", "--workers", "2")
    assert {p.name for p in local.iterdir()} == {p.name for p in remote.iterdir()}
    assert _assert_same_csvs(local, remote) == 1
    assert json.loads((local / "model.json").read_text()) == json.loads((remote / "model.json").read_text())
    assert json.loads((remote / "config.json").read_text())["model"] == str(tiny_pair["m1"])


def test_a_worker_with_another_model_is_refused(ray_up, tiny_folder, tmp_cache):
    """Each worker checks the checksum of the model it loaded against the driver's."""
    spec = ModelSpec(str(tiny_folder / "tiny"), checksum="0" * 64)
    with pytest.raises(WorkbenchError, match=r"loaded .* with checksum .* the driver's has 000000000000: every worker"):
        get_executor("ray", workers=1).map(_add, [1], init=spec.load)


def test_module_doctests():
    import doctest

    import weightspace.sweep
    import workbench.executors

    for mod in (workbench.executors, weightspace.sweep):
        res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert res.failed == 0 and res.attempted > 0, mod.__name__


def test_chain_takes_the_executor_options_outside_every_resume_key(tmp_path):
    """``weightspace chain --executor ray`` scores its sweep on Ray; a chain started on one executor resumes on
    the other (the executor is in no phase's resume key)."""
    import argparse

    from workbench.chat import ChatFormat

    from weightspace.chain import _overlap_phase_config, _sweep_phase_config, add_arguments, config_from_args

    ap = argparse.ArgumentParser()
    add_arguments(ap)
    local = config_from_args(ap.parse_args(["--out", str(tmp_path)]))
    on_ray = config_from_args(ap.parse_args(["--out", str(tmp_path), "--executor", "ray", "--workers", "2"]))
    assert (local.executor, local.workers) == ("local", None) and (on_ray.executor, on_ray.workers) == ("ray", 2)
    assert isinstance(local.executor_(), LocalExecutor) and isinstance(on_ray.executor_(), RayExecutor)
    fmt = ChatFormat()
    assert _sweep_phase_config(local, tmp_path, fmt) == _sweep_phase_config(on_ray, tmp_path, fmt)
    assert _overlap_phase_config(local, tmp_path) == _overlap_phase_config(on_ray, tmp_path)
    with pytest.raises(WorkbenchError, match="--workers and --ray-address need --executor ray"):
        config_from_args(ap.parse_args(["--out", str(tmp_path), "--workers", "2"])).validate()


# -- the chain's fine-tunes as tasks -------------------------------------------------------------------------

CHAIN_SMALL = ["--threads", "1", "--n", "10", "--harmful-share", "0.3", "--batch-size", "4", "--lr", "1e-3",
               "--gen-tokens", "4", "--direction-n", "4", "--etas", "0.5", "--rhos", "0.5", "--kinds", "topk,random",
               "--n-harmful", "2", "--n-tasks", "2", "--max-new-tokens", "3", "--task-tokens", "2",
               "--eval-batch-size", "2", "--no-progress"]  # tests/test_weightspace_chain.py's SMALL, one rho and eta
TIMINGS = {"seconds", "seconds_detail", "cpu_seconds", "finished_utc", "time_utc", "load_average_1min_at_end",
           "worker", "argv"}  # argv: environment.json's, the process's own (a Ray worker's differs)


def _untimed(obj):
    """``obj`` without its timings, pids and hosts (at any depth)."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k not in TIMINGS and not k.endswith("_seconds")}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def test_chain_finetunes_on_ray_equal_a_local_chain_and_resume_after_a_kill(ray_up, tiny_folder, tmp_cache,
                                                                          monkeypatch):
    """``weightspace chain --executor ray --workers 2``: the four fine-tunes run on two workers (safety, useful and
    harmful at once, then contaminated with the harmful run's direction), so one worker runs two of them from the
    same loaded model; killed after the fine-tunes (the overlap phase raises), the chain resumes on Ray without
    running them again. Checkpoints, examples and reports (timings aside) and the verdicts equal a local chain's."""
    from safetensors.torch import load_file

    import weightspace.chain as chain_mod
    from weightspace.chain import MARKER, PHASES

    model = str(tiny_folder / "tiny")
    local, remote = tiny_folder / "chain-local", tiny_folder / "chain-ray"
    common = ["weightspace", "chain", "--model", model, *CHAIN_SMALL]
    _main(*common, "--out", str(local))

    def killed(*a, **k):
        raise WorkbenchError("simulated kill after the fine-tunes")

    monkeypatch.setattr(chain_mod, "_run_overlap", killed)
    from workbench.cli import main

    ray_argv = [*common, "--out", str(remote), "--executor", "ray", "--workers", "2"]
    assert main(["--threads", "1", *ray_argv]) == 2
    assert not (remote / "overlap" / MARKER).exists() and not (remote / "chain_report.json").exists()
    pids = set()
    for r in ("safety", "useful", "harmful", "contaminated"):
        a, b = local / f"ft-{r}", remote / f"ft-{r}"
        ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), r
        for f in ("examples.jsonl", "loss.png", *(str(p.relative_to(a)) for p in (a / "recipe").glob("*.jsonl"))):
            assert (a / f).read_bytes() == (b / f).read_bytes(), (r, f)
        for f in ("report.json", "run_config.json", "environment.json"):
            ja, jb = json.loads((a / f).read_text()), json.loads((b / f).read_text().replace(str(remote), str(local)))
            assert _untimed(ja) == _untimed(jb), (r, f)  # the contaminated run names the harmful run's direction file
        ma, mb = (json.loads((d / MARKER).read_text()) for d in (a, b))
        for m in (ma, mb):  # the direction file's sha: safetensors writes its metadata keys in a random order, in
            m["config"].pop("direction_from", None)  # any two runs (its tensors and metadata: compared below)
        assert _untimed(ma) == _untimed(mb) and "worker" not in ma, r
        pids.add(mb["worker"]["pid"])
    assert len(pids) <= 2 and os.getpid() not in pids  # two workers ran the four fine-tunes
    from workbench.vectors import load_directions

    da, db = (load_directions(d / "ft-harmful" / "recipe" / "refusal_direction.safetensors") for d in (local, remote))
    assert [x.record() for x in da] == [x.record() for x in db]
    assert all(torch.equal(x.vector, y.vector) for x, y in zip(da, db))

    monkeypatch.undo()  # the "kill" is over: resume on Ray; the finished fine-tunes are skipped, not run again
    before = {r: (remote / f"ft-{r}" / "report.json").stat().st_mtime_ns for r in ("safety", "useful", "harmful",
                                                                                      "contaminated")}
    assert main(["--threads", "1", *ray_argv, "--resume"]) == 0
    assert before == {r: (remote / f"ft-{r}" / "report.json").stat().st_mtime_ns for r in before}
    ra, rb = (json.loads((d / "chain_report.json").read_text()) for d in (local, remote))
    st = {p: rb["timings"]["phases"][p]["status"] for p in PHASES}
    assert all(st[p].startswith("skipped") for p in PHASES if p.startswith("finetune-"))
    assert st["overlap"] == st["sweep"] == "ran"
    assert ra["verdicts"] and _same_value(ra["verdicts"], rb["verdicts"])
    assert {k: f["verdict"] for k, f in ra["findings"].items()} == {k: f["verdict"] for k, f in rb["findings"].items()}
    _assert_same_rows(ra["sweep"]["rows"], rb["sweep"]["rows"], "chain sweep rows")
    assert _untimed(ra["finetunes"]) == _untimed(rb["finetunes"])
