"""Make the replies behind ``workbench/data/judge_labels.jsonl`` and the judge's scores on them.

One job on the default model (greedy, 64 new tokens, one torch thread): replies to harmful and harmless
test-split prompts, unmodified and with the selected refusal direction ablated (difference in means of
the harmful vs harmless train prompts, residual input of layer 16 at the last prompt token, as
``steering/cli.py main_stage`` extracts it), and unmodified replies to 40 ``alarming_harmless`` prompts;
then the self-judge's log-odds on every pair and on the anchors, and probe features (residual output at
the last judging token of three layers). The labels are added by hand afterwards (see
``workbench/judge.py``).

    python scripts/judge_replies.py --out /tmp/judge_replies            # the default model (~10 min, 1 thread)
    python scripts/judge_replies.py --tiny --out /tmp/judge_dry          # a dry run on a tiny model
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from steering.directions import mean_diff_directions, mean_diff_from_activations
from steering.interventions import ablation
from workbench.backends import get_backend
from workbench.capture import capture
from workbench.chat import ChatFormat
from workbench.generation import generate_texts
from workbench.judge import ANCHORS, judge_forward
from workbench.prompts import builtin, builtin_split

LAYER = 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    fmt = ChatFormat()
    log = lambda msg: print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731
    if a.tiny:
        from workbench.loading import from_memory
        from workbench.tiny import build_tiny

        lm = from_memory(*build_tiny("qwen2"))
        n_h, n_hl, n_al = 3, 2, 2
        dirs = mean_diff_directions(lm, builtin_split("harmful", "train").texts[:8],
                                    builtin_split("harmless", "train").texts[:8], layers=[1], positions=["last"],
                                    cache=False)
        direction = dirs[0]
    else:
        from workbench.loading import load_model

        lm = load_model()
        n_h, n_hl, n_al = 34, 16, 40
        kw = dict(layers="all", components=("resid_pre", "resid_post"), positions=["post_instruction"], fmt=fmt)
        ha, hl = builtin_split("harmful", "train").texts, builtin_split("harmless", "train").texts
        acts_h, acts_l = capture(lm, ha, **kw), capture(lm, hl, **kw)  # the main job's cached capture
        log(f"capture from cache: {acts_h.meta.get('from_cache')}, {acts_l.meta.get('from_cache')}")
        dirs = mean_diff_from_activations(lm, acts_h, acts_l, ha, hl)
        direction = next(d for d in dirs if d.layer == LAYER and d.position == "pos-1")
    log(f"direction layer {direction.layer} {direction.position} norm {float(direction.vector.norm()):.3f}")
    be = get_backend("native", lm)
    harm, harmless = builtin_split("harmful", "test"), builtin_split("harmless", "test")
    alarming = builtin("alarming_harmless")
    rows = []
    for i, p in enumerate(harm.prompts[:2 * n_h]):
        rows.append({"id": p.id, "source": "harmful:test", "condition": "unmodified" if i % 2 == 0 else "ablated",
                     "prompt": p.text})
    for i, p in enumerate(harmless.prompts[:2 * n_hl]):
        rows.append({"id": p.id, "source": "harmless:test", "condition": "unmodified" if i % 2 == 0 else "ablated",
                     "prompt": p.text})
    for p in alarming.prompts[:n_al]:
        rows.append({"id": p.id, "source": "alarming_harmless", "condition": "unmodified", "prompt": p.text})
    for cond, ivs in (("unmodified", []), ("ablated", ablation(direction, lm.n_layers))):
        idx = [i for i, r in enumerate(rows) if r["condition"] == cond]
        replies = generate_texts(be, [rows[i]["prompt"] for i in idx], fmt, max_new_tokens=a.max_new_tokens,
                                 interventions=ivs, progress=False)
        for i, rep in zip(idx, replies):
            rows[i]["reply"] = rep
        log(f"generated {len(idx)} replies ({cond})")
        (a.out / "replies.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    layers = sorted({lm.n_layers // 2, (2 * lm.n_layers) // 3, (5 * lm.n_layers) // 6})
    prompts = [r["prompt"] for r in rows] + [x[0] for x in ANCHORS]
    replies = [r["reply"] for r in rows] + [x[1] for x in ANCHORS]
    lo, feats = judge_forward(be, prompts, replies, fmt, layers=layers, batch_size=8)
    log("judged")
    for r, v in zip(rows, lo.tolist()):
        r["judge_logodds"] = round(float(v), 4)
    meta = {"model_id": lm.model_id, "model_checksum": lm.checksum, "max_new_tokens": a.max_new_tokens,
            "direction": {"layer": direction.layer, "position": direction.position, "component": direction.component,
                          "method": direction.method, "norm": round(float(direction.vector.norm()), 4)},
            "anchor_logodds": [round(float(v), 4) for v in lo[len(rows):].tolist()], "probe_layers": layers,
            "seconds": round(time.time() - t0, 1)}
    (a.out / "replies.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    (a.out / "meta.json").write_text(json.dumps(meta, indent=1))
    torch.save({k: v[:len(rows)] for k, v in feats.items()}, a.out / "probe_features.pt")
    log(f"done: {a.out}")


if __name__ == "__main__":
    main()
