"""``--threads`` is global but accepted anywhere on the line: a sub-command with its own ``--threads`` (the chain,
the stand-in) must receive the value, not its default 0 (= pick automatically)."""

from __future__ import annotations

import torch

from workbench import cli as core


def test_threads_anywhere_reach_a_subcommand_that_has_its_own(monkeypatch, tmp_path):
    seen = {}

    def fake_chain(args):
        seen["threads"] = args.threads
        seen["torch"] = torch.get_num_threads()
        return 0

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr("weightspace.chain.cmd_chain", fake_chain)
        from weightspace import cli as ws_cli

        monkeypatch.setattr(ws_cli, "cmd_chain", fake_chain, raising=False)
        parser = core.build_parser()
        args = parser.parse_args(["--threads", "1", "weightspace", "chain", "--out", str(tmp_path / "c")])
        assert args.global_threads == 1
        assert core.main(["weightspace", "chain", "--out", str(tmp_path / "c"), "--threads", "1"]) == 0
        assert seen == {"threads": 1, "torch": 1}
        seen.clear()
        assert core.main(["weightspace", "chain", "--out", str(tmp_path / "c")]) == 0
        assert seen["threads"] == 0  # not given: the command's own default (automatic choice)
    finally:
        torch.set_num_threads(before)
