"""The state of a configuration's run folder (results/<sweep>/<config_id>/), shared by both
backends of the sweep runner (`runner: lm_eval`, v2/runs/harness.py; `runner: direct`,
v2/runs/direct.py): its markers and their writers, the runner's log line, and what a finished run's
summary.json must show.

Markers (JSON files, written atomically: temp file + os.replace):
- DONE: the run exited 0 and its checked summary.json is named in it (write_done);
- RUNNING: a process (host, pid, child_pid, slurm_job) runs it now;
- FAILED: the last attempt failed, with its exit status and reason (write_failed);
- SUBMITTED: a SLURM job (slurm_job) was submitted for it.
Read into a configuration's state (`config_state`, `states`): done / pending / running / failed /
missing, asking SLURM (`SlurmView`) only where a marker names a job:
- done: DONE exists. It is written only after the run exited 0 and its summary.json was found and
  checked (schema, tasks, limit, policy), or when a checked summary.json is found without DONE
  (an evaluation that outlived its killed runner): reading the state adopts it;
- pending: a SUBMITTED (or RUNNING) marker names a SLURM job that squeue lists as waiting
  (PENDING, e.g. held, waiting for resources, or requeued);
- running: such a job that squeue lists in any other live state, or a process on this host that
  is alive (or, on another host, that touched its marker in the last minutes);
- failed: a FAILED marker (non-zero exit, a bad summary, or the task stopped by a signal), or
  squeue (for MinJobAge after the end) or sacct says the marker's job ended FAILED / CANCELLED /
  TIMEOUT / OUT_OF_MEMORY / NODE_FAIL / ...;
- missing: anything else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from v2.runs.spec import RunSpec, Sweep

DONE, RUNNING, FAILED, SUBMITTED = "DONE", "RUNNING", "FAILED", "SUBMITTED"
HOST = socket.gethostname()

STATES = ("done", "pending", "running", "failed", "missing")

# squeue states of a job that waits to start (again); other live states count as running
SLURM_WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "STOPPED"}
SLURM_FAILED = {
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
SLURM_FINAL = SLURM_FAILED | {"COMPLETED", "REVOKED"}
HEARTBEAT_S = 30  # a running task touches its RUNNING marker this often
STALE_S = 300  # ... and a marker untouched for longer, on a host we cannot check, is dead


def log_line(msg: str) -> None:
    """One line of the runner's log, on stdout, timed."""
    print(f"[experiments {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Interrupted(Exception):
    """Ctrl-C during a local run; `left` are the configurations it did not finish."""

    def __init__(self, left: list[str]) -> None:
        super().__init__(left)
        self.left = left


# --------------------------------------------------------------------------- markers


def write_marker(run_dir: Path, name: str, data: dict) -> None:
    """Atomically: readers see the old marker or the new one, never half of one."""
    from v2.record import write_json

    write_json(run_dir / name, {"time": time.time(), **data})


def read_marker(run_dir: Path, name: str) -> dict | None:
    try:
        m = json.loads((run_dir / name).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def remove_markers(run_dir: Path, *names: str) -> None:
    for n in names:
        with contextlib.suppress(FileNotFoundError):
            (run_dir / n).unlink()


def slurm_job_here() -> str | None:
    """This process's SLURM job as squeue -r names it: <array job>_<task> or <job>."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def write_failed(run_dir: Path, data: dict) -> None:
    """FAILED with `data` (rc, reason, ...); the run no longer RUNNING."""
    write_marker(run_dir, FAILED, data)
    remove_markers(run_dir, RUNNING)


def write_done(run_dir: Path, task: dict, summary: Path, started: float, **extra) -> None:
    """DONE naming the checked `summary` of `task` ({config_id, expect}); every other marker
    removed. `started`: the run's start (time.time()), for its duration."""
    s = json.loads(summary.read_text())
    write_marker(
        run_dir,
        DONE,
        {
            "config_id": task["config_id"],
            "summary": str(summary.relative_to(run_dir)),
            "results_file": s.get("results_file"),
            "limit": task["expect"]["limit"],
            "host": HOST,
            "slurm_job": slurm_job_here(),
            "seconds": round(time.time() - started, 1),
            "resumed_from_cache": False,
            **extra,
        },
    )
    remove_markers(run_dir, RUNNING, SUBMITTED, FAILED)


# --------------------------------------------------------------------------- the folder


def expected(cfg: RunSpec, limit: int | None) -> dict:
    """What a configuration's summary.json must show (v2.record.check)."""
    return {"tasks": list(cfg.tasks), "limit": limit, "policy": cfg.policy}


def archive(sweep: Sweep, cfg: RunSpec, limit: int | None) -> Path | None:
    """Move a configuration's folder aside (results/<sweep>/_replaced/) before a forced rerun:
    nothing is deleted, and its request cache cannot answer the new run."""
    run_dir = sweep.run_dir(cfg.id, limit)
    if not run_dir.exists():
        return None
    label = f"_limit{limit}-" if limit else ""
    dest = sweep.results / "_replaced" / f"{label}{cfg.id}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run_dir), dest)
    return dest


# --------------------------------------------------------------------------- reading the state


def check_summary(path: Path, expect: dict) -> list[str]:
    """What is wrong with a summary.json for the run that `expect` describes ([] if nothing)."""
    from v2 import record

    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return [f"unreadable: {e}"]
    return record.check(s, expect)


def find_summary(run_dir: Path, expect: dict) -> tuple[Path | None, list[str]]:
    """The newest <run_dir>/<model>/summary.json that passes check_summary."""
    found = sorted(run_dir.glob("*/summary.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    problems = [] if found else [f"no summary.json under {run_dir}/*/"]
    for p in found:
        bad = check_summary(p, expect)
        if not bad:
            return p, []
        problems.append(f"{p}: {'; '.join(bad)}")
    return None, problems


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


class SlurmView:
    """squeue (and sacct, where SLURM keeps accounting), asked once per job id and only when a
    marker names a job. `squeue -t all -r` lists every task of an array, one a line, with its
    live state (PENDING, RUNNING, ...) or, for MinJobAge (300 s by default) after the end, its
    final one; sacct, where it works, knows ended jobs for longer. Without accounting sacct
    exits 1 and tells nothing: the runner does not need it."""

    def __init__(self) -> None:
        self.queued: dict[str, tuple[str, str]] = {}  # live: job -> (state, reason)
        self.ended: dict[str, str] = {}  # job -> final state
        self.asked: set[str] = set()
        self.has_squeue = shutil.which("squeue") is not None
        self.has_sacct = shutil.which("sacct") is not None

    @staticmethod
    def _lines(argv: list[str]) -> list[str]:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return []
        return r.stdout.splitlines() if r.returncode == 0 else []

    def ask(self, job: str) -> None:
        base = job.split("_")[0]
        if base in self.asked or not self.has_squeue:
            return
        self.asked.add(base)
        argv = ["squeue", "-h", "-r", "-t", "all", "-j", base, "-o", "%i|%T|%r"]
        for line in self._lines(argv):
            jid, state, reason = (line.strip().split("|") + ["", ""])[:3]
            if state in SLURM_FINAL:
                self.ended[jid] = state
            elif state:
                self.queued[jid] = (state, "" if reason == "None" else reason)

    def queue_state(self, job: str) -> tuple[str, str] | None:
        """(state, reason) while squeue lists the job as live, else None."""
        self.ask(job)
        return self.queued.get(job)

    def final_state(self, job: str) -> str | None:
        """How the job ended: squeue's word while it still lists it, else sacct's, if any."""
        self.ask(job)
        base = job.split("_")[0]
        if job not in self.ended and self.has_sacct and "sacct:" + base not in self.asked:
            self.asked.add("sacct:" + base)
            argv = ["sacct", "-n", "-X", "-P", "-j", base, "-o", "JobID,State"]
            for line in self._lines(argv):
                jid, _, state = line.strip().partition("|")
                self.ended.setdefault(jid, state.split()[0] if state.split() else "")
        return self.ended.get(job)


@dataclass
class State:
    state: str  # done | pending | running | failed | missing
    note: str = ""


def queued_state(job: str, queued: tuple[str, str]) -> State:
    state, reason = queued
    note = f"slurm {job} {state}" + (f" ({reason})" if reason else "")
    return State("pending" if state in SLURM_WAITING else "running", note)


def config_state(run_dir: Path, slurm: SlurmView) -> State:
    if (run_dir / DONE).exists():
        return State("done")
    running, submitted = read_marker(run_dir, RUNNING), read_marker(run_dir, SUBMITTED)
    if running and running.get("host") == HOST:
        # Its processes decide, not its SLURM job: that may be an interactive allocation that
        # outlives a local runner killed inside it.
        pids = [running.get("pid"), running.get("child_pid")]
        if any(pid_alive(p) for p in pids if p):
            return State("running", f"pid {running.get('child_pid') or running.get('pid')}")
    elif running and running.get("slurm_job") and slurm.has_squeue:
        job = running["slurm_job"]
        if queued := slurm.queue_state(job):
            return queued_state(job, queued)
    elif running:  # another host and no way to ask: trust a recent heartbeat
        try:
            age = time.time() - (run_dir / RUNNING).stat().st_mtime
        except FileNotFoundError:  # it ended while we looked
            return config_state(run_dir, slurm)
        if age < STALE_S:
            return State("running", f"on {running.get('host')} ({age:.0f} s since heartbeat)")
    job = (submitted or {}).get("slurm_job")
    if job and (queued := slurm.queue_state(job)):  # e.g. requeued: pending again
        return queued_state(job, queued)
    failed = read_marker(run_dir, FAILED)
    if failed:
        return State("failed", failed.get("reason", ""))
    for m in (running, submitted):
        job = (m or {}).get("slurm_job")
        if job and (st := slurm.final_state(job)) in SLURM_FAILED:
            return State("failed", f"slurm {job} {st}")
    if running or submitted:
        return State("missing", "an earlier attempt ended without a result")
    return State("missing")


def states(sweep: Sweep, configs: list[RunSpec], limit: int | None) -> dict[str, State]:
    """Each configuration's state. One that is not running but has a checked summary.json (its
    evaluation finished after its runner was killed) is adopted here: DONE is written for it,
    so neither --status nor a rerun calls it missing."""
    slurm = SlurmView()
    out = {}
    for c in configs:
        run_dir = sweep.run_dir(c.id, limit)
        st = config_state(run_dir, slurm)
        if st.state in ("missing", "failed") and run_dir.is_dir():
            summary, _ = find_summary(run_dir, expected(c, limit))
            if summary:
                task = {"config_id": c.id, "expect": expected(c, limit)}
                write_done(run_dir, task, summary, started=time.time(), adopted=True)
                st = State("done", "adopted a summary.json written after its runner ended")
        out[c.id] = st
    return out
