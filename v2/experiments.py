"""Sweeps of evaluation runs: configurations as data (configs/sweeps/*.yaml), one results folder
per configuration, its state, and running what is not done - here, one configuration after
another (--local), or as one SLURM array.

    python -m v2.experiments configs/sweeps/tiny_default.yaml --status
    python -m v2.experiments configs/sweeps/tiny_default.yaml --local
    python -m v2.experiments configs/sweeps/fast_dllm_v2_7b_gsm8k.yaml --dry-run
    python -m v2.experiments SWEEP.yaml [--force [ID ...]] [--only ID ...] [--limit N]

Layout: results/<sweep>/<config_id>/ holds one configuration's lm_eval output
(<model>/results_*.json and <model>/summary.json), its request cache (lm_cache/: lm_eval's
--use_cache, one per configuration because cache keys ignore model_args), logs and state markers.
--limit N runs go to results/<sweep>/_limit<N>/<config_id>/ and never count as full results.

State of a configuration:
- done: DONE exists. It is written (temp file + os.replace) only after the run exited 0 and its
  summary.json was found and checked (schema, tasks, limit, policy), or when a checked
  summary.json is found without DONE (an evaluation that outlived its killed runner): reading
  the state adopts it;
- pending: a SUBMITTED (or RUNNING) marker names a SLURM job that squeue lists as waiting
  (PENDING, e.g. held, waiting for resources, or requeued);
- running: such a job that squeue lists in any other live state, or a process on this host that
  is alive (or, on another host, that touched its marker in the last minutes);
- failed: a FAILED marker (non-zero exit, a bad summary, or the task stopped by a signal:
  scancel, time limit, preemption, Ctrl-C / SIGINT, which stop the evaluation too), or squeue
  (for MinJobAge after the end) or sacct says the marker's job ended FAILED / CANCELLED /
  TIMEOUT / OUT_OF_MEMORY / NODE_FAIL / ...;
- missing: anything else.
A plain run starts every configuration that is missing or failed (a failed one resumes from its
request cache: the cache is kept, greedy answers being deterministic, and lm_eval's cached answers
are not decoded again, so the record's statistics cover only the problems decoded in the last
attempt: summary.json says how many (stats_problems, cached_problems; v2/record.py), --status
says "stats partial" and v2.report marks the row †); --force [ID ...] also runs all (or these)
again from scratch, with every problem decoded, moving each one's
old results to results/<sweep>/_replaced/ just before it runs (at submission with SLURM), so an
interrupted forced run keeps the results it did not reach and prints the command that finishes
it. Pending and running configurations are never started twice. The runner needs squeue, not
sacct (SLURM accounting). A sweep is checked when it is read (decoding threshold > 0, policy
options, a local `pretrained` that exists) and, before a run or --dry-run, its tasks (lm_eval's
or v2/tasks'): a bad one stops with one line before anything runs.

With `runner: lm_eval` (the default) the command that evaluates one configuration is
`python v2/eval.py ...` (`accelerate launch` with more than one GPU); with `runner: direct` every
configuration runs in this process through the engine (v2/direct.py, --local only). Both write
the same record (v2/record.py). FAST_DLLM_EVAL_CMD (or the eval_cmd argument) replaces the
lm_eval launcher and entry, e.g. FAST_DLLM_EVAL_CMD="python my_fake_eval.py" in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from v2.policies import baseline_note
from v2.runs.spec import (
    REPO,
    RunSpec,
    SpecError,
    Sweep,
    SweepError,
    alternatives,
    build_specs,
    read_sweep_file,
)
from v2.runs.spec import config_id as config_id  # re-exported: ids are the runner's word
from v2.runs.state import (
    DONE,
    FAILED,
    HOST,
    RUNNING,
    SUBMITTED,
    Interrupted,
    archive,
    expected,
    log_line,
    read_marker,
    remove_markers,
    slurm_job_here,
    write_done,
    write_failed,
    write_marker,
)

CLUSTER_ENV = REPO / "sbatch" / "cluster.env"
SWEEPS_DIR = REPO / "configs" / "sweeps"
ARRAY_JOB = REPO / "sbatch" / "array_job.sh"
EVAL_CMD_ENV = "FAST_DLLM_EVAL_CMD"
NUM_GPUS_ENV = "FAST_DLLM_NUM_GPUS"

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


# --------------------------------------------------------------------------- sweep definitions


# One configuration: its resolved settings (v2/runs/spec.py), read by both backends and the record.
Config = RunSpec


LM_EVAL_DEFAULTS = {
    "entry": "v2/eval.py",
    "model": "fast_dllm_v2",
    "batch_size": 32,
    "apply_chat_template": True,
    "fewshot_as_multiturn": None,
    "num_fewshot": None,
    "gen_kwargs": None,
    "include_path": None,
    "log_samples": False,
    "use_cache": True,
    "extra_args": [],
}
SWEEP_KEYS = {
    "name",
    "description",
    "pretrained",
    "model_args",
    "tasks",
    "split_tasks",
    "threshold",
    "lm_eval",
    "limit",
    "limit_cpu",
    "main_metric",
    "results",
    "grid",
    "runner",
    "direct",
}


def is_hub_id(pretrained: str) -> bool:
    """`org/name` (fetched from the hub by the model) rather than a local folder."""
    return pretrained.count("/") == 1 and not pretrained.startswith((".", "/", "~"))


def check_pretrained(pretrained: str, where: str) -> None:
    """A local checkpoint folder must exist now (relative paths: from the repository root)."""
    if is_hub_id(pretrained) and not (REPO / pretrained).exists():
        return
    p = Path(pretrained).expanduser()
    p = p if p.is_absolute() else REPO / p
    if not (p / "config.json").is_file():
        what = "has no config.json" if p.is_dir() else "does not exist"
        raise SweepError(f"{where}: pretrained {pretrained!r}: {p} {what}")


def _local_task_names(folders: list[Path]) -> set[str]:
    """`task:` / `group:` / `tag:` names of the task YAML files in these folders (no lm_eval)."""
    names: set[str] = set()
    for folder in folders:
        for f in sorted(folder.rglob("*.yaml")) if folder.is_dir() else []:
            with contextlib.suppress(OSError):
                for line in f.read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in ("task", "group", "tag") and value.strip():
                        names.add(value.strip().strip("'\""))
    return names


def check_tasks(sweep: Sweep) -> None:
    """Every task of the sweep exists for lm_eval: in v2/tasks (or the sweep's include_path), else
    in lm_eval's own index (several seconds to build, so only when a name is not local)."""
    folders = [REPO / "v2" / "tasks"]
    if sweep.lm_eval.get("include_path"):
        inc = Path(str(sweep.lm_eval["include_path"]))
        folders.append(inc if inc.is_absolute() else REPO / inc)
    wanted = list(dict.fromkeys(t for c in sweep.configs for t in c.tasks))
    unknown = [t for t in wanted if t not in _local_task_names(folders)]
    if not unknown:
        return
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        print(f"note: lm_eval is not installed here: tasks {', '.join(unknown)} unchecked")
        return
    known = TaskManager(include_path=[str(f) for f in folders]).all_tasks
    unknown = [t for t in unknown if t not in known]
    if unknown:
        raise SweepError(
            f"{sweep.file}: unknown tasks {', '.join(unknown)}: not lm_eval's, not in "
            f"{', '.join(str(f) for f in folders)} (`lm-eval ls tasks` lists lm_eval's)"
        )


def load_sweep(path: str | Path, results: str | Path | None = None) -> Sweep:
    """Read and check a sweep file. Relative paths in it are relative to the repository root."""
    path = Path(path)
    try:
        data = read_sweep_file(path)
    except SpecError as e:
        raise SweepError(str(e)) from None
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown keys {', '.join(unknown)}; known: {sorted(SWEEP_KEYS)}")
    for key in ("pretrained", "tasks", "grid"):
        if not data.get(key):
            raise SweepError(f"{path}: `{key}` is required")
    tasks = alternatives(data["tasks"])
    lm_eval = {**LM_EVAL_DEFAULTS, **(data.get("lm_eval") or {})}
    unknown = sorted(set(lm_eval) - set(LM_EVAL_DEFAULTS) - {"limit"})
    if unknown:
        raise SweepError(f"{path}: unknown lm_eval keys {', '.join(unknown)}")
    limit = data.get("limit", lm_eval.pop("limit", None))
    runner, direct = check_runner(data, str(path))
    try:
        configs = build_specs(
            data,
            runner=runner,
            batch_size=direct["batch_size"] if runner == "direct" else lm_eval["batch_size"],
            max_new_tokens=direct["max_new_tokens"] if runner == "direct" else None,
            direct_max_new_tokens=(data.get("direct") or {}).get("max_new_tokens"),
        )
    except SpecError as e:
        raise SweepError(f"{path}: {e}") from None
    for c in configs:  # a policy that can skip nothing: the note every entry point prints
        if c.policy != "none" and (note := baseline_note(c.make_policy(), c.options)):
            print(f"note: {path}: {c.id}: {note}", file=sys.stderr)
    check_pretrained(str(data["pretrained"]), str(path))
    if runner == "direct":
        check_direct_tasks(configs, str(path))
    name = str(data.get("name") or path.stem)
    root = Path(results) if results else REPO / str(data.get("results") or "results")
    return Sweep(
        name=name,
        file=path,
        pretrained=str(data["pretrained"]),
        tasks=tasks,
        configs=configs,
        lm_eval=lm_eval,
        limit=int(limit) if limit else None,
        limit_cpu=int(data["limit_cpu"]) if data.get("limit_cpu") else None,
        main_metric=data.get("main_metric"),
        results=root / name,
        runner=runner,
        direct=direct,
    )


def check_runner(data: dict, where: str) -> tuple[str, dict]:
    """(runner, direct settings): `runner: lm_eval` (default) or `direct` (v2/direct.py), whose
    settings are `direct: {batch_size, speed: {batch: problems}, speed_rounds, max_new_tokens}`."""
    from v2.direct import DEFAULTS

    runner = data.get("runner", "lm_eval")
    if runner not in ("lm_eval", "direct"):
        raise SweepError(f"{where}: runner must be lm_eval or direct, got {runner!r}")
    given = data.get("direct") or {}
    if given and runner != "direct":
        raise SweepError(f"{where}: `direct` settings need `runner: direct`")
    if not isinstance(given, dict) or set(given) - set(DEFAULTS):
        raise SweepError(f"{where}: direct takes {', '.join(DEFAULTS)}; got {given!r}")
    direct = {**DEFAULTS, **given}
    if runner == "direct":
        speed = direct["speed"]
        ok = isinstance(speed, dict) and all(
            isinstance(b, int) and isinstance(n, int) and b > 0 and n > 0 for b, n in speed.items()
        )
        if not ok or not isinstance(direct["speed_rounds"], int) or direct["speed_rounds"] < 1:
            raise SweepError(
                f"{where}: direct.speed is {{batch: problems}} (positive integers) and "
                f"speed_rounds an integer >= 1; got {speed!r}, {direct['speed_rounds']!r}"
            )
    return runner, direct


def check_direct_tasks(configs: list[Config], where: str) -> None:
    from v2.direct import TASKS

    for c in configs:
        if len(c.tasks) != 1 or c.tasks[0] not in TASKS:
            raise SweepError(
                f"{where}: {c.id}: runner direct scores one task of {', '.join(TASKS)}, "
                f"not {', '.join(c.tasks)}"
            )


# --------------------------------------------------------------------------- one configuration


def model_args_text(sweep: Sweep, cfg: Config) -> str:
    """lm_eval's --model_args of a configuration: its RunSpec rendered (RunSpec.lm_eval_model_args),
    so the model decodes exactly the spec."""
    return ",".join(f"{k}={v}" for k, v in cfg.lm_eval_model_args().items())


def lm_eval_args(sweep: Sweep, cfg: Config, run_dir: Path, limit: int | None) -> list[str]:
    """Everything after the entry script (`v2/eval.py`)."""
    e = sweep.lm_eval
    args = ["--model", e["model"], "--model_args", model_args_text(sweep, cfg)]
    args += ["--tasks", ",".join(cfg.tasks), "--batch_size", str(e["batch_size"])]
    args += ["--output_path", str(run_dir)]
    if e["apply_chat_template"]:
        args.append("--apply_chat_template")
    if e["fewshot_as_multiturn"]:
        args.append("--fewshot_as_multiturn")
    if e["num_fewshot"] is not None:
        args += ["--num_fewshot", str(e["num_fewshot"])]
    if e["gen_kwargs"]:
        args += ["--gen_kwargs", str(e["gen_kwargs"])]
    if e["include_path"]:
        args += ["--include_path", str(e["include_path"])]
    if e["log_samples"]:
        args.append("--log_samples")
    if limit:
        args += ["--limit", str(limit)]
    if e["use_cache"]:
        args += ["--use_cache", str(run_dir / "lm_cache" / "requests")]
    return args + [str(a) for a in e["extra_args"]]


def make_task(
    sweep: Sweep, cfg: Config, limit: int | None, num_processes: int, index: int = 0
) -> dict:
    """What running one configuration needs, as plain data (a manifest line)."""
    run_dir = sweep.run_dir(cfg.id, limit).resolve()
    return {
        "index": index,
        "sweep": sweep.name,
        "config_id": cfg.id,
        "run_dir": str(run_dir),
        "cwd": str(REPO),
        "entry": sweep.lm_eval["entry"],
        "num_processes": num_processes,
        "lm_eval_args": lm_eval_args(sweep, cfg, run_dir, limit),
        "expect": expected(cfg, limit),
    }


def eval_cmd_from_env() -> list[str] | None:
    v = os.environ.get(EVAL_CMD_ENV, "").strip()
    return shlex.split(v) if v else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main_process_port() -> int:
    """MAIN_PROCESS_PORT, else distinct per array task (29500 + (array job + task) % 1000: tasks of
    one array never collide, two arrays are shifted apart), else a free port here."""
    if os.environ.get("MAIN_PROCESS_PORT"):
        return int(os.environ["MAIN_PROCESS_PORT"])
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job:
        return 29500 + (int(job) + int(os.environ.get("SLURM_ARRAY_TASK_ID", 0))) % 1000
    return free_port()


def eval_argv(task: dict, eval_cmd: list[str] | None = None, port: int | None = None) -> list[str]:
    if eval_cmd:
        prefix = list(eval_cmd)
    elif task["num_processes"] > 1:
        # `accelerate launch` of this interpreter's accelerate (no `accelerate` on PATH needed)
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
        prefix.append("--num_processes")
        prefix += [str(task["num_processes"]), "--main_process_port", str(port or free_port())]
        prefix.append(task["entry"])
    else:
        prefix = [sys.executable, task["entry"]]
    return prefix + task["lm_eval_args"]


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


# --------------------------------------------------------------------------- markers and state


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


def _queued_state(job: str, queued: tuple[str, str]) -> State:
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
            return _queued_state(job, queued)
    elif running:  # another host and no way to ask: trust a recent heartbeat
        try:
            age = time.time() - (run_dir / RUNNING).stat().st_mtime
        except FileNotFoundError:  # it ended while we looked
            return config_state(run_dir, slurm)
        if age < STALE_S:
            return State("running", f"on {running.get('host')} ({age:.0f} s since heartbeat)")
    job = (submitted or {}).get("slurm_job")
    if job and (queued := slurm.queue_state(job)):  # e.g. requeued: pending again
        return _queued_state(job, queued)
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


def states(sweep: Sweep, configs: list[Config], limit: int | None) -> dict[str, State]:
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


# --------------------------------------------------------------------------- running a task


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
    argv = eval_argv(task, eval_cmd or eval_cmd_from_env(), port)
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


# --------------------------------------------------------------------------- SLURM


def cluster_settings(env_file: Path = CLUSTER_ENV) -> dict[str, str]:
    """sbatch/cluster.env evaluated by bash, so environment variables override its defaults."""
    r = subprocess.run(
        ["bash", "-c", 'set -a; source "$1" >/dev/null; env -0', "bash", str(env_file)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise SweepError(f"cannot read {env_file}: {r.stderr.strip()}")
    pairs = (item.partition("=") for item in r.stdout.split("\0") if item)
    return {k: v for k, _, v in pairs if k.startswith("FDLLM_")}


def sbatch_resource_args(s: dict[str, str], strict: bool = True) -> list[str]:
    """The resource flags of cluster.env (account, QoS, partition, GPUs, time, memory, cpus)."""
    account = s.get("FDLLM_ACCOUNT", "")
    if strict and (not account or "<" in account):
        raise SweepError(
            f"set FDLLM_ACCOUNT (now {account!r}) in sbatch/cluster.env or the environment; "
            "`pace-quota` lists your charge accounts"
        )
    args = [f"--account={account}"]
    for key, flag in (
        ("FDLLM_QOS", "--qos"),
        ("FDLLM_PARTITION", "--partition"),
        ("FDLLM_CONSTRAINT", "--constraint"),
        ("FDLLM_TIME", "--time"),
        ("FDLLM_MEM", "--mem"),
        ("FDLLM_CPUS", "--cpus-per-task"),
        ("FDLLM_TMP", "--tmp"),
    ):
        if s.get(key):
            args.append(f"{flag}={s[key]}")
    gpus, gtype = s.get("FDLLM_GPUS", "1"), s.get("FDLLM_GPU_TYPE", "")
    if gpus and gpus != "0":
        args.append(f"--gres=gpu:{gtype}:{gpus}" if gtype else f"--gres=gpu:{gpus}")
    return args + shlex.split(s.get("FDLLM_EXTRA_SBATCH", ""))


def array_spec(indices: list[int]) -> str:
    """0,2,3,4,7 -> '0,2-4,7'."""
    parts, run = [], []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def submit_array(
    sweep: Sweep, to_run: list[Config], limit: int | None, dry_run: bool = False
) -> str | None:
    """One sbatch --array over a manifest of the whole sweep frozen now; SUBMITTED markers."""
    settings = cluster_settings()
    gpus = int(settings.get("FDLLM_GPUS") or 1)
    tasks = [make_task(sweep, c, limit, gpus, i) for i, c in enumerate(sweep.configs)]
    index = {c.id: i for i, c in enumerate(sweep.configs)}
    spec = array_spec([index[c.id] for c in to_run])
    manifests = (sweep.results / "_manifests").resolve()
    stem = time.strftime("%Y%m%d-%H%M%S") + (f"_limit{limit}" if limit else "")
    manifest = next(  # never overwrite: an earlier array may still be reading its manifest
        p
        for n in itertools.count()
        if not (p := manifests / (f"{stem}-{n}.json" if n else f"{stem}.json")).exists()
    )
    cap = settings.get("FDLLM_ARRAY_CAP") or "4"
    argv = ["sbatch", "--parsable", f"--array={spec}%{cap}", f"--job-name=fdllm-{sweep.name}"]
    argv += [f"--output={manifests}/slurm-%A_%a.log", f"--chdir={REPO}"]
    argv += [*sbatch_resource_args(settings, strict=not dry_run), str(ARRAY_JOB), str(manifest)]
    if dry_run:
        print("would submit: " + shlex.join(argv))
        return None
    manifests.mkdir(parents=True, exist_ok=True)
    created = time.strftime("%Y-%m-%d %H:%M:%S")
    data = {"sweep": sweep.name, "sweep_file": str(sweep.file), "created": created, "limit": limit}
    manifest.write_text(json.dumps({**data, "array": spec, "tasks": tasks}, indent=1))
    # The job inherits this environment (sbatch's default --export=ALL) and, unless cluster.env
    # names an environment to enter, runs this interpreter (sbatch/job_env.sh): the packages
    # that submitted the sweep run it.
    env = {**os.environ, "FDLLM_SUBMIT_PYTHON": sys.executable}
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SweepError(f"sbatch failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    job = r.stdout.strip().split(";")[0]
    for c in to_run:
        run_dir = sweep.run_dir(c.id, limit)
        remove_markers(run_dir, FAILED, RUNNING)
        marker = {"slurm_job": f"{job}_{index[c.id]}", "manifest": str(manifest)}
        write_marker(run_dir, SUBMITTED, marker)
    print(f"submitted array job {job}: --array={spec}%{cap} ({len(to_run)} configurations)")
    print(f"manifest: {manifest}")
    print(f"logs: {sweep.runs_root(limit)}/<config>/slurm-{job}_<index>.log")
    print(f"state: python -m v2.experiments {sweep.file} --status" + _limit_flag(limit))
    return job


def _limit_flag(limit: int | None) -> str:
    return f" --limit {limit}" if limit else ""


# --------------------------------------------------------------------------- local runs


def num_gpus() -> int:
    if os.environ.get(NUM_GPUS_ENV):
        return int(os.environ[NUM_GPUS_ENV])
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def run_local(
    sweep: Sweep,
    to_run: list[Config],
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
    cfg: Config,
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


# --------------------------------------------------------------------------- status and CLI


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def status_rows(
    sweep: Sweep, configs: list[Config], st: dict[str, State], limit: int | None
) -> tuple[list[list[str]], list[str]]:
    """Table rows: one per (configuration, task) once done, else one per configuration; and
    what the tokens/s shown can and cannot say."""
    from v2 import report

    found: dict[str, list[report.Row]] = {}
    ids = [c.id for c in sweep.configs]
    configs = sorted(configs, key=lambda c: report.run_order(c.id, ids))  # the report's order
    for c in configs:
        run_dir = sweep.run_dir(c.id, limit)
        if st[c.id].state == "done" and (s := report.newest_summary(run_dir)):
            found[c.id] = report.rows_from_summary(c.id, s[0], s[1], sweep.main_metric)
    flat = [r for rs in found.values() for r in rs]
    for r in flat:
        r.baseline = report.find_baseline(r, flat)
    rows = []
    for c in configs:
        if c.id not in found:
            rows.append([c.id, ",".join(c.tasks), st[c.id].state, "-", "-", "-", st[c.id].note])
            continue
        for r in found[c.id]:
            saved = "-" if r.flops_ratio is None else _fmt_pct(1 - r.flops_ratio)
            if r.end_to_end_ratio is not None:
                saved += f" / {_fmt_pct(1 - r.end_to_end_ratio)}"
            tps = report.speed_text(r)
            note = r.metric or ""
            if r.partial_stats:
                cover = report.coverage_text(r)
                note += f"; stats partial{'' if cover == '-' else ': ' + cover} {report.PARTIAL}"
            rows.append([c.id, r.task, "done", report.accuracy_text(r), tps, saved, note])
    notes = []
    if any(r.tokens_per_second is not None and len(r.speed_rounds) < 2 for r in flat):
        notes.append(f"{report.SINGLE_PASS} tokens/s of one timed pass: not comparable")
    if any(r.on_cpu and r.tokens_per_second is not None for r in flat):
        notes.append("tokens/s measured on a CPU are not results (they swing between runs)")
    if any(r.partial_stats for r in flat):
        notes.append(
            f"{report.PARTIAL} stats partial: resumed from lm_eval's request cache, so the "
            "statistics (tokens/s, FLOPs, ...) cover only the problems decoded in the last "
            "attempt, the accuracy all of them; --force ID redoes it from scratch"
        )
    return rows, notes


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())


def print_status(sweep: Sweep, configs: list[Config], limit: int | None) -> dict[str, int]:
    st = states(sweep, configs, limit)
    rows, notes = status_rows(sweep, configs, st, limit)
    where = sweep.runs_root(limit)
    print(
        f"sweep {sweep.name} ({sweep.file}): {where}" + (" [--limit: smoke test]" if limit else "")
    )
    header = ["config", "task", "state", "accuracy %", "tokens/s", "FLOPs saved fwd/e2e", "note"]
    print_table(header, rows)
    for note in notes:
        print(note)
    counts = dict.fromkeys(STATES, 0)
    for s in st.values():
        counts[s.state] += 1
    print(", ".join(f"{v} {k}" for k, v in counts.items()) + f" of {len(configs)}")
    return counts


def select(sweep: Sweep, only: list[str] | None) -> list[Config]:
    if not only:
        return list(sweep.configs)
    return [sweep.config(i) for i in dict.fromkeys(only)]


def plan(
    configs: list[Config], st: dict[str, State], force: list[str] | None
) -> tuple[list[Config], list[str]]:
    """(configurations to run, notes). Default: missing or failed. --force: all (pending and
    running ones excepted: scancel them first); --force ID ...: those, and what a plain run
    would run (so the command printed after an interrupted forced run finishes it)."""
    notes = []
    if force is None:
        todo = [c for c in configs if st[c.id].state in ("missing", "failed")]
    else:
        wanted = {c.id for c in configs} if not force else set(force)
        todo = []
        for c in configs:
            if c.id not in wanted:
                if st[c.id].state in ("missing", "failed"):
                    todo.append(c)
                continue
            if st[c.id].state in ("pending", "running"):
                notes.append(f"{c.id} is {st[c.id].state} ({st[c.id].note}); not forced")
            else:
                todo.append(c)
    return todo, notes


def positive_int(text: str) -> int:
    """An argparse `type`: an integer >= 1 (a limit of 0 would read as "no limit")."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return n


def effective_limit(sweep: Sweep, args_limit: int | None, local: bool, gpus: int) -> int | None:
    if args_limit:
        return args_limit
    if sweep.limit:
        return sweep.limit
    if local and gpus == 0 and sweep.limit_cpu:
        return sweep.limit_cpu
    return None


SLURM_CONF_PATHS = (
    "/etc/slurm/slurm.conf",
    "/etc/slurm-llnl/slurm.conf",
    "/usr/local/etc/slurm.conf",
    "/run/slurm/conf/slurm.conf",  # the configless cache of slurmd / sackd
)


def slurm_available() -> bool:
    """sbatch on PATH and a cluster to submit to: SLURM_CONF, a slurm.conf where SLURM looks,
    or (a configless cluster) an sinfo that answers. Installing the client alone (as the tests
    do on a fresh machine) leaves sbatch on PATH with no cluster behind it."""
    if shutil.which("sbatch") is None:
        return False
    if os.environ.get("SLURM_CONF") or any(os.path.exists(p) for p in SLURM_CONF_PATHS):
        return True
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=20)
        return r.returncode == 0
    return False


def use_slurm(local: bool, runs: bool = True) -> bool:
    """Whether runs go to SLURM. `runs`: this command runs configurations (not --status or
    --dry-run, which run nothing and must not say that something runs here)."""
    if local:
        return False
    if slurm_available():
        return True
    if shutil.which("sbatch"):
        what = "running here" if runs else "runs would go here, not to SLURM"
        print(
            "note: sbatch is on PATH but finds no SLURM cluster (no SLURM_CONF or slurm.conf, "
            f"sinfo fails): {what}",
            file=sys.stderr,
        )
    return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m v2.experiments", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "sweep",
        type=Path,
        nargs="?",
        help="a sweep file, e.g. configs/sweeps/tiny_default.yaml (--status without one: all "
        "sweeps under configs/sweeps)",
    )
    p.add_argument("--status", action="store_true", help="print each configuration's state")
    p.add_argument("--force", nargs="*", metavar="ID", help="rerun all, or these, from scratch")
    p.add_argument("--only", nargs="+", metavar="ID", help="restrict to these configurations")
    p.add_argument(
        "--limit", type=positive_int, default=None, help="smoke test on N problems per task"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    p.add_argument("--local", action="store_true", help="run here, one configuration at a time")
    p.add_argument("--results", type=Path, default=None, help="results root (default: results/)")
    return p


def main(argv: list[str] | None = None, eval_cmd: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "task":
        return task_main(argv[1:], eval_cmd)
    if argv and argv[0] == "sbatch-args":
        return sbatch_args_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sweep is None:
        if not args.status:
            parser.error("give a sweep file (or --status alone to list the sweeps)")
        return list_sweeps(args.results, args.local)
    try:
        sweep = load_sweep(args.sweep, args.results)
        configs = select(sweep, args.only)
        if not args.status and sweep.runner == "lm_eval":
            check_tasks(sweep)
        if args.force:
            forced = {c.id for c in select(sweep, args.force)}
            if not forced <= {c.id for c in configs}:
                raise SweepError(f"--force {' '.join(sorted(forced))}: not all are in --only")
        slurm = use_slurm(args.local, runs=not (args.status or args.dry_run))
        if slurm and sweep.runner == "direct" and not args.status:
            raise SweepError(
                f"{sweep.file}: runner direct times every configuration in one process, here: "
                "run it with --local (inside a GPU job on a cluster)"
            )
        gpus = 0 if slurm else num_gpus()
        limit = effective_limit(sweep, args.limit, not slurm, gpus)
        if args.status:
            print_status(sweep, configs, limit)
            return 0
        st = states(sweep, configs, limit)
        todo, notes = plan(configs, st, args.force)
        for n in notes:
            print(f"note: {n}")
        where = "SLURM array" if slurm else f"here ({gpus} GPU{'s' * (gpus != 1)})"
        label = f", limit {limit} per task: smoke test" if limit else ""
        if limit and not args.limit and not sweep.limit:
            label += f" (limit_cpu of {sweep.file.name}: no GPU here)"
        verb = "would run" if args.dry_run else "to run"
        print(f"sweep {sweep.name}: {len(todo)} of {len(configs)} {verb} {where}{label}")
        for c in configs:
            mark = "run " if c in todo else "skip"
            print(f"  {mark} {c.id:<28} {st[c.id].state:<8} {st[c.id].note}")
        if not todo:
            print("nothing to run (--force [ID ...] reruns)")
            return 0
        if args.dry_run:
            if sweep.runner == "direct":
                print(f"  runner direct: {', '.join(c.id for c in todo)} in this process")
            elif slurm:
                submit_array(sweep, todo, limit, dry_run=True)
            else:
                cmd = eval_cmd or eval_cmd_from_env()
                for c in todo:
                    task = make_task(sweep, c, limit, max(gpus, 1))
                    print(f"  {c.id}: {shlex.join(eval_argv(task, cmd, port=29500))}")
            return 0
        named = set(args.force or [c.id for c in configs]) if args.force is not None else set()
        forced = {c.id for c in todo if c.id in named}
        if slurm:
            for c in todo:
                if c.id in forced and (dest := archive(sweep, c, limit)):
                    print(f"moved the old {c.id} to {dest}")
            submit_array(sweep, todo, limit)
            return 0
        if sweep.runner == "direct":
            from v2 import direct

            results = direct.run_local(sweep, todo, limit, replace_ids=forced)
        else:
            results = run_local(sweep, todo, limit, gpus, eval_cmd, replace_ids=forced)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        # a plain rerun resumes the interrupted configuration (failed) and the missing ones; the
        # forced ones it did not reach still hold their old results, so they are named
        again = resume_command(args, [c for c in e.left if c in forced and c != e.left[0]])
        print(f"\ninterrupted: to finish what is not done, run\n  {again}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to finish what is not done", file=sys.stderr)
        return 130
    print()
    print_status(sweep, configs, limit)
    finish_report(sweep.runs_root(limit), sweep.main_metric, [c.id for c in sweep.configs])
    failed = [cid for cid, rc in results if rc != 0]
    if failed:
        again = resume_command(args, [])
        print(f"failed: {', '.join(failed)} (`{again}` retries only those)")
    return 1 if failed else 0


def list_sweeps(results: Path | None, local: bool, folder: Path = SWEEPS_DIR) -> int:
    """`--status` without a sweep: each sweep file under configs/sweeps with its counts."""
    files = sorted(folder.glob("*.yaml"))
    if not files:
        print(f"no sweep files under {folder}")
        return 0
    slurm = use_slurm(local, runs=False)
    gpus = 0 if slurm else num_gpus()
    rows = []
    for f in files:
        try:
            sweep = load_sweep(f, results)
        except SweepError as e:
            rows.append([_rel(f), "-", "-", f"error: {e}"])
            continue
        limit = effective_limit(sweep, None, not slurm, gpus)
        counts = dict.fromkeys(STATES, 0)
        for st in states(sweep, sweep.configs, limit).values():
            counts[st.state] += 1
        shown = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        where = _rel(sweep.runs_root(limit)) + (" (smoke test)" if limit else "")
        rows.append([_rel(f), str(len(sweep.configs)), shown, where])
    print_table(["sweep", "configs", "state", "results"], rows)
    print("one sweep in detail: python -m v2.experiments SWEEP.yaml --status")
    return 0


def _rel(p: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(p.resolve().relative_to(REPO))
    return str(p)


def resume_command(args: argparse.Namespace, force: list[str]) -> str:
    """The command that finishes a run: the same selection, without --force except for `force`."""
    argv = ["python", "-m", "v2.experiments", str(args.sweep)]
    if args.local:
        argv.append("--local")
    if args.results:
        argv += ["--results", str(args.results)]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    if args.only:
        argv += ["--only", *args.only]
    if force:
        argv += ["--force", *force]
    return shlex.join(argv)


def sbatch_args_main(argv: list[str]) -> int:
    """`sbatch-args SWEEP ID`: the sbatch flags of a job that runs configuration ID of the sweep
    (run_single.sh), one a line: cluster.env's resources and --output in
    results/<sweep>/_manifests/ (setup messages; the configuration's log is
    <run_dir>/slurm-<job>.log). Fails, before anything is queued, on a bad sweep, an unknown ID
    or a placeholder account."""
    if len(argv) != 2:
        print("usage: python -m v2.experiments sbatch-args SWEEP ID", file=sys.stderr)
        return 2
    try:
        sweep = load_sweep(argv[0])
        sweep.config(argv[1])
        flags = sbatch_resource_args(cluster_settings())
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logs = (sweep.results / "_manifests").resolve()
    logs.mkdir(parents=True, exist_ok=True)
    print("\n".join([*flags, f"--output={logs}/single-%j.log"]))
    return 0


def finish_report(root: Path, metric: str | None, order=()) -> None:
    """The report of the sweep's records, in `order` (its ids: the sweep file's, as --status)."""
    from v2 import report

    if not root.is_dir():
        return
    md, plots, rows = report.build(root, metric=metric, order=order)
    if rows:
        print()
        print(md.read_text())
        print(f"report: {md}")
        for p in plots:
            print(f"plot: {p}")


def task_main(argv: list[str], eval_cmd: list[str] | None = None) -> int:
    """Inside a job: `task MANIFEST INDEX` (array_job.sh) or `task --sweep FILE --id ID`
    (run_single.sh). Output goes to <run_dir>/slurm-<job>.log."""
    p = argparse.ArgumentParser(prog="python -m v2.experiments task")
    p.add_argument("manifest", nargs="?", type=Path)
    p.add_argument("index", nargs="?", type=int)
    p.add_argument("--sweep", type=Path)
    p.add_argument("--id")
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args(argv)
    try:
        if args.manifest:
            tasks = json.loads(args.manifest.read_text())["tasks"]
            task = tasks[args.index]
            if task["index"] != args.index:
                raise SweepError(f"{args.manifest}: line {args.index} is task {task['index']}")
        elif args.sweep and args.id:
            sweep = load_sweep(args.sweep)
            gpus = int(os.environ.get("SLURM_GPUS_ON_NODE") or 0) or num_gpus()
            task = make_task(sweep, sweep.config(args.id), args.limit, max(gpus, 1))
        else:
            p.error("give MANIFEST INDEX or --sweep FILE --id ID")
    except (OSError, ValueError, KeyError, IndexError, SweepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(task["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    job = slurm_job_here()
    log = run_dir / (f"slurm-{job}.log" if job else f"task-{time.strftime('%Y%m%d-%H%M%S')}.log")
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    restart = os.environ.get("SLURM_RESTART_COUNT", 0)
    log_line(f"{task['config_id']} on {HOST}, job {job}, restart {restart}, code {REPO}")
    return run_task(task, eval_cmd=eval_cmd, port=main_process_port())


def cli() -> int:
    """main() for the command line: output into a closed pipe (`--dry-run | head`) ends quietly,
    with the status of a process that SIGPIPE ended."""
    try:
        rc = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would report the failed flush of stdout at exit as well: point it at devnull
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return rc


if __name__ == "__main__":
    sys.exit(cli())
