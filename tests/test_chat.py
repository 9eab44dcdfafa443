"""The step observer of generate and the chat session built on it (v2/chat.py), on CPU: the
committed tiny model for answers, a random network for exact comparisons."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from tests.conftest import IDS, prompt, random_network
from v2.chat import ChatError, ChatSession, parse_options, parse_setting
from v2.generate import FastDLLM, GenerationConfig, generate
from v2.observer import NOT_RUN, Observer
from v2.policies import make_policy, policy_names
from v2.policy import COMPUTE, PASS, REUSE

TINY = Path(__file__).resolve().parent.parent / "v2" / "tiny" / "checkpoint"
QUESTION = (
    "Jack has 100 crayons. Jack mails 58 crayons to a cousin. The next day Jack gets 14 more "
    "crayons. How many crayons are left for Jack?"
)
ANSWER = "#### 56"


@pytest.fixture(scope="module")
def tiny() -> FastDLLM:
    return FastDLLM.load(TINY)


class Steps(list, Observer):
    """The DenoiseSteps of a generation, in order."""

    def on_forward(self, step) -> None:
        self.append(step)


POLICIES = [
    (None, {}),
    ("token", {"cosine_threshold": 0.9}),
    ("token", {"reuse_ratio": 0.5}),
    ("layer", {"cosine_threshold": 0.5}),
    ("reuse", {"reuse_k": 2, "layer_subset": "last"}),
]


@pytest.mark.parametrize("block_cache", [False, True])
@pytest.mark.parametrize(("name", "options"), POLICIES)
def test_observer_changes_nothing_and_accounts_for_every_forward(name, options, block_cache):
    """Same tokens and statistics with and without an observer; the steps' commits rebuild the
    output, and their per-forward statistics add up to the run's denoise work."""
    model = random_network(std=0.3)
    prompts = [prompt(5), prompt(37, 3)]
    cfg = GenerationConfig(max_new_tokens=40, threshold=0.3, use_block_cache=block_cache)
    ref = generate(model, prompts, IDS, cfg, make_policy(name, **options))
    steps = Steps()
    got = generate(model, prompts, IDS, cfg, make_policy(name, **options), observer=steps)
    assert [o.token_ids for o in got.outputs] == [o.token_ids for o in ref.outputs]
    assert got.stats.to_dict() | {"wall_seconds": 0, "tokens_per_second": 0} == (
        ref.stats.to_dict() | {"wall_seconds": 0, "tokens_per_second": 0}
    )
    assert steps and got.stats.forwards["denoise_full"] + got.stats.forwards["denoise_sub"] == len(
        steps
    )

    # Each layer's plan is what the engine ran (on the CPU, exactly the units it computed) over
    # the units it had in scope.
    for s in steps:
        assert s.plan.shape == (model.cfg.num_hidden_layers, len(s.rows), model.cfg.block_size)
        computed = (s.plan == COMPUTE).sum((1, 2)).tolist()
        assert computed == s.forward.executed_units_per_layer
        assert (s.plan != NOT_RUN).sum((1, 2)).tolist() == s.forward.baseline_units_per_layer
        outside = torch.ones(s.plan.shape[-1], dtype=torch.bool)
        outside[s.window_start : s.window_start + s.window_size] = False
        assert (s.plan[:, :, outside] == NOT_RUN).all()

    # Every decoded slot is committed by exactly one forward, with the token it ends with.
    B = model.cfg.block_size
    committed_by = {}
    for s in steps:
        assert s.tokens.shape == s.committed.shape == s.pending.shape == (len(s.rows), B)
        assert not (s.committed & s.pending).any()
        assert s.committed.any(), "each denoise forward commits at least one token"
        for j, r in enumerate(s.rows):
            for t in s.committed[j].nonzero().flatten().tolist():
                key = (r, s.block_start + t)
                assert key not in committed_by
                committed_by[key] = int(s.tokens[j, t])
    for r, out in enumerate(got.outputs):
        L = len(prompts[r])
        for i, tok in enumerate(out.token_ids):
            if (r, L + i) in committed_by:  # else: a block's first slot (an AR step)
                assert committed_by[r, L + i] == tok
        assert sum(1 for (row, _) in committed_by if row == r) >= len(out.token_ids) // 2

    # Between two forwards of one block, the run's statistics grow by exactly the second one's
    # share; across a block end, by it and the commit forward.
    def units(st):
        return st.executed_units_per_layer, st.baseline_units_per_layer, st.executed_flops

    for a, b in zip(steps, steps[1:], strict=False):
        grew = b.total.since(a.total)
        assert b.forward.forwards["denoise_full"] + b.forward.forwards["denoise_sub"] == 1
        assert sum(b.forward.forwards.values()) == 1
        assert grew.forwards == {**b.forward.forwards, "commit": grew.forwards["commit"]}
        if a.block_start == b.block_start:
            assert grew.forwards["commit"] == 0 and units(grew) == units(b.forward)
        else:
            assert grew.forwards["commit"] == 1 and grew.executed_flops > b.forward.executed_flops
    # Rows leave at their last block without a commit forward: the last step saw all the work.
    assert steps[-1].total.executed_flops == got.stats.executed_flops
    assert steps[-1].total.generated_tokens >= got.stats.generated_tokens


def test_observer_exception_stops_generation():
    model = random_network()
    seen = []

    class Stop(Exception):
        pass

    class Stopping(Observer):
        def on_forward(self, step):
            seen.append(step)
            if len(seen) == 2:
                raise Stop

    with pytest.raises(Stop):
        generate(
            model,
            [prompt(5)],
            IDS,
            GenerationConfig(max_new_tokens=64, threshold=1.0, ignore_eos=True),
            observer=Stopping(),
        )
    assert len(seen) == 2
    # The engine serves the next call as usual.
    cfg = GenerationConfig(max_new_tokens=64, ignore_eos=True)
    out = generate(model, [prompt(5)], IDS, cfg)
    ref = generate(random_network(), [prompt(5)], IDS, cfg)
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    assert len(out.outputs[0].token_ids) == 64


@pytest.mark.parametrize(
    ("name", "options", "block_cache"),
    [
        ("token", ["cosine_threshold=0.9"], False),
        ("token", ["reuse_ratio=0.5"], True),
        ("layer", ["cosine_threshold=0.9"], False),
        ("layer", ["cosine_threshold=0.8"], True),
        ("reuse", ["reuse_k=2"], False),
        ("reuse", ["reuse_k=3", "layer_subset=last"], True),
    ],
)
def test_recorded_plans_agree_with_the_engine(tiny, name, options, block_cache):
    """The heatmap's plan (the engine's, through the observer) counts, per layer, the units the
    engine executed and had in scope; reused units match the engine's count where it keeps one
    (per-unit plans)."""
    session = ChatSession(tiny)
    session.set("use_block_cache", block_cache)
    session.set_policy(name, options)
    turn = session.reply(QUESTION)
    assert ANSWER in turn.text
    kinds = set()
    for r in turn.steps:
        plan = torch.tensor(r.plan)
        assert plan.shape == (tiny.model.cfg.num_hidden_layers, len(r.tokens))
        computed = (plan == COMPUTE).sum(1).tolist()
        in_scope = (plan != NOT_RUN).sum(1).tolist()
        assert computed == r.forward["executed_units_per_layer"], r.index
        assert in_scope == r.forward["baseline_units_per_layer"], r.index
        reused = (plan == REUSE).sum(1).tolist()
        if name == "token":
            assert reused == r.forward["reused_units_per_layer"]
        kinds |= {int(c) for c in plan.unique()}
    skipped = {"token": REUSE, "reuse": REUSE, "layer": PASS}[name]
    assert skipped in kinds and COMPUTE in kinds
    # Skipping shows in the run's FLOPs.
    assert turn.stats.executed_flops < turn.stats.baseline_flops


# Every registered policy, with options under which it skips on the tiny model, and the plan
# code its skipping shows as (a policy registered later needs an entry: the test says so).
ACTING = {
    "none": ({}, None),
    "token": ({"cosine_threshold": "0.9"}, REUSE),
    "layer": ({"cosine_threshold": "0.5"}, PASS),
    "reuse": ({"reuse_k": "2"}, REUSE),
    "exit": ({"exit_threshold": "0.5"}, PASS),
}


def test_every_registered_policy_has_acting_options():
    assert set(ACTING) == set(policy_names())


def check_watched_turn(steps, name, layers):
    """Steps of a turn under policy `name`: each with a plan per layer and block position that
    counts what the engine ran, and the policy's skipping in some of them."""
    assert steps
    codes = set()
    for r in steps:
        plan = torch.tensor(r.plan)
        assert plan.shape == (layers, len(r.tokens))
        assert (plan == COMPUTE).sum(1).tolist() == r.forward["executed_units_per_layer"]
        assert (plan != NOT_RUN).sum(1).tolist() == r.forward["baseline_units_per_layer"]
        codes |= set(plan.unique().tolist())
    skipped = ACTING[name][1]
    assert codes <= {NOT_RUN, COMPUTE, REUSE, PASS}
    assert (skipped in codes) if skipped is not None else codes <= {NOT_RUN, COMPUTE}


@pytest.mark.parametrize("block_cache", [False, True])
@pytest.mark.parametrize("name", list(ACTING))
def test_every_policy_in_a_chat_session(tiny, name, block_cache):
    """Each registered policy, `exit` included (it needs the model attached, and passes single
    units), answers in a chat session and shows its plan."""
    session = ChatSession(tiny)
    session.set("use_block_cache", block_cache)
    assert session.set_policy(name, ACTING[name][0]) is None  # it acts: not the baseline
    turn = session.reply(QUESTION)
    assert turn.text.strip() and turn.finish_reason in ("eos", "length")
    check_watched_turn(turn.steps, name, tiny.model.cfg.num_hidden_layers)
    if name != "none":
        assert turn.stats.executed_units < turn.stats.baseline_units


@pytest.mark.parametrize("name", list(ACTING))
def test_every_policy_in_the_chatbot(name, monkeypatch, capsys):
    """`python -m v2.chatbot --policy NAME ...` answers and reports the policy's statistics."""
    import io

    from v2 import chatbot

    flags = [f for k, v in ACTING[name][0].items() for f in ("--" + k.replace("_", "-"), v)]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n/stats\n"))
    assert chatbot.main(["--model", str(TINY), "--policy", name, *flags]) == 0
    out = capsys.readouterr()
    assert "error" not in out.err and "error" not in out.out
    answer = out.out.split("bot> ", 1)[1].split("\n", 1)[0]
    assert answer.strip()
    assert f"policy {name}" in out.out.split("you> ")[-2]  # the /stats of that answer


@pytest.mark.parametrize("name", list(ACTING))
def test_every_policy_in_the_app(tiny, name):
    """The app's decode function (App.respond, what the page's Send calls) with each policy:
    the answer, the statistics and a heatmap per forward that shows the policy's skipping."""
    from v2.app import PLAN_STYLE, App, render_heatmap

    app = App(tiny)
    options, skipped = ACTING[name]
    *_, last = app.respond(QUESTION, [], {}, name, options)
    history, status, stats, block, heatmap, steps = last
    assert "error" not in status and stats and block and heatmap
    assert history[-1]["role"] == "assistant" and history[-1]["content"].strip()
    check_watched_turn(steps, name, tiny.model.cfg.num_hidden_layers)
    shown = "".join(render_heatmap(r) for r in steps)
    if skipped is not None:
        assert f': {PLAN_STYLE[skipped][1]}"' in shown


def test_session_turns_and_records(tiny):
    session = ChatSession(tiny)
    views = []
    turn = session.reply(QUESTION, on_step=views.append)
    assert ANSWER in turn.text and turn.finish_reason == "eos"
    assert views == turn.steps and len(views) >= 3
    # The answer grows; the last record holds the answer's text; states are consistent.
    texts = [v.text for v in views]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    assert ANSWER in texts[-1]
    for v in views:
        assert v.states.count("new") == sum(1 for s in v.states if s == "new") >= 1
        assert all(v.tokens[j] == tiny.tokenizer.decode([tiny.ids.mask]) for j, s in
                   enumerate(v.states) if s == "masked")  # fmt: skip
    assert views[0].states[0] == "prompt"
    assert views[0].forward["flops_ratio"] == 1.0
    assert session.history[-1] == {"role": "assistant", "content": turn.text}
    # A second turn sees the first in its prompt (the chat template over the history).
    assert len(session.prompt_ids("next")) > len(tiny.encode([QUESTION], chat=True)[0]) + 20
    session.reset()
    assert session.history == [] and session.last is None


def test_session_stop(tiny):
    session = ChatSession(tiny)
    stop = threading.Event()

    def on_step(r):
        if r.index == 1:
            stop.set()

    turn = session.reply(QUESTION, on_step=on_step, stop=stop)
    assert turn.stopped and turn.finish_reason == "stopped" and len(turn.steps) == 2
    assert ANSWER not in turn.text
    # The model serves the next turn.
    session.reset()
    assert ANSWER in session.reply(QUESTION).text


def test_bad_input_is_one_line(tiny):
    session = ChatSession(tiny)
    cases = [
        (lambda: session.set_policy("nope"), "unknown policy"),
        (lambda: session.set_policy("token", ["foo=1"]), "not foo"),
        (lambda: session.set_policy("token", ["cosine_threshold"]), "key=value"),
        (lambda: session.set_policy("token", ["cosine_threshold=abc"]), r"\(a number\)"),
        (lambda: session.set_policy("token", ["cosine_threshold=-1"]), "must be >= 0"),
        (lambda: session.set_policy("token", ["min_layer=0"]), "min_layer must be >= 1"),
        (lambda: session.set("threshold", "abc"), "threshold must be a number, got 'abc'"),
        (lambda: session.set("small_block_size", "5"), "divide the block size"),
        (lambda: session.set("colour", "red"), "unknown setting"),
        (lambda: session.reply("   "), "empty message"),
        (lambda: session.reply("Jack " * 2000), "positions"),
    ]
    for call, words in cases:
        with pytest.raises(ChatError, match=words) as e:
            call()
        assert "\n" not in str(e.value)
    assert session.policy_name == "none" and session.config.threshold == 0.9
    assert ANSWER in session.reply(QUESTION).text  # still serving


def test_parsers():
    assert parse_options("token", ["cosine_threshold=0.99", "min_layer=2"]) == {
        "cosine_threshold": 0.99,
        "min_layer": 2,
    }
    assert parse_options("reuse", {"layer_subset": "last", "reuse_k": "3", "subset_size": ""}) == {
        "layer_subset": "last",
        "reuse_k": 3,
    }
    assert parse_setting("use_block_cache", "on") is True
    assert parse_setting("max_new_tokens", "64") == 64
    assert parse_setting("seed", "none") is None


def test_app_and_chatbot_refuse_a_missing_checkpoint(tmp_path, capsys):
    from v2 import app, chatbot

    for main in (app.main, chatbot.main):
        assert main(["--model", str(tmp_path / "nothing")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "nothing" in err and "\n" not in err


@pytest.mark.parametrize("decode", ["autoregressive", "speculative"])
def test_observer_with_a_causal_decode_is_a_clear_error(decode):
    from v2.generate import GenerationError

    cfg = GenerationConfig(max_new_tokens=8, threshold=1.0, decode=decode)
    with pytest.raises(GenerationError, match="observer"):
        generate(random_network(), [prompt(5)], IDS, cfg, observer=Observer())


def test_decode_is_not_a_chat_setting():
    with pytest.raises(ChatError):
        parse_setting("decode", "speculative")
