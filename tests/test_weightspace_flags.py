"""``--embedding-orientation`` and ``--write-dtype`` of ``workbench weightspace project|overlap|chain``, and
``--device`` of ``workbench weightspace chain``: refused values are one-line errors before any work, given values
reach the configs and are recorded (the device in no resume key; the GPU runs themselves: tests/test_cuda.py).

Tiny Llama checkpoints (d_model 64, vocabulary 384, untied head) saved as Hugging Face folders in bfloat16, so
``--write-dtype float32`` is visible in the written file and the embedding's left space is 384-dimensional
as stored and 64-dimensional transposed.
"""

from __future__ import annotations

import argparse
import csv
import json

import pytest
import torch
from safetensors import safe_open

from workbench import cli as core
from workbench.errors import WorkbenchError
from workbench.tiny import build_tiny

EMBED = "model.embed_tokens.weight"


def _parser() -> argparse.ArgumentParser:
    from weightspace.cli import register

    ap = argparse.ArgumentParser(prog="workbench")
    register(ap.add_subparsers(dest="command", required=True))
    return ap


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("flags")
    out = {}
    for name, seed in (("base", 2), ("aligned", 0), ("ft", 1)):
        model, tok = build_tiny("llama", seed=seed, dtype=torch.bfloat16)
        model.save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
        out[name] = root / name
    return out


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _main(monkeypatch, argv):
    import weightspace.cli as wcli

    monkeypatch.setattr(core, "_plugins", lambda: [wcli])
    return core.main(argv)


@pytest.mark.parametrize("cmd, flag, value", [  # overlap writes no weights: it has no --write-dtype
    ("project", "--embedding-orientation", "sideways"), ("overlap", "--embedding-orientation", "sideways"),
    ("chain", "--embedding-orientation", "sideways"), ("project", "--write-dtype", "float16"),
    ("chain", "--write-dtype", "float16")])
def test_bad_values_are_one_line_errors_before_any_work(ckpts, tmp_path, monkeypatch, capsys, cmd, flag, value):
    out = tmp_path / "out"
    argv = {"project": ["--aligned", str(ckpts["aligned"]), "--finetuned", str(ckpts["ft"]),
                        "--reference-base", str(ckpts["base"])],
            "overlap": ["--aligned", str(ckpts["aligned"]), "--base", str(ckpts["base"]), "--model",
                        f"ft={ckpts['ft']}"],
            "chain": ["--model", str(ckpts["aligned"])]}[cmd]
    with pytest.raises(SystemExit) as e:  # argparse refuses it while parsing, exit code 2
        _main(monkeypatch, ["weightspace", cmd, *argv, flag, value, "--out", str(out)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == 2 and "Traceback" not in err
    assert lines[-1].startswith("error: ") and sum("error:" in ln for ln in lines) == 1, err
    assert f"argument {flag}: invalid choice: '{value}'" in lines[-1]
    assert not out.exists()


def test_project_passes_write_dtype_and_embedding_orientation_through(ckpts, tmp_path, capsys):
    from workbench.cli import run_command

    ap = _parser()
    base = ["weightspace", "project", "--aligned", str(ckpts["aligned"]), "--finetuned", str(ckpts["ft"]),
            "--reference-base", str(ckpts["base"]), "--rho", "0.25", "--no-progress"]
    runs = {"default": [], "given": ["--write-dtype", "float32", "--embedding-orientation", "transposed"]}
    got = {}
    for key, extra in runs.items():
        out = tmp_path / key
        assert run_command(ap.parse_args([*base, *extra, "--out", str(out)])) == 0
        rep = json.loads((out / "report.json").read_text())
        conf = json.loads((out / "config.json").read_text())
        with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
            dt = f.get_tensor(EMBED).dtype
        d_embed = {int(r["d"]) for r in _rows(out / "tensors.csv") if r["name"] == EMBED}
        got[key] = (rep["config"]["write_dtype"], rep["rounding"]["write_dtype"], conf["write_dtype"],
                    rep["reference"]["embedding_orientation"], conf["embedding_orientation"], dt, d_embed)
    assert got["default"] == ("stored", "stored", "stored", "stored", "stored", torch.bfloat16, {384})
    assert got["given"] == ("float32", "float32", "float32", "transposed", "transposed", torch.float32, {64})


def test_overlap_passes_embedding_orientation_through(ckpts, tmp_path):
    from workbench.cli import run_command

    ap = _parser()
    base = ["weightspace", "overlap", "--aligned", str(ckpts["aligned"]), "--base", str(ckpts["base"]), "--model",
            f"ft={ckpts['ft']}", "--etas", "0.5", "--plot-eta", "0.5", "--no-angles", "--no-progress"]
    for orient, d in (("stored", 384), ("transposed", 64)):
        out = tmp_path / orient
        extra = [] if orient == "stored" else ["--embedding-orientation", orient]
        assert run_command(ap.parse_args([*base, *extra, "--out", str(out)])) == 0
        summ = json.loads((out / "summary.json").read_text())
        conf = json.loads((out / "config.json").read_text())
        assert summ["config"]["embedding_orientation"] == conf["embedding_orientation"] == orient
        assert conf["directions_embedding_orientation"] is None
        assert {int(r["d"]) for r in _rows(out / "ranks.csv") if r["tensor"] == EMBED} == {d}


def test_chain_flags_reach_the_config_the_sweep_and_the_resume_key(tmp_path):
    from weightspace.chain import WRITE_DTYPES, ChainConfig, _overlap_phase_config, _sweep_phase_config, config_from_args
    from weightspace.projection import WRITE_DTYPES as PROJECTION_WRITE_DTYPES
    from weightspace.sweep import SweepConfig
    from workbench.chat import ChatFormat

    assert WRITE_DTYPES == PROJECTION_WRITE_DTYPES
    ap = _parser()
    d = config_from_args(ap.parse_args(["weightspace", "chain", "--out", str(tmp_path / "c")]))
    assert (d.write_dtype, d.embedding_orientation) == ("stored", "stored")
    cfg = config_from_args(ap.parse_args(["weightspace", "chain", "--out", str(tmp_path / "c"), "--write-dtype",
                                          "float32", "--embedding-orientation", "transposed"]))
    cfg.validate()
    assert (cfg.write_dtype, cfg.embedding_orientation) == ("float32", "transposed")
    assert cfg.to_dict()["write_dtype"] == "float32"  # chain_config.json
    sw = _sweep_phase_config(cfg, tmp_path, ChatFormat())
    assert sw["write_dtype"] == "float32" and sw["embedding_orientation"] == "transposed"
    assert _sweep_phase_config(d, tmp_path, ChatFormat())["write_dtype"] == "stored"  # another resume key
    assert _overlap_phase_config(cfg, tmp_path)["embedding_orientation"] == "transposed"
    with pytest.raises(WorkbenchError, match="write_dtype must be one of stored, float32, got 'float16'"):
        ChainConfig(write_dtype="float16").validate()
    assert SweepConfig(write_dtype="float32").describe()["write_dtype"] == "float32"
    with pytest.raises(WorkbenchError, match="write_dtype must be one of stored, float32"):
        SweepConfig(write_dtype="half")


# -- --device of the chain ------------------------------------------------------------------------------------

def test_chain_help_lists_device(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        _main(monkeypatch, ["weightspace", "chain", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--device DEVICE" in out and "cuda:N" in out and "resume key" in out


_BAD_DEVICES = [("tpu", "unknown device 'tpu'. Valid: cpu, cuda, cuda:N, mps"),
                ("cuda:x", "unknown device 'cuda:x'. Valid: cpu, cuda, cuda:N, mps"),
                ("meta", "unsupported device 'meta'. Valid: cpu, cuda, cuda:N, mps")]
if not torch.cuda.is_available():
    _BAD_DEVICES += [("cuda", "device 'cuda' requested but CUDA is not available here; use 'cpu'"),
                     ("cuda:1", "device 'cuda:1' requested but CUDA is not available here; use 'cpu'")]


@pytest.mark.parametrize("device, message", _BAD_DEVICES)
def test_chain_refuses_an_unusable_device_before_any_work(ckpts, tmp_path, monkeypatch, capsys, device, message):
    import workbench.loading as loading

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr(loading, "load_model", no_load)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    rc = _main(monkeypatch, ["weightspace", "chain", "--model", str(ckpts["aligned"]), "--device", device,
                             "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and "Traceback" not in err
    assert lines == [f"error: {message}"], err
    assert not out.exists() and list(work.iterdir()) == []  # nothing written


def test_chain_with_cuda_on_ray_reserves_a_gpu_per_worker(monkeypatch):
    """Ray hides the GPUs from a worker that reserved none, so a CUDA chain on Ray gives each worker 1 GPU (or
    --ray-gpus-per-worker); GPUs for workers on the CPU are refused in the config check (a GPU is pretended here,
    so the device itself passes; no Ray starts)."""
    from weightspace.chain import ChainConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = ChainConfig(device="cuda", executor="ray", workers=1)
    cfg.validate()
    assert cfg.executor_().gpus_per_worker == 1.0
    assert ChainConfig(device="cuda:1", executor="ray", ray_gpus_per_worker=0.5).executor_().gpus_per_worker == 0.5
    with pytest.raises(WorkbenchError, match="^--ray-gpus-per-worker 1 reserves GPUs for Ray workers that load the "
                                             "model on --device cpu"):
        ChainConfig(device="cpu", executor="ray", ray_gpus_per_worker=1).validate()
    ChainConfig(device="cuda").validate()  # locally it is fine
    ChainConfig(device="cpu", executor="ray", workers=1).validate()
    assert ChainConfig(device="cpu", executor="ray").executor_().gpus_per_worker is None


def test_chain_device_reaches_the_config_but_no_resume_key(tmp_path):
    """A chain started on the CPU resumes on a GPU: the device is recorded (chain_config.json is the config's
    to_dict) but every phase's resume key is the same for every device."""
    from types import SimpleNamespace

    from weightspace.chain import (FT_RECIPES, ChainConfig, _ft_phase_config, _overlap_phase_config,
                                   _sweep_phase_config, config_from_args)
    from workbench.chat import ChatFormat

    ap = _parser()
    base = ["weightspace", "chain", "--out", str(tmp_path / "c")]
    d = config_from_args(ap.parse_args(base))
    assert d.device == "cpu" == ChainConfig().device
    d.validate()
    fmt = ChatFormat()
    lm = SimpleNamespace(model_id="tiny", checksum="0" * 64)
    keys = {}
    for dev in ("cpu", "cuda", "cuda:1", "mps"):
        cfg = config_from_args(ap.parse_args([*base, "--device", dev]))
        assert cfg.device == dev and cfg.to_dict()["device"] == dev  # recorded in chain_config.json
        keys[dev] = ({r: _ft_phase_config(cfg, r, lm, fmt, tmp_path) for r in FT_RECIPES},
                     _overlap_phase_config(cfg, tmp_path), _sweep_phase_config(cfg, tmp_path, fmt))
        assert dev == "cpu" or keys[dev] == keys["cpu"], dev
        assert "device" not in json.dumps(keys[dev])
