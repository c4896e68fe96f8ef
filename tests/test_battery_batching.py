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


def test_battery_attention_switch_is_held_with_the_lock_only():
    """The battery's forwards run with sdpa attention while the lock is held, the model is back to its own
    (eager) attention whenever the lock is released, and eager and sdpa batteries give the same numbers
    (rates exactly, means to float rounding)."""
    import pytest

    from steering.battery import BatteryConfig, BatterySetting, run_battery
    from workbench.arch import AttentionHeld
    from workbench.errors import WorkbenchError

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
        res = {a: run_battery(be, FMT, settings, BatteryConfig(attention=a, **sizes), lock=Lock())
               for a in ("sdpa", "eager")}
    finally:
        handle.remove()
    assert set(Lock.states) == {"eager"} and model.config._attn_implementation == "eager"
    assert "sdpa" in seen and "eager" in seen  # the sdpa battery's passes, then the eager one's
    for a, b in zip(res["sdpa"].summary, res["eager"].summary):
        assert a["attention"] == "sdpa" and b["attention"] == "eager"
        for k in ("harm_rate", "refusal_rate", "pass_rate"):
            assert a[k] == b[k]
        for k in ("refusal_logit", "answer_nll", "kl"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6)
    # the lock is released (and eager restored) when a forward fails inside it
    held = AttentionHeld(Lock(), model, "sdpa")
    with pytest.raises(RuntimeError):
        with held:
            assert model.config._attn_implementation == "sdpa"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "eager" and Lock.states[-1] == "eager"
    with pytest.raises(WorkbenchError, match="attention"):
        BatteryConfig(attention="flash")
