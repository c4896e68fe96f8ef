"""The Gradio app through ``gradio_client``: a tiny in-memory model served in this process.

Checks the Steer endpoint (streaming, scores, several prompts, a second setting, orthogonalised weights),
error messages, the Probes / Weight space loaders, and that two users at once get what they would get one
after the other.
"""

from __future__ import annotations

import math
import re
import socket
import sys
import threading

import pytest
import torch

try:  # declared dependencies (extras "app" and "test"): a missing one fails loudly instead of skipping every test
    import gradio  # noqa: F401
    import gradio_client
except ImportError as e:
    pytest.fail(f"{e.name} is not installed: install the project with its extras (bash scripts/setup.sh)",
                pytrace=False)

from apps.ui import SCORE_HEADERS, SCORE_NAMES, build_app, launch  # noqa: E402
from workbench.loading import from_memory  # noqa: E402
from workbench.tiny import build_tiny  # noqa: E402

MODEL = "tiny-llama"
PROMPT = "Tell me a joke about the sea"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RecordingLock:
    """An RLock that records, in order, which request's prompt batch each locked forward pass was for
    (Gradio runs each step of a streaming call on any worker thread, so thread ids would not tell)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.owners: list[int] = []

    def __enter__(self):
        self._lock.acquire()
        f = sys._getframe(1).f_locals
        batch = getattr(f.get("self"), "batch", None) if "self" in f else f.get("batch")
        if batch is not None:  # every column of one request shares its prompt's token tensor
            self.owners.append(id(batch.input_ids))
        return self

    def __exit__(self, *exc):
        self._lock.release()
        return False


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    lm = from_memory(*build_tiny("llama"), model_id=MODEL)
    runs = tmp_path_factory.mktemp("runs")
    demo = build_app({MODEL: lm}, max_new_tokens_limit=40, max_prompt_tokens=64, concurrency=2, disk_cache=False,
                     runs_roots=(str(runs),), runs_dir=str(runs / "app"))
    _, url, _ = launch(demo, port=free_port(), block=False, quiet=True)
    client = gradio_client.Client(url, verbose=False)
    yield demo, client, lm, runs
    demo.close()


def steer(client, **kw):
    args = dict(model=MODEL, prompt=PROMPT, layer=1, a_kind="addition", a_strength=2.0, max_new_tokens=24)
    args.update(kw)
    return client.predict(api_name="/steer", **args)


def unpack(out):
    status = out[0]
    cols = [out[1 + 4 * j: 5 + 4 * j] for j in range(3)]
    return status, [dict(title=c[0], text=c[1], tokens=c[2], scores=c[3]) for c in cols]


def score(col, name, column="value"):
    """One score from a column's scores table (rows = scores, columns = prompts)."""
    t = col["scores"]
    rows = {r[0]: r for r in t["data"]}
    return rows[name][t["headers"].index(column)]


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_steer_columns_and_scores(served):
    demo, client, lm, _ = served
    status, (base, a, b) = unpack(steer(client))
    assert "done in" in status and "mean_diff at layer 1" in status
    assert base["text"] and a["text"] and base["text"] != a["text"]
    assert "addition x2" in a["title"]
    assert base["scores"]["headers"] == SCORE_HEADERS
    assert [r[0] for r in a["scores"]["data"]] == SCORE_NAMES
    assert score(base, "KL next") == 0 and score(base, "KL reply") == 0
    assert score(a, "KL next") > 0 and score(a, "KL reply") > 0
    assert score(a, "refused") in ("yes", "no") and math.isfinite(score(a, "refusal logit"))
    assert score(a, "perplexity") is None or score(a, "perplexity") > 1
    # per-token view: one entry per generated token, coloured by the normalised projection
    assert len(a["tokens"]) == score(a, "tokens")
    vals = [t["class_or_confidence"] for t in a["tokens"]]
    assert all(v is not None and -1 <= v <= 1 for v in vals)
    assert "".join(t["token"] for t in a["tokens"]) == a["text"]
    assert b["text"] == "" and b["scores"]["data"] == []
    assert no_hooks(lm.model)


def test_steer_streams_tokens(served):
    _, client, _, _ = served
    job = client.submit(api_name="/steer", model=MODEL, prompt=PROMPT, layer=1, a_strength=1.0, max_new_tokens=16)
    job.result(timeout=120)
    lengths = [len(o[2]) + len(o[6]) for o in job.outputs()]
    assert len(lengths) >= 5  # many partial updates, not one final answer
    assert lengths == sorted(lengths) and lengths[-1] > lengths[1]


def test_steer_second_setting_several_prompts_orthogonalised(served):
    _, client, lm, _ = served
    from workbench.prompts import builtin_split

    picks = builtin_split("harmless", "test").texts[:2]
    status, (base, a, b) = unpack(steer(client, prompt="", builtin_prompts=picks, a_kind="orthogonalised",
                                        compare=True, b_kind="ablation", b_direction="same direction",
                                        max_new_tokens=8))
    for col in (base, a, b):
        assert "[1]" in col["text"] and "[2]" in col["text"]
        assert col["scores"]["headers"] == ["score", "prompt 1", "prompt 2", "mean"]
        assert score(col, "refused", "mean").endswith("/2")
    assert "orthogonalised" in a["title"] and "ablation" in b["title"]
    # orthogonalised weights and runtime ablation everywhere generate the same tokens
    assert a["text"] == b["text"]
    status, (base, a, b) = unpack(steer(client, compare=True, b_kind="addition", b_strength=2.0,
                                        b_direction="random control", max_new_tokens=8))
    assert "random control" in b["title"] and b["text"]
    assert no_hooks(lm.model)


@pytest.mark.parametrize("kw, message", [
    (dict(prompt="   "), "prompt is empty"),
    (dict(max_new_tokens=41), "greater than maximum value 40"),
    (dict(prompt="word " * 200), "at most 64 tokens"),
    (dict(a_layers="9"), "out of range"),
    (dict(layer=7), "out of range|greater than maximum value"),
    (dict(model="nope"), "not in the list of choices"),
    (dict(source="saved vector", vector_path="/no/such/file.safetensors"), "no readable direction file"),
])
def test_errors_are_messages(served, kw, message):
    _, client, _, _ = served
    with pytest.raises(Exception) as ei:
        steer(client, **kw)
    text = str(ei.value)
    assert re.search(message, text) and "Traceback" not in text


def test_bad_vector_width_is_a_message(served, tmp_path):
    from workbench.vectors import Direction, save_directions

    _, client, _, runs = served
    p = save_directions(runs / "wide.safetensors",
                        [Direction(torch.ones(96), layer=1, method="m", model_id="x", model_checksum="y", d_model=96)])
    with pytest.raises(Exception, match="bad vector width"):
        steer(client, source="saved vector", vector_path=str(p))
    with pytest.raises(Exception, match="bad vector width"):
        steer(client, source="saved vector", vector_file=gradio_client.handle_file(str(p)))


def test_saved_vector_upload(served, tmp_path):
    from workbench.vectors import Direction, save_directions

    _, client, lm, _ = served
    d = Direction(torch.randn(64), layer=0, method="saved", model_id=lm.model_id, model_checksum=lm.checksum,
                  d_model=64)
    p = save_directions(tmp_path / "v.safetensors", [d])
    status, (base, a, _) = unpack(steer(client, source="saved vector", vector_file=gradio_client.handle_file(str(p)),
                                        max_new_tokens=6))
    assert "saved at layer 0" in status and a["text"]


def test_concurrent_users_do_not_see_each_others_interventions(served):
    """Two calls at once with different strengths give exactly what the same calls give one after another."""
    demo, client, lm, _ = served
    settings = [dict(a_strength=3.0, max_new_tokens=32), dict(a_strength=-3.0, a_kind="addition", max_new_tokens=32,
                                                              compare=True, b_kind="ablation",
                                                              b_direction="same direction")]
    sequential = [steer(client, **s) for s in settings]
    assert unpack(sequential[0])[1][1]["text"] != unpack(sequential[1])[1][1]["text"]
    slot = demo.wb_state.slot(MODEL)
    original = slot.lock
    slot.lock = rec = RecordingLock()
    try:
        jobs = [client.submit(api_name="/steer", model=MODEL, prompt=PROMPT, layer=1, **s) for s in settings]
        concurrent = [j.result(timeout=180) for j in jobs]
    finally:
        slot.lock = original
    # the two calls really ran at the same time: their forward passes interleave on the lock
    switches = sum(1 for x, y in zip(rec.owners, rec.owners[1:]) if x != y)
    assert len(set(rec.owners)) == 2 and switches >= 4
    for seq, con in zip(sequential, concurrent):
        _, cs = unpack(seq)
        _, cc = unpack(con)
        for x, y in zip(cs, cc):
            assert x["text"] == y["text"] and x["title"] == y["title"]
            for rx, ry in zip(x["scores"]["data"], y["scores"]["data"]):
                for vx, vy in zip(rx, ry):
                    if isinstance(vx, float):
                        assert vx == pytest.approx(vy, abs=2e-3)
                    else:
                        assert vx == vy
    assert no_hooks(lm.model)


def _make_run_folder(root):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root.mkdir(parents=True, exist_ok=True)
    for name in ("probe_auroc_vs_layer.png", "overlap_heatmap_U_vs_H1_centred.png"):
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [0.5, 0.9])
        fig.savefig(root / name)
        plt.close(fig)
    (root / "probe_layers.json").write_text('[{"layer": 0, "logistic_auroc": 0.6}, {"layer": 1, "logistic_auroc": 0.9}]')
    (root / "overlap.csv").write_text("pair,layer,eta,mso\nU~H1,0,0.5,0.2\nU~H1,1,0.5,0.3\n")
    (root / "summary.json").write_text('{"best_layer": 1}')


def test_probes_and_weight_space_folders(served, tmp_path):
    _, client, _, runs = served
    run = runs / "probe-run"
    _make_run_folder(run)
    status, main, gallery, pick, table, js = client.predict(str(run), api_name="/probes_load")
    assert "2 plot(s), 3 table(s)" in status
    assert main is not None and len(gallery) == 1
    assert table["headers"] == ["layer", "logistic_auroc"] and len(table["data"]) == 2
    status, main, gallery, pick, table, js = client.predict(str(run), api_name="/weights_load")
    assert len(gallery) == 2
    with pytest.raises(Exception, match="no readable run folder"):
        client.predict(str(runs / "missing"), api_name="/probes_load")
    with pytest.raises(Exception, match="holds no plots"):
        (runs / "empty").mkdir()
        client.predict(str(runs / "empty"), api_name="/probes_load")


def test_probe_sweep_from_the_app(served, tmp_path):
    _, client, lm, runs = served
    msg, folder = client.predict(MODEL, 8, 50, False, str(runs / "sweep"), api_name="/probe_sweep")
    assert "sweep written" in msg and folder == str((runs / "sweep").resolve())
    assert (runs / "sweep" / "probe_directions.safetensors").exists()
    status, main, gallery, *_ = client.predict(folder, api_name="/probes_load")
    assert main is not None and "plot(s)" in status
    # and its directions can steer
    status, (base, a, _) = unpack(steer(client, source="probe direction", probe_folder=folder,
                                        probe_method="logistic", max_new_tokens=4))
    assert "logistic probe direction" in status and a["text"]
    assert no_hooks(lm.model)
