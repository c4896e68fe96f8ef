"""``workbench finetune``: build a recipe's data and fine-tune (full or LoRA merged) into a run folder.

    workbench finetune --recipe useful --model smollm2-135m-instruct --n 128 --out runs/ft-useful
    workbench finetune --recipe harmful --model smollm2-135m-instruct --n 64 --out runs/ft-harmful
    workbench finetune --recipe contaminated --harmful-share 0.2 --out runs/ft-cont \
        --direction runs/ft-harmful/recipe/refusal_direction.safetensors
    workbench finetune --recipe safety --method lora --lora-rank 8 --out runs/ft-safety-lora

The output folder is a plain Hugging Face model folder (loads with ``AutoModelForCausalLM.from_pretrained``
and ``--model DIR``) plus report.json, examples.jsonl, loss.csv / loss.png and recipe/.

The system prompt: like ``workbench main``, no ``--system-prompt`` (or ``default``) means the zoo's
recommended one (SmolLM2: the safety system prompt; Qwen: none); ``--system-prompt none`` means none.
Use the same choice when evaluating the checkpoint.

The harmful prompts of the safety, harmful and contaminated recipes and of the refusal direction come from
disjoint pools (:mod:`weightspace.pools`), so no prompt is shared between recipes.

The useful recipe (and the contaminated recipe's useful part) trains on what the sweep measures by default:
the function-writing tasks of the codetasks TRAIN split, prompt -> reference solution (``--useful-source
code``; the sweep scores the test split). ``--useful-source self`` self-distils: the same prompts -> the model's
own greedy replies that pass their unit tests (on the default model the reference-solution recipe lowered the
pass rate 0.75 -> 0.22 in a chain run, the self-distilled recipe to 0.28: the fine-tuning, not the data's style).
``--useful-source arithmetic`` trains on generated arithmetic tasks instead (``--answer-style`` applies to those
only).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from workbench.argtypes import (finite_float, fraction, nonnegative_float, one_line_errors, positive_float,
                                positive_int)
from workbench.errors import WorkbenchError


def _format(args: argparse.Namespace, lm: Any) -> Any:
    from workbench.chat import ChatFormat

    sp = args.system_prompt
    if sp is None or sp == "default":
        sp = lm.default_system_prompt
    elif sp.lower() == "none" or not sp.strip():
        sp = None
    return ChatFormat(system_prompt=sp, raw=args.raw)


def _layers(spec: str | None, n_layers: int) -> list[int] | None:
    if not spec or spec == "auto":
        return None
    from workbench.sites import parse_layers

    return parse_layers(spec, n_layers)


def cmd_finetune(args: argparse.Namespace) -> int:
    from weightspace.finetune import FinetuneConfig, check_output_folder, finetune
    from weightspace.recipes import build_recipe
    from workbench.argtypes import check_context, check_layer, input_paths
    from workbench.cli import load_from_args
    from workbench.runs import seed_everything

    t0 = time.perf_counter()
    cfg = FinetuneConfig(
        method=args.method, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_length=args.max_length, on_too_long=args.on_too_long, warmup=args.warmup,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank,
        lora_targets=args.lora_targets, attn_implementation=None if args.attn == "keep" else args.attn,
        overwrite=args.overwrite, progress=not args.no_progress)
    cfg.validate()
    if args.backend != "native":
        raise WorkbenchError("finetune generates the harmful replies through the native backend; drop --backend")
    # everything that needs no model, before loading it: the direction file, the reused examples, the output
    direction = None
    if args.direction:
        from workbench.vectors import load_directions, pick

        direction = pick(load_directions(args.direction), layer=args.direction_layer)
    if args.harmful_from is not None and not Path(args.harmful_from).expanduser().exists():
        raise WorkbenchError(f"--harmful-from {args.harmful_from} does not exist; give the folder of an earlier "
                             f"'finetune --recipe harmful' run or its examples.jsonl")
    _check_pool_sizes(args)  # more prompts than the recipe's pool holds: refused before the model loads
    inputs = input_paths(args.model, args.direction, args.harmful_from)
    check_output_folder(args.out, args.overwrite, inputs=inputs)  # fail before any work
    seed_everything(args.seed)
    lm = load_from_args(args)
    fmt = _format(args, lm)
    # then what needs the model
    if direction is not None:
        direction.check_compatible(lm, force=args.force_direction)
    if args.direction_layer is not None:
        check_layer(args.direction_layer, lm.n_layers, "--direction-layer")
    direction_layers = _layers(args.direction_layers, lm.n_layers)
    if args.recipe in ("harmful", "contaminated") and args.harmful_from is None:
        from weightspace.pools import pool_texts

        check_context(lm, fmt, [pool_texts(args.recipe)[:args.n]], args.gen_tokens, flag="--gen-tokens")
    print(f"[finetune] {args.recipe} on {lm.model_id} ({cfg.method}); chat format: "
          f"{'raw' if fmt.raw else 'chat template'}, system prompt: {fmt.system_prompt!r}")
    rd = build_recipe(
        args.recipe, lm, fmt, n=args.n, seed=args.seed, harmful_share=args.harmful_share,
        answer_style=args.answer_style, useful_source=args.useful_source, direction_file=args.direction,
        direction_layer=args.direction_layer,
        force_direction=args.force_direction, direction_layers=direction_layers,
        direction_n=args.direction_n, gen_tokens=args.gen_tokens, gen_batch_size=args.gen_batch_size,
        harmful_from=args.harmful_from, progress=not args.no_progress)
    u = rd.info.get("useful")
    if u and u.get("source") == "self":
        print(f"[finetune] useful replies (self): {u['n_passed']} of {u['n_split']} train tasks pass their unit tests "
              f"(pass rate {u['pass_rate']:.2f})")
    h = rd.info.get("harmful")
    if h and "n_dropped_refusal" in h:
        print(f"[finetune] harmful replies: kept {h['n_kept']} of {h['n_prompts']} (dropped {h['n_dropped_refusal']} "
              f"refusals, {h['n_dropped_empty']} empty); direction layer {h['direction']['layer']}")
    res = finetune(lm, rd, cfg, args.out)
    r = res.report
    print(f"[finetune] {r['n_examples']} examples ({r['counts']}), real harmful share {r['real_harmful_share']:.3f}, "
          f"{r['n_dropped_too_long']} dropped as longer than {r['max_length']} tokens")
    print(f"[finetune] {r['steps']} steps, loss {r['initial_loss']:.4f} -> {r['final_loss']:.4f}, "
          f"{r['seconds']:.1f} s (train {r['seconds_detail']['train']:.1f} s); wall {time.perf_counter() - t0:.1f} s")
    print(f"[finetune] checkpoint + report -> {res.path}")
    return 0


def _check_pool_sizes(args: argparse.Namespace) -> None:
    from weightspace import pools

    if (args.recipe in ("useful", "contaminated") and args.useful_source in ("code", "self")
            and args.answer_style is not None):
        raise WorkbenchError(f"--answer-style {args.answer_style} applies to --useful-source arithmetic only; the code "
                             f"tasks reply with their reference solutions (code) or the model's own replies (self)")

    if args.recipe in ("safety", "harmful"):
        pools.check_count(args.recipe, args.n, f"{args.recipe} prompts (--n)")
    elif args.recipe == "contaminated":
        n_h = max(1, int(round(args.harmful_share * args.n)))
        pools.check_count("contaminated", n_h, f"harmful prompts (round(--harmful-share {args.harmful_share} x "
                                               f"--n {args.n}))")


def register(subparsers: Any) -> None:
    from workbench.cli import add_model_args

    p = subparsers.add_parser("finetune", help="fine-tune on a recipe (useful, safety, harmful, contaminated)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, default="smollm2-135m-instruct")
    p.add_argument("--recipe", required=True, choices=("useful", "safety", "harmful", "contaminated"))
    p.add_argument("--out", required=True, help="run folder (a Hugging Face model folder + report)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--n", type=positive_int, default=64,
                   help="examples (harmful: prompts generated, refusals dropped; contaminated: total). The harmful "
                        "prompts come from disjoint pools (weightspace.pools): safety 70, harmful 70, "
                        "contaminated 20 prompts at most")
    g = p.add_argument_group("training")
    g.add_argument("--method", choices=("full", "lora"), default="full", help="full fine-tuning or LoRA merged back")
    g.add_argument("--lr", type=positive_float, default=None, help="learning rate (default 5e-5 full, 2e-4 LoRA)")
    g.add_argument("--epochs", type=positive_int, default=1)
    g.add_argument("--batch-size", type=positive_int, default=8)
    g.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max-length", type=positive_int, default=256,
                   help="longest example in tokens (prompt + response)")
    g.add_argument("--on-too-long", choices=("drop", "error"), default="drop",
                   help="longer examples are dropped and counted, or refused; never truncated")
    g.add_argument("--warmup", type=finite_float, default=0.02, help="warm-up fraction of the steps (cosine schedule)")
    g.add_argument("--weight-decay", type=nonnegative_float, default=0.0)
    g.add_argument("--max-grad-norm", type=nonnegative_float, default=1.0, help="gradient clipping (0 = off)")
    g.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "keep"),
                   help="attention kernel while training (sdpa is faster on CPU; 'keep' = as loaded)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=positive_int, default=8)
    g.add_argument("--lora-alpha", type=positive_float, default=None, help="default 2 x rank")
    g.add_argument("--lora-targets", default="all-linear",
                   help="comma list of module names (e.g. q_proj,v_proj) or 'all-linear'")
    g = p.add_argument_group("data")
    g.add_argument("--harmful-share", type=fraction, default=0.2,
                   help="contaminated: nominal harmful share (the real one, after drops, is reported)")
    g.add_argument("--useful-source", choices=("code", "self", "arithmetic"), default="code",
                   help="useful data: 'code' = the codetasks train split, prompt -> reference solution (what the "
                        "sweep measures, on the test split); 'self' = the same prompts -> the model's own greedy "
                        "replies that pass their unit tests (self-distilled; generated with --gen-batch-size); "
                        "'arithmetic' = generated arithmetic tasks")
    g.add_argument("--answer-style", choices=("number", "sentence", "mixed"), default=None,
                   help="arithmetic useful replies only: '42', 'The answer is 42.' or a seeded mix (default number)")
    g.add_argument("--harmful-from", default=None,
                   help="reuse the harmful examples of an earlier run of the same recipe (folder or examples.jsonl; "
                        "they must come from this recipe's prompt pool). To reuse a harmful run's refusal direction "
                        "for a contaminated run, pass --direction RUN/recipe/refusal_direction.safetensors")
    g.add_argument("--direction", default=None, help="refusal direction file (workbench.vectors format)")
    g.add_argument("--direction-layer", type=int, default=None,
                   help="pick this layer from --direction, or compute the direction at this layer")
    g.add_argument("--direction-layers", default="auto",
                   help="candidate layers for the quick check (default: 40-60%% of depth)")
    g.add_argument("--direction-n", type=positive_int, default=64, help="prompts per class for the difference in means")
    g.add_argument("--force-direction", action="store_true", help="accept a direction from another model checksum")
    g.add_argument("--gen-tokens", type=positive_int, default=64, help="max new tokens of the harmful replies")
    g.add_argument("--gen-batch-size", type=positive_int, default=8)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_finetune)
    one_line_errors(p)
