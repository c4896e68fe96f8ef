"""Is refusal one direction or several? A harm direction and a decline direction, compared and ablated
alone and together (issue 12, item 5).

The default model (a coder model) answers "I'm sorry, but I can't assist with that." to part of plain
everyday questions that have nothing to do with code, so part of what is measured as refusal may be declining
anything off-topic. Two directions, read at the residual input of every layer (``resid_pre``, the last prompt
token by default):

- **harm direction**: difference in means of harmful vs harmless requests (``harmful:train`` minus
  ``harmless:train``: requests of the same form);
- **decline direction**: difference in means of the everyday questions the *unmodified* model declines minus
  those it answers (``everyday:train``). Which are declined is not assumed: each question is put to the model
  (greedy, ``label_tokens`` new tokens) and its reply judged (:class:`workbench.judge.RefusalJudge` by
  default; ``label_by`` = ``phrase`` uses phrase matching, ``agree`` keeps only the replies both call alike).

Per layer: the cosine of the two directions and each one's held-out AUROC as a projection score (the ``val``
splits: harmful vs harmless for the harm direction, declined vs answered everyday questions, labelled the same
way, for the decline direction; each direction is also scored on the other's labels). The ablation layer
is fixed by :data:`RULE_LAYER` before anything is ablated. Conditions (directional ablation at every layer's
residual input and attention / MLP output, :func:`workbench.interventions.ablation_everywhere`): unmodified,
harm, decline, both (the orthonormalised 2-D span), and a random control of the same dimension for each
(seeded). For every condition, on the ``test`` splits: harmful refusal, off-topic decline (everyday) and
harmless over-refusal by the judge and by phrases (95 % Wilson intervals), and the KL of the next-token
distribution to the unmodified model (bootstrap interval). Extraction prompts are never evaluation prompts
(:class:`DeclineSets` refuses an overlap). :func:`reading` applies :data:`RULE_READING`, also fixed before the run.

    workbench steer decline --out runs/decline                  # built-in harmful / harmless / everyday sets
    workbench steer decline --layer 16 --out runs/decline-l16   # the main job's selected layer instead of the rule

The science lives in :mod:`steering.decline_labels` (prompt sets, labelling), :mod:`steering.decline_layers`
(per-layer comparison, layer rule), :mod:`steering.decline_ablation` (conditions, evaluation, reading) and the
figure in :mod:`steering.decline_plots`; this module runs them in order (:func:`run_decline`) and is the command.

>>> from steering.decline_labels import DeclineSets
>>> DeclineSets.from_specs(limit=3).record()["everyday:train"]
3
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from steering.decline_ablation import (CONTROL, MEASURE, RULE_READING, control_directions, decline_conditions,
                                       evaluate, reading, span_ablation)
from steering.decline_labels import LABEL_BY, DeclineSets, Labelled, decide, label_replies, require_classes
from steering.decline_layers import RULE_LAYER, choose_layer, per_layer_rows
from workbench.errors import WorkbenchError
from workbench.vectors import Direction

__all__ = ["CONTROL", "MEASURE", "RULE_LAYER", "RULE_READING", "LABEL_BY", "DeclineSets", "Labelled", "DeclineResult",
           "decide", "label_replies", "require_classes", "per_layer_rows", "choose_layer", "span_ablation",
           "decline_conditions", "control_directions", "evaluate", "reading", "run_decline"]


@dataclass
class DeclineResult:
    """Everything one run measured (:func:`run_decline`)."""

    harm: list[Direction]
    decline: list[Direction]
    layer: int
    layer_reason: str
    per_layer: list[dict[str, Any]]
    labels: list[dict[str, Any]]
    label_counts: dict[str, dict[str, int]]
    summary: list[dict[str, Any]]
    per_prompt: list[dict[str, Any]]
    reading: dict[str, Any]
    controls: list[Direction] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def at_layer(self) -> tuple[Direction, Direction]:
        """The harm and decline directions at the ablation layer."""
        return (next(d for d in self.harm if d.layer == self.layer),
                next(d for d in self.decline if d.layer == self.layer))


def _position_key(position: str) -> str:
    if position == "last":
        return "last"
    if position.lstrip("-").isdigit() and int(position) < 0:
        return f"pos{int(position)}"
    raise WorkbenchError(f"--position must be 'last' or a negative index from the prompt's end (e.g. -2), got "
                         f"{position!r}")


def run_decline(lm: Any, fmt: Any, sets: DeclineSets, judge: Any, *, backend: str = "native", position: str = "last",
                layer: int | None = None, label_tokens: int = 32, max_new_tokens: int = 64, min_declined: int = 8,
                label_by: str = "judge", n_boot: int = 1000, seed: int = 0, cache: bool = True,
                progress: bool = True) -> DeclineResult:
    """Label, extract, compare per layer, choose the layer, ablate and evaluate (see the module docstring)."""
    from steering.directions import mean_diff_from_activations
    from workbench.backends import get_backend
    from workbench.capture import capture

    key = _position_key(position)
    if label_by not in LABEL_BY:
        raise WorkbenchError(f"unknown labelling {label_by!r}; valid: {', '.join(LABEL_BY)}")
    if min_declined < 2:
        raise WorkbenchError(f"--min-declined must be >= 2 (a mean needs prompts), got {min_declined}")
    if layer is not None and not 0 <= layer < lm.n_layers:
        raise WorkbenchError(f"--layer {layer} is outside the model's 0..{lm.n_layers - 1}")
    be = get_backend(backend, lm)
    t0 = time.perf_counter()
    n_tr = len(sets.everyday_train)
    lab = label_replies(be, fmt, list(sets.everyday_train) + list(sets.everyday_val), judge,
                        max_new_tokens=label_tokens, by=label_by, progress=progress)
    tr = Labelled(*(x[:n_tr] for x in (lab.prompts, lab.replies, lab.judge, lab.phrase, lab.declined)))
    va = Labelled(*(x[n_tr:] for x in (lab.prompts, lab.replies, lab.judge, lab.phrase, lab.declined)))
    require_classes(tr, min_declined, "everyday:train")
    require_classes(va, 2, "everyday:val", "to score the decline direction per layer", "")
    t1 = time.perf_counter()

    def acts(prompts: Sequence[str]) -> Any:
        return capture(lm, list(prompts), layers="all", components=["resid_pre"], positions=[position if key == "last"
                       else int(position)], fmt=fmt, backend=backend, cache=cache, progress=progress)

    a_h, a_n = acts(sets.harmful_train), acts(sets.harmless_train)
    a_e = acts(list(sets.everyday_train) + list(sets.everyday_val))
    a_dec, a_ans = a_e.select(tr.indices(True)), a_e.select(tr.indices(False))
    harm = mean_diff_from_activations(lm, a_h, a_n, sets.harmful_train, sets.harmless_train)
    dec_p = [tr.prompts[i] for i in tr.indices(True)]
    ans_p = [tr.prompts[i] for i in tr.indices(False)]
    decline = mean_diff_from_activations(lm, a_dec, a_ans, dec_p, ans_p)
    for d, kind in [(d, "harm") for d in harm] + [(d, "decline") for d in decline]:
        d.meta.update(direction=kind, label_by=label_by if kind == "decline" else "")
    ev = a_e.get(key)[n_tr:]
    held = {"harmful": acts(sets.harmful_val).get(key), "harmless": acts(sets.harmless_val).get(key),
            "declined": ev[va.indices(True)], "answered": ev[va.indices(False)]}
    rows = per_layer_rows(harm, decline, held, n_boot=n_boot, seed=seed)
    chosen, reason = choose_layer(rows, lm.n_layers, layer)
    t2 = time.perf_counter()
    h, c = next(d for d in harm if d.layer == chosen), next(d for d in decline if d.layer == chosen)
    conds = decline_conditions(h, c, lm.n_layers, seed)
    summary, per = evaluate(be, fmt, conds, harmful=sets.harmful_test, everyday=sets.everyday_test,
                            harmless=sets.harmless_test, judge=judge, max_new_tokens=max_new_tokens, n_boot=n_boot,
                            seed=seed, progress=progress)
    t3 = time.perf_counter()
    return DeclineResult(harm, decline, chosen, reason, rows, tr.rows("train") + va.rows("val"),
                         {"train": tr.counts(), "val": va.counts()}, summary, per, reading(summary),
                         control_directions(h, c, seed),
                         {"labelling": t1 - t0, "directions_and_probes": t2 - t1, "ablations": t3 - t2})


def _print_table(summary: Sequence[dict[str, Any]]) -> None:
    print(f"{'condition':18} {'harmful refusal':>20} {'off-topic decline':>20} {'harmless refusal':>20} {'KL':>7}")
    for r in summary:
        cells = [f"{r[f'{c}']:.2f} [{r[f'{c}_lo']:.2f},{r[f'{c}_hi']:.2f}]" for c in
                 ("harmful_refusal_judge", "everyday_decline_judge", "harmless_refusal_judge")]
        print(f"{r['condition']:18} {cells[0]:>20} {cells[1]:>20} {cells[2]:>20} {r['kl_harmless']:>7.3f}")


def cmd_decline(args: argparse.Namespace) -> int:
    from steering.cli import _open_run, _setup
    from steering.decline_plots import decline_figure
    from workbench.argtypes import check_context, input_paths
    from workbench.backends import get_backend
    from workbench.judge import RefusalJudge
    from workbench.vectors import save_directions

    sets = DeclineSets.from_specs(args.harmful, args.harmless, args.everyday, limit=args.limit)
    _position_key(args.position)
    if args.min_declined < 2:
        raise WorkbenchError(f"--min-declined must be >= 2 (a mean needs prompts), got {args.min_declined}")
    inputs = input_paths(args.model, args.harmful, args.harmless, args.everyday)
    lm, fmt = _setup(args, inputs)
    if args.layer is not None and not 0 <= args.layer < lm.n_layers:
        raise WorkbenchError(f"--layer {args.layer} is outside the model's 0..{lm.n_layers - 1}")
    check_context(lm, fmt, [getattr(sets, n) for n in sets.names()], max(args.max_new_tokens, args.label_tokens))
    judge = RefusalJudge(get_backend(args.backend, lm), fmt, method=args.judge)
    res = run_decline(lm, fmt, sets, judge, backend=args.backend, position=args.position, layer=args.layer,
                      label_tokens=args.label_tokens, max_new_tokens=args.max_new_tokens,
                      min_declined=args.min_declined, label_by=args.label_by, n_boot=args.n_boot, seed=args.seed)
    run = _open_run(args, "decline", lm, inputs)
    save_directions(run.path / "directions.safetensors", res.harm + res.decline)
    save_directions(run.path / "ablated_directions.safetensors", [*res.at_layer(), *res.controls])
    run.write_csv("labels.csv", res.labels)
    run.write_csv("per_layer.csv", res.per_layer)
    run.write_csv("conditions.csv", res.summary)
    run.write_csv("per_prompt.csv", res.per_prompt)
    run.write_json("decline.json", {
        "layer": res.layer, "layer_reason": res.layer_reason, "rule_layer": RULE_LAYER, "reading": res.reading,
        "summary": res.summary, "label_counts": res.label_counts, "label_by": args.label_by, "judge": judge.name,
        "sets": {"harmful": args.harmful, "harmless": args.harmless, "everyday": args.everyday,
                 "sizes": sets.record(), "directions": "train splits", "probes": "val splits",
                 "ablations": "test splits"},
        "position": args.position, "cosine_at_layer": next(r["cosine"] for r in res.per_layer
                                                          if r["layer"] == res.layer),
        "seconds": res.seconds})
    run.save_figure("decline.png", decline_figure(res.per_layer, res.summary, res.layer,
                                                  f"{lm.model_id}: harm vs decline direction"))
    c = res.label_counts
    print(f"labels (unmodified, {args.label_by}): train {c['train']['declined']} declined / "
          f"{c['train']['answered']} answered, val {c['val']['declined']} / {c['val']['answered']}")
    print(f"ablation layer {res.layer} ({res.layer_reason}); cosine(harm, decline) there "
          f"{next(r['cosine'] for r in res.per_layer if r['layer'] == res.layer):.3f}")
    _print_table(res.summary)
    print(f"reading: {res.reading['verdict']} ({RULE_READING})")
    return 0


def add_decline_parser(ss: Any, common: Any) -> None:
    """Register ``steer decline`` (called from :func:`steering.cli.register`)."""
    from workbench.argtypes import positive_int

    p = ss.add_parser("decline", help="harm direction vs decline direction (everyday questions the model declines): "
                                      "cosine and probe AUROC per layer, each ablated alone and together, with "
                                      "random controls, harmful refusal, off-topic decline and KL")
    common(p)
    p.add_argument("--harmful", default="harmful", help="whole harmful set (built-in name or file): train / val / test "
                                                        "splits for direction / probe / ablations")
    p.add_argument("--harmless", default="harmless", help="whole harmless set, the harm direction's other side")
    p.add_argument("--everyday", default="everyday", help="whole set of everyday off-topic questions (the decline "
                                                          "direction's prompts, labelled by the unmodified model)")
    p.add_argument("--position", default="last", help="reading position: last (default) or -K from the prompt's end")
    p.add_argument("--layer", type=int, default=None, help="ablation layer (default: the rule, see decline.json)")
    p.add_argument("--label-by", choices=LABEL_BY, default="judge",
                   help="declined / answered by the judge (default), by phrases, or where both agree")
    p.add_argument("--judge", choices=("hybrid", "self", "rules"), default="hybrid", help="refusal judge method")
    p.add_argument("--label-tokens", type=positive_int, default=32, help="new tokens of the labelling replies")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="new tokens of the evaluation replies")
    p.add_argument("--min-declined", type=positive_int, default=8,
                   help="fewest declined (and answered) train questions to form the decline direction (default 8)")
    p.add_argument("--limit", type=positive_int, default=None, help="at most N prompts per split (quick runs)")
    p.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples (AUROC and KL intervals)")
    p.set_defaults(func=cmd_decline)
