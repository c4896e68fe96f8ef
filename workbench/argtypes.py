"""Argument types and early checks shared by every ``workbench`` command line.

Argparse ``type=`` callables refuse bad numbers while the command line is parsed, before any work:
non-finite floats (``nan``, ``inf``) anywhere, counts below 1, fractions out of range. The parsers of
the workbench commands report such errors on one line (``error: argument --n: ...``, exit code 2)
through :func:`one_line_errors`.

>>> finite_float("0.5"), positive_int("3"), finite_float_list("0.5, 1,2")
(0.5, 3, [0.5, 1.0, 2.0])
>>> finite_float("nan")
Traceback (most recent call last):
...
argparse.ArgumentTypeError: expected a finite number, got 'nan'
>>> positive_int("0")
Traceback (most recent call last):
...
argparse.ArgumentTypeError: expected an integer >= 1, got '0'

The helpers below the types check things that need a loaded tokenizer (prompt lengths against the
model's context) and collect the input paths a command reads (for :func:`workbench.runs.check_out`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Iterable, NoReturn, Sequence

from workbench.errors import WorkbenchError

__all__ = [
    "finite_float", "positive_float", "nonnegative_float", "fraction", "open_fraction", "fraction_range",
    "finite_float_list",
    "positive_int", "nonnegative_int", "seed_int", "position_list", "one_line_errors", "input_paths", "check_layer",
    "check_context",
]

POSITION_NAMES = ("last", "post_instruction", "mean", "all")


def _float(s: str) -> float:
    try:
        v = float(str(s).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def finite_float(s: str) -> float:
    """Any finite float (``nan``, ``inf``, ``-inf`` are refused)."""
    return _float(s)


def positive_float(s: str) -> float:
    """A finite float > 0."""
    v = _float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {s!r}")
    return v


def nonnegative_float(s: str) -> float:
    """A finite float >= 0."""
    v = _float(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s!r}")
    return v


def fraction(s: str) -> float:
    """A finite float in [0, 1]."""
    v = _float(s)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {s!r}")
    return v


def open_fraction(s: str) -> float:
    """A finite float in (0, 1]."""
    v = _float(s)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s!r}")
    return v


def fraction_range(s: str) -> tuple[float, float]:
    """Two fractions ``LOW,HIGH`` with 0 <= LOW <= HIGH <= 1 (``"0.2,0.9"``; equal ends fix the value)."""
    items = [x.strip() for x in str(s).split(",")]
    if len(items) != 2 or not all(items):
        raise argparse.ArgumentTypeError(f"expected two fractions LOW,HIGH like '0.2,0.9', got {s!r}")
    lo, hi = (fraction(x) for x in items)
    if lo > hi:
        raise argparse.ArgumentTypeError(f"expected LOW <= HIGH, got {s!r}")
    return lo, hi


def finite_float_list(s: str) -> list[float]:
    """A comma list of finite floats (``"0.5,1,2"``); an empty string gives ``[]``."""
    items = [x.strip() for x in str(s).split(",")]
    if all(not x for x in items):
        return []
    if any(not x for x in items):
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers like '0.5,1,2', got {s!r}")
    out = []
    for x in items:
        try:
            out.append(_float(x))
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e} in the list {s!r}") from None
    return out


def _int(s: str) -> int:
    try:
        return int(str(s).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


def positive_int(s: str) -> int:
    """An integer >= 1 (counts, lengths, batch sizes)."""
    v = _int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s!r}")
    return v


def nonnegative_int(s: str) -> int:
    """An integer >= 0 (counts where 0 means 'none')."""
    v = _int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def seed_int(s: str) -> int:
    """A random seed: an integer in [0, 2**32)."""
    v = _int(s)
    if not 0 <= v < 2**32:
        raise argparse.ArgumentTypeError(f"expected a seed in 0..{2**32 - 1}, got {s!r}")
    return v


def position_list(s: str) -> str:
    """A comma list of reading positions (last, post_instruction, mean, all, or integer indices); kept as text."""
    items = [x.strip() for x in str(s).split(",")]
    for x in items:
        if x in POSITION_NAMES:
            continue
        try:
            int(x)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"unknown reading position {x!r}; valid: {', '.join(POSITION_NAMES)}, or an integer index") from None
    return ",".join(items)


# -- one-line argparse errors -----------------------------------------------------------------------

def _error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    print(f"error: {message} (see '{parser.prog} -h')", file=sys.stderr)
    sys.exit(2)


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` and all its sub-parsers report errors as one line ``error: ...`` (exit code 2)."""
    parser.error = lambda message, _p=parser: _error(_p, message)  # type: ignore[method-assign]
    for action in parser._actions:  # noqa: SLF001 - argparse has no public walk over sub-parsers
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for sub in set(action.choices.values()):
                one_line_errors(sub)
    return parser


# -- early checks -----------------------------------------------------------------------------------

def input_paths(*specs: Any) -> list[str]:
    """The local paths among ``specs`` (model names, prompt specs ``file.csv#col``, checkpoints ``label=PATH``).

    Builtin prompt sets, zoo keys and ``None`` are dropped; lists are flattened.
    """
    out: list[str] = []

    def add(spec: Any) -> None:
        if spec is None or spec == "":
            return
        if isinstance(spec, (list, tuple)):
            for s in spec:
                add(s)
            return
        s = str(spec).strip()
        if s and Path(s).expanduser().exists():
            path = str(Path(s).expanduser())
            if path not in out:
                out.append(path)
            return
        head = s.partition("#")[0]
        if head != s and head and Path(head).expanduser().exists():
            add(head)
        elif "=" in s:
            add(s.split("=", 1)[1])
        elif "," in s:
            for part in s.split(","):
                add(part)

    for spec in specs:
        add(spec)
    return out


def check_layer(layer: int, n_layers: int, flag: str) -> int:
    """``layer`` as an index in ``0..n_layers-1`` (negatives count from the end), or a one-line error."""
    if not -n_layers <= layer < n_layers:
        raise WorkbenchError(f"{flag} {layer} is out of range: this model has {n_layers} layers "
                             f"(valid: 0..{n_layers - 1}, or -{n_layers}..-1)")
    return layer % n_layers


def check_context(lm: Any, fmt: Any, prompt_lists: Iterable[Sequence[str]], max_new_tokens: int | None = None,
                  flag: str = "--max-new-tokens") -> int:
    """Tokenise every prompt once and check it fits the model's context with ``max_new_tokens`` more.

    Returns the longest prompt in tokens. Errors name the prompt, its length and the limit.
    """
    from workbench.chat import tokenize_prompts

    limit = lm.max_positions
    longest = 0
    for prompts in prompt_lists:
        prompts = list(prompts)
        if not prompts:
            continue
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise WorkbenchError(f"prompt {i} is empty or not a string: {p!r}")
        ids, _ = tokenize_prompts(lm.tokenizer, prompts, fmt)
        for p, row in zip(prompts, ids):
            if limit and len(row) > limit:
                raise WorkbenchError(
                    f"prompt {p[:40]!r}... is {len(row)} tokens long (with the chat template), more than the model's "
                    f"context of {limit} tokens; shorten it (nothing is truncated silently)")
            longest = max(longest, len(row))
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise WorkbenchError(f"{flag} must be >= 1, got {max_new_tokens}")
        if limit and longest + max_new_tokens > limit:
            raise WorkbenchError(
                f"{flag} {max_new_tokens} is too large: the model's context is {limit} tokens "
                f"(max_position_embeddings) and the longest prompt takes {longest}, so at most "
                f"{limit - longest} new tokens fit")
    return longest
