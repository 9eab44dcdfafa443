"""The local launcher of the lm_eval backend: a configuration's job (v2/runs/harness.py) as a
child process of the runner, watched to its end: the RUNNING marker with a heartbeat, DONE only
after a checked summary.json, FAILED with the reason otherwise (a non-zero exit, no valid record,
or a signal: SIGTERM from scancel, a time limit or preemption stops the job too, and so does
Ctrl-C). `run_task` is also what a SLURM array task runs (v2/runs/slurm.py); `run_local` runs
configurations one after another on this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

from v2.record import write_json
from v2.runs.harness import eval_cmd_from_env, job_argv, make_task, task_file
from v2.runs.spec import RunSpec, Sweep
from v2.runs.state import (
    DONE,
    FAILED,
    HEARTBEAT_S,
    HOST,
    RUNNING,
    Interrupted,
    archive,
    find_summary,
    log_line,
    remove_markers,
    slurm_job_here,
    write_done,
    write_failed,
    write_marker,
)


def run_task(
    task: dict,
    log_path: Path | None = None,
    eval_cmd: list[str] | None = None,
    port: int | None = None,
) -> int:
    """Run one configuration unless it is done; DONE only after a checked summary.json.
    With log_path the evaluation's output goes there, else to this process's stdout."""
    run_dir = Path(task["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / DONE).exists():
        log_line(f"{task['config_id']}: already done ({run_dir / DONE})")
        return 0
    summary, _ = find_summary(run_dir, task["expect"])
    if summary:  # an earlier attempt finished but was stopped before it could write DONE
        write_done(run_dir, task, summary, started=time.time(), adopted=True)
        log_line(f"{task['config_id']}: adopted the summary an earlier attempt wrote: {summary}")
        return 0
    cache = run_dir / "lm_cache"
    resumed = cache.is_dir() and any(p.stat().st_size > 0 for p in cache.iterdir())
    argv = job_argv(task, eval_cmd or eval_cmd_from_env(), port)
    write_json(task_file(task), task)  # the job's settings
    remove_markers(run_dir, FAILED)
    started = time.time()
    marker = {
        "host": HOST,
        "pid": os.getpid(),
        "slurm_job": slurm_job_here(),
        "attempt": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
        "log": str(log_path) if log_path else None,
        "argv": argv,
    }
    write_marker(run_dir, RUNNING, marker)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [task["cwd"], env.get("PYTHONPATH")]))
    with contextlib.ExitStack() as stack:
        out = None
        if log_path:
            out = stack.enter_context(open(log_path, "a"))
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n")
            out.flush()
        else:
            log_line(f"{task['config_id']}: {shlex.join(argv)}")
        proc = None
        try:
            with _sigterm_raises():
                try:
                    proc = subprocess.Popen(
                        argv,
                        cwd=task["cwd"],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT if out else None,
                    )
                except OSError as e:
                    write_failed(run_dir, {"rc": None, "reason": f"cannot start: {e}"})
                    return 127
                write_marker(run_dir, RUNNING, {**marker, "child_pid": proc.pid})
                while True:
                    try:
                        rc = proc.wait(timeout=HEARTBEAT_S)
                        break
                    except subprocess.TimeoutExpired:
                        os.utime(run_dir / RUNNING)
        except Stopped as e:
            # scancel, a time limit, preemption or a requeue: SLURM sends SIGTERM to the job's
            # processes (SIGKILL KillWait seconds later). Say so in a FAILED marker, which
            # --status shows; a requeued task is pending again and removes it when it starts.
            if proc is not None:
                _stop(proc)
            name = signal.Signals(e.signum).name
            reason = f"stopped by {name} (scancel, time limit, preemption or requeue)"
            write_failed(run_dir, {"rc": 128 + e.signum, "reason": reason, **marker})
            log_line(f"{task['config_id']}: {reason}")
            signal.raise_signal(e.signum)  # then end as SIGTERM would have: no next configuration
            return 128 + e.signum
        except KeyboardInterrupt:
            # Ctrl-C or SIGINT to the runner alone: its evaluation must not go on as an orphan
            # that a rerun would skip as running.
            if proc is not None:
                _stop(proc)
            reason = "interrupted (SIGINT); a rerun resumes it from its request cache"
            write_failed(run_dir, {"rc": 130, "reason": reason, **marker})
            raise
    # The evaluation has ended: from here on RUNNING would be a lie (its pid is this process,
    # alive while a local runner goes on with the next configuration), so FAILED replaces it.
    if rc != 0:
        reason = f"exit {rc}" + (f", log {log_path}" if log_path else "")
        write_failed(run_dir, {"rc": rc, "reason": reason, **marker})
        return rc
    summary, problems = find_summary(run_dir, task["expect"])
    if summary is None:
        reason = "no valid summary: " + " | ".join(problems)
        write_failed(run_dir, {"rc": 0, "reason": reason, **marker})
        log_line(f"{task['config_id']}: {reason}")
        return 1
    write_done(run_dir, task, summary, started, resumed_from_cache=resumed)
    partial = partial_stats(summary)
    if partial:
        log_line(
            f"{task['config_id']}: stats partial: {', '.join(partial)} (the rest answered from "
            f"lm_eval's request cache); --force {task['config_id']} redoes it from scratch"
        )
    return 0


def partial_stats(summary: Path) -> list[str]:
    """'<task>: <decoded> of <n> decoded' for each task of a record whose statistics cover
    fewer problems than its metrics ([] if none, or a record without the counts)."""
    try:
        tasks = json.loads(Path(summary).read_text()).get("tasks") or {}
    except (OSError, ValueError):
        return []
    return [
        f"{name}: {t['stats_problems']} of {t['n']} decoded"
        for name, t in tasks.items()
        if isinstance(t, dict)
        and isinstance(t.get("stats_problems"), int)
        and t["stats_problems"] < t.get("n", 0)
    ]


class Stopped(Exception):
    """The runner got SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises Stopped while inside (main thread only: elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Stopped(signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _stop(proc: subprocess.Popen, grace_s: float = 20) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_local(
    sweep: Sweep,
    to_run: list[RunSpec],
    limit: int | None,
    gpus: int,
    eval_cmd: list[str] | None = None,
    replace_ids: set[str] | frozenset = frozenset(),
) -> list[tuple[str, int]]:
    """One configuration after another on this machine; a failure does not stop the others.
    The configurations in `replace_ids` (--force) have their old results moved aside just before
    they run, so an interrupted forced run leaves the ones it did not reach as they were.
    Ctrl-C raises Interrupted, which names the configurations not finished."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: list[tuple[str, int]] = []
    try:
        for n, cfg in enumerate(to_run, 1):
            if cfg.id in replace_ids and (dest := archive(sweep, cfg, limit)):
                log_line(f"[{n}/{len(to_run)}] {cfg.id}: moved the old results to {dest}")
            where = f"[{n}/{len(to_run)}]"
            results.append((cfg.id, _run_one(sweep, cfg, limit, gpus, eval_cmd, where, stamp)))
    except KeyboardInterrupt:
        finished = {cid for cid, rc in results if rc == 0}
        raise Interrupted([c.id for c in to_run if c.id not in finished]) from None
    return results


def _run_one(
    sweep: Sweep,
    cfg: RunSpec,
    limit: int | None,
    gpus: int,
    eval_cmd: list[str] | None,
    where: str,
    stamp: str,
) -> int:
    task = make_task(sweep, cfg, limit, max(gpus, 1))
    log = Path(task["run_dir"]) / f"local-{stamp}.log"
    log_line(f"{where} {cfg.id}: running (log {log})")
    t0 = time.time()
    rc = run_task(task, log_path=log, eval_cmd=eval_cmd)
    took = f"{time.time() - t0:.1f} s"
    if rc == 0:
        log_line(f"{where} {cfg.id}: done in {took}")
    else:
        log_line(f"{where} {cfg.id}: FAILED (exit {rc}) after {took}; end of {log}:")
        with contextlib.suppress(OSError):
            print("".join(log.read_text().splitlines(keepends=True)[-15:]), flush=True)
    return rc
