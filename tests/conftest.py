"""Shared fixtures: the real embedded SmolLM2 (loaded once per session), tiny in-code models and an
isolated workbench cache.

No fixture here is autouse. Side effects at import: offline hub env defaults and one torch thread per
test process (see below).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray's memory monitor kills workers when the *node* is near its memory limit, whoever uses the memory: with a
# model job beside the suite it killed the tests' tiny workers (0.1 GB each) on a 24 GB machine. The tests' Ray
# workers hold tiny models, so its out-of-memory killer is off for them (and the CLI subprocesses they start).
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The test machines have 2 cores shared by several jobs: two OpenMP threads per process thrash
# (measured 6x slower under load), one thread per process does not. Override with WORKBENCH_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("WORKBENCH_TEST_THREADS", "1")))

SMOLLM2 = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"


def _real_models_root() -> Path:
    """The models cache the user actually has (read before any test redirects WORKBENCH_CACHE)."""
    from workbench.paths import models_cache

    return models_cache()


_REAL_MODELS_ROOT = _real_models_root()


def load_zoo_or_fail(key: str):
    """Load a zoo model; fail with a clear message when its PyPI package is missing (setup installs it)."""
    from workbench.errors import WorkbenchError
    from workbench.loading import load_model

    try:
        return load_model(key)
    except WorkbenchError as e:
        if "needs the PyPI package" in str(e):
            pytest.fail(f"zoo model {key} is not installed (the README test command installs it): {e}")
        raise


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct as a LoadedModel, shared by the whole session (read-only use!)."""
    return load_zoo_or_fail(SMOLLM2)


@pytest.fixture
def make_tiny():
    """Factory: ``make_tiny("llama"|"qwen2"|"gemma3"|"gpt2", seed=0)`` -> a fresh in-memory LoadedModel."""
    from workbench.loading import from_memory
    from workbench.tiny import build_tiny

    def make(arch: str = "llama", seed: int = 0):
        return from_memory(*build_tiny(arch, seed=seed), model_id=f"tiny-{arch}-{seed}")

    return make


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    """Point WORKBENCH_CACHE at a fresh folder; the already-converted zoo models are linked in (read-only
    use) so loading them does not re-convert from GGUF."""
    root = tmp_path / "wb-cache"
    (root / "models").mkdir(parents=True)
    if _REAL_MODELS_ROOT.exists():
        for d in _REAL_MODELS_ROOT.iterdir():
            if d.is_dir() and not d.name.startswith(".") and (d / "provenance.json").exists():
                (root / "models" / d.name).symlink_to(d, target_is_directory=True)
    monkeypatch.setenv("WORKBENCH_CACHE", str(root))
    return root


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    """Point WORKBENCH_CACHE at a fresh, truly empty folder (no models at all)."""
    root = tmp_path / "wb-empty-cache"
    root.mkdir()
    monkeypatch.setenv("WORKBENCH_CACHE", str(root))
    return root


# Whole modules that start a server, a browser or subprocesses, or run the whole weight-space chain: marked slow
# (each takes from about ten seconds to a minute on the 2-core test machines) so `pytest -m "not slow"` is a quick
# run. Slow, never broken: a failing test is fixed, not marked.
SLOW_MODULES = {"test_app_browser.py", "test_app_cli.py", "test_app_ui.py", "test_steer_cli.py",
                "test_weightspace_chain.py"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


def pytest_configure(config) -> None:
    """Register the markers used across the suite (so ``-m "not real_model"`` works without warnings)."""
    config.addinivalue_line(
        "markers", "real_model: uses a real embedded zoo model (e.g. SmolLM2-135M) from the workbench cache"
    )
    config.addinivalue_line(
        "markers", "slow: takes several seconds (subprocesses, servers); deselect with -m 'not slow' for a quick run. "
                   "Marks what is slow, never what is broken: a broken test is fixed, not marked"
    )
