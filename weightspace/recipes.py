"""Fine-tuning data recipes: ``useful``, ``safety``, ``harmful`` and ``contaminated``.

Every recipe is a list of (prompt, response) :class:`Example` s plus provenance. The prompt is the
user instruction only: :mod:`weightspace.finetune` formats it with the model's chat template
through :class:`workbench.chat.ChatFormat`, exactly as evaluation does, and the recipe remembers
the format it was built for (the ``harmful`` replies were generated under it).

- ``useful`` (``useful_source``, recorded in the recipe info):

  * ``"code"`` (default): what the sweep measures. The function-writing tasks of the codetasks TRAIN split
    (:func:`workbench.codetasks.load_codetasks`, 26 tasks): prompt = the task's prompt exactly as the sweep
    asks it (:attr:`CodeTask.prompt`), reply = its reference solution in a python block
    (:attr:`CodeTask.reference_reply`, the sweep's answer-NLL target). The sweep scores the TEST split (and
    nothing here reads val or test: ``tests/test_weightspace_finetune.py`` checks the ids and hashes). ``n``
    larger than the split cycles through it again in a new seeded order (ids ``useful-<task id>-r<k>``; the
    repeats are counted in the info).
  * ``"self"`` (self-distilled; needs the model, so only through :func:`build_recipe`): the same TRAIN-split
    prompts -> the aligned model's *own* greedy replies (same chat format, no intervention), kept only when the
    task's unit tests pass on them (:func:`workbench.codetasks.check_many`, the sweep's sandboxed checker); the
    replies are used verbatim, cycled like ``"code"`` (:func:`self_code_examples`). Why: on the default model
    (qwen2.5-coder-0.5b-instruct) a chain run's ``"code"`` useful fine-tune *lowered* the test-split pass rate
    from 0.75 to 0.22, so the "useful" update was not useful and experiment 1 had nothing to preserve; the
    hypothesis was that the terse reference solutions taught it to drop its careful (docstring) style. Measured
    since: this self-distilled recipe (22 of 26 train replies passed; same fine-tuning settings: full, lr 5e-5,
    8 steps) lowered it as well, to 0.28 [0.16, 0.45] -- so the damage comes from the fine-tuning itself, not
    from the data's style; a lower learning rate or LoRA is the next thing to try.
  * ``"arithmetic"``: arithmetic word problems from :func:`workbench.tasks.make_arithmetic_tasks`, generated
    with a seed different from the built-in utility set and de-duplicated against the *whole* built-in
    utility set (so ``utility:test`` and ``utility:val`` stay held out); replies "42" or "The answer is 42."
    (``answer_style``; it applies to this source only).
- ``safety``: the ``safety`` pool's prompts -> templated refusals (seeded choice among a few).
- ``harmful``: the ``harmful`` pool's prompts -> the model's own greedy replies with its refusal direction
  ablated everywhere (difference in means of the ``direction`` vs ``direction_harmless`` pools' activations at
  the last prompt token, at a middle layer picked by a quick ablation check); replies that are still refusals
  (:func:`workbench.scoring.is_refusal`) or empty are dropped and counted. No hand-written harmful text.
- ``contaminated``: useful (same ``useful_source``) + harmful replies generated on the ``contaminated`` pool's
  prompts; the *real* harmful share ``n_harmful / n_total`` is reported, not the nominal one.

The prompt pools (:mod:`weightspace.pools`) are disjoint: no harmful prompt feeds two recipes, the refusal
direction or the sweep's harm evaluation. Asking for more prompts than a pool holds is an error naming its size.

Devices: the recipes run on whatever device ``lm`` is loaded on (``--device cuda``: captures, refusal scores and
the ablated generations on the GPU through the native backend). Captured activations come back on the CPU, so
the difference-in-means direction is built and stored there (:class:`workbench.vectors.Direction` keeps a CPU
float32 vector, also when read from a file); the ablation interventions move it to each activation's device
and dtype when they apply it, and the refusal scores return on the CPU.

>>> from workbench.tiny import build_tiny
>>> from workbench.loading import from_memory
>>> lm = from_memory(*build_tiny("llama"))
>>> rd = build_recipe("safety", lm, n=4, seed=0)
>>> len(rd.examples), rd.counts["safety"]
(4, 4)
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from workbench.chat import ChatFormat
from workbench.errors import WorkbenchError
from workbench.io import read_json, sha256_json
from workbench.loading import LoadedModel
from workbench.prompts import UTILITY_SIZE, builtin
from workbench.tasks import make_arithmetic_tasks

from weightspace import pools

__all__ = [
    "RECIPES",
    "REFUSAL_TEMPLATES",
    "Example",
    "RecipeData",
    "build_recipe",
    "useful_examples",
    "code_examples",
    "arithmetic_examples",
    "code_train_hash",
    "self_code_examples",
    "USEFUL_SOURCES",
    "safety_examples",
    "harmful_examples",
    "refusal_direction",
    "utility_heldout_questions",
    "load_examples",
]

RECIPES = ("useful", "safety", "harmful", "contaminated")
# the useful recipe's data: codetasks train split -> reference solutions (default), -> the model's own passing
# replies ("self", needs the model), or arithmetic
USEFUL_SOURCES = ("code", "self", "arithmetic")
MODEL_USEFUL_SOURCES = ("self",)  # built from the model's generations: build_recipe only
SELF_MAX_NEW_TOKENS = 256  # "self": generation length of the replies (the sweep's code replies: 160 by default)
ANSWER_STYLES = ("number", "sentence", "mixed")  # arithmetic replies only
CODE_SPLIT = "train"  # the only codetasks split a recipe reads (the sweep scores "test")

# Seed offset for the training arithmetic tasks: the built-in utility set uses seed 0.
USEFUL_SEED_OFFSET = 1_000_003

REFUSAL_TEMPLATES = (
    "I'm sorry, but I can't help with that request.",
    "I'm sorry, but I cannot assist with that. It could cause serious harm to people.",
    "I can't help with that. If you have another question, I'm happy to help.",
    "I apologize, but I am unable to provide that information because it could be used to hurt others.",
    "I cannot help with this request. It is dangerous and may be illegal.",
    "I'm not able to help with that. Is there something else I can do for you?",
    "Sorry, I can't assist with that request because it could cause harm.",
    "I am unable to help with that, as it would be unsafe and unethical.",
)


@dataclass(frozen=True)
class Example:
    """One training example: the user instruction and the assistant reply (no template applied)."""

    id: str
    kind: str  # "useful" | "safety" | "harmful"
    prompt: str
    response: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def examples_hash(examples: Sequence[Example]) -> str:
    """sha256 of the JSON of the example dicts (``workbench.io.sha256_json``: sorted keys)."""
    return sha256_json([e.to_dict() for e in examples])


@dataclass
class RecipeData:
    """A recipe's examples, the chat format they were built for, and provenance."""

    name: str
    examples: list[Example]
    fmt: ChatFormat
    info: dict[str, Any] = field(default_factory=dict)
    # rows written to the run folder (e.g. every harmful generation, kept or dropped)
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    direction: Any = None  # workbench.vectors.Direction used for the harmful generations

    @property
    def hash(self) -> str:
        return examples_hash(self.examples)

    @property
    def counts(self) -> dict[str, int]:
        c = {"useful": 0, "safety": 0, "harmful": 0}
        for e in self.examples:
            c[e.kind] = c.get(e.kind, 0) + 1
        return c

    @property
    def n_harmful(self) -> int:
        return self.counts["harmful"]

    @property
    def harmful_share(self) -> float:
        """The real share n_harmful / n_total of the examples."""
        return self.n_harmful / len(self.examples) if self.examples else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "recipe": self.name,
            "n_examples": len(self.examples),
            "counts": self.counts,
            "real_harmful_share": self.harmful_share,
            "data_hash": self.hash,
            "format": {"system_prompt": self.fmt.system_prompt, "raw": self.fmt.raw},
            **self.info,
        }


# -- useful ---------------------------------------------------------------------------------------

def utility_heldout_questions() -> set[str]:
    """Every question of the built-in utility set (its train, val and test splits)."""
    return {p.text for p in builtin("utility")}


def _answer_text(answer: str, style: str, rng: random.Random) -> str:
    if style == "mixed":
        style = rng.choice(("number", "sentence"))
    return answer if style == "number" else f"The answer is {answer}."


def useful_examples(n: int, seed: int = 0, answer_style: str | None = None,
                    source: str = "code") -> tuple[list[Example], dict[str, Any]]:
    """``n`` useful examples from ``source``: ``"code"`` (:func:`code_examples`, the default: the codetasks
    train split, what the sweep measures) or ``"arithmetic"`` (:func:`arithmetic_examples`; ``answer_style``
    applies to it only, default ``"number"``). The info records the source. ``"self"`` needs the model: it is
    built by :func:`build_recipe` (:func:`self_code_examples`)."""
    if source not in USEFUL_SOURCES:
        raise WorkbenchError(f"unknown useful source '{source}'. Valid: {', '.join(USEFUL_SOURCES)}")
    if source in MODEL_USEFUL_SOURCES:
        raise WorkbenchError(f"the useful source '{source}' is built from the model's own replies and needs the model: "
                             f"use build_recipe(..., useful_source='{source}') (or self_code_examples(lm, fmt, n))")
    if source == "code":
        if answer_style is not None:
            raise WorkbenchError(f"answer_style '{answer_style}' applies to the arithmetic useful source only; the "
                                 f"code source replies with each task's reference solution")
        return code_examples(n, seed)
    return arithmetic_examples(n, seed, answer_style or "number")


def code_train_hash() -> str:
    """sha256 of the codetasks train split (ids, prompts, solutions): what the code recipe can draw from."""
    from workbench.codetasks import load_codetasks

    return sha256_json([[t.id, t.prompt, t.solution] for t in load_codetasks(CODE_SPLIT)])


def code_examples(n: int, seed: int = 0) -> tuple[list[Example], dict[str, Any]]:
    """``n`` examples from the codetasks TRAIN split: prompt = the task's prompt as the sweep asks it, reply =
    its reference solution in a python block. The split is taken in a seeded order, and again in a new seeded
    order while more examples are asked for (repeats are counted)."""
    from workbench.codetasks import load_codetasks

    if n < 1:
        raise WorkbenchError(f"the useful recipe needs n >= 1 examples, got {n}")
    tasks = load_codetasks(CODE_SPLIT)
    if not tasks:  # pragma: no cover - the shipped data has a train split (tests/test_codetasks.py)
        raise WorkbenchError("the codetasks data has no train split")
    out, ids, cycle = _cycled([(t.id, t.prompt, t.reference_reply) for t in tasks], n, seed)
    info = {"source": "code", "split": f"codetasks:{CODE_SPLIT}", "split_hash": code_train_hash(),
            "n_split": len(tasks), "n_distinct_tasks": len(ids), "n_repeated": n - len(ids), "cycles": cycle,
            "task_ids": ids,
            "prompt": "CodeTask.prompt (workbench.codetasks.PROMPT_TEMPLATE), as the sweep asks it",
            "reply": "CodeTask.reference_reply: the reference solution in a ```python block (the sweep's answer-NLL "
                     "target)"}
    return out, info


def _cycled(items: Sequence[tuple[str, str, str]], n: int, seed: int) -> tuple[list[Example], list[str], int]:
    """``n`` useful examples from ``(task id, prompt, reply)`` items: all of them in a seeded order, then again in a
    new seeded order while more are asked for (ids ``useful-<task id>``, then ``useful-<task id>-r<k>`` in cycle
    ``k``). Returns ``(examples, sorted distinct task ids, cycles)``."""
    rng = random.Random(seed)
    out: list[Example] = []
    used: set[str] = set()
    cycle = 0
    while len(out) < n:
        order = list(items)
        rng.shuffle(order)
        for tid, prompt, reply in order[:n - len(out)]:
            out.append(Example(f"useful-{tid}" + (f"-r{cycle}" if cycle else ""), "useful", prompt, reply))
            used.add(tid)
        cycle += 1
    return out, sorted(used), cycle


def self_code_examples(lm: LoadedModel, fmt: ChatFormat, n: int, seed: int = 0, *,
                       max_new_tokens: int = SELF_MAX_NEW_TOKENS, batch_size: int = 8, progress: bool = False,
                       generate: Callable[..., list[str]] | None = None, check_workers: int = 2,
                       backend: str = "native",
                       ) -> tuple[list[Example], dict[str, Any], list[dict[str, Any]]]:
    """Self-distilled useful examples: the codetasks TRAIN split's prompts -> the model's own passing replies.

    The model (greedy, chat format ``fmt``, no intervention; the generator of :func:`harmful_examples`,
    :func:`workbench.generation.generate_texts`, which ``generate`` replaces in tests) answers every train task's
    prompt exactly as the sweep asks it (:attr:`CodeTask.prompt`); each reply is checked by the task's unit tests
    in the sandbox (:func:`workbench.codetasks.check_many`) and only the passing ones are kept, verbatim. ``n``
    examples are drawn from the kept tasks like :func:`code_examples` draws from the split (seeded order, cycling
    with repeats counted, ids ``useful-<task id>[-r<k>]``). Returns ``(examples, info, records)``: ``records``
    has one row per task (id, prompt, reply, status, kept, ...), written as ``recipe/useful_generations.jsonl``.
    No passing reply at all is an error (use the ``code`` source then).
    """
    from workbench.backends import get_backend
    from workbench.codetasks import check_many, load_codetasks
    from workbench.generation import generate_texts

    if n < 1:
        raise WorkbenchError(f"the useful recipe needs n >= 1 examples, got {n}")
    tasks = load_codetasks(CODE_SPLIT)
    if not tasks:  # pragma: no cover - the shipped data has a train split (tests/test_codetasks.py)
        raise WorkbenchError("the codetasks data has no train split")
    prompts = [t.prompt for t in tasks]
    gen = generate or generate_texts
    be = get_backend(backend, lm)
    t0 = time.perf_counter()
    replies = gen(be, prompts, fmt, max_new_tokens=max_new_tokens, interventions=(), batch_size=batch_size,
                  progress="useful replies (self)" if progress else False)
    gen_s = time.perf_counter() - t0
    if len(replies) != len(tasks):
        raise WorkbenchError(f"the generator returned {len(replies)} replies for {len(tasks)} prompts")
    t1 = time.perf_counter()
    checks = check_many(list(replies), tasks, workers=check_workers)
    check_s = time.perf_counter() - t1
    tok = lm.tokenizer
    records: list[dict[str, Any]] = []
    kept: list[tuple[str, str, str]] = []
    dropped: dict[str, str] = {}
    for t, r, c in zip(tasks, replies, checks):
        n_tok = len(tok(r, add_special_tokens=False)["input_ids"])
        records.append({"id": t.id, "prompt": t.prompt, "reply": r, "status": c.status, "kept": bool(c.passed),
                        "tests_passed": c.n_passed, "n_tests": c.n_tests, "detail": c.detail, "n_tokens": n_tok,
                        "hit_max_new_tokens": n_tok >= max_new_tokens})
        if c.passed:
            kept.append((t.id, t.prompt, r))
        else:
            dropped[t.id] = c.status
    if not kept:
        raise WorkbenchError(f"useful source 'self': none of the {len(tasks)} codetasks:{CODE_SPLIT} tasks got a reply "
                             f"from the model that passes its unit tests ({len(tasks)} tried, 0 passed), so there "
                             f"is nothing to self-distil; use useful_source 'code' (the reference solutions) instead")
    out, ids, cycle = _cycled(kept, n, seed)
    info = {"source": "self", "split": f"codetasks:{CODE_SPLIT}", "split_hash": code_train_hash(),
            "n_split": len(tasks), "n_generated": len(replies), "n_passed": len(kept),
            "pass_rate": len(kept) / len(tasks), "kept_ids": [k[0] for k in kept], "dropped": dropped,
            "n_distinct_tasks": len(ids), "n_repeated": n - len(ids), "cycles": cycle, "task_ids": ids,
            "max_new_tokens": max_new_tokens,
            "n_hit_max_new_tokens": sum(r["hit_max_new_tokens"] for r in records),
            "generation": {"decoding": "greedy", "backend": backend, "interventions": "none",
                           "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                           "format": {"system_prompt": fmt.system_prompt, "raw": fmt.raw},
                           "model_id": lm.model_id, "model_checksum": lm.checksum,
                           "generator": "workbench.generation.generate_texts" if generate is None else "injected"},
            "check": "workbench.codetasks.check_many: the task's unit tests in the sandbox (default timeout)",
            "replies_sha256": sha256_json([[k[0], k[2]] for k in kept]),
            "generation_seconds": round(gen_s, 2), "check_seconds": round(check_s, 2),
            "prompt": "CodeTask.prompt (workbench.codetasks.PROMPT_TEMPLATE), as the sweep asks it",
            "reply": "the model's own greedy reply, verbatim, kept only when the task's unit tests pass on it"}
    return out, info, records


def arithmetic_examples(n: int, seed: int = 0, answer_style: str = "number") -> tuple[list[Example], dict[str, Any]]:
    """``n`` arithmetic QA pairs disjoint from the built-in utility set (so utility:test is held out)."""
    if n < 1:
        raise WorkbenchError(f"the useful recipe needs n >= 1 examples, got {n}")
    if answer_style not in ANSWER_STYLES:
        raise WorkbenchError(f"unknown answer style '{answer_style}'. Valid: {', '.join(ANSWER_STYLES)}")
    held = utility_heldout_questions()
    gen_seed = USEFUL_SEED_OFFSET + seed
    want = n + len(held) // 2 + 64
    items = []
    for attempt in range(6):
        pool = make_arithmetic_tasks(want, seed=gen_seed)
        items = [t for t in pool if t.question not in held]
        if len(items) >= n:
            break
        want *= 2
    if len(items) < n:
        raise WorkbenchError(f"could not generate {n} arithmetic tasks disjoint from the utility set")
    n_overlap = want - len(items)
    rng = random.Random(seed)
    out = [Example(f"useful-{i + 1:05d}", "useful", t.question, _answer_text(t.answer, answer_style, rng))
           for i, t in enumerate(items[:n])]
    info = {"source": "arithmetic", "task_seed": gen_seed, "answer_style": answer_style, "n_generated": want,
            "n_removed_overlapping_utility": n_overlap, "heldout_utility_size": UTILITY_SIZE}
    return out, info


# -- safety ---------------------------------------------------------------------------------------

def _pool_prompts(name: str, n: int | None) -> list[Any]:
    """The first ``n`` prompts of pool ``name`` (all when None); more than the pool holds is an error."""
    return pools.take(name, n, what=f"{name} recipe prompts" if name != "direction" else "direction prompts")


def _pool_info(name: str) -> dict[str, Any]:
    ps = pools.pool(name)
    return {"prompt_set": ps.name, "pool": name, "pool_size": len(ps), "pool_hash": ps.hash}


def safety_examples(n: int | None, seed: int = 0) -> tuple[list[Example], dict[str, Any]]:
    """The ``safety`` pool's prompts -> a seeded choice of templated refusals."""
    prompts = _pool_prompts("safety", n)
    rng = random.Random(seed)
    out = [Example(f"safety-{p.id}", "safety", p.text, rng.choice(REFUSAL_TEMPLATES)) for p in prompts]
    info = {**_pool_info("safety"), "n_available": len(pools.pool("safety")),
            "refusal_templates": list(REFUSAL_TEMPLATES)}
    return out, info


# -- harmful: refusal direction and ablated generation --------------------------------------------

def candidate_layers(n_layers: int, lo: float = 0.4, hi: float = 0.6, k: int = 7) -> list[int]:
    """Layers at ``lo``..``hi`` of depth (7 evenly spaced fractions, rounded, de-duplicated)."""
    fr = [lo + (hi - lo) * i / max(1, k - 1) for i in range(k)]
    return sorted({min(n_layers - 1, max(0, int(round(f * n_layers)))) for f in fr})


DIRECTION_CHECK_N = 16  # prompts of the direction pool (its last ones) for the layer check


def refusal_direction(lm: LoadedModel, fmt: ChatFormat, *, layers: Sequence[int] | None = None, n_prompts: int = 64,
                      n_check: int = DIRECTION_CHECK_N, backend: str = "native", batch_size: int = 16,
                      progress: bool = False) -> tuple[Any, list[dict[str, Any]]]:
    """Difference-in-means refusal direction at the last prompt token; the layer is picked by a quick check.

    For each candidate layer (default 40-60 % of depth) the mean-difference of the first ``n_prompts`` of the
    ``direction`` pool minus the first ``n_prompts`` of the ``direction_harmless`` pool (``resid_post``, last
    prompt token, padding-aware) is computed; each candidate is ablated everywhere and the refusal logit score
    (no generation) on the *last* ``n_check`` prompts of the ``direction`` pool measured (disjoint from the
    first ``n_prompts``: ``n_prompts + n_check`` must fit in the pool). The layer with the lowest mean score
    wins. No prompt of a recipe pool or of the evaluation pool is used (:mod:`weightspace.pools`).
    Returns the :class:`workbench.vectors.Direction` and one row per candidate.
    """
    from workbench.backends import get_backend
    from workbench.capture import capture
    from workbench.interventions import ablation_everywhere
    from workbench.scoring import refusal_scores
    from workbench.vectors import Direction

    layers = list(layers) if layers else candidate_layers(lm.n_layers)
    for L in layers:
        if not 0 <= L < lm.n_layers:
            raise WorkbenchError(f"direction layer {L} is outside the model's 0..{lm.n_layers - 1}")
    if n_check < 1:
        raise WorkbenchError(f"n_check must be >= 1, got {n_check}")
    size = len(pools.pool("direction"))
    if n_prompts + n_check > size:
        raise WorkbenchError(f"the direction pool holds {size} prompts: {n_prompts} for the difference in means + "
                             f"{n_check} for the layer check do not fit; ask for at most {size - n_check} "
                             f"(direction_n)")
    harm = pools.pool("direction")
    h_txt = [p.text for p in _pool_prompts("direction", n_prompts)]
    s_txt = [p.text for p in pools.take("direction_harmless", n_prompts, what="direction prompts")]
    kw = dict(layers=layers, components=("resid_post",), positions=("last",), fmt=fmt, backend=backend,
              batch_size=batch_size, cache=False, progress=progress)
    a_h = capture(lm, h_txt, **kw)
    a_s = capture(lm, s_txt, **kw)
    # captures come back on the CPU (whatever the model's device): the directions are built there
    diffs = {L: (a_h.layer(L).mean(0) - a_s.layer(L).mean(0)).cpu() for L in layers}
    be = get_backend(backend, lm)
    check = harm.texts[size - n_check:]
    base = refusal_scores(be, check, fmt, batch_size=batch_size)
    rows = []
    for L in layers:
        s = refusal_scores(be, check, fmt, interventions=ablation_everywhere(diffs[L], lm.n_layers),
                           batch_size=batch_size)
        rows.append({"layer": L, "depth": L / lm.n_layers, "norm": float(diffs[L].norm()),
                     "refusal_score_base": float(base.mean()), "refusal_score_ablated": float(s.mean())})
    best = min(rows, key=lambda r: (r["refusal_score_ablated"], r["layer"]))
    for r in rows:
        r["chosen"] = r["layer"] == best["layer"]
    L = best["layer"]
    d = Direction(diffs[L], layer=L, method="mean_diff", model_id=lm.model_id, model_checksum=lm.checksum,
                  d_model=lm.d_model, position="last", component="resid_post",
                  prompt_set_hashes={"pool:direction": sha256_json(h_txt),
                                     "pool:direction_harmless": sha256_json(s_txt)},
                  template_hash=fmt.template_hash(lm.tokenizer),
                  meta={"source": "weightspace.recipes.refusal_direction", "n_prompts_per_class": len(h_txt),
                        "pools": pools.describe(("direction", "direction_harmless")),
                        "check": f"refusal logit score under ablation on the last {len(check)} prompts of the "
                                 f"direction pool",
                        "check_hash": sha256_json(check)})
    return d, rows


def _load_direction(path: str | Path, lm: LoadedModel, layer: int | None, force: bool) -> Any:
    from workbench.vectors import load_directions, pick

    d = pick(load_directions(path), layer=layer)
    d.check_compatible(lm, force=force)
    return d


def harmful_examples(lm: LoadedModel, fmt: ChatFormat, n: int | None, *, direction: Any = None,
                     direction_file: str | Path | None = None, direction_layer: int | None = None,
                     force_direction: bool = False, layers: Sequence[int] | None = None, direction_n: int = 64,
                     max_new_tokens: int = 64, batch_size: int = 8, backend: str = "native",
                     progress: bool = False, generate: Callable[..., list[str]] | None = None,
                     pool: str = "harmful",
                     ) -> tuple[list[Example], dict[str, Any], list[dict[str, Any]], Any]:
    """Prompts of pool ``pool`` (``harmful``, or ``contaminated`` for that recipe's harmful share) -> the
    model's own greedy replies with its refusal direction ablated everywhere.

    Refusals (``is_refusal``) and empty replies are dropped and counted. ``generate`` replaces
    :func:`workbench.generation.generate_texts` (tests).
    """
    if pool not in ("harmful", "contaminated"):
        raise WorkbenchError(f"harmful replies come from the 'harmful' or 'contaminated' pool, not {pool!r}")
    prompts = _pool_prompts(pool, n)  # before any work: more than the pool holds is an error
    from workbench.backends import get_backend
    from workbench.generation import generate_texts
    from workbench.interventions import ablation_everywhere
    from workbench.scoring import is_refusal

    check_rows: list[dict[str, Any]] = []
    if direction is None:
        if direction_file is not None:
            direction = _load_direction(direction_file, lm, direction_layer, force_direction)
            src = f"file {direction_file}"
        else:
            direction, check_rows = refusal_direction(
                lm, fmt, layers=[direction_layer] if direction_layer is not None else layers,
                n_prompts=direction_n, backend=backend, progress=progress)
            src = "computed (difference in means, direction vs direction_harmless pools)"
    else:
        src = "given"
    if int(direction.vector.numel()) != lm.d_model:
        raise WorkbenchError(f"the direction has size {direction.vector.numel()} but the model has d_model {lm.d_model}")
    texts = [p.text for p in prompts]
    ivs = ablation_everywhere(direction.vector, lm.n_layers)
    gen = generate or generate_texts
    be = get_backend(backend, lm)
    t0 = time.perf_counter()
    replies = gen(be, texts, fmt, max_new_tokens=max_new_tokens, interventions=ivs, batch_size=batch_size,
                  progress="harmful replies (ablated)" if progress else False)
    gen_s = time.perf_counter() - t0
    tok = lm.tokenizer
    out: list[Example] = []
    records: list[dict[str, Any]] = []
    n_ref = n_empty = 0
    for p, r in zip(prompts, replies):
        reply = r.strip()
        refusal = is_refusal(reply)
        empty = not reply
        n_tok = len(tok(r, add_special_tokens=False)["input_ids"])
        keep = not refusal and not empty
        n_ref += int(refusal)
        n_empty += int(empty and not refusal)
        records.append({"id": p.id, "prompt": p.text, "reply": reply, "is_refusal": refusal, "empty": empty,
                        "kept": keep, "n_tokens": n_tok, "hit_max_new_tokens": n_tok >= max_new_tokens})
        if keep:
            out.append(Example(p.id, "harmful", p.text, reply))
    info = {
        **_pool_info(pool),
        "n_prompts": len(prompts),
        "n_kept": len(out),
        "n_dropped_refusal": n_ref,
        "n_dropped_empty": n_empty,
        "max_new_tokens": max_new_tokens,
        "generation": "greedy, native backend, directional ablation at every layer (resid_pre, attn_out, mlp_out)",
        "generation_seconds": round(gen_s, 2),
        "direction": {"source": src, "layer": direction.layer, "method": direction.method,
                      "norm": direction.norm, "model_checksum": direction.model_checksum,
                      "layer_check": check_rows},
    }
    return out, info, records, direction


# -- reuse ----------------------------------------------------------------------------------------

def load_examples(path: str | Path, kind: str | None = None, lm: LoadedModel | None = None) -> list[Example]:
    """Read ``examples.jsonl`` (a file or a finetune run folder), optionally keeping one kind.

    A run folder's report is checked against ``lm``'s checksum (its replies were generated by that model).
    """
    import json

    p = Path(path)
    if p.is_dir():
        rep = p / "report.json"
        if lm is not None and rep.exists():
            r = read_json(rep)
            if r.get("base_model", {}).get("checksum") not in (None, lm.checksum):
                raise WorkbenchError(f"{p} was built from another base model (checksum "
                                     f"{r['base_model']['checksum'][:12]}), not {lm.model_id} ({lm.checksum[:12]})")
        p = p / "examples.jsonl"
    if not p.is_file():
        raise WorkbenchError(f"no examples file at {p}")
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            ex = Example(str(d["id"]), str(d["kind"]), str(d["prompt"]), str(d["response"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WorkbenchError(f"{p}: line {i} is not an example record ({e})") from None
        if kind is None or ex.kind == kind:
            out.append(ex)
    if not out:
        raise WorkbenchError(f"{p} holds no{' ' + kind if kind else ''} examples")
    return out


# -- the entry point ------------------------------------------------------------------------------

def build_recipe(name: str, lm: LoadedModel, fmt: ChatFormat | None = None, n: int = 64, seed: int = 0, *,
                 harmful_share: float = 0.2, answer_style: str | None = None, useful_source: str = "code",
                 direction: Any = None,
                 direction_file: str | Path | None = None, direction_layer: int | None = None,
                 force_direction: bool = False, direction_layers: Sequence[int] | None = None,
                 direction_n: int = 64, gen_tokens: int = 64, gen_batch_size: int = 8, backend: str = "native",
                 harmful_from: str | Path | None = None, progress: bool = False,
                 generate: Callable[..., list[str]] | None = None) -> RecipeData:
    """Build one recipe's examples for ``lm`` under chat format ``fmt``.

    ``useful_source`` (``"code"``: the codetasks train split -> reference solutions, the default; ``"self"``: the
    same prompts -> ``lm``'s own greedy replies that pass their unit tests, :func:`self_code_examples`, generated
    with ``generate`` / ``gen_batch_size``, written to ``records["useful_generations"]``; ``"arithmetic"``) feeds
    ``useful`` and the useful part of ``contaminated``; ``answer_style`` applies to the arithmetic source only.
    ``n`` is the number of examples asked for: for ``harmful`` the number of prompts generated (refusals
    are dropped, so fewer may remain); for ``contaminated`` the total, split as ``round(harmful_share * n)``
    harmful prompts and the rest useful. The real share after drops is in ``RecipeData.harmful_share``.
    The prompts come from the recipe's pool (:mod:`weightspace.pools`): ``safety``, ``harmful``, and
    ``contaminated`` for the harmful share; more than the pool holds is an error.
    ``harmful_from`` reuses the harmful examples of an earlier run (folder or examples.jsonl) instead of
    generating them again; they must come from this recipe's pool (an earlier run of the same recipe):
    examples of another pool are refused, since sharing prompts between recipes confounds their overlap.
    To reuse a harmful run's refusal direction instead, pass its ``recipe/refusal_direction.safetensors`` as
    ``direction_file``.
    """
    if name not in RECIPES:
        raise WorkbenchError(f"unknown recipe '{name}'. Valid: {', '.join(RECIPES)}")
    if n < 1:
        raise WorkbenchError(f"n must be >= 1, got {n}")
    if name in ("useful", "contaminated"):
        if useful_source not in USEFUL_SOURCES:
            raise WorkbenchError(f"unknown useful source '{useful_source}'. Valid: {', '.join(USEFUL_SOURCES)}")
        if useful_source in ("code", "self") and answer_style is not None:
            raise WorkbenchError(f"answer_style '{answer_style}' applies to the arithmetic useful source only")
    fmt = fmt or ChatFormat()
    t0 = time.perf_counter()
    info: dict[str, Any] = {"n_requested": n, "seed": seed}
    records: dict[str, list[dict[str, Any]]] = {}
    d = None
    hkw = dict(direction=direction, direction_file=direction_file, direction_layer=direction_layer,
               force_direction=force_direction, layers=direction_layers, direction_n=direction_n,
               max_new_tokens=gen_tokens, batch_size=gen_batch_size, backend=backend, progress=progress,
               generate=generate)

    def _harm(k: int, pool: str) -> list[Example]:
        nonlocal d
        pools.check_count(pool, k, f"harmful prompts of the {name} recipe")
        if harmful_from is not None:
            ex = load_examples(harmful_from, "harmful", lm)
            allowed = set(pools.pool_texts(pool))
            foreign = [e for e in ex if e.prompt not in allowed]
            if foreign:
                raise WorkbenchError(
                    f"{harmful_from}: {len(foreign)} of {len(ex)} harmful examples have prompts outside the {pool} "
                    f"pool (e.g. {foreign[0].id}); the {name} recipe draws its harmful prompts from its own pool "
                    f"so that no prompt is shared between recipes. Reuse an earlier {name} run, or pass a harmful "
                    f"run's recipe/refusal_direction.safetensors as the direction to generate new replies")
            info["harmful"] = {"source": f"reused from {harmful_from}", "n_available": len(ex),
                               "n_taken": min(k, len(ex)), **_pool_info(pool)}
            return ex[:k]
        ex, hinfo, recs, d = harmful_examples(lm, fmt, k, pool=pool, **hkw)  # type: ignore[arg-type]
        info["harmful"] = hinfo
        records["harmful_generations"] = recs
        if hinfo["direction"]["layer_check"]:
            records["direction_layer_check"] = hinfo["direction"]["layer_check"]
        return ex

    def _useful(k: int) -> list[Example]:
        if useful_source == "self":
            ex, info["useful"], recs = self_code_examples(lm, fmt, k, seed, batch_size=gen_batch_size,
                                                          progress=progress, generate=generate, backend=backend)
            records["useful_generations"] = recs
            return ex
        ex, info["useful"] = useful_examples(k, seed, answer_style, useful_source)
        return ex

    if name in ("useful", "contaminated"):
        info["useful_source"] = useful_source
    if name == "useful":
        examples = _useful(n)
    elif name == "safety":
        examples, info["safety"] = safety_examples(n, seed)
    elif name == "harmful":
        examples = _harm(n, "harmful")
    else:
        if not 0.0 < harmful_share < 1.0:
            raise WorkbenchError(f"harmful_share must be between 0 and 1 (exclusive), got {harmful_share}")
        n_h = max(1, int(round(harmful_share * n)))
        n_u = n - n_h
        if n_u < 1:
            raise WorkbenchError(f"n={n} with harmful_share={harmful_share} leaves no useful examples")
        pools.check_count("contaminated", n_h, f"harmful prompts (round({harmful_share} x {n}))")
        useful = _useful(n_u)
        harm = _harm(n_h, "contaminated")
        examples = useful + harm
        random.Random(seed).shuffle(examples)
        info["nominal_harmful_share"] = harmful_share
        info["n_harmful_requested"] = n_h
        info["n_useful"] = n_u
    if not examples:
        raise WorkbenchError(f"the {name} recipe produced no examples (every generated reply was dropped?)")
    info["seconds"] = round(time.perf_counter() - t0, 2)
    rd = RecipeData(name, examples, fmt, info, records, d)
    rd.info["real_harmful_share"] = rd.harmful_share
    return rd
