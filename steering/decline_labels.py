"""The inputs of ``steer decline``: its prompt sets, and which everyday questions the unmodified model declines.

:class:`DeclineSets` holds the train (directions), val (per-layer probes) and test (ablations) prompts of the three
sets and refuses an extraction prompt that is also an evaluation prompt. :func:`label_replies` puts questions to
the unmodified model (greedy) and labels each reply declined / answered by the judge, by phrases, or by both where
they agree (:func:`decide`); :func:`require_classes` refuses to form a direction from too few of either.

>>> decide([True, False], [False, False], "judge")
[True, False]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from workbench.errors import WorkbenchError
from workbench.scoring import is_refusal

LABEL_BY = ("judge", "phrase", "agree")
SPLITS = ("train", "val", "test")


def _texts(prompts: Sequence[Any]) -> tuple[str, ...]:
    return tuple(p.text if hasattr(p, "text") else p for p in prompts)


@dataclass(frozen=True)
class DeclineSets:
    """The prompts of one run: ``train`` extracts the directions, ``val`` scores the per-layer probes, ``test``
    is what the ablations are evaluated on. Strings or :class:`workbench.prompts.Prompt` objects.

    Every set must be non-empty, and no extraction (train) prompt may be a val or test prompt (of any set).

    >>> s = DeclineSets(["h1"], ["n1"], ["e1", "e2"], ["h2"], ["n2"], ["e3"], ["h3"], ["n3"], ["e4"])
    >>> s.everyday_train
    ('e1', 'e2')
    >>> DeclineSets(["h1"], ["n1"], ["e1"], ["h2"], ["n2"], ["e3"], ["h3"], ["n3"], ["e1"])
    Traceback (most recent call last):
    ...
    workbench.errors.WorkbenchError: 1 extraction (train) prompt is also an evaluation (val/test) prompt, e.g. 'e1'; the sets must be disjoint
    """

    harmful_train: Sequence[Any]
    harmless_train: Sequence[Any]
    everyday_train: Sequence[Any]
    harmful_val: Sequence[Any]
    harmless_val: Sequence[Any]
    everyday_val: Sequence[Any]
    harmful_test: Sequence[Any]
    harmless_test: Sequence[Any]
    everyday_test: Sequence[Any]

    def __post_init__(self) -> None:
        for name in self.names():
            texts = _texts(getattr(self, name))
            if not texts:
                raise WorkbenchError(f"the {name.replace('_', ':')} prompt set is empty; every set needs prompts "
                                     f"(give a larger set or a larger --limit)")
            object.__setattr__(self, name, texts)
        train = {t for s in ("harmful", "harmless", "everyday") for t in getattr(self, f"{s}_train")}
        held = [t for s in ("harmful", "harmless", "everyday") for k in ("val", "test") for t in getattr(self, f"{s}_{k}")]
        both = sorted({t for t in held if t in train})
        if both:
            raise WorkbenchError(f"{len(both)} extraction (train) prompt{'s are' if len(both) > 1 else ' is'} also "
                                 f"{'' if len(both) > 1 else 'an '}evaluation (val/test) prompt"
                                 f"{'s' if len(both) > 1 else ''}, e.g. {both[0][:60]!r}; the sets must be disjoint")

    @staticmethod
    def names() -> list[str]:
        return [f"{s}_{k}" for k in SPLITS for s in ("harmful", "harmless", "everyday")]

    @classmethod
    def from_specs(cls, harmful: str = "harmful", harmless: str = "harmless", everyday: str = "everyday", *,
                   limit: int | None = None) -> "DeclineSets":
        """The seeded train / val / test splits of three whole sets (built-in names or prompt files), at most
        ``limit`` prompts per split."""
        from workbench.prompts import SPLIT_NAMES, resolve_prompts

        parts: dict[str, list[str]] = {}
        for flag, spec in (("--harmful", harmful), ("--harmless", harmless), ("--everyday", everyday)):
            base, _, split = spec.partition(":")
            if split in SPLIT_NAMES:
                raise WorkbenchError(f"{flag} {spec!r}: give the whole set ({base!r}); the command uses its train, "
                                     f"val and test splits itself")
            ps = resolve_prompts(spec)
            for k in SPLITS:
                texts = ps.split(k).texts
                parts[f"{flag[2:]}_{k}"] = texts[:limit] if limit else texts
        return cls(**parts)

    def record(self) -> dict[str, int]:
        """The number of prompts of every set."""
        return {n.replace("_", ":"): len(getattr(self, n)) for n in self.names()}


def decide(judge: Sequence[bool], phrase: Sequence[bool], by: str = "judge") -> list[bool | None]:
    """Declined (True), answered (False) or left out (None) per reply, by the judge, by phrases, or by both
    when they agree (``agree``: disagreements are left out).

    >>> decide([True, True, False], [True, False, False], "agree")
    [True, None, False]
    """
    if by not in LABEL_BY:
        raise WorkbenchError(f"unknown labelling {by!r}; valid: {', '.join(LABEL_BY)}")
    if by == "judge":
        return [bool(j) for j in judge]
    if by == "phrase":
        return [bool(p) for p in phrase]
    return [bool(j) if bool(j) == bool(p) else None for j, p in zip(judge, phrase)]


@dataclass
class Labelled:
    """The unmodified model's replies to some prompts, both readers' verdicts and the label used."""

    prompts: list[str]
    replies: list[str]
    judge: list[bool]
    phrase: list[bool]
    declined: list[bool | None]

    def indices(self, declined: bool) -> list[int]:
        return [i for i, d in enumerate(self.declined) if d is declined]

    def counts(self) -> dict[str, int]:
        return {"declined": len(self.indices(True)), "answered": len(self.indices(False)),
                "left_out": sum(d is None for d in self.declined), "judge_refusals": sum(self.judge),
                "phrase_refusals": sum(self.phrase)}

    def rows(self, split: str) -> list[dict[str, Any]]:
        return [{"split": split, "index": i, "prompt": p, "reply": r, "judge_refusal": j, "phrase_refusal": f,
                 "label": {True: "declined", False: "answered", None: "left out"}[d]}
                for i, (p, r, j, f, d) in enumerate(zip(self.prompts, self.replies, self.judge, self.phrase,
                                                        self.declined))]


def label_replies(backend: Any, fmt: Any, prompts: Sequence[str], judge: Any, *, max_new_tokens: int = 32,
                  by: str = "judge", progress: bool = True) -> Labelled:
    """Generate with the unmodified model (greedy) and label every reply declined / answered (:func:`decide`).
    ``judge``: anything with ``is_refusal(prompts, replies) -> list[bool]``."""
    from workbench.generation import generate_texts

    prompts = list(prompts)
    replies = generate_texts(backend, prompts, fmt, max_new_tokens=max_new_tokens,
                             progress="labelling: unmodified" if progress else False)
    j = [bool(x) for x in judge.is_refusal(prompts, replies)]
    ph = [is_refusal(t) for t in replies]
    return Labelled(prompts, replies, j, ph, decide(j, ph, by))


def require_classes(lab: Labelled, minimum: int, where: str, purpose: str = "to form the decline direction",
                    hint: str = ", or lower --min-declined") -> None:
    """Refuse to form a direction (or a score) from fewer than ``minimum`` declined or answered prompts."""
    c = lab.counts()
    for cls in ("declined", "answered"):
        if c[cls] < minimum:
            raise WorkbenchError(
                f"only {c[cls]} of the {len(lab.prompts)} {where} prompts are {cls} by the unmodified model "
                f"({c['declined']} declined, {c['answered']} answered, {c['left_out']} left out); at least "
                f"{minimum} are needed {purpose}: give more everyday questions (--everyday FILE, or a larger "
                f"--limit){hint}")
