"""One RunSpec per configuration (v2/runs/spec.py): built once from the sweep file by one rule (a
setting named in two places must have one value), read by both backends, which write the same
id and the same record `config` for it (issue 25)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from v2.policies import make_policy
from v2.runs import cli as runs_cli
from v2.runs import harness as runs_harness
from v2.runs import slurm as runs_slurm
from v2.runs import spec as runs_spec
from v2.runs import sweep as runs_sweep
from v2.runs.spec import RunSpec

REPO = Path(__file__).resolve().parents[1]


def sweep_file(tmp_path: Path, name: str = "spec", **extra) -> Path:
    data = {
        "name": name,
        "pretrained": "v2/tiny/checkpoint",
        "tasks": ["tiny_gsm"],
        "grid": [{"policy": "token", "reuse_ratio": 0.5}],
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def only(path: Path) -> RunSpec:
    (spec,) = runs_sweep.load_sweep(path).configs
    return spec


# --------------------------------------------------------------------------- the precedence test


@pytest.mark.parametrize("runner", ["lm_eval", "direct"])
def test_a_threshold_given_twice_with_two_values_is_refused(tmp_path, capsys, runner):
    """`threshold: 0.9` and `model_args: {threshold: 0.5}`: lm_eval decoded at 0.5 and direct at
    0.9, both records called `baseline`. Now neither runs: one line names the setting and both
    values."""
    path = sweep_file(
        tmp_path, threshold=0.9, model_args={"threshold": 0.5}, runner=runner, grid=[{}]
    )
    results = tmp_path / "results"
    assert runs_cli.main([str(path), "--local", "--results", str(results), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "threshold is set twice" in err and "0.9" in err and "0.5" in err, err
    assert "threshold:" in err and "model_args" in err, err  # the two places
    assert not results.exists()


@pytest.mark.usefixtures("one_thread")
def test_both_backends_decode_one_spec_and_record_one_config(tmp_path, monkeypatch):
    """A sweep naming the threshold once, run for real on the committed tiny model by both
    backends (lm_eval through v2/eval.py, direct in this process): the same id, the same
    threshold, and byte-identical `config` in both records."""
    monkeypatch.delenv(runs_harness.EVAL_CMD_ENV, raising=False)
    monkeypatch.setenv(runs_slurm.NUM_GPUS_ENV, "0")
    common = {"threshold": 0.9, "model_args": {"max_new_tokens": 16}}
    lm = sweep_file(tmp_path, "via_lm_eval", lm_eval={"batch_size": 2}, **common)
    direct = sweep_file(
        tmp_path,
        "via_direct",
        runner="direct",
        direct={"batch_size": 2, "speed": {1: 1}, "speed_rounds": 1},
        **common,
    )
    specs = {p.stem: only(p) for p in (lm, direct)}
    assert {s.id for s in specs.values()} == {"token_rr0.5"}
    assert specs["via_lm_eval"].lm_eval_model_args() == {
        "pretrained": "v2/tiny/checkpoint",
        "threshold": 0.9,
        "policy": "token",
        "reuse_ratio": 0.5,
        "max_new_tokens": 16,
    }
    results = tmp_path / "results"
    configs = {}
    for path in (lm, direct):
        assert runs_cli.main([str(path), "--local", "--limit", "2", "--results", str(results)]) == 0
        (summary,) = (results / path.stem / "_limit2" / "token_rr0.5").glob("*/summary.json")
        record = json.loads(summary.read_text())
        assert record["runner"] == path.stem.removeprefix("via_")
        configs[path.stem] = record["config"]
    lm_config, direct_config = configs["via_lm_eval"], configs["via_direct"]
    assert lm_config["threshold"] == 0.9 and lm_config["max_new_tokens"] == 16
    assert lm_config["policy"] == {"policy": "token", **specs["via_direct"].policy_options}
    assert json.dumps(lm_config) == json.dumps(direct_config)


# --------------------------------------------------------------------------- building specs


@pytest.mark.parametrize(
    ("extra", "setting", "value"),
    [
        # the same value named twice is named once
        ({"threshold": 0.8, "grid": [{"threshold": 0.8}]}, "threshold", 0.8),
        ({"threshold": 0.8, "model_args": {"threshold": 0.8}}, "threshold", 0.8),
        ({"threshold": 0.8, "grid": [{"model_args": {"threshold": 0.8}}]}, "threshold", 0.8),
        ({"grid": [{"threshold": 1}]}, "threshold", 1.0),  # a float setting is a float
        ({}, "threshold", 1.0),  # named nowhere: the evaluation's default
        ({"model_args": {"max_new_tokens": 64}}, "max_new_tokens", 64),
        (
            {
                "model_args": {"max_new_tokens": 64},
                "grid": [{"model_args": {"max_new_tokens": 64}}],
            },
            "max_new_tokens",
            64,
        ),
        ({}, "max_new_tokens", None),  # lm_eval: each request's max_gen_toks
        ({"runner": "direct"}, "max_new_tokens", 256),  # direct: its default
        ({"runner": "direct", "direct": {"max_new_tokens": 48}}, "max_new_tokens", 48),
        # the direct backend ignored model_args' max_new_tokens
        ({"runner": "direct", "model_args": {"max_new_tokens": 48}}, "max_new_tokens", 48),
        (
            {
                "runner": "direct",
                "direct": {"max_new_tokens": 48},
                "model_args": {"max_new_tokens": 48},
            },
            "max_new_tokens",
            48,
        ),
        ({"model_args": {"block_size": 16}}, "block_size", 16),
        (
            {"model_args": {"block_size": 16}, "grid": [{"model_args": {"block_size": 16}}]},
            "block_size",
            16,
        ),
        ({}, "block_size", None),  # the checkpoint's
    ],
)
def test_generation_settings_resolved_by_one_rule(tmp_path, extra, setting, value):
    extra = {**extra}
    grid = extra.pop("grid", [{}])
    grid = [{"policy": "token", "reuse_ratio": 0.5, **g} for g in grid]
    spec = only(sweep_file(tmp_path, grid=grid, **extra))
    got = spec.generation[setting]
    assert got == value and type(got) is type(value)
    assert set(spec.generation) == {
        f.name for f in __import__("dataclasses").fields(spec.generation_config())
    }


@pytest.mark.parametrize(
    ("extra", "setting", "values"),
    [
        ({"threshold": 0.9, "model_args": {"threshold": 0.5}}, "threshold", ("0.9", "0.5")),
        ({"threshold": 0.9, "grid": [{"threshold": 0.8}]}, "threshold", ("0.9", "0.8")),
        (
            {"grid": [{"threshold": 0.9, "model_args": {"threshold": 0.5}}]},
            "threshold",
            ("0.9", "0.5"),
        ),
        (
            {
                "model_args": {"max_new_tokens": 64},
                "grid": [{"model_args": {"max_new_tokens": 32}}],
            },
            "max_new_tokens",
            ("64", "32"),
        ),
        (
            {
                "runner": "direct",
                "direct": {"max_new_tokens": 48},
                "model_args": {"max_new_tokens": 64},
            },
            "max_new_tokens",
            ("48", "64"),
        ),
        (
            {"model_args": {"block_size": 32}, "grid": [{"model_args": {"block_size": 16}}]},
            "block_size",
            ("32", "16"),
        ),
        (
            {"grid": [{"cosine_threshold": 0.95, "model_args": {"cosine_threshold": 0.9}}]},
            "cosine_threshold",
            ("0.95", "0.9"),
        ),
        (
            {"model_args": {"cosine_threshold": 0.9}, "grid": [{"cosine_threshold": 0.95}]},
            "cosine_threshold",
            ("0.9", "0.95"),
        ),
        ({"grid": [{"policy": "none", "model_args": {"policy": "token"}}]}, "policy", ("none",)),
        ({"model_args": {"pretrained": "elsewhere"}, "grid": [{}]}, "pretrained", ("elsewhere",)),
    ],
)
def test_a_setting_named_twice_with_two_values_is_refused(tmp_path, extra, setting, values):
    extra = {**extra}
    grid = extra.pop("grid", [{}])
    grid = [{"policy": "token", **g} for g in grid]
    with pytest.raises(runs_spec.SweepError) as e:
        runs_sweep.load_sweep(sweep_file(tmp_path, grid=grid, **extra))
    message = str(e.value)
    assert f"{setting} is set twice" in message and "\n" not in message, message
    assert all(v in message for v in values), message


def test_policy_options_resolved_and_named(tmp_path):
    """Every option of the policy with its value, defaults included (its config()); the id shows
    the options the file names; an option named in model_args and as a grid key once, fine."""
    grid = [
        {"policy": "token", "cosine_threshold": 0.95, "model_args": {"cosine_threshold": 0.95}},
        {"policy": "reuse", "reuse_k": 2},
    ]
    token, reuse = runs_sweep.load_sweep(sweep_file(tmp_path, grid=grid)).configs
    assert token.id == "token_ct0.95" and reuse.id == "reuse_k2"
    assert token.policy_options == {
        k: v
        for k, v in make_policy("token", cosine_threshold=0.95).config().items()
        if k != "policy"
    }
    assert reuse.policy_options["layer_subset"] == "middle"  # the default, recorded
    assert reuse.make_policy().config() == make_policy("reuse", reuse_k=2).config()
    # an option in model_args belongs to the policy, as a grid key does
    (spec,) = runs_sweep.load_sweep(
        sweep_file(tmp_path, grid=[{"policy": "token", "model_args": {"cosine_threshold": 0.9}}])
    ).configs
    assert spec.id == "token_ct0.9" and spec.policy_options["cosine_threshold"] == 0.9
    with pytest.raises(
        runs_spec.SweepError, match="policy 'none' takes no options; not cosine_threshold"
    ):
        runs_sweep.load_sweep(sweep_file(tmp_path, model_args={"cosine_threshold": 0.9}, grid=[{}]))


def test_unknown_model_args_are_refused_when_read(tmp_path):
    with pytest.raises(runs_spec.SweepError, match="not warp"):
        runs_sweep.load_sweep(sweep_file(tmp_path, model_args={"warp": 1}))
    with pytest.raises(
        runs_spec.SweepError, match="not ignore_eos"
    ):  # lm_eval's stop strings decide
        runs_sweep.load_sweep(sweep_file(tmp_path, model_args={"ignore_eos": True}))
    with pytest.raises(runs_spec.SweepError, match="max_new_tokens must be an integer"):
        runs_sweep.load_sweep(sweep_file(tmp_path, model_args={"max_new_tokens": 1.5}))


# --------------------------------------------------------------------------- committed sweeps


# every committed record folder is a configuration of the sweep file it came from
RECORDS = {
    "h200_main_job_lm_eval": "tiny_default",
    "h200_main_job_direct": "tiny_default",
    "h200_tiny_exit": "tiny_exit",
    "h200_tiny_speculative": "tiny_speculative",
    "tiny_layer_analysed_cpu": "tiny_layer_analysed_cpu",
    "tiny_token_h100": "tiny_token",
    "tiny_reuse_h100": "tiny_layer",
}


def test_committed_sweeps_load_with_their_ids():
    ids = {
        f.stem: [c.id for c in runs_sweep.load_sweep(f).configs]
        for f in sorted((REPO / "configs/sweeps").glob("*.yaml"))
    }
    # tiny_default's ids: tests/test_experiments.py::test_tiny_default_ids_and_shipped_sweeps
    assert ids["tiny_exit"][:3] == ["baseline", "exit_et1.0_ml1", "exit_et1.0_ml4"]
    assert ids["fast_dllm_v2_7b_baseline"] == ["baseline@gsm8k_boxed", "baseline@minerva_math"]
    assert ids["tiny_speculative"] == ids["tiny_speculative_speed"]
    assert "speculative_thr0.7_s8_reuse_k2_middle" in ids["tiny_speculative"]
    assert "layer_ct0.99_pf2_pl2" in ids["tiny_layer"] and len(ids["tiny_direct"]) == 27
    data = REPO / "docs/results/data"
    for folder, sweep in RECORDS.items():
        committed = {p.parent.parent.name for p in (data / folder).glob("*/*/summary.json")}
        assert committed and committed <= set(ids[sweep]), (folder, committed - set(ids[sweep]))


def test_lm_eval_decodes_exactly_the_spec():
    """For every configuration of every committed lm_eval sweep, the model_args the runner
    writes give the lm_eval model (v2/lm_adapter.py) the spec's generation settings and policy."""
    from v2.lm_adapter import parse_model_args

    for f in sorted((REPO / "configs/sweeps").glob("*.yaml")):
        sweep = runs_sweep.load_sweep(f)
        if sweep.runner != "lm_eval":
            continue
        for spec in sweep.configs:
            task = runs_harness.make_task(sweep, spec, None, 1)
            st = parse_model_args(json.loads(json.dumps(task["evaluate"]["model_args"])))
            gen = {**vars(st.gen_config), "max_new_tokens": st.max_new_tokens}
            assert gen == spec.generation, (f.name, spec.id)
            policy = st.policy.config() if st.policy else {"policy": "none"}
            assert policy == {"policy": spec.policy, **spec.policy_options}, (f.name, spec.id)


def test_old_records_are_read_by_the_report(tmp_path):
    """Records written before the one dialect (4-key direct configs, 12-key lm_eval ones) still
    read: every committed summary.json is a row of the report."""
    import subprocess

    from v2 import record, report

    data = REPO / "docs/results/data"
    found = sorted(data.rglob("summary.json"))
    assert found and all(record.read(p) is not None for p in found)
    folders = {p.relative_to(data).parts[0] for p in found}
    rows = [r for f in sorted(folders) for r in report.collect(data / f)]
    assert len(rows) == len(found)  # one row per record: none left out
    r = subprocess.run(
        [sys.executable, "-m", "v2.report", "docs/results/data", "--out", str(tmp_path / "r")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
