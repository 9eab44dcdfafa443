"""A training run that is paused, killed or preempted resumes from its state file to the model an
uninterrupted run makes (v2/tiny/train.py, TrainState): same weights, same losses, bit for bit on
CPU in float32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from v2.checkpoint import token_ids
from v2.model import Network
from v2.tiny import train as tr

# on conftest's 96 `hard` problems, 6 a batch: 16 batches an epoch, so 20 steps cross its end
CFG = tr.TrainConfig(steps=20, batch_size=6, warmup_steps=2, minutes=60, bucket=True)


def _train(tok, hard, cfg=CFG, state: tr.TrainState | None = None) -> tr.TrainResult:
    """One 'process': a freshly initialised model (as a new process builds it), then train."""
    torch.manual_seed(0)
    model = Network(tr.default_model_config(len(tok), smoke=True))
    tr.init_weights(model)
    return tr.train(model, hard, token_ids(tok).mask, cfg, torch.device("cpu"), False, state=state)


def interrupt_step(monkeypatch, n: int, interrupt) -> None:
    """`interrupt()` runs inside training step n (at its n-th accumulate_gradients call)."""
    real, calls = tr.accumulate_gradients, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            interrupt()
        return real(*args, **kwargs)

    monkeypatch.setattr(tr, "accumulate_gradients", step)


def test_a_run_paused_after_every_step_ends_where_an_uninterrupted_one_does(
    tok, hard: tr.Samples, tmp_path: Path
) -> None:
    straight = _train(tok, hard)
    assert straight.stopped == "steps" and len(straight.processes) == 1

    state = tr.TrainState(tmp_path / "state.pt", every_s=1e9, pause_after_s=0.0, resume=True)
    runs = []
    while not runs or runs[-1].stopped == "paused":
        runs.append(_train(tok, hard, state=state))
        assert len(runs) <= CFG.steps
    last = runs[-1]
    assert len(runs) == CFG.steps  # one step a process: every step was resumed once
    assert [p["steps"] for p in last.processes] == [[i, i + 1] for i in range(CFG.steps)]
    assert last.stopped == "steps" and last.steps == CFG.steps
    assert last.losses == straight.losses
    # the loss curve's points do not depend on the processes: every 20 steps, means equal
    assert [(p["step"], p["loss"]) for p in last.loss_curve] == [
        (p["step"], p["loss"]) for p in straight.loss_curve
    ]
    for (name, a), b in zip(
        straight.model.state_dict().items(), last.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_a_killed_run_resumes_from_its_last_save(
    tok, hard: tr.Samples, tmp_path: Path, monkeypatch
) -> None:
    """Killed inside its 5th step, after saving at every step: the next process redoes step 5."""
    cfg = tr.TrainConfig(**{**vars(CFG), "steps": 8})
    straight = _train(tok, hard, cfg)
    path = tmp_path / "state.pt"

    def kill():
        raise KeyboardInterrupt  # what SIGINT does; SIGKILL leaves the same file behind

    interrupt_step(monkeypatch, 5, kill)
    with pytest.raises(KeyboardInterrupt):
        _train(tok, hard, cfg, tr.TrainState(path, every_s=0.0))
    monkeypatch.undo()
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 4 and saved["processes"][-1]["stopped"] is None
    resumed = _train(tok, hard, cfg, tr.TrainState(path, resume=True))
    assert resumed.losses == straight.losses
    assert [p["steps"] for p in resumed.processes] == [[0, 4], [4, 8]]
    assert [(p["step"], p["loss"]) for p in resumed.loss_curve] == [(8, sum(straight.losses) / 8)]
    assert not path.with_name(path.name + ".tmp").exists()


def test_resuming_with_other_settings_is_refused(tok, hard: tr.Samples, tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    _train(tok, hard, tr.TrainConfig(**{**vars(CFG), "steps": 1}), tr.TrainState(path))
    other = tr.TrainConfig(**{**vars(CFG), "steps": 1, "lr": 2e-3})
    with pytest.raises(tr.TrainStateError, match=r"lr 0\.001 -> 0\.002"):
        _train(tok, hard, other, tr.TrainState(path, resume=True))
    # how a step is executed may change: compiled or not, the dev cadence
    same = tr.TrainConfig(**{**vars(CFG), "steps": 2, "dev_every_s": 5.0})
    with pytest.raises(tr.TrainStateError, match="steps 1 -> 2"):
        _train(tok, hard, same, tr.TrainState(path, resume=True))
    path.write_bytes(b"not a state")
    with pytest.raises(tr.TrainStateError, match="not a readable training state"):
        _train(tok, hard, CFG, tr.TrainState(path, resume=True))


def test_command_pauses_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    common = ["--smoke", "--steps", "3", "--batch-size", "4", "--n-train", "50", "--no-eval"]
    assert tr.main(["--out", str(tmp_path / "straight"), *common]) == 0
    straight = json.loads((tmp_path / "straight" / "train_log.json").read_text())

    out, state = tmp_path / "resumed", tmp_path / "state.pt"
    argv = ["--out", str(out), *common, "--state", str(state)]
    assert tr.main([*argv, "--pause-after", "1e-9"]) == 0
    said = capsys.readouterr().out
    assert "paused at step 1" in said and "--resume" in said
    assert not (out / "train_log.json").exists()  # no checkpoint, no evaluation while paused
    assert tr.main([*argv, "--resume"]) == 0
    assert "resuming" in capsys.readouterr().out
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 3 and [p["steps"] for p in log["processes"]] == [[0, 1], [1, 3]]
    assert log["final_loss"] == straight["final_loss"]  # the mean of all three steps' losses

    # a wrong resume stops before any setup, with one line
    with pytest.raises(SystemExit) as e:
        tr.main([*argv, "--resume", "--lr", "0.5"])
    assert e.value.code == 2 and "other settings (lr" in capsys.readouterr().err
    # a saved run is never overwritten by a command that forgot --resume
    with pytest.raises(SystemExit):
        tr.main(argv)
    assert "holds a saved run: --resume continues it" in capsys.readouterr().err
    for bad in (["--resume"], ["--pause-after", "1"]):
        with pytest.raises(SystemExit):
            tr.main(["--out", str(out), *common, *bad])
        assert "need --state" in capsys.readouterr().err


def test_a_finished_run_resumed_stays_finished(tok, hard: tr.Samples, tmp_path: Path) -> None:
    """A rerun after the end (a requeue during evaluation, say) trains nothing more: not for a
    run that ran out of steps, nor for one that stopped on its dev accuracy (which nothing in the
    loop would stop again before the next dev check)."""
    path = tmp_path / "state.pt"
    cfg = tr.TrainConfig(**{**vars(CFG), "steps": 6})
    done = _train(tok, hard, cfg, tr.TrainState(path))
    again = _train(tok, hard, cfg, tr.TrainState(path, resume=True))
    assert again.steps == 6 and again.losses == done.losses and len(again.processes) == 1
    for a, b in zip(done.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(a, b)

    calls = []

    def dev(model) -> float:  # reaches the target at its third check
        calls.append(1)
        return 1.0 if len(calls) >= 3 else 0.0

    path = tmp_path / "dev.pt"
    cfg = tr.TrainConfig(**{**vars(CFG), "dev_every_s": 0.0, "stop_at_dev_acc": 0.5})
    model = Network(tr.default_model_config(len(tok), smoke=True))
    first = tr.train(
        model, hard, token_ids(tok).mask, cfg, torch.device("cpu"), False, dev, tr.TrainState(path)
    )
    assert first.stopped == "dev accuracy" and first.steps == 2
    resumed = _train(tok, hard, cfg, tr.TrainState(path, resume=True))
    assert resumed.stopped == "dev accuracy" and resumed.steps == 2
    assert len(resumed.processes) == 1 and len(calls) == 3


def test_sigterm_saves_at_the_end_of_the_step_and_stops(
    tok, hard: tr.Samples, tmp_path: Path, monkeypatch
) -> None:
    """What SLURM sends on preemption, requeue or a time limit: the step under way ends, the state
    is saved, the loop stops; resumed, the run ends where an uninterrupted one does."""
    import os
    import signal

    cfg = tr.TrainConfig(**{**vars(CFG), "steps": 8})
    straight = _train(tok, hard, cfg)
    path = tmp_path / "state.pt"
    interrupt_step(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    stopped = _train(tok, hard, cfg, tr.TrainState(path, every_s=1e9))
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the loop's only
    monkeypatch.undo()
    assert stopped.stopped == "terminated" and stopped.steps == 3
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 3 and saved["processes"][-1]["stopped"] == "terminated"
    resumed = _train(tok, hard, cfg, tr.TrainState(path, resume=True))
    assert resumed.losses == straight.losses
    assert [p["steps"] for p in resumed.processes] == [[0, 3], [3, 8]]


def test_a_state_from_another_device_is_refused(tok, hard: tr.Samples, tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    cfg = tr.TrainConfig(**{**vars(CFG), "steps": 1})
    _train(tok, hard, cfg, tr.TrainState(path))
    state = torch.load(path, weights_only=True)
    tr.save_train_state(path, {**state, "device_type": "cuda"})
    with pytest.raises(tr.TrainStateError, match="saved by a run on cuda; resume it on cuda"):
        _train(tok, hard, cfg, tr.TrainState(path, resume=True))
