"""Prompt sets: built-in harmful/harmless/utility data (plus the experiment-4 sets harmful_styled and
useful_requests, the generalisation sets harmful_extra and alarming_harmless, and everyday off-topic
questions), seeded splits, file loaders.

Example:
    >>> ps = builtin("harmful")
    >>> len(ps) >= 300
    True
    >>> train = builtin_split("harmful", "train")
    >>> resolve_prompts("harmless:test").name
    'harmless:test'

User files are loaded with :func:`load_prompts` (CSV, JSON, JSONL, TXT) or
:func:`resolve_prompts` ("path.csv#column"). Loaders never split on commas.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from workbench.errors import WorkbenchError
from workbench.tasks import make_arithmetic_tasks

__all__ = [
    "Prompt",
    "PromptSet",
    "BUILTIN_NAMES",
    "SPLIT_NAMES",
    "builtin",
    "split_prompts",
    "builtin_split",
    "load_prompts",
    "resolve_prompts",
]

BUILTIN_NAMES: tuple[str, ...] = ("harmful", "harmless", "utility", "harmful_styled", "useful_requests",
                                  "harmful_extra", "alarming_harmless", "everyday")
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
DEFAULT_FIELDS: tuple[str, ...] = ("instruction", "prompt", "text")
EXTENSIONS: tuple[str, ...] = (".csv", ".json", ".jsonl", ".txt")
UTILITY_SIZE = 400
_EXTRA = "\x00extra"


@dataclass(frozen=True)
class Prompt:
    """One prompt; ``answer`` is set for utility tasks with a gold answer."""

    id: str
    text: str
    category: str | None = None
    answer: str | None = None


@dataclass(frozen=True)
class PromptSet:
    """A named, non-empty, immutable sequence of prompts.

    Example:
        >>> ps = PromptSet("demo", (Prompt("a", "Hello, world"), Prompt("b", "Hi")))
        >>> ps.texts, len(ps.subset([1]))
        (['Hello, world', 'Hi'], 1)
    """

    name: str
    prompts: tuple[Prompt, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.prompts, tuple):
            object.__setattr__(self, "prompts", tuple(self.prompts))
        if not self.prompts:
            raise WorkbenchError(f"prompt set {self.name!r} is empty; at least one prompt is required")

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    def __getitem__(self, index: int) -> Prompt:
        return self.prompts[index]

    @property
    def texts(self) -> list[str]:
        """The prompt texts, in order."""
        return [p.text for p in self.prompts]

    @property
    def hash(self) -> str:
        """sha256 hex digest of the JSON-dumped list of texts (stable across runs)."""
        return hashlib.sha256(json.dumps(self.texts).encode("utf-8")).hexdigest()

    def subset(self, indices: Iterable[int], name: str | None = None) -> PromptSet:
        """A new set holding the prompts at ``indices`` (in the given order)."""
        idx = [int(i) for i in indices]
        return PromptSet(name or self.name, tuple(self.prompts[i] for i in idx))

    def split(self, name: str, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> PromptSet:
        """One of the seeded "train"/"val"/"test" splits (see :func:`split_prompts`)."""
        splits = split_prompts(self, fractions=fractions, seed=seed)
        if name not in splits:
            raise WorkbenchError(f"unknown split {name!r}; valid splits: {', '.join(SPLIT_NAMES)}")
        return splits[name]


def _read_jsonl_text(text: str, source: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise WorkbenchError(f"{source}: line {lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise WorkbenchError(f"{source}: line {lineno} must be a JSON object, got {type(obj).__name__}")
        rows.append(obj)
    return rows


def builtin(name: str) -> PromptSet:
    """Load a built-in prompt set: "harmful", "harmless", "utility", "harmful_styled", "useful_requests",
    "harmful_extra", "alarming_harmless" or "everyday".

    "utility" is ``make_arithmetic_tasks(400, seed=0)`` with answers attached. The two sets of the study's
    experiment 4 (activation overlap, ``probes.overlap.PROTOCOLS["study"]``): "harmful_styled" holds harmful
    requests from a second source, written in another style than "harmful" (first-person situations,
    pretexts and role-play, multi-sentence messages; requests only, same categories), and "useful_requests"
    benign everyday requests in the same short imperative form as "harmful" ("Explain how to ...").

    Two sets for refusal removal that generalises (issue 12): "harmful_extra" holds harmful requests in
    categories "harmful" lacks (extremism, CBRN weapons, election interference, money laundering,
    counterfeiting, trafficking, animal cruelty, environmental crime, infrastructure sabotage, evading the
    law, academic dishonesty, non-consensual imagery) and in styles it lacks (terse fragments, plain
    questions, long first-person stories, fiction framing, "hypothetically", lower-case chat with typos,
    French / German / Spanish / Italian, persona jailbreaks, professional pretexts; requests only);
    "alarming_harmless" harmless requests that merely sound alarming ("How do I kill a stuck Python
    process?"), across programming, photography, law, cooking, sport, games, health, history and more,
    for measuring over-refusal.

    "everyday" (issue 12, item 5: :mod:`steering.decline`): 300 plain everyday questions that have nothing to do
    with code and nothing alarming about them, 20 in each of 15 topics (history, sport, cooking, careers,
    travel, gardening, pets, music, books and film, health, science, money, home, language, geography), written
    for the workbench; a coder model declines part of them, which is what the decline direction is read from.

    Example:
        >>> builtin("utility")[0].answer is not None
        True
    """
    if name not in BUILTIN_NAMES:
        raise WorkbenchError(f"unknown built-in prompt set {name!r}; valid names: {', '.join(BUILTIN_NAMES)}")
    if name == "utility":
        tasks = make_arithmetic_tasks(UTILITY_SIZE, seed=0)
        return PromptSet(name, tuple(Prompt(t.id, t.question, "arithmetic", t.answer) for t in tasks))
    text = resources.files("workbench").joinpath("data", f"{name}.jsonl").read_text(encoding="utf-8")
    rows = _read_jsonl_text(text, f"built-in {name}")
    return PromptSet(name, tuple(Prompt(r["id"], r["instruction"], r.get("category")) for r in rows))


def split_prompts(
    ps: PromptSet, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0
) -> dict[str, PromptSet]:
    """Split ``ps`` into disjoint "train"/"val"/"test" sets covering every prompt.

    The order comes from ``numpy.random.default_rng(seed).permutation``, so the
    split is fixed for a given set, fractions and seed. Split names are
    "<name>:train" etc.

    Example:
        >>> s = split_prompts(builtin("harmless"))
        >>> sum(len(v) for v in s.values()) == len(builtin("harmless"))
        True
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise WorkbenchError(f"fractions must be three non-negative numbers with a positive sum, got {tuple(fractions)}")
    total = float(sum(fractions))
    n = len(ps)
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(n * fractions[0] / total))
    n_val = int(round(n * fractions[1] / total))
    n_val = min(n_val, n - n_train)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
    out: dict[str, PromptSet] = {}
    for key, (lo, hi) in bounds.items():
        if hi <= lo:
            raise WorkbenchError(
                f"split {key!r} of {ps.name!r} would be empty ({n} prompts, fractions {tuple(fractions)}); "
                "use more prompts or larger fractions"
            )
        out[key] = ps.subset(sorted(perm[lo:hi].tolist()), name=f"{ps.name}:{key}")
    return out


def builtin_split(name: str, split: str) -> PromptSet:
    """A fixed seeded split of a built-in set, e.g. ``builtin_split("harmful", "train")``."""
    return builtin(name).split(split)


def _pick_field(available: Sequence[str], requested: str | None, source: str, what: str) -> str:
    if requested is not None:
        if requested not in available:
            raise WorkbenchError(
                f"{source}: {what} {requested!r} not found; available {what}s: {', '.join(map(repr, available)) or '(none)'}"
            )
        return requested
    for cand in DEFAULT_FIELDS:
        if cand in available:
            return cand
    raise WorkbenchError(
        f"{source}: no default {what} ({', '.join(DEFAULT_FIELDS)}) found; choose one of the available {what}s: "
        f"{', '.join(map(repr, available)) or '(none)'}"
    )


def _check_text(value: Any, source: str, where: str) -> str:
    if not isinstance(value, str):
        raise WorkbenchError(f"{source}: {where} must be a string, got {type(value).__name__} ({value!r:.60})")
    return value


def _texts_from_objects(rows: list[dict[str, Any]], key: str | None, source: str) -> tuple[list[str], list[Any]]:
    available: list[str] = []
    for r in rows:
        for k in r:
            if k not in available:
                available.append(k)
    chosen = _pick_field(available, key, source, "field")
    texts, cats = [], []
    for i, r in enumerate(rows, start=1):
        if chosen not in r:
            raise WorkbenchError(f"{source}: record {i} has no field {chosen!r}; its fields: {', '.join(map(repr, r))}")
        texts.append(_check_text(r[chosen], source, f"record {i} field {chosen!r}"))
        cats.append(r.get("category"))
    return texts, cats


def load_prompts(
    path: str | Path,
    *,
    column: str | None = None,
    field: str | None = None,
    name: str | None = None,
) -> PromptSet:
    """Load prompts from a .csv, .json, .jsonl or .txt file.

    - CSV: read with the ``csv`` module (quoted commas stay inside the field);
      ``column`` defaults to "instruction", "prompt" or "text". In a
      one-column file unquoted commas are kept as part of the prompt; in a
      multi-column file a row with extra fields is an error.
    - JSON: a list of strings, or a list of objects (``field`` picks the key).
    - JSONL: one object per line (``field`` picks the key).
    - TXT: one prompt per line; blank lines are skipped.

    ``column`` and ``field`` are synonyms. Blank prompts are dropped; an empty
    result raises WorkbenchError (a ValueError). A "category" key/column, if present, is kept.

    Example:
        >>> ps = load_prompts("prompts.csv", column="question")  # doctest: +SKIP
    """
    p = Path(path)
    source = str(p)
    if column is not None and field is not None and column != field:
        raise WorkbenchError(f"pass either column={column!r} or field={field!r}, not both")
    key = column if column is not None else field
    ext = p.suffix.lower()
    if ext not in EXTENSIONS:
        raise WorkbenchError(f"{source}: unknown file extension {ext or '(none)'!r}; supported: {', '.join(EXTENSIONS)}")
    if not p.is_file():
        raise WorkbenchError(f"prompt file not found: {source}")
    try:
        raw = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise WorkbenchError(f"{source}: not UTF-8 text; save the prompt file as UTF-8") from None

    cats: list[Any]
    if ext == ".csv":
        reader = csv.DictReader(io.StringIO(raw, newline=""), restkey=_EXTRA)
        columns = list(reader.fieldnames or [])
        if not columns:
            raise WorkbenchError(f"{source}: CSV file has no header row; the first row must name the columns")
        chosen = _pick_field(columns, key, source, "column")
        texts, cats = [], []
        for r in reader:
            text = r.get(chosen) or ""
            if _EXTRA in r:
                if len(columns) > 1:
                    raise WorkbenchError(
                        f"{source}: line {reader.line_num} has more fields than the {len(columns)} header columns; "
                        'put double quotes around values that contain commas, e.g. "Write a poem, please"'
                    )
                text = ",".join([text, *r[_EXTRA]])  # one-column file: an unquoted comma is part of the prompt
            texts.append(text)
            cats.append(r.get("category"))
    elif ext == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise WorkbenchError(f"{source}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise WorkbenchError(f"{source}: JSON must be a list of strings or a list of objects, got {type(data).__name__}")
        if data and all(isinstance(x, dict) for x in data):
            texts, cats = _texts_from_objects(data, key, source)
        elif all(isinstance(x, str) for x in data):
            if key is not None:
                raise WorkbenchError(f"{source}: field {key!r} given but the JSON is a list of strings")
            texts, cats = list(data), [None] * len(data)
        else:
            raise WorkbenchError(f"{source}: JSON list must hold only strings or only objects")
    elif ext == ".jsonl":
        texts, cats = _texts_from_objects(_read_jsonl_text(raw, source), key, source)
    else:
        if key is not None:
            raise WorkbenchError(f"{source}: column/field {key!r} given but .txt files have no columns")
        texts = raw.splitlines()
        cats = [None] * len(texts)

    prompts = []
    for text, cat in zip(texts, cats):
        if not text.strip():
            continue
        cat = cat if isinstance(cat, str) and cat else None
        prompts.append(Prompt(f"{p.stem}-{len(prompts) + 1:04d}", text.strip(), cat))
    if not prompts:
        raise WorkbenchError(f"{source}: no prompts found (file is empty or all values are blank)")
    return PromptSet(name or p.stem, tuple(prompts))


def resolve_prompts(spec: str) -> PromptSet:
    """Resolve a built-in name (optionally ":train"/":val"/":test") or a file path.

    A file path may end in "#column" to choose the CSV column or JSON field.

    Example:
        >>> resolve_prompts("harmful:val").name
        'harmful:val'
        >>> resolve_prompts("my_prompts.csv#question")  # doctest: +SKIP
    """
    base, _, split = spec.partition(":")
    if base in BUILTIN_NAMES:
        if not split:
            return builtin(base)
        if split not in SPLIT_NAMES:
            raise WorkbenchError(f"unknown split {split!r} in {spec!r}; valid splits: {', '.join(SPLIT_NAMES)}")
        return builtin_split(base, split)
    path, _, col = spec.partition("#")
    p = Path(path)
    if p.suffix.lower() not in EXTENSIONS and not p.exists():
        raise WorkbenchError(
            f"{spec!r} is neither a built-in prompt set ({', '.join(BUILTIN_NAMES)}, optionally with "
            f":{'/:'.join(SPLIT_NAMES)}) nor a prompt file ({', '.join(EXTENSIONS)})"
        )
    return load_prompts(p, column=col or None)
