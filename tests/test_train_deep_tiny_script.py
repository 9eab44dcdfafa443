"""sbatch/train_deep_tiny.sh end to end on CPU with the smoke model: every stage runs (the
compiled step included), the card is generated from the run's records, and PACK_TO gets parts
the device tool can return."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "sbatch" / "train_deep_tiny.sh"


def _run(out: Path, pack: Path | None, flags: list[str], **env: str):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **env}
    if pack is not None:
        env["PACK_TO"] = str(pack)
    flags = ["--smoke", "--steps", "2", "--batch-size", "4", "--n-train", "40", *flags]
    flags += ["--dev-every-s", "0", "--dev-limit", "2", "--eval-limit", "2"]
    done = subprocess.run(
        ["bash", str(SCRIPT), str(out), *flags],
        env=env,
        cwd=out.parent,  # the script finds the repository itself
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_smoke_run_packs_everything(tmp_path: Path) -> None:
    out, pack = tmp_path / "run", tmp_path / "pack"
    # the script compiles by default; one fixed length keeps the CPU compile to one graph
    _run(out, pack, ["--fixed-lengths", "1"], ANALYZE="1")
    stages = (out / "stages.txt").read_text().split("\n")
    assert [s.split()[0] for s in stages if s] == ["train", "card", "analyze", "card"]
    ckpt = out / "checkpoint"
    log = json.loads((ckpt / "train_log.json").read_text())
    assert log["task"] == "hard" and log["steps"] == 2 and log["dev_curve"]
    assert log["train_config"]["compile"] and log["train_config"]["minutes"] == 7.5
    assert log["compile"]["failure"] is None
    assert log["compile"]["lengths_compiled"] == log["fixed_lengths"] and log["fixed_lengths"]
    card = (ckpt / "README.md").read_text()
    assert "sbatch/train_deep_tiny.sh" in card and "## Layer profile" in card
    assert "No analysis" not in card and (ckpt / "layer_profile.png").exists()
    analysis = json.loads((ckpt / "analysis" / "analysis.json").read_text())
    assert analysis["prompts"] == 4 and "--task tiny_gsm_hard" in analysis["command"]

    returned = sorted(p.name for p in pack.iterdir())
    assert returned == ["README.md", "deep_tiny.tar.00", "stages.txt", "train.log"]
    assert all(p.stat().st_size < 16 * 2**20 for p in pack.iterdir())
    with tarfile.open(pack / "deep_tiny.tar.00") as tar:
        names = set(tar.getnames())
    assert "./checkpoint/model.safetensors" in names and "./checkpoint/README.md" in names


def test_analysis_is_off_by_default(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = _run(out, None, ["--no-compile"])
    stages = (out / "stages.txt").read_text().split("\n")
    assert [s.split()[0] for s in stages if s] == ["train", "card"]
    assert "analyze off" in done.stdout
    log = json.loads((out / "checkpoint" / "train_log.json").read_text())
    assert not log["train_config"]["compile"] and log["compile"] is None


def test_a_paused_run_goes_on_when_run_again(tmp_path: Path) -> None:
    """--pause-after stops the training with its state saved and runs no other stage; the same
    command again resumes it (the state file stays out of the packed parts)."""
    out, pack = tmp_path / "run", tmp_path / "pack"
    _run(out, pack, ["--no-compile", "--pause-after", "1e-9"])
    assert (out / "stages.txt").read_text().splitlines()[-1].startswith("train paused")
    assert (out / "train_state.pt").exists() and not (out / "checkpoint" / "config.json").exists()
    _run(out, pack, ["--no-compile"])
    stages = (out / "stages.txt").read_text().split("\n")
    assert [s.split()[0] for s in stages if s] == ["train", "card"]
    log = json.loads((out / "checkpoint" / "train_log.json").read_text())
    assert [p["steps"] for p in log["processes"]] == [[0, 1], [1, 2]]
    card = (out / "checkpoint" / "README.md").read_text()
    assert "Trained by 2 processes" in card and "steps 0-1 in" in card and "by paused" in card
    train_log = (out / "train.log").read_text()
    assert "paused at step 1" in train_log and "resuming" in train_log  # appended, not replaced
    with tarfile.open(pack / "deep_tiny.tar.00") as tar:
        names = set(tar.getnames())
    assert "./checkpoint/model.safetensors" in names and "./train_state.pt" not in names


def test_a_refused_resume_is_not_taken_for_a_pause(tmp_path: Path) -> None:
    """Call 2 of a paused run with other settings is refused by the training (one line, rc 2):
    the script says the train stage failed, not that it paused again, and exits non-zero."""
    out = tmp_path / "run"
    _run(out, None, ["--no-compile", "--pause-after", "1e-9"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    flags = ["--smoke", "--steps", "2", "--batch-size", "4", "--n-train", "40", "--no-compile"]
    done = subprocess.run(
        ["bash", str(SCRIPT), str(out), *flags, "--lr", "0.5", "--eval-limit", "2"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    stages = (out / "stages.txt").read_text()
    assert done.returncode != 0 and "train rc=2" in stages and "paused" not in stages, stages
