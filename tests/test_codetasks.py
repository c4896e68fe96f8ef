"""The function-writing tasks and their sandboxed checker (``workbench.codetasks``).

Every task's reference solution passes its own tests and a constant answer fails them (so the tests are not
trivially satisfiable); the checker extracts code from fenced and bare replies; a wrong solution fails, an
infinite loop times out, and a solution that opens a socket, writes outside its scratch folder or starts a
process fails without doing it.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from workbench.codetasks import (SPLITS, check_completion, check_many, check_solution, extract_code,
                                 load_codetasks)

TASKS = load_codetasks()
BY_NAME = {t.name: t for t in TASKS}


def test_the_data_is_complete_and_split_fixed():
    assert len(TASKS) >= 60
    assert len({t.id for t in TASKS}) == len(TASKS) and len(BY_NAME) == len(TASKS)
    counts = {s: len(load_codetasks(s)) for s in SPLITS}
    assert counts == {"train": 26, "val": 12, "test": 32}
    for t in TASKS:
        assert t.signature.startswith(t.name + "(") and len(t.tests) >= 2
        assert f"`{t.signature}`" in t.prompt and "```python" in t.prompt


def test_every_reference_solution_passes_and_a_constant_answer_fails():
    res = check_many([t.reference_reply for t in TASKS], TASKS, workers=2)
    bad = [(t.id, r.status, r.detail) for t, r in zip(TASKS, res) if not r.passed]
    assert not bad, bad
    assert all(r.n_passed == r.n_tests == len(t.tests) for t, r in zip(TASKS, res))
    # a function that returns a constant fails every task's tests (none is trivially constant)
    consts = [f"def {t.signature.split('(')[0]}(*args, **kwargs):\n    return {v!r}\n"
              for t in TASKS for v in (None, 0, "", [], True)]
    tasks5 = [t for t in TASKS for _ in range(5)]
    passed = {t.id for t, r in zip(tasks5, check_many([f"```python\n{c}```" for c in consts], tasks5, workers=2))
              if r.passed}
    assert not passed, passed


def test_extract_code_from_fences_and_bare_defs():
    fenced = "Sure!\n```python\ndef f(x):\n    return x + 1\n```\nThis adds one."
    assert extract_code(fenced) == "def f(x):\n    return x + 1\n"
    two = "```python\nimport math\n```\n```python\ndef g(x):\n    return math.sqrt(x)\n```"
    assert extract_code(two, "g").startswith("def g(x)")
    unclosed = "```python\ndef h():\n    return 3\n"  # cut by the token limit
    assert extract_code(unclosed) == "def h():\n    return 3\n"
    bare = "Here it is:\ndef k(a):\n    if a:\n        return 1\n\n    return 0\nThat is all."
    assert extract_code(bare) == "def k(a):\n    if a:\n        return 1\n\n    return 0\n"
    assert extract_code("I cannot help with that.") == ""
    r = check_completion("I cannot help with that.", TASKS[0])
    assert r.status == "no code" and not r.passed


def test_correct_passes_and_wrong_fails():
    t = BY_NAME["count_vowels"]
    ok = check_completion("```python\ndef count_vowels(s):\n    return sum(c in 'aeiou' for c in s.lower())\n```", t)
    assert ok.passed and ok.status == "passed" and ok.n_passed == len(t.tests)
    wrong = check_solution("def count_vowels(s):\n    return sum(c in 'aeiou' for c in s)\n", t)  # case-sensitive
    assert not wrong.passed and wrong.status == "failed" and 0 < wrong.n_passed < len(t.tests)
    assert "AEIOU" in wrong.detail and "AssertionError" in wrong.detail
    broken = check_solution("def count_vowels(s) return 0\n", t)
    assert broken.status == "error" and "SyntaxError" in broken.detail


def test_an_infinite_loop_times_out():
    t = BY_NAME["gcd"]
    r = check_solution("def gcd(a, b):\n    while True:\n        pass\n", t, timeout=1.5)
    assert r.status == "timeout" and not r.passed
    assert r.seconds < 10


def test_a_socket_is_refused(tmp_path):
    """Neither the socket module nor the C-level _socket can open a socket; a listener here sees nothing."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(3)
    port = srv.getsockname()[1]
    seen: list[bool] = []

    def accept() -> None:
        try:
            conn, _ = srv.accept()
            seen.append(True)
            conn.close()
        except OSError:
            pass

    th = threading.Thread(target=accept)
    th.start()
    t = BY_NAME["clamp"]
    body = "def clamp(x, lo, hi):\n    return max(lo, min(hi, x))\n"
    for attempt in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}))\n",
                    f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
                    f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n"):
        r = check_solution(attempt + body, t)
        assert r.status == "error" and not r.passed, r
        assert "PermissionError" in r.detail, r.detail
    th.join()
    srv.close()
    assert not seen


def test_writing_outside_the_scratch_folder_is_refused(tmp_path):
    t = BY_NAME["clamp"]
    body = "def clamp(x, lo, hi):\n    return max(lo, min(hi, x))\n"
    target = tmp_path / "escaped.txt"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    attempts = [
        f"open({str(target)!r}, 'w').write('x')\n",
        f"import os\nos.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))\n",
        f"import os\nos.remove({str(victim)!r})\n",
        f"import os\nos.rename({str(victim)!r}, 'stolen.txt')\n",
        f"import shutil\nshutil.copy('runner.py', {str(target)!r})\n",
        f"import os\nos.chdir({str(tmp_path)!r})\nopen('escaped.txt', 'w')\n",
        f"open('../escaped-{os.getpid()}.txt', 'w')\n",
        "import subprocess\nsubprocess.run(['touch', " + repr(str(target)) + "])\n",
        "import os\nos.system('touch " + str(target) + "')\n",
        "import ctypes\n",
    ]
    for code in attempts:
        r = check_solution(code + body, t)
        assert r.status == "error" and "PermissionError" in r.detail, (code, r)
    assert not target.exists() and victim.read_text() == "keep me"
    assert not (Path(os.path.realpath("/tmp")) / f"escaped-{os.getpid()}.txt").exists()
    # writing inside the scratch folder is allowed (and the folder is removed afterwards)
    ok = check_solution("open('notes.txt', 'w').write('ok')\n" + body, t)
    assert ok.passed


def test_the_child_gets_an_empty_environment_and_resource_limits(monkeypatch):
    monkeypatch.setenv("WORKBENCH_SECRET_FOR_TEST", "hunter2")
    t = BY_NAME["clamp"]
    body = "def clamp(x, lo, hi):\n    return max(lo, min(hi, x))\n"
    probe = ("import os, resource, sys\n"
             "assert 'WORKBENCH_SECRET_FOR_TEST' not in os.environ, 'env leaked'\n"
             "assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)\n"
             "assert resource.getrlimit(resource.RLIMIT_AS)[1] <= 512 << 20\n"
             "assert sys.flags.isolated and sys.flags.no_site\n")
    r = check_solution(probe + body, t)
    assert r.passed, r
    big = check_solution("x = bytearray(2 << 30)\n" + body, t)  # past the address-space limit
    assert not big.passed and "MemoryError" in big.detail


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_replies_are_checked(smollm2):
    """End to end on a real (small) model: the replies are parsed and checked; the count is what it is."""
    from workbench.backends import get_backend
    from workbench.chat import ChatFormat
    from workbench.generation import generate_texts

    tasks = load_codetasks("test")[:2]
    replies = generate_texts(get_backend("native", smollm2), [t.prompt for t in tasks],
                             ChatFormat(system_prompt=smollm2.default_system_prompt), max_new_tokens=48)
    res = check_many(replies, tasks)
    assert [r.n_tests for r in res] == [len(t.tests) for t in tasks]
    assert all(r.status in ("passed", "failed", "error", "no code", "timeout", "crashed") for r in res)


def test_command_line_pass_rate_with_wilson_interval(tmp_path, monkeypatch, capsys):
    """``python -m workbench.codetasks``: every task's reply checked; reference replies all pass, a tiny random model
    passes none; the interval is Wilson's; a bad model name is one clear error line."""
    import json

    import workbench.generation as gen
    from workbench import codetasks as C
    from workbench.tiny import build_tiny

    model, tok = build_tiny("llama")
    d = tmp_path / "tiny"
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    tasks = C.load_codetasks("val")
    good = {t.prompt: t.reference_reply for t in tasks[:9]}
    monkeypatch.setattr(gen, "generate_texts", lambda be, prompts, fmt, **kw: [good.get(p, "no code") for p in prompts])
    assert C.main(["--model", str(d), "--split", "val", "--out", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert (r["n"], r["n_passed"]) == (len(tasks), 9) and r["pass_rate"] == pytest.approx(9 / len(tasks))
    assert [x["passed"] for x in r["rows"]] == [True] * 9 + [False] * (len(tasks) - 9)
    assert {x["status"] for x in r["rows"][9:]} == {"no code"}
    lo, hi = r["ci"]
    assert lo < 9 / len(tasks) < hi and (lo, hi) == pytest.approx(C._wilson(9, len(tasks)))
    assert C._wilson(0, 10)[0] == 0.0 and C._wilson(10, 10)[1] == pytest.approx(1.0)
    assert "9/12" in capsys.readouterr().out
    monkeypatch.undo()
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    assert C.main(["--model", "no-such-model-xyz", "--split", "val"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
