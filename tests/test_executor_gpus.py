"""Ray workers with GPUs (:mod:`workbench.executors`): ``gpus_per_worker`` / ``--ray-gpus-per-worker``.

No GPU and no Ray cluster needed: a fake ``ray`` stands for the cluster (its resources, and the options each actor
is created with), the command-line checks are parse-level, and a worker's device mapping runs in this process.
The refusal on a real Ray without GPUs is in ``tests/test_executors.py`` (it shares that module's Ray). What needs
a GPU (a worker really loading on its reserved GPU) is not tested here.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

import pytest
import torch

import workbench.executors as executors
from workbench.errors import WorkbenchError
from workbench.executors import ModelSpec, RayExecutor, executor_from_args, get_executor, worker_device


class FakeRay:
    """Just what :class:`RayExecutor` calls while a pool opens, grows and closes: the cluster's resources, the
    actor class's ``options(...).remote(...)`` (recorded), ``kill``."""

    def __init__(self, resources: dict[str, float]) -> None:
        self.resources = resources
        self.created: list[tuple[dict[str, Any], tuple[Any, ...]]] = []
        self.killed: list[Any] = []

    def is_initialized(self) -> bool:
        return True  # a Ray "already running": the executor neither starts nor stops one

    def cluster_resources(self) -> dict[str, float]:
        return dict(self.resources)

    def remote(self, cls: type) -> Any:
        fake = self

        class _Creator:
            def __init__(self, opts: dict[str, Any]) -> None:
                self.opts = opts

            def remote(self, *args: Any) -> object:
                fake.created.append((self.opts, args))
                return object()

        class _ActorClass:
            def options(self, **opts: Any) -> _Creator:
                return _Creator(opts)

        return _ActorClass()

    def kill(self, actor: Any) -> None:
        self.killed.append(actor)

    def shutdown(self) -> None:  # pragma: no cover - would mean the executor stopped a Ray it did not start
        raise AssertionError("the executor shut down a Ray it did not start")


@pytest.fixture
def fake_ray(monkeypatch):
    def make(resources: dict[str, float]) -> FakeRay:
        fake = FakeRay(resources)
        monkeypatch.setattr(executors, "_import_ray", lambda: fake)
        return fake

    return make


# -- the actors' options and the pool's size -----------------------------------------------------------------

@pytest.mark.parametrize("resources, gpus, workers, size, cpus", [
    ({"CPU": 8, "GPU": 2}, 0.5, 8, 4, 2),  # the GPUs cap the pool; the CPUs are shared among the 4 that run
    ({"CPU": 8, "GPU": 2}, 1, None, 2, 4),  # default workers: as many as the GPUs hold
    ({"CPU": 2, "GPU": 4}, 1, None, 2, 1),  # the CPUs cap it
    ({"CPU": 8, "GPU": 3}, 2, None, 1, 8),  # whole GPUs: 3 hold one worker of 2
    ({"CPU": 8, "GPU": 1}, 0.3, 2, 2, 4),  # fewer asked than fit: as asked
], ids=["half-gpu-capped", "one-gpu-each", "cpu-capped", "two-gpus-each", "as-asked"])
def test_gpu_workers_reserve_num_gpus_and_the_gpus_cap_the_pool(fake_ray, resources, gpus, workers, size, cpus):
    fake = fake_ray(resources)
    ex = RayExecutor(workers=workers, gpus_per_worker=gpus)
    fewer = workers is not None and size < workers
    warns = pytest.warns(UserWarning, match=rf"room for {size} workers of {cpus} CPU\(s\) and {gpus:g} GPU\(s\), not "
                                            rf"{workers}; running {size}") if fewer else nullcontext()
    with warns:
        with ex.pool(None) as pool:
            assert pool.size == size
            pool._grow(100)  # as many actors as the pool holds
    options = {"num_cpus": cpus, "max_concurrency": 1, "num_gpus": float(gpus)}
    assert [opts for opts, _ in fake.created] == [options] * size
    assert all(args[1] == cpus and args[-1] == float(gpus) for _, args in fake.created)  # threads; the worker's GPUs
    assert len(fake.killed) == size  # released on exit


def test_cpu_workers_reserve_no_gpu(fake_ray):
    """Without gpus_per_worker the actors are created as before: no num_gpus, whatever GPUs the cluster has."""
    fake = fake_ray({"CPU": 8, "GPU": 2})
    with RayExecutor(workers=4).pool(None) as pool:
        assert pool.size == 4
        pool._grow(4)
    assert [opts for opts, _ in fake.created] == [{"num_cpus": 2, "max_concurrency": 1}] * 4
    assert all(args[-1] == 0.0 for _, args in fake.created)


@pytest.mark.parametrize("resources, gpus, have", [({"CPU": 8}, 1, "0"), ({"CPU": 8, "GPU": 1}, 2, "1"),
                                                   ({"CPU": 8, "GPU": 0.5}, 1, "0.5")])
def test_too_few_gpus_for_one_worker_is_a_clear_error(fake_ray, resources, gpus, have):
    fake = fake_ray(resources)
    with pytest.raises(WorkbenchError, match=rf"^--ray-gpus-per-worker {gpus}: a worker needs {gpus} GPU\(s\) but the "
                                             rf"Ray cluster has {have} \(CPU 8.*\); Ray would keep the workers "
                                             rf"pending forever.*lower --ray-gpus-per-worker.*--device cpu"):
        with RayExecutor("auto", gpus_per_worker=gpus).pool(None):
            pass
    assert fake.created == []


@pytest.mark.parametrize("gpus, message", [
    (0, "must be a finite number > 0"), (-1, "must be a finite number > 0"),
    (float("nan"), "must be a finite number > 0"), (float("inf"), "must be a finite number > 0"),
    ("x", "must be a finite number > 0"),
    (0.00001, "must be at least 0.0001"), (1.5, "above 1 must be a whole number of GPUs"),
])
def test_bad_gpus_per_worker_are_refused(gpus, message):
    with pytest.raises(WorkbenchError, match="^--ray-gpus-per-worker " + message):
        RayExecutor(gpus_per_worker=gpus)


# -- describe() ----------------------------------------------------------------------------------------------

def test_describe_names_the_gpus_only_when_asked_for():
    assert RayExecutor(workers=2).describe() == {"executor": "ray", "workers": 2, "ray_address": None}
    assert RayExecutor().describe() == {"executor": "ray", "workers": None, "ray_address": None}
    assert RayExecutor(workers=2, gpus_per_worker=0.5).describe() == {
        "executor": "ray", "workers": 2, "ray_address": None, "gpus_per_worker": 0.5}
    assert get_executor("ray", workers=2, device="cpu").describe() == RayExecutor(workers=2).describe()
    assert get_executor("ray", device="cuda:1").describe()["gpus_per_worker"] == 1.0


# -- the command line ------------------------------------------------------------------------------------------

def _parse(*argv: str) -> Any:
    from workbench.cli import build_parser

    return build_parser().parse_args(list(argv))


COMMANDS = {  # each command that takes the executor options, with what it needs to parse
    "steer select": ["steer", "select", "--out", "o"],
    "probe": ["probe", "--out", "o"],
    "overlap": ["overlap", "--out", "o"],
    "weightspace sweep": ["weightspace", "sweep", "--aligned", "a", "--reference-base", "b", "--useful", "u",
                          "--out", "o"],
    "weightspace chain": ["weightspace", "chain", "--out", "o"],
}


def _executor(command: str, args: Any) -> Any:
    if command == "weightspace chain":
        from weightspace.chain import config_from_args

        return config_from_args(args).executor_()
    return executor_from_args(args)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_defaults_cuda_ray_workers_to_one_gpu(command):
    """--device cuda (any index) with --executor ray reserves 1 GPU per worker unless --ray-gpus-per-worker says
    otherwise; on the CPU, and locally, nothing changes. Parse-level: no model, no Ray started."""
    base = COMMANDS[command]
    for device in ("cuda", "cuda:1"):
        ex = _executor(command, _parse(*base, "--device", device, "--executor", "ray", "--workers", "2"))
        assert ex.describe() == {"executor": "ray", "workers": 2, "ray_address": None, "gpus_per_worker": 1.0}
    ex = _executor(command, _parse(*base, "--device", "cuda", "--executor", "ray", "--ray-gpus-per-worker", "0.5"))
    assert ex.gpus_per_worker == 0.5
    assert "gpus_per_worker" not in _executor(command, _parse(*base, "--executor", "ray")).describe()
    assert _executor(command, _parse(*base, "--device", "cuda")).describe() == {"executor": "local", "workers": 1}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("extra, message", [
    (["--device", "cpu", "--executor", "ray", "--ray-gpus-per-worker", "1"],
     "--ray-gpus-per-worker 1 reserves GPUs for Ray workers that load the model on --device cpu, where they would "
     "hold GPUs they never use; give --device cuda"),
    (["--executor", "ray", "--ray-gpus-per-worker", "2"], "--ray-gpus-per-worker 2 reserves GPUs"),  # default cpu
    (["--device", "mps", "--executor", "ray", "--ray-gpus-per-worker", "1"], "--ray-gpus-per-worker 1 reserves GPUs"),
    (["--device", "cuda", "--ray-gpus-per-worker", "1"], "--ray-gpus-per-worker needs --executor ray"),
    (["--device", "cuda", "--executor", "ray", "--ray-gpus-per-worker", "1.5"],
     "--ray-gpus-per-worker above 1 must be a whole number of GPUs"),
])
def test_gpus_for_workers_that_cannot_use_them_are_refused(command, extra, message):
    args = _parse(*COMMANDS[command], *extra)
    with pytest.raises(WorkbenchError, match="^" + message.replace("(", r"\(")):
        _executor(command, args)


@pytest.mark.parametrize("value, expected", [("0", "a finite number > 0"), ("-1", "a finite number > 0"),
                                             ("nan", "a finite number"), ("inf", "a finite number"),
                                             ("half", "a number")])
def test_a_bad_gpus_per_worker_is_a_one_line_parse_error(value, expected, capsys):
    with pytest.raises(SystemExit) as e:
        _parse("probe", "--out", "o", "--executor", "ray", "--ray-gpus-per-worker", value)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert err == (f"error: argument --ray-gpus-per-worker: expected {expected}, got {value!r} "
                   f"(see 'workbench probe -h')"), err


def test_a_refused_option_stops_the_command_before_any_work(tmp_path, capsys):
    """Through ``main``: one error line, exit code 2, nothing written, no model loaded."""
    from workbench.cli import main

    out = tmp_path / "out"
    rc = main(["probe", "--out", str(out), "--device", "cpu", "--executor", "ray", "--ray-gpus-per-worker", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().startswith("error: --ray-gpus-per-worker 1 reserves GPUs for Ray workers")
    assert not out.exists()


# -- on a GPU worker: the model loads on the worker's own GPU ---------------------------------------------------

def test_a_gpu_worker_loads_a_cuda_model_on_its_own_gpu(monkeypatch):
    """A worker whose actor reserved GPUs (Ray set its CUDA_VISIBLE_DEVICES) loads --device cuda:1 on ``cuda``,
    its first visible GPU; a CPU device, and any device off such a worker, stay as given. The worker's body runs in
    this process here (nothing loads: load_model is replaced by a recorder)."""
    import workbench.loading as loading

    monkeypatch.setattr(executors, "_GPU_WORKER", False)  # restored after the test
    threads = torch.get_num_threads()
    asked: list[str] = []
    monkeypatch.setattr(loading, "load_model", lambda source, **kw: asked.append(kw["device"]) or
                        type("LM", (), {"checksum": None})())
    ModelSpec("m", device="cuda:1").load()
    assert worker_device("cuda:1") == "cuda:1" and asked == ["cuda:1"]  # the driver / a local run: unchanged

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # as Ray sets it for the actor
    try:
        w = executors._Worker(None, 1, {}, os.getcwd(), 0.5)
    finally:
        torch.set_num_threads(threads)
    assert executors._GPU_WORKER and w.stats["gpus"] == 0.5 and w.stats["cuda_visible_devices"] == "3"
    assert [worker_device(d) for d in ("cuda:1", "cuda", "cuda:0", "cpu", "mps")] == ["cuda", "cuda", "cuda", "cpu",
                                                                                        "mps"]
    ModelSpec("m", device="cuda:1").load()
    ModelSpec("m", device="cpu").load()
    assert asked == ["cuda:1", "cuda", "cpu"]
    assert ModelSpec("m", device="cuda:1").describe()["device"] == "cuda:1"  # recorded as the command gave it

    cpu_worker = executors._Worker(None, 1, {}, os.getcwd())  # no GPUs: nothing mapped, stats as before
    torch.set_num_threads(threads)
    assert not executors._GPU_WORKER and worker_device("cuda:1") == "cuda:1" and "gpus" not in cpu_worker.stats
