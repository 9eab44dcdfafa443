"""The SLURM runner against a real one-node cluster (tests/slurm_cluster.py: Debian's slurm-wlm,
munge, no accounting) on the committed tiny model with --limit 2, and the deep model's training
job (sbatch/train_deep_tiny.sh) requeued while it trains.

Jobs run sbatch/array_job.sh (or run_single.sh) for real: job_env.sh, the submitting Python,
the lm_eval job (v2/runs/harness.py) on the tiny checkpoint. Pending is observed through held
jobs (--hold, released by the test), requeue through `scontrol requeue` and `scontrol update
StartTime=now` (a requeued job otherwise waits about two minutes). Where SLURM cannot be
installed (not root, no apt-get) these tests are skipped with the reason; tests/run.sh installs it
on a fresh Debian machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
import yaml
from test_report import summary_dict, write_summary

from v2 import report
from v2.runs import cli as runs_cli
from v2.runs import harness as runs_harness
from v2.runs import slurm as runs_slurm
from v2.runs import spec as runs_spec
from v2.runs import state as runs_state
from v2.runs import sweep as runs_sweep

REPO = Path(__file__).resolve().parents[1]
IDS = ["baseline", "token_ct0.95", "reuse_k2_middle"]
LIMIT = 2


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    if reason := slurm_cluster.ensure_installed():
        pytest.skip(reason)
    c = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def slurm(cluster, tmp_path, monkeypatch):
    """The cluster for one test: its SLURM_CONF, cluster.env's defaults (a real-looking account),
    the real evaluation, a node-local $TMPDIR for the jobs; every job cancelled afterwards."""
    for k in [k for k in os.environ if k.startswith("FDLLM_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    monkeypatch.setenv("FDLLM_ACCOUNT", "gts-test")
    monkeypatch.setenv("FDLLM_DATASETS_SEED", str(tmp_path / "no-seed"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "node"))
    (tmp_path / "node").mkdir()
    monkeypatch.delenv(runs_harness.EVAL_CMD_ENV, raising=False)
    yield cluster
    cluster.cancel_all()


def write_sweep(tmp_path: Path) -> Path:
    data = {
        "name": "real",
        "pretrained": "v2/tiny/checkpoint",
        "tasks": ["tiny_gsm"],
        "threshold": 0.9,
        "model_args": {"max_new_tokens": 16},
        "results": str(tmp_path / "results"),
        "grid": [
            {"policy": "none"},
            {"policy": "token", "cosine_threshold": 0.95},
            {"policy": "reuse", "reuse_k": 2, "layer_subset": "middle"},
        ],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def submitted(out: str, spec: str) -> str:
    """The array job id the runner printed for --array=<spec>."""
    m = re.search(rf"submitted array job (\d+): --array={re.escape(spec)}%4 ", out)
    assert m, out
    return m[1]


def state_map(sweep: runs_spec.Sweep) -> dict[str, runs_state.State]:
    return runs_state.states(sweep, sweep.configs, LIMIT)


def wait(
    cond, what: str, cluster: slurm_cluster.Cluster, sweep: runs_spec.Sweep, timeout: float = 300
):
    """Poll cond() until it returns something true; on timeout fail with what SLURM and the jobs
    said."""
    deadline = time.time() + timeout
    while not (value := cond()):
        if time.time() > deadline:
            queue = cluster.run(["squeue", "-t", "all", "-r", "-o", "%i %T %r"], check=False)
            logs = "\n".join(
                f"--- {p}\n{p.read_text()[-1500:]}"
                for p in sorted(sweep.results.rglob("slurm-*.log"))
            )
            pytest.fail(
                f"no {what} after {timeout:.0f} s\nstates {state_map(sweep)}\n"
                f"{queue.stdout}\n{logs}\n{cluster.logs()}"
            )
        time.sleep(0.25)
    return value


def evaluations(run_dir: Path, cid: str) -> int:
    """How many times a configuration's evaluation was started, from its job logs."""
    pattern = rf"\] {re.escape(cid)}: \S+ -m v2\.runs\.harness "
    return sum(len(re.findall(pattern, p.read_text())) for p in run_dir.glob("slurm-*.log"))


def mark_done(sweep: runs_spec.Sweep, cid: str) -> None:
    """A finished smoke-test run of baseline (what the state machine reads: DONE + summary)."""
    run_dir = sweep.run_dir(cid, LIMIT)
    write_summary(run_dir, summary_dict({"policy": "none"}, limit=LIMIT, n=LIMIT))
    runs_state.write_marker(run_dir, runs_state.DONE, {"config_id": cid})


def test_array_of_the_missing_configurations_pending_running_done(
    slurm, tmp_path, capsys, monkeypatch
):
    path = write_sweep(tmp_path)
    sweep = runs_sweep.load_sweep(path)
    argv = [str(path), "--limit", str(LIMIT)]
    mark_done(sweep, "baseline")
    failed = {"rc": 1, "reason": "exit 1"}
    runs_state.write_marker(sweep.run_dir("token_ct0.95", LIMIT), runs_state.FAILED, failed)
    monkeypatch.setenv("FDLLM_EXTRA_SBATCH", "--hold")  # pending until the test releases it

    assert runs_cli.main(argv) == 0
    job = submitted(capsys.readouterr().out, "1-2")
    assert sorted(slurm.jobs()) == [f"{job}_1", f"{job}_2"]  # exactly failed + missing
    st = state_map(sweep)
    assert st["baseline"].state == "done"
    for i, cid in ((1, "token_ct0.95"), (2, "reuse_k2_middle")):
        assert st[cid] == runs_state.State("pending", f"slurm {job}_{i} PENDING (JobHeldUser)")
    assert runs_cli.main([*argv, "--status"]) == 0
    out = capsys.readouterr().out
    assert "1 done, 2 pending, 0 running, 0 failed, 0 missing of 3" in out
    assert runs_cli.main(argv) == 0  # again while pending: nothing twice
    assert "nothing to run" in capsys.readouterr().out
    assert sorted(slurm.jobs()) == [f"{job}_1", f"{job}_2"]

    slurm.run(["scontrol", "release", job])
    seen: dict[str, list[str]] = {cid: [] for cid in IDS}

    def all_done() -> bool:
        for cid, s in state_map(sweep).items():
            if not seen[cid] or seen[cid][-1] != s.state:
                seen[cid].append(s.state)
        return all(s[-1] == "done" for s in seen.values())

    wait(all_done, "finished array", slurm, sweep)
    assert seen == {
        "baseline": ["done"],
        "token_ct0.95": ["pending", "running", "done"],
        "reuse_k2_middle": ["pending", "running", "done"],
    }

    def completed() -> bool:
        # DONE is written just before a task's process exits: SLURM may list it RUNNING a moment
        cmd = ["squeue", "-h", "-t", "all", "-r", "-j", job, "-o", "%i %T"]
        queue = slurm.run(cmd).stdout
        return sorted(queue.splitlines()) == [f"{job}_1 COMPLETED", f"{job}_2 COMPLETED"]

    wait(completed, "completed array tasks", slurm, sweep, timeout=60)

    for i, cid in ((1, "token_ct0.95"), (2, "reuse_k2_middle")):
        run_dir = sweep.run_dir(cid, LIMIT)
        assert sorted(p.name for p in run_dir.iterdir() if p.name.isupper()) == ["DONE"]
        assert runs_state.read_marker(run_dir, runs_state.DONE)["slurm_job"] == f"{job}_{i}"
        log = (run_dir / f"slurm-{job}_{i}.log").read_text()
        # the worktree's code ran, under the interpreter that submitted, on the tiny model
        assert f"{cid} on {runs_state.HOST}, job {job}_{i}, restart 0, code {REPO}" in log
        assert evaluations(run_dir, cid) == 1 and f"{sys.executable} -m v2.runs.harness" in log
        setup = (sweep.results / "_manifests" / f"slurm-{job}_{i}.log").read_text()
        assert f"python {sys.executable} HF_HUB_OFFLINE=1" in setup
        assert f"HF_DATASETS_CACHE={tmp_path}/node/fdllm-hf-datasets-" in setup
        summary = json.loads((run_dir / runs_state.DONE).read_text())["summary"]
        assert json.loads((run_dir / summary).read_text())["limit"] == LIMIT

    assert runs_cli.main([*argv, "--status"]) == 0
    out = capsys.readouterr().out
    assert "3 done, 0 pending, 0 running, 0 failed, 0 missing of 3" in out
    rows = {r.config_id: r for r in report.collect(sweep.runs_root(LIMIT))}
    line = next(x for x in out.splitlines() if x.startswith("reuse_k2_middle "))
    assert report.accuracy_text(rows["reuse_k2_middle"]) in line and rows["reuse_k2_middle"].n == 2


def test_cancelled_and_requeued_tasks_resubmitted_once(slurm, tmp_path, capsys):
    """scancel one running task, requeue another: the next runner call submits only the
    cancelled one (the requeued one is pending again); each configuration ends DONE once."""
    path = write_sweep(tmp_path)
    sweep = runs_sweep.load_sweep(path)
    argv = [str(path), "--limit", str(LIMIT)]
    index = {cid: i for i, cid in enumerate(IDS)}
    assert runs_cli.main(argv) == 0
    job = submitted(capsys.readouterr().out, "0-2")

    def two_evaluating() -> list[str] | None:
        ids = [
            cid
            for cid in IDS
            if "child_pid"
            in (runs_state.read_marker(sweep.run_dir(cid, LIMIT), runs_state.RUNNING) or {})
        ]
        return ids if len(ids) == 2 else None

    # the node takes two tasks at once (8 of its 16 CPUs each); stop both mid-evaluation
    cancelled, requeued = wait(two_evaluating, "two evaluations at once", slurm, sweep)
    (rest,) = set(IDS) - {cancelled, requeued}
    slurm.run(["scancel", f"{job}_{index[cancelled]}"])
    slurm.run(["scontrol", "requeue", f"{job}_{index[requeued]}"])
    requeued_at = time.time()

    def settled() -> dict[str, runs_state.State] | None:
        st = state_map(sweep)
        return st if (st[cancelled].state, st[requeued].state) == ("failed", "pending") else None

    st = wait(settled, "cancelled task failed and requeued task pending", slurm, sweep)
    assert st[cancelled].note.startswith("stopped by SIGTERM")
    assert st[requeued].note == f"slurm {job}_{index[requeued]} PENDING (BeginTime)"

    assert runs_cli.main(argv) == 0
    out = capsys.readouterr().out
    again = submitted(out, str(index[cancelled]))
    assert f"{again}_{index[cancelled]}" in slurm.jobs()
    assert [j for j in slurm.jobs() if j.startswith(f"{again}_")] == [f"{again}_{index[cancelled]}"]
    # the requeued task would wait ~2 min (its BeginTime); let it start now, but not in the
    # second its old instance was killed: slurmd revokes a job's credentials by the second, and a
    # launch credential issued in that second is refused ("Job N already killed", or "Job
    # credential revoked") and the task ends FAILED without running. The BeginTime delay exists
    # to avoid exactly this; forcing the start sooner than ~2 s after the requeue races it.
    time.sleep(max(0.0, requeued_at + 3.0 - time.time()))
    slurm.run(["scontrol", "update", f"jobid={job}_{index[requeued]}", "StartTime=now"])
    wait(
        lambda: all(s.state == "done" for s in state_map(sweep).values()),
        "all done",
        slurm,
        sweep,
    )
    assert runs_cli.main(argv) == 0
    assert "nothing to run" in capsys.readouterr().out
    # nothing new was submitted: the queue lists at most tasks of the two arrays, still exiting
    assert {j.split("_")[0] for j in slurm.jobs()} <= {job, again}
    slurm.drain()

    expected_job = {cancelled: f"{again}_{index[cancelled]}"}
    expected_job |= {cid: f"{job}_{index[cid]}" for cid in (requeued, rest)}
    starts = {}
    for cid in IDS:
        run_dir = sweep.run_dir(cid, LIMIT)
        assert sorted(p.name for p in run_dir.iterdir() if p.name.isupper()) == ["DONE"]
        assert runs_state.read_marker(run_dir, runs_state.DONE)["slurm_job"] == expected_job[cid]
        starts[cid] = evaluations(run_dir, cid)
    assert starts == {cancelled: 2, requeued: 2, rest: 1}
    log = (sweep.run_dir(requeued, LIMIT) / f"slurm-{job}_{index[requeued]}.log").read_text()
    assert "restart 0" in log and "restart 1" in log  # one log, both attempts (append)
    assert "stopped by SIGTERM" in log


def test_every_sbatch_script_passes_sbatch_test_only(slurm, tmp_path, capsys):
    """The runner's sbatch line (cluster.env's defaults: 1 H100, 8 CPUs, 64G, 8 h, QoS inferno),
    and every script under sbatch/ with those flags; run_single.sh also submits itself and runs."""
    path = write_sweep(tmp_path)
    sweep = runs_sweep.load_sweep(path)
    assert runs_cli.main([str(path), "--dry-run"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("would submit: "))
    argv = shlex.split(line.removeprefix("would submit: "))
    flags = runs_slurm.sbatch_resource_args(runs_slurm.cluster_settings())
    assert {"--gres=gpu:H100:1", "--cpus-per-task=8", "--mem=64G", "--qos=inferno"} <= set(flags)
    assert argv[0] == "sbatch" and set(flags) <= set(argv[1:])

    def test_only(cmd: list[str]) -> subprocess.CompletedProcess:
        return slurm.run([cmd[0], "--test-only", *cmd[1:]], check=False)

    r = test_only(argv)
    assert r.returncode == 0 and "to start at" in r.stderr, r.stderr
    assert "using 8 processors" in r.stderr

    single = REPO / "sbatch" / "run_single.sh"
    lines = subprocess.run(
        [sys.executable, "-m", "v2.experiments", "sbatch-args", str(path), "baseline"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert set(flags) <= set(lines)
    for script in sorted((REPO / "sbatch").glob("*.sh")):
        text = script.read_text()
        if not text.startswith("#!"):  # job_env.sh: sourced by the job scripts, not submitted
            assert "#SBATCH" not in text
            r = test_only(["sbatch", str(script)])
            assert r.returncode != 0 and "does not look like a batch script" in r.stderr
            continue
        cmds = [
            ["sbatch", *flags, str(script), str(path), "baseline"],  # cluster.env's flags
            ["sbatch", str(script), str(path), "baseline"],  # its own #SBATCH lines alone
        ]
        if script == single:  # the flags it submits itself with
            cmds.append(["sbatch", *lines, f"--chdir={REPO}", str(script), str(path), "baseline"])
        for cmd in cmds:
            r = test_only(cmd)
            assert r.returncode == 0 and "to start at" in r.stderr, (script, r.stderr)
    assert slurm.jobs() == []  # --test-only queues nothing

    r = subprocess.run(
        ["bash", str(single), str(path), "token_ct0.95", "--limit", str(LIMIT)],
        cwd=tmp_path,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    single_job = r.stdout.split()[-1]
    assert r.stdout.strip() == f"Submitted batch job {single_job}"
    run_dir = sweep.run_dir("token_ct0.95", LIMIT)
    wait(lambda: (run_dir / runs_state.DONE).exists(), "run_single.sh's result", slurm, sweep)
    log = (run_dir / f"slurm-{single_job}.log").read_text()
    assert (
        f"job {single_job}, restart 0, code {REPO}" in log
        and evaluations(run_dir, "token_ct0.95") == 1
    )
    setup = (sweep.results / "_manifests" / f"single-{single_job}.log").read_text()
    assert f"python {sys.executable} " in setup


def test_force_and_resubmission_while_pending(slurm, tmp_path, capsys, monkeypatch):
    """A second submission while the first array is pending adds only what is not queued;
    --force skips pending configurations (scancel first) and redoes done ones; pending array
    tasks cancelled with scancel leave no trace in the queue and are submitted again."""
    path = write_sweep(tmp_path)
    sweep = runs_sweep.load_sweep(path)
    argv = [str(path), "--limit", str(LIMIT)]
    mark_done(sweep, "baseline")
    monkeypatch.setenv("FDLLM_EXTRA_SBATCH", "--hold")

    assert runs_cli.main([*argv, "--only", "token_ct0.95"]) == 0
    first = submitted(capsys.readouterr().out, "1")
    assert runs_cli.main(argv) == 0
    second = submitted(capsys.readouterr().out, "2")
    assert set(slurm.jobs()) == {f"{first}_1", f"{second}_2"}
    assert runs_cli.main(argv) == 0
    assert "nothing to run" in capsys.readouterr().out

    assert runs_cli.main([*argv, "--force", "token_ct0.95"]) == 0
    out = capsys.readouterr().out
    assert (
        f"note: token_ct0.95 is pending (slurm {first}_1 PENDING (JobHeldUser)); not forced" in out
    )
    assert "nothing to run" in out
    assert runs_cli.main([*argv, "--force"]) == 0
    out = capsys.readouterr().out
    third = submitted(out, "0")  # only the done one: moved aside, then submitted
    assert "note: reuse_k2_middle is pending" in out and "moved the old baseline to" in out
    replaced = list((sweep.results / "_replaced").iterdir())
    assert len(replaced) == 1 and (replaced[0] / runs_state.DONE).exists()
    assert set(slurm.jobs()) == {f"{third}_0", f"{first}_1", f"{second}_2"}
    st = state_map(sweep)
    assert {s.state for s in st.values()} == {"pending"}

    slurm.run(["scancel", f"{first}_1", f"{third}_0"])
    wait(lambda: len(slurm.jobs()) == 1, "the cancelled tasks gone", slurm, sweep)
    st = state_map(sweep)
    assert st["token_ct0.95"] == runs_state.State(
        "missing", "an earlier attempt ended without a result"
    )
    assert st["reuse_k2_middle"].state == "pending"
    assert runs_cli.main(argv) == 0
    fourth = submitted(capsys.readouterr().out, "0-1")
    assert set(slurm.jobs()) == {f"{fourth}_0", f"{fourth}_1", f"{second}_2"}


def test_deep_training_job_requeued_midway_resumes(slurm, tmp_path):
    """sbatch/train_deep_tiny.sh as a SLURM job (the smoke model, on the CPU): requeued while it
    trains (SIGTERM, as a preemption), it saves its state at the end of the step under way; the
    job starts again and resumes there; the model is trained for every step once, by two
    processes."""
    import torch

    out, steps = tmp_path / "deep", 300
    flags = ["--smoke", "--steps", str(steps), "--batch-size", "4", "--n-train", "40"]
    flags += ["--no-compile", "--save-every-s", "0.5", "--eval-limit", "2"]
    env = {**os.environ, "SLURM_CONF": str(slurm.conf), "PYTHON": sys.executable}
    sbatch = ["sbatch", "--parsable", f"--output={tmp_path}/job-%j.log"]
    sbatch += ["--export=ALL,OMP_NUM_THREADS=1", str(REPO / "sbatch" / "train_deep_tiny.sh")]
    submitted = subprocess.run(
        [*sbatch, str(out), *flags],
        cwd=REPO,  # the job runs in the repository it was submitted from
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    job = submitted.stdout.strip()
    state = out / "train_state.pt"

    def saved_step() -> int:
        try:
            return torch.load(state, weights_only=True)["step"] if state.exists() else 0
        except Exception:  # noqa: BLE001 - replaced while read: try again
            return 0

    def job_log() -> str:
        logs = sorted(tmp_path.glob("job-*.log"))
        return logs[0].read_text(errors="replace")[-3000:] if logs else "(no job log)"

    def until(cond, what: str, timeout: float = 240):
        deadline = time.time() + timeout
        while not (value := cond()):
            if time.time() > deadline:
                queue = slurm.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%T %r"])
                pytest.fail(f"no {what} after {timeout:.0f} s: {queue.stdout}\n{job_log()}")
            time.sleep(0.2)
        return value

    first = until(lambda: (s := saved_step()) >= 20 and s, "training state at step 20")
    assert first < steps, "the job finished before it could be requeued"
    slurm.run(["scontrol", "requeue", job])
    requeued_at = time.time()
    until(
        lambda: slurm.run(["squeue", "-h", "-j", job, "-o", "%T"]).stdout.strip() == "PENDING",
        "requeued job pending",
    )
    time.sleep(max(0.0, requeued_at + 3.0 - time.time()))  # see the test above: not in 1 s
    slurm.run(["scontrol", "update", f"jobid={job}", "StartTime=now"])
    log_path = out / "checkpoint" / "train_log.json"
    until(lambda: log_path.exists() and "card rc=" in (out / "stages.txt").read_text(), "card")
    log = json.loads(log_path.read_text())
    processes = log["processes"]
    assert log["steps"] == steps and len(processes) == 2, processes
    killed, resumed = processes
    # SIGTERM: the step under way ended, the state was saved there and the process stopped
    assert killed["steps"][0] == 0 and killed["stopped"] == "terminated"
    assert resumed["steps"] == [killed["steps"][1], steps] and resumed["stopped"] == "steps"
    assert killed["steps"][1] >= first
    train_log = (out / "train.log").read_text()
    assert f"resuming {state}: step {killed['steps'][1]}," in train_log
    assert "card rc=0" in (out / "stages.txt").read_text()
