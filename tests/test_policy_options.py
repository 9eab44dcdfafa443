"""Policy options declared once (issue 25): every option of every registered policy reaches every
entry point from its dataclass field; one text->value function; one validation and one note."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from v2 import chat, lm_adapter, policies, tune
from v2.eval import model_help
from v2.generate import build_parser
from v2.options import (
    LayerSubset,
    OptionError,
    Options,
    Range,
    at_least,
    declared,
    option,
    parse_value,
)
from v2.policy import Policy
from v2.runs import sweep as runs_sweep

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "v2" / "tiny" / "checkpoint"


# ---- one text -> value function -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [(w, True) for w in ("true", "TRUE", "yes", "Yes", "on", "ON", "1", True, 1)]
    + [(w, False) for w in ("false", "False", "no", "NO", "off", "Off", "0", False, 0)],
)
def test_booleans(text, value):
    assert parse_value(text, bool, "x") is value


@pytest.mark.parametrize(
    ("kind", "text", "value"),
    [
        (int, "3", 3),
        (int, " 3 ", 3),
        (int, 3, 3),
        (int, "3.0", 3),
        (int, 3.0, 3),
        (float, "0.9", 0.9),
        (float, 1, 1.0),
        (float, "1e-3", 0.001),
        (float, "inf", float("inf")),
        (str, "speculative", "speculative"),
        (LayerSubset, "first", "first"),
        (LayerSubset, "MIDDLE", "middle"),
        (LayerSubset, "last", "last"),
        (LayerSubset, "3;5;7", "3;5;7"),
        (LayerSubset, "3 5 7", "3 5 7"),
        (LayerSubset, "3+5", "3+5"),
        (LayerSubset, "3,5", "3,5"),
        (LayerSubset, [1, 2], [1, 2]),
    ],
)
def test_numbers_and_layer_subsets(kind, text, value):
    got = parse_value(text, kind, "x")
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        (bool, "maybe"),
        (bool, 2),
        (bool, "2"),
        (int, "3.5"),
        (int, "three"),
        (int, True),
        (float, "nan"),
        (float, "abc"),
        (float, False),
        (float, [1.0]),
        (LayerSubset, "1;-2"),
        (LayerSubset, "a;b"),
        (LayerSubset, "firstish"),
        (LayerSubset, [-1]),
        (LayerSubset, []),
        (LayerSubset, 3),
    ],
)
def test_bad_values_are_one_line_naming_option_value_and_what_is_accepted(kind, text):
    with pytest.raises(OptionError) as e:
        parse_value(text, kind, "knob", policy="fake")
    message = str(e.value)
    assert "\n" not in message and message.startswith("policy 'fake': knob must be ")
    assert message.endswith(f", got {text!r}")


@pytest.mark.parametrize("text", [None, "", "  ", "none", "None", "default", "DEFAULT"])
def test_not_given_words(text):
    assert parse_value(text, float, "x", optional=True) is None
    with pytest.raises(OptionError, match="x must be a number"):
        parse_value(text, float, "x")  # a setting that must have a value


def test_ranges():
    assert parse_value("0", float, "x", at_least(0)) == 0.0
    assert parse_value("0.5", float, "x", Range(0, 1, high_open=True)) == 0.5
    for bad, rng, words in [
        ("-1", at_least(0), ">= 0 (a number)"),
        ("1", Range(0, 1, high_open=True), "in [0, 1) (a number)"),
        ("0", Range(0, low_open=True), "> 0 (a number)"),
    ]:
        with pytest.raises(OptionError, match=re.escape(f"x must be {words}, got '{bad}'")):
            parse_value(bad, float, "x", rng)


# ---- every option, every entry point, from the declaration ----------------------------------


def sample(d) -> tuple[str, object]:
    """A valid non-default value of a declared option: (its text, its typed value)."""
    if d.kind == LayerSubset:
        return "1;2", "1;2"
    if d.kind is bool:
        return "on", True
    low = d.range.low if d.range and d.range.low is not None else 0
    if d.kind is int:
        return str(int(low) + 2), int(low) + 2
    value = 0.5 if (0.5 in d.range if d.range else True) else low + 0.5
    return str(value), value


def check_everywhere(name: str) -> None:
    """Every declared option of policy `name` reaches each entry point."""
    ds = declared(policies.POLICIES[name].Options)
    assert ds, name
    help_text = " ".join(build_parser().format_help().split())
    assert name in help_text.rsplit("--policy NAME", 1)[1].split("--", 1)[0]
    defaults = policies.make_policy(name).config()
    for d in ds:
        text, value = sample(d)
        flag = "--" + d.name.replace("_", "-")
        # v2.generate --help: the flag, the help text, the default from the field
        assert flag in help_text and f"[{name}] {' '.join(d.described().split())}" in help_text
        # the flag parses through the one function into the policy
        args = build_parser().parse_args(
            ["--model", "m", "--prompt", "p", "--policy", name, flag, text]
        )
        assert policies.policy_from_args(args).config()[d.name] == value
        # lm_eval model_args (text, as lm_eval's string gives it)
        st = lm_adapter.parse_model_args({"pretrained": "x", "policy": name, d.name: text})
        assert st.policy.config()[d.name] == value
        assert d.name in lm_adapter.model_arg_defaults()
        assert f"{d.name} ({d.type_name})" in " ".join(model_help("v2/eval.py", None).split())
        # the chat /policy parser
        assert chat.parse_options(name, [f"{d.name}={text}"]) == {d.name: value}
        # config(): every option with its resolved value, defaults included
        assert d.name in defaults
        # sweep keys and ids
        cfgs = grid_specs([{"policy": name, d.name: value}])
        short = d.id if d.id is not None else ""
        assert cfgs[0].id.startswith(f"{name}_{short}") and cfgs[0].options == {d.name: value}


def grid_specs(grid: list) -> list:
    """The configurations (RunSpecs) of a sweep with this grid, as the runner builds them."""
    from v2.runs.spec import build_specs

    data = {"pretrained": "ckpt", "tasks": ["t"], "threshold": 0.9, "grid": grid}
    return build_specs(data, runner="lm_eval", batch_size=1)


@pytest.mark.parametrize("name", list(policies.POLICIES))
def test_every_option_of_every_policy_reaches_every_entry_point(name):
    check_everywhere(name)


@dataclass(frozen=True)
class FakeOptions(Options):
    fake_knob: int = option(3, "a knob nobody has", id="fk", range=at_least(1))
    fake_switch: bool = option(False, "a switch nobody has", id="fs")


class FakePolicy(Policy):
    name = "fake"
    Options = FakeOptions


def test_a_new_policy_option_is_one_edit(monkeypatch, tmp_path):
    """A policy and its options declared here, registered, and nothing else edited: its options
    reach every entry point (so one added to a real policy cannot be forgotten)."""
    monkeypatch.setitem(policies.POLICIES, "fake", FakePolicy)
    check_everywhere("fake")
    assert "fake" in policies.policy_names()
    assert policies.make_policy("fake", fake_knob="7").config() == {
        "policy": "fake",
        "fake_knob": 7,
        "fake_switch": False,
    }
    with pytest.raises(OptionError, match=r"policy 'fake': fake_knob must be >= 1 \(an integer\)"):
        policies.make_policy("fake", fake_knob="0")
    # the tuner's search space
    sweep = tmp_path / "tune.yaml"
    grid = [{"policy": "fake", "fake_knob": {"low": 1, "high": 9}}]
    sweep.write_text(
        yaml.safe_dump({"pretrained": "v2/tiny/checkpoint", "tasks": ["tiny_gsm"], "grid": grid})
    )
    assert tune.read_space(sweep)["space"] == {"fake_knob": {"low": 1, "high": 9}}


# ---- one validation: out of range is refused everywhere with the same line --------------------


NEGATIVE = "policy 'token': cosine_threshold must be >= 0 (a number), got"


def write_sweep(tmp_path: Path, grid: list) -> Path:
    data = {"pretrained": "v2/tiny/checkpoint", "tasks": ["tiny_gsm"], "threshold": 0.9}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**data, "grid": grid}))
    return path


def test_a_negative_cosine_threshold_is_refused_everywhere(tmp_path):
    from token_skip_generation_functions import TokenSkipPolicy

    sweep = [{"policy": "token", "cosine_threshold": -1}]
    space = [{"policy": "token", "cosine_threshold": {"low": -1, "high": 0.99}}]
    model_args = {"pretrained": "x", "cosine_threshold": "-1"}  # token_skip_eval.py's default
    calls = [
        lambda: TokenSkipPolicy(cosine_threshold=-1),
        lambda: policies.make_policy("token", cosine_threshold="-1"),
        lambda: build_and_parse(["--policy", "token", "--cosine-threshold", "-1"]),
        lambda: lm_adapter.parse_model_args(model_args, 1, "token"),
        lambda: chat.parse_options("token", ["cosine_threshold=-1"]),
        lambda: runs_sweep.load_sweep(write_sweep(tmp_path, sweep)),
        lambda: tune.read_space(write_sweep(tmp_path, space)),
    ]
    for call in calls:
        with pytest.raises(ValueError) as e:
            call()
        assert NEGATIVE in str(e.value) and "\n" not in str(e.value), str(e.value)
    # the layer policy's threshold: the same rule from its own declaration
    with pytest.raises(OptionError, match="policy 'layer': cosine_threshold must be >= 0"):
        policies.make_policy("layer", cosine_threshold=-0.5)


def build_and_parse(extra: list[str]):
    args = build_parser().parse_args(["--model", "m", "--prompt", "p", *extra])
    return policies.policy_from_args(args)


def test_a_bad_policy_name_is_one_line(capsys):
    from v2 import chatbot
    from v2.generate import main

    assert main(["--model", "m", "--prompt", "p", "--policy", "tokn"]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown policy 'tokn'; choose one of none, token, layer, reuse, exit\n"
    assert chatbot.main(["--model", str(TINY), "--policy", "tokn"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown policy 'tokn'")


# ---- one note: a policy that can skip nothing ---------------------------------------------------

NOTE = "can skip nothing: this run is the baseline"


@pytest.fixture(scope="module")
def tiny():
    from v2.generate import FastDLLM

    return FastDLLM.load(TINY)


def test_the_skip_nothing_note_in_the_chat_session_and_the_app(tiny):
    from v2.app import App
    from v2.chat import ChatSession

    session = ChatSession(tiny)
    note = session.set_policy("token", ["cosine_threshold=2"])
    assert note == f"policy 'token' with {{'cosine_threshold': 2.0}} {NOTE}" == session.note
    assert session.set_policy("token") == f"policy 'token' with its defaults {NOTE}"
    assert session.set_policy("token", ["cosine_threshold=0.9"]) is None and session.note is None
    assert session.set_policy("none") is None

    app = App(tiny)
    options = {"cosine_threshold": "2", "min_layer": ""}
    *_, last = app.respond("Hi", [], {"max_new_tokens": 4}, "token", options)
    assert last[1].startswith(f"**note:** policy 'token' with {{'cosine_threshold': 2.0}} {NOTE}")
    *_, last = app.respond("Hi", [], {"max_new_tokens": 4}, "token", {"cosine_threshold": "0.9"})
    assert "note" not in last[1]


def test_the_skip_nothing_note_at_sweep_load(tmp_path, capsys):
    grid = [
        {"policy": "none"},
        {"policy": "layer", "cosine_threshold": [2, 0.9]},
        {"policy": "reuse", "reuse_k": 1},
    ]
    runs_sweep.load_sweep(write_sweep(tmp_path, grid))
    notes = capsys.readouterr().err.strip().splitlines()
    assert notes == [
        f"note: {tmp_path / 'sweep.yaml'}: layer_ct2: policy 'layer' with "
        f"{{'cosine_threshold': 2.0}} {NOTE}",
        f"note: {tmp_path / 'sweep.yaml'}: reuse_k1: policy 'reuse' with {{'reuse_k': 1}} {NOTE}",
    ]


def test_the_skip_nothing_note_in_lm_eval_runs(capsys):
    lm_adapter.parse_model_args({"pretrained": "x", "policy": "token", "cosine_threshold": "2"})
    err = capsys.readouterr().err
    assert f"note: policy 'token' with {{'cosine_threshold': 2.0}} {NOTE}" in err
    lm_adapter.parse_model_args({"pretrained": "x"}, 1, "token")  # token_skip_eval.py, no options
    assert f"policy 'token' with its defaults {NOTE}" in capsys.readouterr().err
    lm_adapter.parse_model_args({"pretrained": "x", "cosine_threshold": 0.9}, 1, "token")
    assert "note" not in capsys.readouterr().err


# ---- kept: ids and recorded configs ------------------------------------------------------------


def test_committed_sweep_ids_are_unchanged():
    ids = set()
    for name in ("tiny_token", "tiny_layer", "tiny_direct", "tiny_exit", "fast_dllm_v2_7b_gsm8k"):
        ids |= {c.id for c in runs_sweep.load_sweep(REPO / f"configs/sweeps/{name}.yaml").configs}
    # the folders of committed records under docs/results/data carry these ids
    for cid in (
        "token_ct0.95",
        "token_ct1.0",
        "token_rr0.5",
        "token_rr0.25",
        "layer_ct0.99",
        "layer_ct0.99_pf2_pl2",
        "layer_ct0.999_pf2_pl2",
        "reuse_k1_middle",
        "reuse_k2_middle",
        "reuse_k3_first",
        "exit_et0.9_ml4",
        "exit_et1.0_ml1",
    ):
        assert cid in ids, cid
    grid = [{"policy": "reuse", "reuse_k": 3, "layer_subset": "3;5;7", "subset_size": 2}]
    assert grid_specs(grid)[0].id == "reuse_k3_L3-5-7_n2"


@pytest.mark.parametrize(
    ("record", "policy", "options"),
    [
        ("h200_main_job_lm_eval/token_rr0.5", "token", {"reuse_ratio": 0.5}),
        ("h200_main_job_lm_eval/token_ct0.99", "token", {"cosine_threshold": 0.99}),
        ("h200_tiny_exit/exit_et0.9_ml4", "exit", {"exit_threshold": 0.9, "min_layer": 4}),
    ],
)
def test_config_is_the_recorded_one(record, policy, options):
    """config() (every option, defaults included) is what the committed full records hold."""
    summary = REPO / "docs/results/data" / record / "checkpoint/summary.json"
    recorded = json.loads(summary.read_text())["config"]["policy"]
    assert policies.make_policy(policy, **options).config() == recorded
