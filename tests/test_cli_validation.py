"""Bad input fails before any work: one line ``error: ...`` on stderr, exit code 2, no traceback, no run folder.

Every command line goes through the real ``workbench`` console script in a subprocess (``--threads 1``).
Errors that must fire before a model is loaded are given a model that cannot be loaded (``--model
no-such-model``), so the expected message can only come from an earlier check. The models are tiny
random ones saved as Hugging Face folders (``workbench.tiny``); no zoo model is loaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

NO_MODEL = "no-such-model"  # loading it fails: a check that names something else ran before loading


def _workbench() -> str:
    exe = Path(sys.executable).parent / "workbench"
    return str(exe) if exe.exists() else (shutil.which("workbench") or pytest.fail("no workbench console script: run the README set-up"))


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("wb-cache")
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             WORKBENCH_CACHE=str(cache), HF_HUB_DISABLE_PROGRESS_BARS="1")
    return e


def run_cli(env: dict[str, str], cwd: Path, *argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([_workbench(), "--threads", "1", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_refused(p: subprocess.CompletedProcess, out: Path, *needles: str) -> str:
    """Exit code 2, exactly one ``error:`` line (the last line), no traceback, and no run folder made."""
    err = p.stderr
    assert p.returncode == 2, (p.returncode, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1 and errors[0].startswith("error: ") and lines[-1] == errors[0], err[-2000:]
    for n in needles:
        assert n in errors[0], (n, errors[0])
    assert not out.exists(), f"{out} was created"
    assert not [q.name for q in out.parent.iterdir() if q.name.startswith(f".{out.name}.")], "staging folder left"
    return errors[0]


# -- tiny models on disk ------------------------------------------------------------------------------------

def _save(model, tok, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, env) -> dict[str, Path]:
    """Two tiny Llama folders (same shapes, other weights), directions for the first, and broken variants."""
    from safetensors.torch import save_file

    from workbench.loading import model_identity
    from workbench.tiny import build_tiny
    from workbench.vectors import FORMAT, Direction, save_directions

    root = tmp_path_factory.mktemp("tiny")
    a = _save(*build_tiny("llama", seed=0), root / "a")
    b = _save(*build_tiny("llama", seed=1), root / "b")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_CACHE", env["WORKBENCH_CACHE"])
        model_id, checksum = model_identity(str(a))
    g = torch.Generator().manual_seed(0)

    def direction(d_model: int = 64, checksum: str = checksum, layer: int = 0) -> Direction:
        return Direction(torch.randn(d_model, generator=g), layer=layer, method="mean_diff", model_id=model_id,
                         model_checksum=checksum, d_model=d_model, component="resid_pre")

    out = {"a": a, "b": b}
    out["dir"] = save_directions(root / "dir.safetensors", [direction()])
    out["dir_other_model"] = save_directions(root / "dir_other.safetensors", [direction(checksum="0" * 64)])
    out["dir_narrow"] = save_directions(root / "dir_narrow.safetensors", [direction(d_model=32)])
    # a NaN direction cannot be made through Direction: write the file format by hand
    rec = direction().record()
    rec.pop("norm")
    import json

    save_file({"dir.0": torch.full((64,), float("nan"))}, str(root / "dir_nan.safetensors"),
              metadata={"format": FORMAT, "records": json.dumps([rec])})
    out["dir_nan"] = root / "dir_nan.safetensors"
    # broken model folders
    out["bad_config"] = shutil.copytree(a, root / "bad_config")
    (out["bad_config"] / "config.json").write_text('{"model_type": "llama", oops')
    out["no_weights"] = shutil.copytree(a, root / "no_weights")
    (out["no_weights"] / "model.safetensors").unlink()
    out["pickle"] = shutil.copytree(a, root / "pickle")
    (out["pickle"] / "model.safetensors").unlink()
    sd = dict(build_tiny("llama", seed=0)[0].state_dict())
    sd["extra"] = _Unsafe()
    torch.save(sd, str(out["pickle"] / "pytorch_model.bin"))
    # a checkpoint holding a NaN
    out["nan_ckpt"] = shutil.copytree(b, root / "nan_ckpt")
    from safetensors.torch import load_file

    w = load_file(str(b / "model.safetensors"))
    w["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(w, str(out["nan_ckpt"] / "model.safetensors"), metadata={"format": "pt"})
    return out


class _Unsafe:
    """Pickles as a call to a function: exactly what torch's weights_only loader refuses."""

    def __reduce__(self):
        return (print, ("this must never run",))


# -- numbers on the command line (argparse, no model) --------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["steer", "generate", "--mode", "none", "--alpha", "nan"], "--alpha: expected a finite number, got 'nan'"),
    (["steer", "sweep", "--direction", "d.safetensors", "--alphas", "0.5,inf"], "--alphas: expected a finite number"),
    (["steer", "generate", "--mode", "none", "--n", "0"], "--n: expected an integer >= 1, got '0'"),
    (["steer", "sweep", "--direction", "d.safetensors", "--n", "-1"], "--n: expected an integer >= 1, got '-1'"),
    (["steer", "generate", "--mode", "none", "--max-new-tokens", "0"], "--max-new-tokens: expected an integer >= 1"),
    (["finetune", "--recipe", "useful", "--lr", "nan"], "--lr: expected a finite number"),
    (["weightspace", "project", "--aligned", "a", "--finetuned", "b", "--reference-base", "c", "--rho", "nan"],
     "--rho: expected a finite number"),
    (["weightspace", "overlap", "--aligned", "a", "--base", "b", "--model", "x=c", "--etas", "0.5,nan"],
     "--etas: expected a finite number"),
    (["overlap", "--plot-eta=-inf"], "--plot-eta: expected a finite number"),
])
def test_bad_numbers_are_refused_while_parsing(env, tmp_path, argv, needle):
    out = tmp_path / "out"
    p = run_cli(env, tmp_path, *argv, "--model" if argv[0] in ("steer", "finetune", "overlap") else "--seed",
                NO_MODEL if argv[0] in ("steer", "finetune", "overlap") else "0", "--out", str(out))
    assert_refused(p, out, needle)


# -- checks that need no model run before the model is loaded -------------------------------------------------

def test_unknown_prompt_split_is_refused_before_loading(env, tmp_path):
    out = tmp_path / "out"
    p = run_cli(env, tmp_path, "steer", "generate", "--mode", "none", "--prompts", "harmful:nope",
                "--model", NO_MODEL, "--out", str(out))
    assert_refused(p, out, "unknown split 'nope'")


def test_missing_direction_and_folder_as_direction_are_refused_before_loading(env, tmp_path, tiny):
    out = tmp_path / "out"
    p = run_cli(env, tmp_path, "steer", "generate", "--mode", "ablation", "--model", NO_MODEL, "--out", str(out))
    assert_refused(p, out, "--mode ablation needs --direction FILE")
    p = run_cli(env, tmp_path, "steer", "generate", "--mode", "ablation", "--direction", str(tiny["a"]),
                "--model", NO_MODEL, "--out", str(out))
    err = assert_refused(p, out, "is a folder, not a direction file", "model.safetensors")
    assert "os error" not in err


def test_non_finite_direction_is_refused_before_loading(env, tmp_path, tiny):
    out = tmp_path / "out"
    p = run_cli(env, tmp_path, "steer", "orthogonalize", "--direction", str(tiny["dir_nan"]), "--model", NO_MODEL,
                "--out", str(out))
    assert_refused(p, out, "non-finite")


def test_probe_prompt_set_with_a_split_is_refused_before_loading(env, tmp_path):
    out = tmp_path / "out"
    p = run_cli(env, tmp_path, "probe", "--positive", "harmful:train", "--model", NO_MODEL, "--out", str(out))
    assert_refused(p, out, "without a split")


# -- checks that need the model run before the run folder is made --------------------------------------------

def test_max_new_tokens_is_bounded_by_the_context(env, tmp_path, tiny):
    out = tmp_path / "out"
    p = run_cli(env, tmp_path, "steer", "generate", "--mode", "none", "--n", "2", "--max-new-tokens", "100000",
                "--model", str(tiny["a"]), "--out", str(out))
    assert_refused(p, out, "--max-new-tokens 100000 is too large", "context is 256 tokens", "at most")


def test_generate_layer_out_of_range_fails_before_generating(env, tmp_path, tiny):
    out = tmp_path / "out"
    p = run_cli(env, tmp_path, "steer", "generate", "--mode", "addition", "--direction", str(tiny["dir"]),
                "--layer", "99", "--n", "2", "--model", str(tiny["a"]), "--out", str(out))
    assert_refused(p, out, "--layer 99 is out of range", "0..1")
    assert "unmodified" not in p.stdout + p.stderr  # no generation pass ran


def test_capture_layer_out_of_range_and_overlong_prompt(env, tmp_path, tiny):
    out = tmp_path / "out"
    p = run_cli(env, tmp_path, "capture", "--prompts", "harmless:test", "--layers", "99", "--model", str(tiny["a"]),
                "--out", str(out))
    assert_refused(p, out, "layer 99 is out of range")
    long = tmp_path / "long.txt"
    long.write_text("Explain how a transformer language model works, " * 60 + "\nHi there\n")
    p = run_cli(env, tmp_path, "capture", "--prompts", str(long), "--model", str(tiny["a"]), "--out", str(out))
    assert_refused(p, out, "more than the model's context of 256 tokens")


def test_direction_of_another_width_or_model(env, tmp_path, tiny):
    out = tmp_path / "out"
    p = run_cli(env, tmp_path, "steer", "generate", "--mode", "ablation", "--direction", str(tiny["dir_narrow"]),
                "--force", "--model", str(tiny["a"]), "--out", str(out))
    assert_refused(p, out, "size 32", "d_model 64")
    p = run_cli(env, tmp_path, "steer", "generate", "--mode", "ablation", "--direction", str(tiny["dir_other_model"]),
                "--model", str(tiny["a"]), "--out", str(out))
    assert_refused(p, out, "--force")


# -- loading errors are one line ------------------------------------------------------------------------------

@pytest.mark.parametrize("which, needles", [
    ("bad_config", ["config.json is not valid JSON"]),
    ("no_weights", ["has a config.json but no weights", "model.safetensors"]),
    ("pickle", ["pickled Python objects", "safetensors"]),
    ("cut_gguf", ["truncated"]),
])
def test_broken_models_are_one_line_errors(env, tmp_path, tiny, which, needles):
    if which == "cut_gguf":
        from workbench.errors import WorkbenchError
        from workbench.zoo import get_entry, part_paths

        try:
            src = part_paths(get_entry("smollm2-135m-instruct"))[0]
        except WorkbenchError as e:
            pytest.fail(f"the smollm2 package the set-up installs is missing: {e}")
        model = tmp_path / "cut.gguf"
        with open(src, "rb") as f:
            model.write_bytes(f.read(2_000_000))
    else:
        model = tiny[which]
    out = tmp_path / "out"
    p = run_cli(env, tmp_path, "steer", "generate", "--mode", "none", "--n", "1", "--model", str(model),
                "--out", str(out))
    assert_refused(p, out, *needles)
    assert "this must never run" not in p.stdout + p.stderr


# -- weight space -------------------------------------------------------------------------------------------

def test_weightspace_checkpoint_with_a_broken_config(env, tmp_path, tiny):
    out = tmp_path / "out"
    p = run_cli(env, tmp_path, "weightspace", "overlap", "--aligned", str(tiny["a"]), "--model",
                f"x={tiny['bad_config']}", "--model", f"y={tiny['b']}", "--out", str(out), "--no-progress")
    assert_refused(p, out, "config.json is not valid JSON")


def test_weightspace_nan_checkpoint_is_refused_before_the_run_folder(env, tmp_path, tiny):
    out = tmp_path / "out"
    p = run_cli(env, tmp_path, "weightspace", "project", "--aligned", str(tiny["a"]), "--finetuned",
                str(tiny["nan_ckpt"]), "--reference-model", str(tiny["b"]), "--out", str(out), "--no-progress")
    assert_refused(p, out, "model.layers.1.mlp.down_proj.weight", "non-finite")


def test_weightspace_directions_follow_the_checksum_rule(env, tmp_path, tiny):
    out = tmp_path / "out"
    argv = ["weightspace", "project", "--aligned", str(tiny["a"]), "--finetuned", str(tiny["b"]), "--directions",
            str(tiny["dir_other_model"]), "--out", str(out), "--no-progress"]
    p = run_cli(env, tmp_path, *argv)
    assert_refused(p, out, "computed on model", "--force")
    p = run_cli(env, tmp_path, *argv[:-1], "--force", "--no-progress")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "model" / "model.safetensors").exists()
    p = run_cli(env, tmp_path, "weightspace", "overlap", "--aligned", str(tiny["a"]), "--model", f"ft={tiny['b']}",
                "--directions", str(tiny["dir_narrow"]), "--force", "--out", str(tmp_path / "ov"), "--no-progress")
    assert_refused(p, tmp_path / "ov", "size 32", "d_model 64")


# -- probe fitting threads ----------------------------------------------------------------------------------

def _children() -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_probe_fitting_follows_torch_threads_and_starts_no_processes(monkeypatch):
    from probes.sweep import ProbeSweep

    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(24, 3, 8, generator=g) + 1.0, torch.randn(24, 3, 8, generator=g)
    import joblib
    import sklearn.model_selection  # noqa: F401 - sklearn subclasses joblib.Parallel on import: keep its own

    calls = []

    class Recording(joblib.Parallel):
        def __init__(self, *a, **kw):
            calls.append(kw)
            super().__init__(*a, **kw)

    before = set(_children())
    threads = torch.get_num_threads()
    try:
        monkeypatch.setattr(joblib, "Parallel", Recording)
        torch.set_num_threads(1)
        sw = ProbeSweep(Cs=(1.0,), cv=2, n_boot=0)
        assert sw.resolved_n_jobs(3) == 1
        sw.fit(pos, neg)
        assert calls == []  # one thread: the layers are fitted in a plain loop
        torch.set_num_threads(2)
        sw2 = ProbeSweep(Cs=(1.0,), cv=2, n_boot=0)
        assert sw2.resolved_n_jobs(3) == 2 and sw2.resolved_n_jobs(1) == 1
        sw2.fit(pos, neg)
        assert calls == [{"n_jobs": 2, "backend": "threading"}]  # threads, never worker processes
    finally:
        torch.set_num_threads(threads)
    assert set(_children()) <= before
    a = [p.logistic_direction for p in sw.probes_]
    b = [p.logistic_direction for p in sw2.probes_]
    assert all(torch.allclose(torch.as_tensor(x), torch.as_tensor(y)) for x, y in zip(a, b))
