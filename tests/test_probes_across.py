"""``workbench probe`` / ``workbench overlap`` across several models (:mod:`probes.across`), on the local executor.

A run across two tiny models writes, per model, the files of a separate single-model run with the same numbers,
plus a combined CSV, a comparison plot and ``models.json``; folder names are safe and distinct; a model listed
twice, an empty or unknown ``--model`` and executor options without ``--executor ray`` are refused before any
work, and a model that fails after another has run leaves no run folder. The same runs on Ray (rows equal to
1e-6) are in tests/test_executors.py.
"""

from __future__ import annotations

import csv
import doctest
import json
from pathlib import Path

import pytest
import torch

from tiny_models import save_tiny_pair  # tests/ is on sys.path
from workbench.errors import WorkbenchError

import probes.across
from probes.across import model_labels, model_sources

PROBE = ["--n-boot", "10"]
OVERLAP = ["--n-per-set", "6", "--n-boot", "3", "--etas", "0.5,0.9"]
PROBE_FILES = {"probe_layers.csv", "probe_layers.json", "probe_directions.safetensors", "probe_timing.json",
               "probe_summary.json", "probe_auroc_vs_layer.png", "probe_cosine_logistic_vs_mean_diff.png",
               "probe_direction_cosines.png"}
RUN_FILES = {"config.json", "environment.json", "workbench_run.json", "model.json"}
TIMING = ("capture_seconds", "fit_seconds", "fit_over_capture")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("across"))


def _run(*argv: str) -> int:
    from workbench.cli import build_parser, run_command

    return run_command(build_parser().parse_args(list(argv)))


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _json(path: Path):
    return json.loads(path.read_text())


def test_probe_across_models_writes_what_separate_runs_write(pair, tmp_path, tmp_cache):
    common = ["probe", "--positive", str(pair["pos"]), "--negative", str(pair["neg"]), *PROBE]
    multi = tmp_path / "multi"
    assert _run(*common, "--model", str(pair["m0"]), "--model", str(pair["m1"]), "--out", str(multi)) == 0
    assert _names(multi) == {"config.json", "environment.json", "workbench_run.json", "models.json", "m0", "m1",
                             "probe_layers_by_model.csv", "probe_auroc_by_model.png"}
    for name in ("m0", "m1"):
        single = tmp_path / name
        assert _run(*common, "--model", str(pair[name]), "--out", str(single)) == 0
        assert _names(single) == _names(multi / name) == RUN_FILES | PROBE_FILES  # today's files, per model
        assert _json(single / "config.json")["model"] == str(pair[name])  # one --model: a string, as before
        for f in ("probe_layers.csv", "probe_layers.json"):
            assert (multi / name / f).read_text() == (single / f).read_text(), f
        a, b = (_json(p / "probe_summary.json") for p in (single, multi / name))
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
        assert _json(single / "model.json") == _json(multi / name / "model.json")
        from safetensors.torch import load_file

        ta, tb = (load_file(str(p / "probe_directions.safetensors")) for p in (single, multi / name))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        assert _json(multi / name / "config.json")["model"] == str(pair[name])
    combined = _csv(multi / "probe_layers_by_model.csv")
    assert [r["model"] for r in combined] == ["m0", "m0", "m1", "m1"]
    assert [{k: v for k, v in r.items() if k != "model"} for r in combined] == \
        _csv(multi / "m0" / "probe_layers.csv") + _csv(multi / "m1" / "probe_layers.csv")
    listing = _json(multi / "models.json")
    assert [(m["model"], m["source"]) for m in listing["models"]] == [("m0", str(pair["m0"])), ("m1", str(pair["m1"]))]
    checksums = [_json(multi / n / "model.json")["checksum"] for n in ("m0", "m1")]
    assert [m["checksum"] for m in listing["models"]] == checksums
    assert listing["models"][0]["summary"]["best_layer"] == _json(multi / "m0" / "probe_summary.json")["best_layer"]
    assert listing["executor"]["executor"] == "local" and listing["executor"]["worker_stats"][0]["tasks"] == 2
    cfg = _json(multi / "config.json")
    assert cfg["model"] == [str(pair["m0"]), str(pair["m1"])] and cfg["model_folders"] == {"m0": str(pair["m0"]),
                                                                                         "m1": str(pair["m1"])}
    assert (multi / "probe_auroc_by_model.png").read_bytes()[:4] == b"\x89PNG"


def test_overlap_across_models_writes_what_separate_runs_write(pair, tmp_path, tmp_cache):
    multi = tmp_path / "multi"
    assert _run("overlap", *OVERLAP, "--model", str(pair["m0"]), "--model", str(pair["m1"]), "--out", str(multi)) == 0
    assert _names(multi) == {"config.json", "environment.json", "workbench_run.json", "models.json", "m0", "m1",
                             "overlap_layers_by_model.csv", "overlap_by_model.png"}
    for name in ("m0", "m1"):
        single = tmp_path / name
        assert _run("overlap", *OVERLAP, "--model", str(pair[name]), "--out", str(single)) == 0
        assert _names(single) == _names(multi / name) and "overlap_protocols.png" in _names(single)
        for f in ("overlap.csv", "overlap_layers.csv", "overlap_averages.csv", "overlap_summary.json", "model.json"):
            assert (multi / name / f).read_text() == (single / f).read_text(), f
    combined = _csv(multi / "overlap_layers_by_model.csv")
    assert [r["model"] for r in combined] == ["m0", "m0", "m1", "m1"]
    assert [{k: v for k, v in r.items() if k != "model"} for r in combined] == \
        _csv(multi / "m0" / "overlap_layers.csv") + _csv(multi / "m1" / "overlap_layers.csv")
    s = _json(multi / "m1" / "overlap_summary.json")
    head = _json(multi / "models.json")["models"][1]["summary"]
    assert head["study"]["layers"] == "slice" and head["workbench"]["layers"] == "all"  # each protocol's headline
    assert head["study"]["diff"] == s["protocols"]["study"]["exp4"]["slice"]["diff"]
    assert head["workbench"]["verdict"] == s["protocols"]["workbench"]["exp4"]["all"]["verdict"]["verdict"]


@pytest.mark.parametrize("command, extra", [("probe", PROBE), ("overlap", OVERLAP)])
def test_bad_model_lists_are_refused_before_any_work(pair, tmp_path, tmp_cache, monkeypatch, command, extra):
    import workbench.loading

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(workbench.loading, "load_model", no_load)
    out = tmp_path / "out"
    m0 = str(pair["m0"])
    for models, options, message in [
        ([m0, m0 + "/."], [], r"^--model '.*m0/\.' names the same model as '.*m0'; give each model once$"),
        ([m0, ""], [], r"^--model is empty"),
        ([m0, str(pair["m1"])], ["--workers", "2"], r"^--workers and --ray-address need --executor ray$"),
        ([m0, str(tmp_path / "no-such-model")], [], r"^unknown model '.*no-such-model'"),
    ]:
        argv = [command, *extra, *[a for m in models for a in ("--model", m)], *options, "--out", str(out)]
        with pytest.raises(WorkbenchError, match=message):
            _run(*argv)
        assert not out.exists()


def test_a_model_that_fails_after_another_ran_leaves_no_run_folder(pair, tmp_path, tmp_cache):
    from workbench.tiny import build_tiny

    deep = tmp_path / "deep"  # 3 layers: --layers 2 is fine here, out of range for m0 (2 layers), which runs second
    model, tok = build_tiny("llama", n_layers=3)
    model.save_pretrained(str(deep))
    tok.save_pretrained(str(deep))
    out = tmp_path / "out"
    with pytest.raises(WorkbenchError, match=r"^model .*m0: layer 2 is out of range: this model has 2 layers"):
        _run("probe", *PROBE, "--positive", str(pair["pos"]), "--negative", str(pair["neg"]), "--layers", "2",
             "--model", str(deep), "--model", str(pair["m0"]), "--out", str(out))
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_model_sources_and_labels():
    assert model_sources(None, "smollm2-135m-instruct") == ["smollm2-135m-instruct"]
    assert model_sources(["a/b", "c"], "x") == ["a/b", "c"]
    with pytest.raises(WorkbenchError, match="^give at least one --model$"):
        model_sources([], "x")
    assert model_labels(["runs/ft1/final", "runs/ft2/final", "zoo-key"]) == ["ft1_final", "ft2_final", "zoo-key"]
    assert model_labels(["org/name", "x/y z"]) == ["name", "y_z"]
    assert model_labels(["..hidden", "a:b"]) == ["_hidden", "a_b"]  # never a hidden folder or a colon
    assert model_labels(["a b", "a_b"]) == ["a_b", "a_b-2"]  # clash after every part: numbered
    assert model_labels(["one"]) == ["one"]


def test_module_doctests():
    from workbench.loading import check_model_source

    res = doctest.testmod(probes.across, optionflags=doctest.ELLIPSIS)
    assert res.failed == 0 and res.attempted > 0
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in doctest.DocTestFinder().find(check_model_source, globs={"check_model_source": check_model_source}):
        runner.run(t)
    assert runner.failures == 0 and runner.tries == 2
