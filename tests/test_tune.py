"""v2.tune: a search over a policy's options that resumes after being killed, and writes a
sweep file the runner reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

from v2 import experiments  # noqa: E402
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
            if db.exists():
                try:
                    if len(completed(db)) >= 2:
                        break
                except (KeyError, ValueError, optuna.exceptions.StorageInternalError):
                    pass  # the study is being created
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
    best = experiments.load_sweep(out / "best.yaml")
    assert [c.policy for c in best.configs] == ["none", "token"]
    assert best.configs[1].options == summary["best"]["options"]
    assert (out / "trials.png").stat().st_size > 0


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
