"""Function-writing utility tasks checked by their unit tests, and the sandboxed checker that runs them.

The data (``workbench/data/codetasks.jsonl``, 70 small original tasks) holds per task: ``id``, ``split``
(fixed: ``train`` 26 / ``val`` 12 / ``test`` 32), the function ``name`` and ``signature``, a one-line
``description``, several assert-based ``tests`` and a reference ``solution`` (every test passes on it:
``tests/test_codetasks.py``). The prompt asks for the function in a ```python block; the checker takes the
code out of a completion (:func:`extract_code`) and runs the task's tests on it (:func:`check_completion`).

On ``qwen2.5-coder-0.5b-instruct`` (greedy, up to 160 new tokens, its default system prompt) the test split
passes 24/32 = 75 % (95 % Wilson interval 58-87 %; the 8 failures are real mistakes, e.g. ``snake_to_camel``,
``mask_email``, ``rotate_left``), measured once with ``docs/img/app/screenshot.py`` (numbers in
``docs/img/app/screenshot.json``).

What the checker sandboxes (and what it does not)
-------------------------------------------------

Every check runs ``python -I -S runner.py`` as a child process:

- **a fresh scratch folder** (``tempfile.mkdtemp``) is its working directory and is deleted afterwards;
- **an empty environment** (``env={}``), isolated mode ``-I`` (no ``PYTHON*`` variables, no user site, no
  script folder on ``sys.path``) and ``-S`` (no ``site`` module, so no ``sitecustomize`` / ``.pth`` files and no
  site-packages: only the standard library is importable);
- **resource limits**, set by the child on itself before the candidate code runs (``resource.setrlimit``, soft =
  hard, so they cannot be raised again): CPU seconds, address space, file size, open files, processes, and no
  core files;
- **a wall-clock timeout**: the child runs in its own session and the whole process group is killed with
  SIGKILL when it runs past ``timeout``;
- **network**: ``socket.socket``, ``socket.create_connection`` and friends are replaced by a function that raises,
  and an audit hook (``sys.addaudithook``, PEP 578) refuses ``socket.*`` events raised from C (``_socket``
  included), so no socket can be created;
- **writes outside the scratch folder**: the same audit hook refuses ``open`` for writing, ``os.remove``,
  ``os.rename``, ``os.mkdir``, ``os.rmdir``, ``os.chmod``, ``os.symlink``, ``os.link``, ``os.truncate``,
  ``shutil.*`` and ``os.chdir`` on any path that does not resolve inside the scratch folder;
- **escapes**: the hook refuses starting processes (``subprocess``, ``os.system``, ``os.exec*``, ``os.spawn*``,
  ``os.posix_spawn``, ``os.fork``), signals to other processes (``os.kill``), ``ctypes`` (which could undo
  everything), changing rlimits, and replacing a function's ``__code__``.

Not sandboxed: **reading** files (anything the user running the workbench may read can be read; the
checker returns only pass/fail counts and a short error line, and nothing leaves the machine without a
socket); CPU and memory use up to the limits; and Python audit hooks are not a security boundary against
code written to defeat them (a determined adversary may find a way around an in-process hook). This
checker is meant for a model's honest attempts at small functions, on the user's own machine, with no
root-only isolation (namespaces, seccomp, containers). A result can also be forged by adversarial code
(it could print the runner's result line itself): pass rates measure honest attempts.

>>> task = load_codetasks("test")[0]
>>> check_solution(task.solution, task).passed
True
>>> extract_code("Here you go:\\n```python\\ndef f(x):\\n    return x\\n```\\nDone.")
'def f(x):\\n    return x\\n'
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Sequence

from workbench.errors import WorkbenchError

__all__ = ["CodeTask", "CheckResult", "load_codetasks", "extract_code", "check_solution", "check_completion",
           "check_many", "SPLITS", "PROMPT_TEMPLATE", "DEFAULT_TIMEOUT"]

SPLITS = ("train", "val", "test")
PROMPT_TEMPLATE = ("Write a Python function `{signature}` that {description}. "
                   "Reply with only the function in a single ```python code block.")
DEFAULT_TIMEOUT = 5.0  # wall seconds per check (the CPU limit is the same, rounded up)
MEMORY_MB = 512
MAX_DETAIL = 300


@dataclass(frozen=True)
class CodeTask:
    """One function-writing task: the prompt, the function's name, its tests and a reference solution."""

    id: str
    split: str
    name: str
    signature: str
    description: str
    tests: tuple[str, ...]
    solution: str

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(signature=self.signature, description=self.description)

    @property
    def reference_reply(self) -> str:
        """The reply a perfect model would give (the answer-NLL target): the solution in a python block."""
        return f"```python\n{self.solution}```"


@lru_cache(maxsize=1)
def _all_tasks() -> tuple[CodeTask, ...]:
    text = resources.files("workbench.data").joinpath("codetasks.jsonl").read_text(encoding="utf-8")
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            out.append(CodeTask(r["id"], r["split"], r["name"], r["signature"], r["description"],
                                tuple(r["tests"]), r["solution"]))
        except (json.JSONDecodeError, KeyError) as e:  # pragma: no cover - the shipped file is tested
            raise WorkbenchError(f"codetasks.jsonl line {i} is malformed: {e}") from None
    return tuple(out)


def load_codetasks(split: str | None = None) -> list[CodeTask]:
    """The tasks of one split (``train`` / ``val`` / ``test``), or all of them, in file order."""
    if split is not None and split not in SPLITS:
        raise WorkbenchError(f"unknown code-task split {split!r}; valid: {', '.join(SPLITS)}")
    return [t for t in _all_tasks() if split is None or t.split == split]


# -- code extraction ---------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_CODE_START = re.compile(r"^(def |async def |import |from |class |@)")


def extract_code(completion: str, name: str | None = None) -> str:
    """The code in a completion: the first fenced block (```python or a bare ```) that defines ``name``
    (else the first fenced block; an unclosed block runs to the end), or else a bare ``def`` and the lines
    that belong to it (indented, blank, or more top-level ``def`` / ``import`` / ``class`` lines). ``""``
    when there is none."""
    text = completion.replace("\r\n", "\n")
    blocks = [m.group(2) for m in _FENCE.finditer(text) if m.group(1).lower() in ("", "python", "py", "python3")]
    if blocks:
        pick = next((b for b in blocks if name and re.search(rf"\bdef\s+{re.escape(name)}\s*\(", b)), blocks[0])
        return pick.rstrip() + "\n" if pick.strip() else ""
    lines = text.split("\n")
    start = next((i for i, ln in enumerate(lines) if _CODE_START.match(ln)), None)
    if start is None:
        return ""
    keep = []
    for ln in lines[start:]:
        if not ln.strip() or ln[:1] in (" ", "\t") or _CODE_START.match(ln) or ln.startswith(("return", "#")):
            keep.append(ln)
        else:
            break
    return "\n".join(keep).rstrip() + "\n"


# -- the sandboxed check -----------------------------------------------------------------------------

@dataclass
class CheckResult:
    """``status``: passed | failed (a test failed) | error (the code did not run) | timeout | no code |
    crashed (killed, e.g. by a resource limit)."""

    passed: bool
    status: str
    n_tests: int
    n_passed: int
    detail: str = ""
    seconds: float = 0.0
    code: str = field(default="", repr=False)


_RUNNER = r'''
import json, os, resource, sys
_SCRATCH = {scratch!r}
_NONCE = {nonce!r}
_CPU, _MEM = {cpu!r}, {mem!r}
for _lim, _v in ((resource.RLIMIT_CPU, _CPU), (resource.RLIMIT_AS, _MEM), (resource.RLIMIT_CORE, 0),
                 (resource.RLIMIT_FSIZE, 8 << 20), (resource.RLIMIT_NOFILE, 64)):
    resource.setrlimit(_lim, (_v, _v))
try:
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
except (ValueError, OSError):
    pass
with open(os.path.join(_SCRATCH, "payload.json"), encoding="utf-8") as _f:
    _PAYLOAD = json.load(_f)
_OUT = os.open(os.path.join(_SCRATCH, "result.json"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

import socket as _socket_mod, _socket


def _no_network(*a, **k):
    raise PermissionError("the network is disabled in the code-task sandbox")


for _n in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
           "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
    setattr(_socket_mod, _n, _no_network)
_socket.socket = _no_network

_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
            "os.forkpty", "os.kill", "os.killpg", "os.setuid", "os.setgid", "pty.", "ctypes.", "resource.setrlimit",
            "resource.prlimit", "sys.addaudithook", "webbrowser.", "urllib.", "http.", "ftplib.", "smtplib.",
            "imaplib.", "poplib.", "nntplib.", "telnetlib.", "os.startfile", "sys.remote_exec", "_posixsubprocess")
_PATHS = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink", "os.link",
          "os.truncate", "os.utime", "os.chdir", "os.mkfifo", "os.mknod", "shutil.")


def _inside(p):
    if isinstance(p, int):
        return True  # an open file descriptor: only files opened inside can be written
    try:
        full = os.path.realpath(os.fsdecode(p))
    except (TypeError, ValueError):
        return False
    return full == _SCRATCH or full.startswith(_SCRATCH + os.sep)


def _hook(event, args):
    if event.startswith(_BLOCKED):
        raise PermissionError("the code-task sandbox refuses " + event)
    if event == "open":
        path, mode, flags = args
        if path is None:
            return
        writes = ((isinstance(flags, int) and flags & _WRITE)
                  or (isinstance(mode, str) and any(c in mode for c in "wax+")))
        if writes and not _inside(path):
            raise PermissionError("the code-task sandbox refuses writing outside its scratch folder")
    elif event.startswith(_PATHS):
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                raise PermissionError("the code-task sandbox refuses " + event + " outside its scratch folder")
    elif event == "object.__setattr__" and len(args) > 1 and args[1] in ("__code__", "__globals__"):
        raise PermissionError("the code-task sandbox refuses replacing __code__")


sys.addaudithook(_hook)


def _finish(status, n_passed, detail):
    os.write(_OUT, json.dumps({{"nonce": _NONCE, "status": status, "n_passed": n_passed,
                                "detail": str(detail)[:{maxd}]}}).encode())
    os.close(_OUT)
    sys.stdout.flush()
    os._exit(0)


_ns = {{"__name__": "solution"}}
try:
    exec(compile(_PAYLOAD["code"], "solution.py", "exec"), _ns)
except BaseException as _e:
    _finish("error", 0, type(_e).__name__ + ": " + str(_e))
_ok = 0
_first = ""
for _i, _t in enumerate(_PAYLOAD["tests"]):
    try:
        exec(compile(_t, "<test %d>" % _i, "exec"), _ns)
        _ok += 1
    except BaseException as _e:
        if not _first:
            _first = _t + " -> " + type(_e).__name__ + (": " + str(_e) if str(_e) else "")
_finish("passed" if _ok == len(_PAYLOAD["tests"]) else "failed", _ok, _first)
'''


def check_solution(code: str, task: CodeTask, *, timeout: float = DEFAULT_TIMEOUT,
                   memory_mb: int = MEMORY_MB) -> CheckResult:
    """Run ``task``'s tests on ``code`` in the sandbox described in the module docstring."""
    n = len(task.tests)
    if not code.strip():
        return CheckResult(False, "no code", n, 0, "no code found in the reply", 0.0, code)
    scratch = os.path.realpath(tempfile.mkdtemp(prefix="wb-codetask-"))
    t0 = time.perf_counter()
    try:
        nonce = os.urandom(8).hex()
        runner = _RUNNER.format(scratch=scratch, nonce=nonce, cpu=max(1, int(timeout + 0.999)),
                                mem=int(memory_mb) << 20, maxd=MAX_DETAIL)
        with open(os.path.join(scratch, "runner.py"), "w", encoding="utf-8") as f:
            f.write(runner)
        with open(os.path.join(scratch, "payload.json"), "w", encoding="utf-8") as f:
            json.dump({"code": code, "tests": list(task.tests)}, f)
        with open(os.path.join(scratch, "stdout.txt"), "wb") as out:
            p = subprocess.Popen([sys.executable, "-I", "-S", os.path.join(scratch, "runner.py")], cwd=scratch,
                                 env={}, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True, close_fds=True)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(p)
                return CheckResult(False, "timeout", n, 0, f"ran past {timeout:g} s", time.perf_counter() - t0, code)
            finally:
                _kill_group(p)  # anything the child left behind in its session
        try:
            with open(os.path.join(scratch, "result.json"), encoding="utf-8") as f:
                res = json.load(f)
            if res.get("nonce") != nonce:
                raise ValueError("bad nonce")
        except (OSError, ValueError):
            tail = _tail(os.path.join(scratch, "stdout.txt"))
            return CheckResult(False, "crashed", n, 0, f"exit status {p.returncode}; {tail}"[:MAX_DETAIL],
                               time.perf_counter() - t0, code)
        st = str(res["status"])
        return CheckResult(st == "passed", st, n, int(res["n_passed"]), str(res["detail"]),
                           time.perf_counter() - t0, code)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass


def _tail(path: str, n: int = 400) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace").strip().replace("\n", " | ")
    except OSError:
        return ""


def check_completion(completion: str, task: CodeTask, **kw: Any) -> CheckResult:
    """Extract the code from a model's reply (:func:`extract_code`) and check it."""
    return check_solution(extract_code(completion, task.name), task, **kw)


def check_many(completions: Sequence[str], tasks: Sequence[CodeTask], *, workers: int = 2,
               **kw: Any) -> list[CheckResult]:
    """Check many replies (in order), ``workers`` sandboxes at a time."""
    if len(completions) != len(tasks):
        raise WorkbenchError(f"{len(completions)} completions but {len(tasks)} tasks")
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as ex:
        return list(ex.map(lambda ct: check_completion(ct[0], ct[1], **kw), zip(completions, tasks)))


# -- command line: a model's pass rate on one split ---------------------------------------------------

from workbench.stats import wilson_interval as _wilson  # noqa: E402  (the CLI's interval; one implementation)


def evaluate(lm: Any, fmt: Any, split: str = "test", *, max_new_tokens: int = 160, batch_size: int | None = None,
             workers: int = 2, progress: bool = False) -> dict[str, Any]:
    """Greedy replies of ``lm`` (chat format ``fmt``) to every task of ``split``, checked by their unit tests.

    Returns ``{"split", "n", "n_passed", "pass_rate", "ci" (95 % Wilson), "rows": [per task]}``.
    """
    from workbench.backends import get_backend
    from workbench.generation import generate_texts

    tasks = load_codetasks(split)
    replies = generate_texts(get_backend("native", lm), [t.prompt for t in tasks], fmt, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, progress="code tasks" if progress else False)
    checks = check_many(replies, tasks, workers=workers)
    k = sum(c.passed for c in checks)
    rows = [{"id": t.id, "status": c.status, "passed": c.passed, "tests_passed": c.n_passed, "n_tests": c.n_tests,
             "reply": r} for t, c, r in zip(tasks, checks, replies)]
    return {"split": split, "n": len(tasks), "n_passed": k, "pass_rate": k / len(tasks) if tasks else float("nan"),
            "ci": list(_wilson(k, len(tasks))), "max_new_tokens": max_new_tokens, "rows": rows}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m workbench.codetasks --model KEY_OR_FOLDER --split test [--out FILE.json]``."""
    import argparse

    from workbench.argtypes import positive_int
    from workbench.chat import ChatFormat
    from workbench.loading import load_model

    ap = argparse.ArgumentParser(prog="python -m workbench.codetasks",
                                 description="a model's unit-test pass rate on the function-writing tasks")
    ap.add_argument("--model", required=True, help="zoo key or model folder")
    ap.add_argument("--split", choices=SPLITS, default="test")
    ap.add_argument("--max-new-tokens", type=positive_int, default=160)
    ap.add_argument("--batch-size", type=positive_int, default=None)
    ap.add_argument("--system-prompt", default=None, help="'default' (the zoo's, if any), 'none', or a text")
    ap.add_argument("--threads", type=positive_int, default=None)
    ap.add_argument("--out", default=None, help="write the result and every reply as JSON")
    a = ap.parse_args(argv)
    try:
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        lm = load_model(a.model)
        sp = a.system_prompt
        sp = lm.default_system_prompt if sp in (None, "default") else (None if sp.lower() == "none" else sp)
        res = evaluate(lm, ChatFormat(system_prompt=sp), a.split, max_new_tokens=a.max_new_tokens,
                       batch_size=a.batch_size, progress=True)
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res["model"] = a.model
    if a.out:
        from workbench.io import write_json

        write_json(a.out, res)
    lo, hi = res["ci"]
    print(f"{a.model}: {res['n_passed']}/{res['n']} = {res['pass_rate']:.3f} [{lo:.3f}, {hi:.3f}] of the "
          f"{a.split} tasks pass their unit tests (greedy, {a.max_new_tokens} new tokens)")
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through main() in tests
    raise SystemExit(main())
