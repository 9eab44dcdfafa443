"""The `lm_eval` backend of the sweep runner (`runner: lm_eval`, the default). Each configuration
is one job process,

    python -m v2.runs.harness <run_dir>/job.json
    python -m accelerate.commands.launch --multi_gpu --num_processes N ... -m v2.runs.harness ...

which evaluates through lm_eval's Python API (`simple_evaluate`, with a `TaskManager` that knows
v2/tasks and an `EvaluationTracker` that writes lm_eval's results file), holds lm_eval's results
as an object, and writes the record (summary.json, v2/eval.py `write_summary`) from it. The job's
settings are one JSON file, the task (`make_task`): the configuration's RunSpec rendered as
simple_evaluate's arguments, once, here. The runner (v2/runs/local.py) starts and watches the job;
a SLURM array task runs the same job (v2/runs/slurm.py). FAST_DLLM_EVAL_CMD replaces the
launcher and module, e.g. `python fake_eval.py` in tests; it is given the task file.

Users' own evaluations go through lm_eval's command line instead (v2/eval.py, token_skip_eval.py,
layer_skip_eval.py), which writes the same record.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
from pathlib import Path

from v2.runs.spec import REPO, RunSpec, Sweep
from v2.runs.state import expected

EVAL_CMD_ENV = "FAST_DLLM_EVAL_CMD"
JOB_FILE = "job.json"
TASKS_DIR = REPO / "v2" / "tasks"
MODULE = "v2.runs.harness"


def evaluate_args(sweep: Sweep, cfg: RunSpec, run_dir: Path, limit: int | None) -> dict:
    """lm_eval's simple_evaluate arguments for one configuration (JSON, for the task file)."""
    e = sweep.lm_eval
    chat = bool(e["apply_chat_template"])
    multiturn = e["fewshot_as_multiturn"]
    return {
        "model_args": cfg.lm_eval_model_args(),
        "tasks": list(cfg.tasks),
        "batch_size": e["batch_size"],
        "apply_chat_template": chat,
        # lm_eval's command line turns it on with the chat template when not given
        "fewshot_as_multiturn": chat if multiturn is None else bool(multiturn),
        "num_fewshot": e["num_fewshot"],
        "gen_kwargs": e["gen_kwargs"],
        "log_samples": bool(e["log_samples"]),
        "limit": limit,
        "use_cache": str(run_dir / "lm_cache" / "requests") if e["use_cache"] else None,
    }


def include_paths(sweep: Sweep) -> list[str]:
    """Where lm_eval looks for task files beside its own: v2/tasks and the sweep's include_path
    (relative to the repository root)."""
    paths = [TASKS_DIR]
    if sweep.lm_eval.get("include_path"):
        inc = Path(str(sweep.lm_eval["include_path"]))
        paths.append(inc if inc.is_absolute() else REPO / inc)
    return [str(p) for p in paths]


def rerun_command(sweep: Sweep, cfg: RunSpec, limit: int | None) -> str:
    """The command that runs this configuration again (the record's `command`)."""
    try:
        file = str(Path(sweep.file).resolve().relative_to(REPO))
    except ValueError:
        file = str(sweep.file)
    argv = ["python", "-m", "v2.experiments", file, "--only", cfg.id]
    return shlex.join(argv + (["--limit", str(limit)] if limit else []))


def make_task(
    sweep: Sweep, cfg: RunSpec, limit: int | None, num_processes: int, index: int = 0
) -> dict:
    """One configuration's job as plain data (a manifest line; the job's task file)."""
    run_dir = sweep.run_dir(cfg.id, limit).resolve()
    return {
        "index": index,
        "sweep": sweep.name,
        "config_id": cfg.id,
        "run_dir": str(run_dir),
        "cwd": str(REPO),
        "num_processes": num_processes,
        "evaluate": evaluate_args(sweep, cfg, run_dir, limit),
        "include_path": include_paths(sweep),
        "command": rerun_command(sweep, cfg, limit),
        "expect": expected(cfg, limit),
    }


def task_file(task: dict) -> Path:
    return Path(task["run_dir"]) / JOB_FILE


def eval_cmd_from_env() -> list[str] | None:
    v = os.environ.get(EVAL_CMD_ENV, "").strip()
    return shlex.split(v) if v else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_argv(task: dict, eval_cmd: list[str] | None = None, port: int | None = None) -> list[str]:
    """The job's command line: this interpreter (under `accelerate launch` of its accelerate with
    more than one process, so no `accelerate` on PATH is needed), or `eval_cmd`."""
    if eval_cmd:
        prefix = list(eval_cmd)
    elif task["num_processes"] > 1:
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
        prefix += ["--num_processes", str(task["num_processes"])]
        prefix += ["--main_process_port", str(port or free_port()), "-m", MODULE]
    else:
        prefix = [sys.executable, "-m", MODULE]
    return [*prefix, str(task_file(task))]


def describe(task: dict) -> str:
    """One line for --dry-run: what the job will ask lm_eval for."""
    a = task["evaluate"]
    model_args = ",".join(f"{k}={v}" for k, v in a["model_args"].items())
    shown = [f"tasks {','.join(a['tasks'])}", f"model_args {model_args}"]
    shown.append(f"batch_size {a['batch_size']}")
    shown += [k for k in ("apply_chat_template", "fewshot_as_multiturn", "log_samples") if a[k]]
    shown += [f"{k} {a[k]}" for k in ("num_fewshot", "gen_kwargs", "limit") if a[k] is not None]
    return "lm_eval: " + "; ".join(shown)


# --------------------------------------------------------------------------- inside the job


def run_job(task: dict) -> Path | None:
    """Evaluate one configuration with lm_eval's Python API; on rank 0 save lm_eval's results
    file and write summary.json beside it (its path), on other ranks give their statistics."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from v2.eval import write_summary
    from v2.lm_adapter import MODEL_NAME

    args = dict(task["evaluate"])
    tracker = EvaluationTracker(output_path=task["run_dir"])
    tasks = TaskManager(include_path=task["include_path"], metadata=dict(args["model_args"]))
    results = simple_evaluate(
        model=MODEL_NAME, evaluation_tracker=tracker, task_manager=tasks, **args
    )
    results_file = None
    if results is not None:  # rank 0
        samples = results.pop("samples", None)
        tracker.save_results_aggregated(results=results, samples=samples)
        for name in results["configs"] if samples else ():
            tracker.save_results_samples(task_name=name, samples=samples[name])
        folder = Path(task["run_dir"]) / tracker.general_config_tracker.model_name_sanitized
        results_file = folder / f"results_{tracker.date_id}.json"
        print(make_table(results))
    return write_summary(results, results_file, args["limit"], task["command"])


def main(argv: list[str] | None = None) -> int:
    """`python -m v2.runs.harness TASK.json`: the job of one configuration."""
    from v2.eval import guarded

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(
            f"usage: python -m {MODULE} TASK.json (written by python -m v2.experiments)",
            file=sys.stderr,
        )
        return 2
    try:
        task = json.loads(Path(argv[0]).read_text())
    except (OSError, ValueError) as e:
        print(f"error: task file {argv[0]}: {e}", file=sys.stderr)
        return 2
    return guarded(lambda: run_job(task))


if __name__ == "__main__":
    sys.exit(main())
