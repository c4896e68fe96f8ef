"""The battery's batched decoding: several settings in one batch (OnRows) give each setting's own replies,
ended rows leave the batch without changing the others, and the prefill log-probabilities equal a forward
over the prompts alone."""

from __future__ import annotations

import torch

from steering.battery import greedy_decode
from workbench.backends import get_backend
from workbench.chat import ChatFormat
from workbench.interventions import Ablation, Addition, HookContext, OnRows
from workbench.loading import from_memory
from workbench.scoring import next_token_logprobs
from workbench.sites import Site
from workbench.tiny import build_tiny

PROMPTS = ["Tell me about the sea", "hi", "What is the capital of France?", "Write a poem about rain",
           "Explain gradient descent"]
FMT = ChatFormat(system_prompt="Be brief.")


def _backend(arch: str = "llama"):
    return get_backend("native", from_memory(*build_tiny(arch, n_layers=3)))


def _vec(d: int, seed: int) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def test_on_rows_touches_only_its_rows_and_follows_row_ids():
    v = torch.ones(3)
    iv = OnRows(Addition(Site(0, "resid_pre"), v, 2.0), rows=[5, 7])
    act = torch.zeros(3, 2, 3)
    ctx = HookContext(pads=torch.tensor([0, 1, 0]), prompt_width=2, n_post=0, rows=torch.tensor([7, 6, 5]))
    out = iv(act, ctx)
    assert out[0].tolist() == [[2.0] * 3] * 2 and out[2].tolist() == [[2.0] * 3] * 2
    assert out[1].abs().sum() == 0
    # a pad column of a touched row stays untouched
    ctx = HookContext(pads=torch.tensor([1, 0, 0]), prompt_width=2, n_post=0, rows=torch.tensor([7, 6, 5]))
    assert iv(act, ctx)[0, 0].abs().sum() == 0 and iv(act, ctx)[0, 1].tolist() == [2.0] * 3
    assert not OnRows.position_wise  # never split into a shared prefix computed for one row


def test_settings_in_one_batch_equal_each_setting_alone():
    be = _backend()
    d = be.lm.model.config.hidden_size
    ivs_a = [Addition(Site(1, "resid_pre"), _vec(d, 0), 4.0)]
    ivs_b = [Ablation(Site(0, "resid_post"), _vec(d, 1)), Addition(Site(2, "resid_pre"), _vec(d, 2), -3.0)]
    n = len(PROMPTS)
    joint_first: list[torch.Tensor] = []
    joint = greedy_decode(be, PROMPTS * 3, FMT, max_new_tokens=6, batch_size=3 * n, first_step=joint_first,
                          interventions=[OnRows(iv, range(n, 2 * n)) for iv in ivs_a]
                          + [OnRows(iv, range(2 * n, 3 * n)) for iv in ivs_b])
    for k, ivs in enumerate(([], ivs_a, ivs_b)):
        first: list[torch.Tensor] = []
        alone = greedy_decode(be, PROMPTS, FMT, max_new_tokens=6, batch_size=n, interventions=ivs, first_step=first)
        assert joint[k * n:(k + 1) * n] == alone
        torch.testing.assert_close(joint_first[0][k * n:(k + 1) * n], first[0], atol=1e-5, rtol=1e-5)
        # the prefill log-probabilities are what a forward over the prompts alone gives
        torch.testing.assert_close(first[0], next_token_logprobs(be, PROMPTS, FMT, interventions=ivs).float(),
                                   atol=1e-5, rtol=1e-5)
    assert joint[n:2 * n] != joint[:n]  # the steering changed the replies


def test_ended_rows_leave_the_batch_without_changing_the_others():
    be = _backend("qwen2")

    def stop(text: str) -> bool:  # rows end after different numbers of tokens
        return len(text) >= 4 + 3 * (ord(text[0]) % 4) if text else False

    batched = greedy_decode(be, PROMPTS, FMT, max_new_tokens=12, batch_size=len(PROMPTS), stop=stop)
    one_by_one = [greedy_decode(be, [p], FMT, max_new_tokens=12, batch_size=1, stop=stop)[0] for p in PROMPTS]
    assert batched == one_by_one
    assert len({len(t) for t in batched}) > 1  # really different lengths: rows ended at different steps
    assert all(stop(t) for t in batched)  # every row ended by the rule, none ran on


def test_answers_teacher_forced_in_the_prefill_score_as_completion_nll():
    """The reference answers scored in the decoding's prefill give completion_nll's numbers (alone and with
    settings on their own rows), and the replies are those of a decoding without answers."""
    import pytest

    from workbench.errors import WorkbenchError
    from workbench.scoring import completion_nll

    be = _backend("qwen2")
    d = be.lm.model.config.hidden_size
    answers = ["def f(x):\n    return x + 1", "", "Paris.", "Rain falls\non the roofs of the town", "Step downhill."]
    ivs = [Ablation(Site(1, "resid_pre"), _vec(d, 4)), Addition(Site(2, "resid_pre"), _vec(d, 5), 2.0)]
    n = len(PROMPTS)
    for settings in ([[]], [[], ivs]):
        joint = [OnRows(iv, range(k * n, (k + 1) * n)) for k, s in enumerate(settings) for iv in s]
        prompts = PROMPTS * len(settings)
        nll: list = []
        got = greedy_decode(be, prompts, FMT, max_new_tokens=5, batch_size=4, interventions=joint,
                            answers=answers * len(settings), answer_nll=nll)
        assert got == greedy_decode(be, prompts, FMT, max_new_tokens=5, batch_size=4, interventions=joint)
        for k, s in enumerate(settings):
            want = completion_nll(be, PROMPTS, answers, FMT, interventions=s)
            for (a, ca), (b, cb) in zip(nll[0][k * n:(k + 1) * n], want):
                assert ca == cb and a == pytest.approx(b, rel=1e-5, abs=1e-5)
        assert nll[0][1] == (0.0, 0) and all(c > 0 for i, (_, c) in enumerate(nll[0]) if i % n != 1)
    assert nll[0][0] != nll[0][n]  # the steered setting scores the answers differently
    last = [Addition(Site(1, "resid_pre"), _vec(d, 6), 2.0, apply_to="last")]
    with pytest.raises(WorkbenchError, match="all positions"):
        greedy_decode(be, PROMPTS, FMT, max_new_tokens=2, interventions=last, answers=answers, answer_nll=[])


def test_battery_kernels_are_switched_with_the_lock_only_and_agree():
    """The battery's forwards run with sdpa attention and oneDNN linear layers while the lock is held, the model
    is back to its own (eager) attention whenever the lock is released, and the fast and the default kernels
    give the same numbers (rates exactly, means to float rounding)."""
    import pytest

    from steering.battery import BatteryConfig, BatterySetting, run_battery
    from workbench.errors import WorkbenchError
    from workbench.kernels import KernelsHeld, onednn_linear_available

    be = _backend("qwen2")
    model = be.lm.model
    seen: list[str] = []
    handle = model.register_forward_pre_hook(lambda m, a: seen.append(m.config._attn_implementation))

    class Lock:  # records the model's attention at every acquire and release
        states: list[str] = []

        def __enter__(self):
            self.states.append(model.config._attn_implementation)

        def __exit__(self, *exc):
            self.states.append(model.config._attn_implementation)

    d = model.config.hidden_size
    settings = [BatterySetting("unmodified"), BatterySetting("ablation", [Ablation(Site(1, "resid_pre"), _vec(d, 7))])]
    sizes = dict(n_harmful=3, n_tasks=2, n_harmless=3, harm_tokens=4, code_tokens=8, n_boot=50)
    try:
        res = {k: run_battery(be, FMT, settings, BatteryConfig(attention=a, linear=li, **sizes), lock=Lock())
               for k, (a, li) in {"fast": ("sdpa", "onednn"), "default": ("eager", "default")}.items()}
    finally:
        handle.remove()
    assert set(Lock.states) == {"eager"} and model.config._attn_implementation == "eager"
    assert "sdpa" in seen and "eager" in seen  # the fast battery's passes, then the default one's
    assert onednn_linear_available()  # x86 PyTorch builds carry oneDNN: the fast path is really taken here
    for a, b in zip(res["fast"].summary, res["default"].summary):
        assert (a["attention"], a["linear"], b["attention"], b["linear"]) == ("sdpa", "onednn", "eager", "default")
        for k in ("harm_rate", "refusal_rate", "pass_rate"):
            assert a[k] == b[k]
        for k in ("refusal_logit", "answer_nll", "kl"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6)
    # the lock is released (and eager restored, the linear mode left) when a forward fails inside it
    held = KernelsHeld(Lock(), model, "sdpa", "onednn")
    with pytest.raises(RuntimeError):
        with held:
            assert model.config._attn_implementation == "sdpa"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "eager" and Lock.states[-1] == "eager"
    lin = torch.nn.Linear(4, 2)
    with KernelsHeld(Lock(), model, None, "onednn") as h:
        y = lin(torch.randn(3, 4))  # autograd on: the default kernel, gradients flow
    assert y.requires_grad and h.linear_used() == "default"
    for bad in (dict(attention="flash"), dict(linear="blas")):
        with pytest.raises(WorkbenchError, match="must be one of"):
            BatteryConfig(**bad)


def test_parts_decode_in_one_loop_with_the_replies_of_each_part_alone():
    """Prompt sets of different lengths, own token limits and stop rules, several settings on their own rows:
    decoded as parts (each prefilled alone, then one loop) they give each part's replies, first-step
    log-probabilities and answer NLLs decoded alone, in fewer forward passes."""
    be = _backend("qwen2")
    d = be.lm.model.config.hidden_size
    short = ["hi", "Name a colour", "Say yes"]
    long = ["Explain in detail how a steam engine turns heat into work, step by step",
            "Write a long story about a lighthouse keeper and a storm at sea, with a twist at the end"]

    def stop(text: str) -> bool:
        return len(text) >= 9

    calls = [0]
    handle = be.lm.model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    ivs_b = [Addition(Site(1, "resid_pre"), _vec(d, 8), 3.0)]
    try:
        sets = [(short, 7, None, None), (long, 11, stop, ["The engine burns coal.", "Once upon a time"]),
                (PROMPTS[:2], 1, None, None)]
        prompts, limits, stops, answers, parts, spans = [], [], [], [], [], []
        for k, (ps, lim, st, ans) in enumerate(sets):
            for s in range(2):  # two settings: unmodified, ivs_b
                spans.append((k, s, len(prompts), len(ps)))
                prompts += ps
                limits += [lim] * len(ps)
                stops += [st] * len(ps)
                answers += ans if ans else [None] * len(ps)
                parts += [k] * len(ps)
        rows_b = [r for k, s, a, n in spans if s == 1 for r in range(a, a + n)]
        joint_ivs = [OnRows(iv, rows_b) for iv in ivs_b]
        fs, nl = [], []
        calls[0] = 0
        got = greedy_decode(be, prompts, FMT, max_new_tokens=limits, interventions=joint_ivs, stop=stops, parts=parts,
                            batch_size=16, first_step=fs, answers=answers, answer_nll=nl)
        n_joint = calls[0]
        n_alone = 0
        for k, s, a, n in spans:
            ps, lim, st, ans = sets[k]
            f1, n1 = [], []
            calls[0] = 0
            alone = greedy_decode(be, ps, FMT, max_new_tokens=lim, stop=st, interventions=ivs_b if s else [],
                                  batch_size=16, first_step=f1, answers=ans, answer_nll=n1 if ans else None)
            n_alone += calls[0]
            assert got[a:a + n] == alone, (k, s)
            torch.testing.assert_close(fs[0][a:a + n], f1[0], atol=2e-5, rtol=1e-5)
            if ans:
                for (x, cx), (y, cy) in zip(nl[0][a:a + n], n1[0]):
                    assert cx == cy and abs(x - y) < 1e-4 * max(1.0, abs(y))
    finally:
        handle.remove()
    assert any(stop(t) for t in got[6:10]) and got[:3] != got[3:6]
    assert n_joint < n_alone  # the parts shared their decoding steps


def test_battery_numbers_equal_the_independent_scorers_joint_or_not():
    """Every per-item number of the battery (refusal logit, answer NLL, KL) equals what the plain scorers give
    for that setting (next_token_logprobs, completion_nll, refusal_scores), joint or one setting at a time, for
    a setting on all positions, one on the last prompt position only (answers then scored apart) and one on
    its own backend."""
    import pytest

    from steering.battery import BatteryConfig, BatterySetting, battery_inputs, run_battery
    from workbench.scoring import completion_nll, kl_from_logprobs, refusal_scores

    be = _backend("qwen2")
    other = _backend("llama")  # a setting with a backend of its own (as an orthogonalised copy is)
    d = be.lm.model.config.hidden_size
    last = [Addition(Site(1, "resid_pre"), _vec(d, 9), 4.0, apply_to="last")]
    settings = [BatterySetting("unmodified"), BatterySetting("abl", [Ablation(Site(1, "resid_pre"), _vec(d, 7))]),
                BatterySetting("last", last), BatterySetting("own", (), other)]
    cfg = BatteryConfig(n_harmful=3, n_tasks=2, n_harmless=3, harm_tokens=4, code_tokens=8, n_boot=50,
                        attention="eager")
    harmful, tasks, harmless = battery_inputs(cfg)
    runs = {j: run_battery(be, FMT, settings, cfg, joint=j) for j in (True, False)}
    ref = next_token_logprobs(be, harmless, FMT)
    for j, res in runs.items():
        for st in settings:
            b = st.backend or be
            ivs = list(st.interventions)
            items = {(r["set"], r["index"]): r for r in res.items if r["setting"] == st.name}
            want_nll = completion_nll(b, [t.prompt for t in tasks], [t.reference_reply for t in tasks], FMT,
                                      interventions=ivs)
            want_kl = kl_from_logprobs(ref, next_token_logprobs(b, harmless, FMT, interventions=ivs)).tolist()
            want_rl = refusal_scores(b, harmful, FMT, interventions=ivs).tolist()
            for i, (s, c) in enumerate(want_nll):
                assert items[("code", i)]["answer_nll"] == pytest.approx(s / c, rel=1e-4), (j, st.name, i)
            for i, v in enumerate(want_kl):
                assert items[("harmless", i)]["kl_last"] == pytest.approx(v, rel=1e-3, abs=1e-6), (j, st.name, i)
            for i, v in enumerate(want_rl):
                assert items[("harmful", i)]["refusal_logit"] == pytest.approx(v, rel=1e-4, abs=1e-5), (j, st.name, i)
    for a, b in zip(runs[True].summary, runs[False].summary):
        for k in ("harm_rate", "refusal_rate", "pass_rate"):
            assert a[k] == b[k]
    assert [r["reply"] for r in runs[True].items if "reply" in r] == \
        [r["reply"] for r in runs[False].items if "reply" in r]
    assert runs[True].summary[0]["kl"] == 0 and runs[True].summary[1]["kl"] > 0


def test_another_thread_never_sees_the_battery_kernels():
    """While a battery runs with the fast kernels in one thread, forwards of the same model in another thread
    (an app user generating; both take the model's lock) run with the model's own eager attention and no
    oneDNN routing, and give the same logits as when no battery runs."""
    import threading

    from steering.battery import BatteryConfig, BatterySetting, run_battery

    be = _backend("qwen2")
    model = be.lm.model
    lock = threading.Lock()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    seen: list[tuple[str, bool]] = []
    got: list[torch.Tensor] = []
    turn, served, done = threading.Event(), threading.Event(), threading.Event()

    def other_user() -> None:  # one forward each time the battery reports progress (between its steps)
        while True:
            turn.wait()
            turn.clear()
            if done.is_set():
                return
            with lock, torch.no_grad():
                seen.append((model.config._attn_implementation, torch._C._is_torch_function_mode_enabled()))
                got.append(model(input_ids=ids).logits)
            served.set()

    def progress(fraction: float, message: str) -> None:  # the battery's thread waits for the other user's forward
        served.clear()
        turn.set()
        assert served.wait(30)

    t = threading.Thread(target=other_user)
    t.start()
    try:
        d = model.config.hidden_size
        res = run_battery(be, FMT, [BatterySetting("unmodified"),
                                    BatterySetting("abl", [Ablation(Site(1, "resid_pre"), _vec(d, 7))])],
                          BatteryConfig(n_harmful=3, n_tasks=2, n_harmless=3, harm_tokens=6, code_tokens=12, n_boot=50),
                          lock=lock, progress=progress)
    finally:
        done.set()
        turn.set()
        t.join()
    assert res.summary[0]["linear"] == "onednn" and res.summary[0]["attention"] == "sdpa"
    assert len(seen) > 3 and set(seen) == {("eager", False)}
    for x in got:
        assert torch.equal(x, want)
