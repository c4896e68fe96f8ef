"""Re-apply the deliberate breaks of issue #15, one at a time, on a temporary copy of the sources, and run the
fast tests that must notice each one (the working tree is never modified; see ``benchmarks/_overlay.py``).

    nice -n 10 .venv/bin/python benchmarks/breaks.py [--only ID ...] [--no-control]

For every break: the tests first run on the unbroken copy (the control: they must pass), then on the broken
copy (they must fail). Prints a table and writes benchmarks/results/breaks.json. Exit code 1 when a break goes
unnoticed or a control fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _overlay import Overlay  # noqa: E402


@dataclass(frozen=True)
class Break:
    id: str
    what: str
    file: str | tuple[str, ...]  # alternatives: the first file that holds the snippet
    old: str | tuple[str, ...]  # alternatives: the first one found in the source is broken
    new: str | tuple[str, ...]
    tests: tuple[str, ...]

    def pick(self, src: str) -> tuple[str, str] | None:
        olds = (self.old,) if isinstance(self.old, str) else self.old
        news = (self.new,) if isinstance(self.new, str) else self.new
        for o, n in zip(olds, news):
            if src.count(o) == 1:
                return o, n
        return None


BREAKS = (
    Break("cache_key-positions", "capture.cache_key: positions left out of the key", "workbench/capture.py",
          '        "keys": list(keys),\n', "",
          ("tests/test_cache_key.py",)),
    # every field of the cache key, dropped one at a time (and the backend added), against tests/test_cache_key.py
    *(Break(f"cache_key-{field}", f"capture.cache_key: {field} left out of the key", "workbench/capture.py",
            line, "", ("tests/test_cache_key.py",))
      for field, line in (("prompts", '        "texts": sha256_json(list(texts)),\n'),
                          ("template", '        "template": template_hash,\n'),
                          ("sites", '        "sites": [s.name for s in sites],\n'),
                          ("dtype", '        "dtype": str(lm.dtype),\n'),
                          ("checksum", '        "model": lm.checksum,\n'))),
    Break("cache_key-components", "capture.cache_key: components left out (layers only)", "workbench/capture.py",
          '"sites": [s.name for s in sites]', '"sites": [s.layer for s in sites]', ("tests/test_cache_key.py",)),
    Break("cache_key-backend", "capture.cache_key: the backend made part of the key", "workbench/capture.py",
          "key = cache_key(lm, texts, sites, keys, thash)", "key = cache_key(lm, texts, sites, keys, thash + backend)",
          ("tests/test_cache_key.py",)),
    Break("overlap-directions-side", "update_overlap: `directions.side == cfg.side` flipped", "weightspace/overlap.py",
          ("directions.side == cfg.side", "directions.side_of(info) == side"),
          ("directions.side != cfg.side", "directions.side_of(info) != side"),
          ("tests/test_breakage.py::test_overlap_directions_join_the_comparison",)),
    Break("projection-unselected", "projection: unselected tensors always keep the fine-tuned weights",
          "weightspace/projection.py",
          'load_f32(finetuned if cfg.unselected == "finetuned" else aligned, info)', "load_f32(finetuned, info)",
          ("tests/test_breakage.py", "-k", "unselected")),
    Break("safelora-threshold", "projection: safelora_threshold comparison inverted", "weightspace/projection.py",
          "cos >= cfg.safelora_threshold", "cos < cfg.safelora_threshold",
          ("tests/test_breakage.py", "-k", "safelora")),
    Break("score_column-kl_reply-max", "apps/steer.score_column: kl_reply uses max instead of mean", "apps/steer.py",
          "kl_reply=float(kl.mean())", "kl_reply=float(kl.max())",
          ("tests/test_breakage.py::test_score_column_equals_a_manual_teacher_forced_pass",
           "tests/test_app_scores.py")),
    Break("chain-paired-swapped", "chain._paired: higher / lower verdicts swapped",
          "weightspace/metrics.py",  # chain_report._paired -> weightspace.metrics.paired_difference (issue #10)
          "verdict = HIGHER if lo > 0 else LOWER if hi < 0 else NO_DIFFERENCE",
          "verdict = LOWER if lo > 0 else HIGHER if hi < 0 else NO_DIFFERENCE",
          ("tests/test_breakage.py", "-k", "paired")),
    Break("ablation-prompt-only", "ablation_everywhere: generated tokens no longer ablated (apply_to='prompt')",
          "workbench/interventions.py",
          "out.append(Ablation(Site(i, comp), direction))",
          'out.append(Ablation(Site(i, comp), direction, apply_to="prompt"))',
          ("tests/test_generation_ablation.py",
           "tests/test_weightspace_finetune.py::test_harmful_recipe_uses_the_models_own_ablated_generations")),
    Break("native-run-positions-dropped", "native run: position ids not passed to the model",
          "workbench/backends/native.py",
          "                position_ids=batch.position_ids,\n                use_cache=False,",
          "                use_cache=False,",
          ("tests/test_breakage.py", "-k", "rope and native")),
    Break("position-ids-shifted", "position_ids_from_mask: shifted by one", "workbench/chat.py",
          "(mask.long().cumsum(-1) - 1).clamp(min=0)", "mask.long().cumsum(-1).clamp(min=0)",
          ("tests/test_breakage.py", "-k", "position and not gpt2")),
    Break("refusal-ids-no-space", "refusal_token_ids: space-prefixed variants dropped", "workbench/scoring.py",
          'for variant in (phrase, " " + phrase):', "for variant in (phrase,):",
          ("tests/test_breakage.py::test_refusal_token_ids_include_the_space_prefixed_forms",
           "tests/test_scoring.py::test_refusal_scores_equal_manual_log_odds")),
    Break("probe-best-layer", "probe sweep summary: best_layer always the first layer", "probes/cli.py",
          'best = res.best_layer("logistic_auroc")', "best = 0",
          ("tests/test_probes.py::test_run_probe_sweep_writes_a_complete_run_folder",)),
)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None, help="break ids to run (default: all)")
    ap.add_argument("--no-control", action="store_true", help="skip the runs on the unbroken copy")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "breaks.json"))
    args = ap.parse_args()
    todo = [b for b in BREAKS if not args.only or b.id in args.only]
    results = []
    ok = True
    with Overlay() as ov:
        ov.check("workbench.capture")
        for b in todo:
            found, file = None, None
            for file in ((b.file,) if isinstance(b.file, str) else b.file):
                src = ov.source(file)
                found = b.pick(src)
                if found is not None:
                    break
            if found is None:
                print(f"{b.id}: the snippet to break does not occur exactly once in {b.file}: update BREAKS")
                results.append({"id": b.id, "what": b.what, "error": "snippet not found"})
                ok = False
                continue
            control = None if args.no_control else ov.run(list(b.tests), args.timeout, ("-q",))
            ov.replace(file, src.replace(*found))
            try:
                broken = ov.run(list(b.tests), args.timeout, ("-q",))
            finally:
                ov.restore(file)
            summary = broken.tail.strip().splitlines()[-1] if broken.tail.strip() else ""
            caught = not broken.passed
            ok &= caught and (control is None or control.passed)
            row = {"id": b.id, "what": b.what, "file": file, "broken_code": found[1], "tests": " ".join(b.tests),
                   "control": None if control is None else ("pass" if control.passed else f"FAIL rc={control.rc}"),
                   "broken": "caught" if caught else "NOT CAUGHT", "broken_summary": summary,
                   "seconds": round(broken.seconds, 1)}
            if control is not None and not control.passed:
                row["control_tail"] = control.tail[-1500:]
            results.append(row)
            print(f"{b.id:30} control={row['control']}  broken={row['broken']:10}  ({summary})", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
