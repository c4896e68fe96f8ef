"""Run tests against a modified copy of the sources, never touching the working tree.

The project's packages are copied into a temporary folder (a snapshot: edits made to the working tree while a
run is going on do not leak into it), one file is replaced there, and pytest runs from the repository root as
``python -P -m pytest`` with ``PYTHONPATH=<copy>``: ``-P`` keeps the repository root off ``sys.path`` and the
path entry comes before the editable install's finder, so ``import workbench`` etc. load the copy. Byte code is
neither read for the replaced file nor written anywhere (``PYTHONDONTWRITEBYTECODE``).

Used by ``benchmarks/breaks.py`` (the hand-made breaks of issue #15) and ``benchmarks/mutation.py``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("workbench", "probes", "steering", "weightspace", "apps")


@dataclass
class TestRun:
    rc: int  # pytest's exit code; -1 when killed at the timeout
    seconds: float
    tail: str

    @property
    def passed(self) -> bool:
        return self.rc == 0

    @property
    def timed_out(self) -> bool:
        return self.rc == -1


class Overlay:
    """A temporary copy of the project's packages; ``replace`` one file, ``run`` tests, ``restore``."""

    def __init__(self, packages: tuple[str, ...] = PACKAGES) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="wb-overlay-"))
        for p in packages:
            shutil.copytree(ROOT / p, self.dir / p, ignore=shutil.ignore_patterns("*.pyc", "__pycache__"))
        self.original: dict[str, str] = {}

    def source(self, rel: str) -> str:
        """The snapshot's text of ``rel`` (e.g. ``"workbench/capture.py"``) before any replacement."""
        if rel not in self.original:
            self.original[rel] = (self.dir / rel).read_text(encoding="utf-8")
        return self.original[rel]

    def replace(self, rel: str, text: str) -> None:
        self.source(rel)
        (self.dir / rel).write_text(text, encoding="utf-8")

    def restore(self, rel: str) -> None:
        if rel in self.original:
            (self.dir / rel).write_text(self.original[rel], encoding="utf-8")

    def env(self) -> dict[str, str]:
        return dict(os.environ, PYTHONPATH=str(self.dir), PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1",
                    TRANSFORMERS_OFFLINE="1", WORKBENCH_TEST_THREADS="1", OMP_NUM_THREADS="1",
                    TOKENIZERS_PARALLELISM="false")

    def check(self, module: str) -> None:
        """Fail unless ``module`` really is imported from the copy."""
        out = subprocess.run([sys.executable, "-P", "-c", f"import {module} as m; print(m.__file__)"],
                             capture_output=True, text=True, env=self.env(), cwd=ROOT, timeout=120)
        if not out.stdout.strip().startswith(str(self.dir)):
            raise RuntimeError(f"{module} is not imported from the overlay: {out.stdout!r} {out.stderr[-500:]}")

    def run(self, tests: list[str], timeout: float = 120.0, extra: tuple[str, ...] = ("-x", "-q")) -> TestRun:
        cmd = [sys.executable, "-P", "-m", "pytest", *tests, *extra, "-p", "no:cacheprovider"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the test run and anything it started
            out, _ = proc.communicate()
            rc = -1
        return TestRun(rc, time.perf_counter() - t0, (out or "")[-3000:])

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Overlay":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
