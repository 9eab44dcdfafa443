"""v2.tune: a search over a policy's options that resumes after being killed, and writes a
sweep file the runner reads."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

from v2.runs import cli as runs_cli  # noqa: E402
from v2.runs import direct as runs_direct  # noqa: E402
from v2.runs import sweep as runs_sweep  # noqa: E402
from v2.runs.spec import SweepError  # noqa: E402
from v2.tune import main, read_space  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def sweep_file(tmp_path: Path, checkpoint: Path) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "pretrained": str(checkpoint),
                "tasks": ["tiny_gsm"],
                "threshold": 0.9,
                "grid": [
                    {"policy": "none"},
                    {
                        "policy": "token",
                        "cosine_threshold": {"low": 0.5, "high": 1.0},
                        "min_layer": [1, 2],
                    },
                ],
            }
        )
    )
    return path


def completed(db: Path) -> list:
    (name,) = optuna.get_all_study_names(f"sqlite:///{db}")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    return study.get_trials(states=(TrialState.COMPLETE,))


def completed_read_only(db: Path) -> int:
    """Completed trials, read while the search writes: a read-only sqlite connection (optuna's
    own storage would create its tables and version row if absent, racing the search's, and one
    of the two then fails on a UNIQUE constraint); 0 while the study is being created."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as c:
            (n,) = c.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()
    except sqlite3.Error:  # no file, no table yet, or locked
        return 0
    return n


def test_a_killed_search_resumes(tmp_path, checkpoint):
    sweep, out = sweep_file(tmp_path, checkpoint), tmp_path / "out"
    args = [str(sweep), "--max-drop", "1", "--dev-n", "2", "--max-new-tokens", "32"]
    args += ["--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "v2.tune", *args, "--trials", "200"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    db = out / "study.db"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if completed_read_only(db) >= 2:
                break
            assert proc.poll() is None, "the search ended before it was killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    before = completed(db)
    (name,) = optuna.get_all_study_names(f"sqlite:///{db}")
    running = [
        t.number
        for t in optuna.load_study(study_name=name, storage=f"sqlite:///{db}").trials
        if t.state == TrialState.RUNNING
    ]
    assert 2 <= len(before) < 200
    want = len(before) + 2
    assert main([*args, "--trials", str(want), "--confirm", "--confirm-n", "2"]) == 0
    after = completed(db)
    assert len(after) == want  # the earlier trials count: only two more ran
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{db}").trials
    assert all(t.state != TrialState.RUNNING for t in trials)
    assert all(trials[n].state == TrialState.FAIL for n in running)  # killed mid-way: failed
    kept = {t.number: t.params for t in after}
    assert all(kept[t.number] == t.params for t in before)
    summary = json.loads((out / "trials.json").read_text())
    assert len(summary["trials"]) == want
    assert summary["best"] is not None  # a random model: 0 % everywhere, all within budget
    assert "a prefix" in summary["confirm"]["split"]
    assert set(summary["confirm"]) == {"split", "baseline", "best"}
    assert all(0.5 <= t["options"]["cosine_threshold"] <= 1.0 for t in summary["trials"])
    # best.yaml is a sweep the runner reads: the baseline and the best setting
    best = runs_sweep.load_sweep(out / "best.yaml")
    assert [c.policy for c in best.configs] == ["none", "token"]
    assert best.configs[1].options == summary["best"]["options"]
    assert (out / "trials.png").stat().st_size > 0


def test_a_malformed_sweep_is_the_runners_one_line_with_its_position(tmp_path, capsys):
    """The tuner reads a sweep file with the runner's reader: PyYAML's error was one line
    without a position here (and 8 lines in the runner)."""
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\ngrid:\n  - policy: token\n    cosine_threshold: [0.9\n")
    assert main([str(path), "--out", str(tmp_path / "out"), "--max-drop", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "<unicode string>" not in err, err
    assert f"{path}: not valid YAML: line 5, column 1" in err, err


def test_the_tuner_checks_a_sweep_with_the_runners_loader(tmp_path):
    """read_space checks the file with the runner's loader (v2.runs.sweep.sweep_of, on one point
    of the space): what the runner refuses, the tuner refuses with the runner's line; and the
    chat template follows the runner's default (on) where the file names none."""
    good = {
        "pretrained": "v2/tiny/checkpoint",
        "tasks": ["tiny_gsm"],
        "grid": [{"policy": "token", "cosine_threshold": {"low": 0.9, "high": 0.99}}],
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(good))
    assert read_space(path)["chat"] is True  # no lm_eval section: the runner's default
    path.write_text(yaml.safe_dump({**good, "lm_eval": {"apply_chat_template": False}}))
    assert read_space(path)["chat"] is False
    for extra, message in (
        ({"gird": []}, "unknown keys gird"),
        ({"pretrained": "no/such/dir/x"}, "does not exist"),
        ({"lm_eval": {"entry": "v2/eval.py"}}, "lm_eval.entry"),
        ({"runner": "fast"}, "runner must be lm_eval or direct"),
    ):
        point = {**good, "grid": [{"policy": "token", "cosine_threshold": 0.9}]}  # the low end
        path.write_text(yaml.safe_dump({**point, **extra}))
        with pytest.raises(SweepError, match=message) as e:
            runs_sweep.load_sweep(path)
        path.write_text(yaml.safe_dump({**good, **extra}))
        with pytest.raises(ValueError, match=re.escape(str(e.value))):
            read_space(path)


def test_bad_sweeps_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"pretrained": "x", "tasks": ["tiny_gsm"], "grid": [{}]}))
    with pytest.raises(ValueError, match="no grid entry with a policy"):
        read_space(bad)
    bad.write_text(
        yaml.safe_dump(
            {"pretrained": "x", "tasks": ["t"], "grid": [{"policy": "token", "nope": [1]}]}
        )
    )
    with pytest.raises(ValueError, match="no option nope"):
        read_space(bad)
    bad.write_text(
        yaml.safe_dump(
            {
                "pretrained": "x",
                "tasks": ["t"],
                "grid": [{"policy": "token", "cosine_threshold": {"low": 1, "high": 0.5}}],
            }
        )
    )
    assert main([str(bad), "--max-drop", "1"]) == 2
    assert "low < high" in capsys.readouterr().err


def small(sweep: Path, out: Path, *extra: str) -> list[str]:
    """A fast search's command line: two dev problems, short answers, one trial."""
    args = [str(sweep), "--max-drop", "1", "--dev-n", "2", "--max-new-tokens", "8"]
    return [*args, "--trials", "1", "--out", str(out), *extra]


def test_a_resume_with_other_settings_is_refused(tmp_path, checkpoint, capsys):
    sweep, out = sweep_file(tmp_path, checkpoint), tmp_path / "out"
    assert main(small(sweep, out)) == 0
    capsys.readouterr()
    changes = {
        "--max-new-tokens": ["--max-new-tokens", "4"],  # the audit's case: 64 then 32
        "--dev-n": ["--dev-n", "3"],  # used to start a second study in the same file
        "--max-drop": ["--max-drop", "2"],
        "--batch-size": ["--batch-size", "1"],
    }
    for flag, change in changes.items():
        assert main(small(sweep, out, "--trials", "2", *change)) == 2, flag
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert flag in err and "another --out" in err and "same settings" in err
    raw = yaml.safe_load(sweep.read_text())
    raw["threshold"] = 0.5
    raw["grid"][1]["min_layer"] = [1]
    sweep.write_text(yaml.safe_dump(raw))
    assert main(small(sweep, out, "--trials", "2")) == 2
    err = capsys.readouterr().err
    assert "threshold (the sweep's) 0.9 there, 0.5 now" in err and "search space" in err
    db = out / "study.db"
    assert len(completed(db)) == 1  # nothing was added to the old study, and no second one
    summary = json.loads((out / "trials.json").read_text())
    assert summary["settings"]["max_new_tokens"] == 8 and summary["settings"]["dev_n"] == 2


def test_a_study_scored_by_the_old_scorer_is_not_resumed(tmp_path, checkpoint, capsys):
    """Studies before the one scorer recorded none (they took the last `#### N`): resuming one
    would mix two scorers' accuracies, so it is refused, naming the scorer."""
    sweep, out = sweep_file(tmp_path, checkpoint), tmp_path / "out"
    assert main(small(sweep, out)) == 0
    (name,) = optuna.get_all_study_names(f"sqlite:///{out}/study.db")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out}/study.db")
    settings = study.user_attrs["settings"]
    assert settings["scorer"].startswith("strict-match, v2/tasks/gsm_answers.py")
    study.set_user_attr("settings", {k: v for k, v in settings.items() if k != "scorer"})
    capsys.readouterr()
    assert main(small(sweep, out, "--trials", "2")) == 2
    err = capsys.readouterr().err
    assert "scorer (an older v2.tune's, null: the last `#### N`" in err and "--out" in err


def test_a_study_without_recorded_settings_is_refused(tmp_path, checkpoint, capsys):
    sweep, out = sweep_file(tmp_path, checkpoint), tmp_path / "out"
    out.mkdir()
    old = optuna.create_study(study_name="t:token:flops:2", storage=f"sqlite:///{out}/study.db")
    old.set_user_attr("baseline", {"accuracy": 0.0})  # an older v2.tune's study
    assert main(small(sweep, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no recorded settings" in err and "--out" in err


def test_a_study_that_measured_nothing_takes_new_settings(tmp_path, checkpoint, capsys):
    sweep, out = sweep_file(tmp_path, checkpoint), tmp_path / "out"
    assert main(small(sweep, out, "--model", str(tmp_path / "missing"))) == 2
    assert "error: " in capsys.readouterr().err  # a bad model: no baseline, no trial
    assert main(small(sweep, out)) == 0  # the fixed command is not refused as a resume
    assert len(completed(out / "study.db")) == 1
    summary = json.loads((out / "trials.json").read_text())
    assert summary["settings"]["pretrained"] == str(checkpoint.resolve())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--dev-n", "-1"], "--dev-n must be >= 1, got -1"),
        (["--trials", "0"], "--trials must be >= 1, got 0"),
        (["--max-drop", "-1"], "--max-drop must be >= 0, got -1.0"),
        (["--confirm", "--confirm-n", "0"], "--confirm-n must be >= 1, got 0"),
        (["--confirm", "--confirm-n", "-3"], "--confirm-n must be >= 1, got -3"),
        (["--confirm-n", "2"], "add --confirm"),
    ],
)
def test_bad_numbers_are_refused_before_any_work(tmp_path, checkpoint, capsys, extra, message):
    sweep, out = sweep_file(tmp_path, checkpoint), tmp_path / "out"
    assert main(small(sweep, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err == f"error: {err[7:]}" and err.count("\n") == 1 and message in err, err
    assert not out.exists()  # no model loaded, no study, no search


def fake_evaluate(baseline: dict, trial: dict):
    """v2.tune.evaluate with set results: `baseline` without a policy, `trial` with one."""

    def evaluate(lm, problems, spec, chat, warm=False):
        m = baseline if spec.policy == "none" else trial
        return {"executed_flops": 1, "tokens_per_second": 1.0, **m}

    return evaluate


def search_with(tmp_path, checkpoint, monkeypatch, baseline: dict, trial: dict) -> Path:
    """A small search whose decodes give set results (fake_evaluate); its output folder."""
    sweep, out = sweep_file(tmp_path, checkpoint), tmp_path / "out"
    monkeypatch.setattr("v2.tune.evaluate", fake_evaluate(baseline, trial))
    assert main(small(sweep, out)) == 0
    return out


def test_a_resumed_search_goes_on_where_one_search_would(tmp_path, checkpoint, monkeypatch):
    """A search stopped and resumed twice draws the points one uninterrupted search of the same
    --seed draws (it used to replay its first trials: the sampler restarted from --seed), past
    TPE's ten random start-up trials too; no point is evaluated twice."""
    sweep = sweep_file(tmp_path, checkpoint)
    monkeypatch.setattr(
        "v2.tune.evaluate",
        fake_evaluate({"accuracy": 50.0, "flops_ratio": 1.0}, {"accuracy": 50.0}),
    )
    assert main(small(sweep, tmp_path / "one", "--trials", "12")) == 0
    for trials in ("3", "7", "12"):
        assert main(small(sweep, tmp_path / "resumed", "--trials", trials)) == 0
    one = [t.params for t in completed(tmp_path / "one" / "study.db")]
    resumed = [t.params for t in completed(tmp_path / "resumed" / "study.db")]
    assert len(resumed) == 12
    assert len({tuple(sorted(p.items())) for p in resumed}) == 12, resumed
    assert resumed == one


def test_a_zero_percent_baseline_is_warned_about(tmp_path, checkpoint, capsys, monkeypatch):
    out = search_with(
        tmp_path,
        checkpoint,
        monkeypatch,
        {"accuracy": 0.0, "flops_ratio": 1.0, "executed_flops": 100},
        {"accuracy": 0.0, "flops_ratio": 0.5, "executed_flops": 50},
    )
    err = capsys.readouterr().err
    assert "warning: the baseline scores 0 %" in err and "budget means nothing" in err
    assert "--max-new-tokens (now 8)" in err
    summary = json.loads((out / "trials.json").read_text())
    assert summary["warnings"] and "0 %" in summary["warnings"][0]
    assert summary["best_beats_baseline"] is True
    assert "# warning: the baseline scores 0 %" in (out / "best.yaml").read_text()


def test_a_best_no_better_than_the_baseline_says_so(tmp_path, checkpoint, capsys, monkeypatch):
    # the trial saves 10 % per forward but needs more forwards: 2 % more FLOPs in all, and the
    # objective is the end-to-end ratio
    out = search_with(
        tmp_path,
        checkpoint,
        monkeypatch,
        {"accuracy": 50.0, "flops_ratio": 1.0, "executed_flops": 100},
        {"accuracy": 50.0, "flops_ratio": 0.9, "executed_flops": 102},
    )
    captured = capsys.readouterr()
    assert "warning" not in captured.err  # a 50 % baseline: the budget means something
    assert "no trial beats the baseline's flops (1)" in captured.out
    assert "best.yaml's setting (trial 0, flops 1.02)" in captured.out
    assert "no better than running without the policy" in captured.out
    summary = json.loads((out / "trials.json").read_text())
    assert summary["best_beats_baseline"] is False and summary["warnings"] == []
    assert "# NOT BETTER than the baseline" in (out / "best.yaml").read_text()
    # the file is still a sweep the runner reads (the existing contract)
    assert [c.policy for c in runs_sweep.load_sweep(out / "best.yaml").configs] == [
        "none",
        "token",
    ]


def test_a_warm_evaluation_measures_the_pass_that_set_nothing_up():
    """warm=True (the tokens/s objective): the warm-up rule (v2.bench.timing.settle) on an engine
    of the trial's own: whole passes over the problems until one sets nothing up (a forward
    signature first seen takes three calls on a GPU: record, warm-up, capture), and the accuracy
    and statistics are that pass's. (Before: one pass over the first batch, and the measured
    pass paid for whatever the rest set up.)"""
    from types import SimpleNamespace

    from v2.runs.spec import build_specs
    from v2.stats import Stats
    from v2.tune import evaluate

    calls, made = [], []

    class Engine:
        setups = 0

        def __init__(self, policy):
            self.given_policy = policy

    class LM:
        def engine(self, config, policy):
            made.append(policy)
            return Engine(policy)

        def generate(self, texts, config, policy, chat, engine=None):
            calls.append((len(texts), policy, engine))
            setting_up = engine is None or engine.setups < 4  # the first four calls set up
            if engine is not None and setting_up:
                engine.setups += 1
            st = Stats(1)
            st.generated_tokens, st.wall_seconds = 10 * len(texts), 100.0 if setting_up else 1.0
            outputs = [SimpleNamespace(text="#### 3") for _ in texts]
            return SimpleNamespace(outputs=outputs, stats=st)

    problems = [{"question": f"q{i}", "answer": "#### 3"} for i in range(5)]
    data = {"pretrained": "x", "tasks": ["tiny_gsm"], "grid": [{"policy": "token"}]}
    (spec,) = build_specs(data, runner="direct", batch_size=2, max_new_tokens=8)
    cold = evaluate(LM(), problems, spec, False)
    assert [n for n, _, _ in calls] == [2, 2, 1] and cold["tokens_per_second"] < 1
    assert made == [] and "warm_up_passes" not in cold
    calls.clear()
    hot = evaluate(LM(), problems, spec, False, warm=True)
    assert [n for n, _, _ in calls] == [2, 2, 1] * 3  # pass 2 still set one thing up
    (policy,) = made  # the trial's own engine, built with the spec's policy, decodes every pass
    assert type(policy).__name__ == type(spec.make_policy()).__name__
    assert {(p, id(e)) for _, p, e in calls} == {(policy, id(calls[0][2]))}
    assert hot["tokens_per_second"] == 50 / 3 and hot["accuracy"] == 100.0
    assert hot["warm_up_passes"] == 2 and hot["settled"] is True


def test_the_trials_plot_hides_no_trial_behind_the_baseline():
    """Feasible trials on the baseline's spot (the best among them) are drawn around its star,
    each apart from every other marker, and named under the plot; a trial elsewhere stays."""
    import matplotlib.pyplot as plt

    from v2.plotting import GAP
    from v2.tune import trials_figure

    def trial(number, value, accuracy):
        return dict(number=number, value=value, accuracy=accuracy, constraint=99 - accuracy)

    summary = {
        "policy": "layer",
        "objective": "flops",
        "dev_n": 48,
        "baseline": {"accuracy": 100.0},
        "baseline_value": 1.0,
        "accuracy_floor": 99.0,
        "best": trial(1, 1.0, 100.0),
        "trials": [trial(0, 1.0, 100.0), trial(1, 1.0, 100.0), trial(2, 1.5, 50.0)],
    }
    fig, notes = trials_figure(summary)
    try:
        ax = fig.axes[0]
        scale = 72 / fig.dpi
        drawn = []
        for line in ax.lines:
            if line.get_marker() in ("*", "o") and line.get_markersize() >= 6:
                (x,), (y,) = line.get_data()
                px, py = ax.transData.transform((x, y)) * scale
                drawn.append(((px, py), line.get_markersize(), (x, y)))
        assert len(drawn) == 4  # the baseline and three trials
        for i, (a, sa, _) in enumerate(drawn):
            for b, sb, _ in drawn[i + 1 :]:
                assert ((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5 >= (sa + sb) / 2 + GAP
        assert drawn[0][2] == (1.0, 100.0) and drawn[3][2] == (1.5, 50.0)
        assert notes == [
            "overlapping markers drawn apart (a gray spoke to each one's point): "
            "baseline, trial 0, trial 1"
        ]
    finally:
        plt.close(fig)


def test_a_trial_decodes_and_scores_as_a_direct_sweep_run(tmp_path, monkeypatch):
    """A tuner trial is the RunSpec a direct sweep run of the same setting is, decoded and scored
    by the same path (v2.direct.decode): on the committed tiny model, the same answers, the same
    accuracy and the same executed FLOPs, for the baseline and for a policy's setting."""
    from v2.generate import FastDLLM
    from v2.tune import evaluate, test_split, trial_spec

    setting = {"cosine_threshold": 0.9, "min_layer": 1}
    raw = {
        "name": "same",
        "pretrained": "v2/tiny/checkpoint",
        "tasks": ["tiny_gsm"],
        "threshold": 0.9,
        "runner": "direct",
        "direct": {"batch_size": 3, "speed": {3: 3}, "speed_rounds": 1, "max_new_tokens": 24},
        "grid": [{"policy": "none"}, {"policy": "token", **setting}],
    }
    path = tmp_path / "same.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    answers: list[list[str]] = []
    real = FastDLLM.generate

    def spy(self, *a, **k):
        result = real(self, *a, **k)
        answers.append([o.text for o in result.outputs])
        return result

    monkeypatch.setattr(FastDLLM, "generate", spy)
    results = tmp_path / "results"
    argv = [str(path), "--local", "--results", str(results), "--limit", "3"]
    assert runs_cli.main(argv) == 0
    swept = answers[:2]  # the accuracy pass: baseline, then the token setting (one batch each)
    runs = {}
    for cid in ("baseline", "token_ct0.9_ml1"):
        (summary,) = (results / "same" / "_limit3" / cid).glob("*/summary.json")
        runs[cid] = json.loads(summary.read_text())

    answers.clear()
    setup = read_space(path)
    assert setup["chat"] is True  # the direct runner's: always the chat template
    args = SimpleNamespace(sweep=path, batch_size=3, max_new_tokens=24)
    lm = FastDLLM.load(REPO / "v2/tiny/checkpoint")
    problems = test_split("tiny_gsm")[:3]
    tuned = {}
    for cid, options in (("baseline", None), ("token_ct0.9_ml1", setting)):
        spec = trial_spec(setup, options, args)
        assert spec == runs_sweep.load_sweep(path, results).config(cid)  # one rule, one spec
        tuned[cid] = evaluate(lm, problems, spec, setup["chat"])
    assert answers == swept and len(swept[0]) == 3
    for cid, run in runs.items():
        metric = run["tasks"]["tiny_gsm"]["metrics"][runs_direct.STRICT]["value"]
        assert tuned[cid]["accuracy"] == 100.0 * metric, cid
        assert tuned[cid]["executed_flops"] == run["stats"]["executed_flops"], cid
    # the setting skips work, so the comparison is not of two baselines
    assert tuned["token_ct0.9_ml1"]["executed_flops"] < tuned["baseline"]["executed_flops"]
