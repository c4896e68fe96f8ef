"""The app on the real embedded SmolLM2-135M-Instruct (marked real_model): streaming equals
``backend.generate``, and one steered request end to end through ``gradio_client``."""

from __future__ import annotations

import socket

import pytest

from apps.state import AppState
from apps.steer import ColumnSpec, GreedyStream, Probe, build_interventions, encode_prompt
from workbench.zoo import SAFETY_SYSTEM_PROMPT

MODEL = "smollm2-135m-instruct"
LAYER = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.real_model
def test_stream_equals_generate_on_smollm2(smollm2):
    state = AppState({MODEL: smollm2}, disk_cache=False)
    slot = state.slot(MODEL)
    fmt = state.chat_format(SAFETY_SYSTEM_PROMPT)
    d = slot.mean_diff(fmt, LAYER)
    be = slot.backend()
    batch = encode_prompt(be, "Write a haiku about autumn leaves.", fmt)
    for spec in (ColumnSpec("add", "addition", d, strength=1.0), ColumnSpec("abl", "ablation", d)):
        ivs = build_interventions(spec, smollm2.n_layers)
        ref = be.generate(batch, max_new_tokens=12, interventions=ivs)
        s = GreedyStream(be, batch, interventions=ivs, max_new_tokens=12, probe=Probe.from_direction(d),
                         lock=slot.lock).run()
        assert s.token_ids == ref[0, :len(s.token_ids)].tolist()
        assert s.text == be.decode(ref)[0]


@pytest.mark.real_model
def test_app_smoke_smollm2(smollm2):
    import gradio_client  # a declared test dependency: an ImportError here is a failure, not a skip
    from apps.ui import build_app, launch

    demo = build_app({MODEL: smollm2}, max_new_tokens_limit=32, disk_cache=False, runs_roots=())
    _, url, _ = launch(demo, port=free_port(), block=False, quiet=True)
    try:
        client = gradio_client.Client(url, verbose=False)
        out = client.predict(model=MODEL, prompt="How do I bake a loaf of bread?", system_prompt=SAFETY_SYSTEM_PROMPT,
                             source="mean-diff", layer=LAYER, a_kind="addition", a_strength=1.0, compare=True,
                             b_kind="orthogonalised", b_direction="same direction", max_new_tokens=12,
                             api_name="/steer")
    finally:
        demo.close()
    status = out[0]
    cols = [out[1 + 4 * j: 5 + 4 * j] for j in range(3)]
    assert "done in" in status and f"mean_diff at layer {LAYER}" in status
    scores = []
    for title, text, tokens, table in cols:
        assert text.strip(), title
        assert len(tokens) >= 1
        s = {r[0]: r[1] for r in table["data"]}
        assert set(s) >= {"refused", "refusal logit", "KL next", "KL reply", "perplexity", "mean proj", "tokens"}
        scores.append(s)
    base, add, ortho = scores
    assert base["KL next"] == 0 and add["KL next"] > 0 and ortho["KL next"] > 0
    # adding the harmful-minus-harmless direction makes refusal more likely on a harmless request
    assert add["refusal logit"] > base["refusal logit"]
    # the projection on the direction moves the way the intervention pushes it
    assert add["mean proj"] > base["mean proj"]
    assert abs(ortho["mean proj"]) < 1e-2 * max(1.0, abs(base["mean proj"]))
