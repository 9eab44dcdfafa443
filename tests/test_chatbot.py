"""The terminal chatbot (python -m v2.chatbot) driven through a pseudo-terminal with pexpect:
two turns, a /policy change, /set, /stats, bad input, Ctrl-D."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect", reason="pexpect not installed (pip install -e '.[dev]')")

from tests.test_chat import ANSWER, QUESTION, TINY  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120


def flops(child) -> float:
    child.expect(r"executed FLOPs ([\d.]+)% of no skipping")
    return float(child.match.group(1))


def test_chatbot_in_a_terminal():
    child = pexpect.spawn(
        sys.executable,
        ["-m", "v2.chatbot", "--model", str(TINY)],
        cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT), "TERM": "dumb"},
        encoding="utf-8",
        timeout=TIMEOUT,
    )
    try:
        child.expect("you> ")
        # Turn 1: streamed, answered.
        child.sendline(QUESTION)
        child.expect("bot> ")
        child.expect(re.escape(ANSWER))
        child.expect("you> ")
        child.sendline("/stats")
        child.expect("policy none")
        assert flops(child) == 100.0
        child.expect("you> ")

        # Bad input: one line each, the session goes on.
        for line, message in [
            ("/policy token foo=1", "not foo"),
            ("/policy warp", "unknown policy"),
            ("/set threshold abc", "threshold must be a number, got 'abc'"),
            ("/policy token cosine_threshold=-1", "cosine_threshold must be >= 0"),
            ("/nope", "unknown command"),
        ]:
            child.sendline(line)
            child.expect(f"error: [^\r\n]*{re.escape(message)}")
            child.expect("you> ")
        # A policy that can skip nothing is accepted with the note every entry point prints.
        child.sendline("/policy layer cosine_threshold=2")
        child.expect("policy layer cosine_threshold=2.0")
        child.expect("note: policy 'layer' with {'cosine_threshold': 2.0} can skip nothing")
        child.expect("you> ")

        # Turn 2 of the same conversation, under a policy: the statistics show the skipping.
        child.sendline("/policy token cosine_threshold=0.9")
        child.expect("policy token cosine_threshold=0.9")
        child.expect("you> ")
        # /stats describes the last answer, decoded with no policy, not the policy chosen since
        child.sendline("/stats")
        child.expect("policy none; finish")
        assert flops(child) == 100.0
        child.expect("you> ")
        child.sendline("/set max_new_tokens 64")
        child.expect("max_new_tokens = 64")
        child.expect("you> ")
        child.sendline("And how many crayons does Jack have if he gets 2 more?")
        child.expect("bot> ")
        child.expect("you> ")
        child.sendline("/stats")
        child.expect("policy token cosine_threshold=0.9")
        assert flops(child) < 90.0
        child.expect("you> ")

        # A fresh conversation (what the tiny model was trained on) answers as before.
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.expect("you> ")
        child.sendline("/set max_new_tokens 128")
        child.expect("you> ")
        child.sendline(QUESTION)
        child.expect("bot> ")
        child.expect(re.escape(ANSWER))
        child.expect("you> ")

        child.sendeof()  # Ctrl-D
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
