"""The state of a configuration's run folder (results/<sweep>/<config_id>/), shared by both
backends of the sweep runner (`runner: lm_eval` in v2/experiments.py, `runner: direct` in
v2/direct.py): its markers and their writers, the runner's log line, and what a finished run's
summary.json must show.

Markers (JSON files, written atomically: temp file + os.replace):
- DONE: the run exited 0 and its checked summary.json is named in it (write_done);
- RUNNING: a process (host, pid, child_pid, slurm_job) runs it now;
- FAILED: the last attempt failed, with its exit status and reason (write_failed);
- SUBMITTED: a SLURM job (slurm_job) was submitted for it.
How the runner reads them into done / pending / running / failed / missing is the runner's
(v2/experiments.py: config_state, states).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from v2.runs.spec import RunSpec, Sweep

DONE, RUNNING, FAILED, SUBMITTED = "DONE", "RUNNING", "FAILED", "SUBMITTED"
HOST = socket.gethostname()


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
