"""The SLURM launcher: a sweep's configurations as one array job over a manifest (one task, one
configuration's job: v2/runs/harness.py), submitted with the cluster's settings
(sbatch/cluster.env); inside the job, `python -m v2.experiments task MANIFEST INDEX`
(sbatch/array_job.sh) or `task --sweep FILE --id ID` (sbatch/run_single.sh) runs the
configuration's job as the local launcher does (v2/runs/local.py run_task).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from v2.runs.harness import free_port, make_task
from v2.runs.local import run_task
from v2.runs.spec import REPO, RunSpec, Sweep, SweepError
from v2.runs.state import (
    FAILED,
    HOST,
    RUNNING,
    SUBMITTED,
    log_line,
    remove_markers,
    slurm_job_here,
    write_marker,
)
from v2.runs.sweep import load_sweep

CLUSTER_ENV = REPO / "sbatch" / "cluster.env"
ARRAY_JOB = REPO / "sbatch" / "array_job.sh"
NUM_GPUS_ENV = "FAST_DLLM_NUM_GPUS"


def main_process_port() -> int:
    """MAIN_PROCESS_PORT, else distinct per array task (29500 + (array job + task) % 1000: tasks of
    one array never collide, two arrays are shifted apart), else a free port here."""
    if os.environ.get("MAIN_PROCESS_PORT"):
        return int(os.environ["MAIN_PROCESS_PORT"])
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job:
        return 29500 + (int(job) + int(os.environ.get("SLURM_ARRAY_TASK_ID", 0))) % 1000
    return free_port()


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
    sweep: Sweep, to_run: list[RunSpec], limit: int | None, dry_run: bool = False
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


def num_gpus() -> int:
    if os.environ.get(NUM_GPUS_ENV):
        return int(os.environ[NUM_GPUS_ENV])
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


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
