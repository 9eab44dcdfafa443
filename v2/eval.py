"""Evaluate a Fast-dLLM v2 checkpoint with lm_eval (docs/evaluation.md):

    python v2/eval.py --model fast_dllm_v2 --model_args pretrained=DIR,threshold=1 \\
        --tasks gsm8k_boxed --apply_chat_template --output_path OUT
    accelerate launch v2/eval.py ...        (data parallel; torchrun works too)

All of lm_eval's flags work. Added here: the tasks in v2/tasks are found without
--include_path, `model_path=` is filed like `pretrained=`, and rank 0 writes `summary.json`
(config, metrics with n and stderr, decoding statistics, environment) beside lm_eval's
`results_<timestamp>.json`, plus `request_stats.jsonl` (one line per scored generate request).
A bad input (model_args, batch size, checkpoint, task) is one line, `error: ...`, before lm_eval
starts where it can be: exit status 2, or 143 under `accelerate launch` (see user_error).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root, not v2/, is importable
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

REPO = Path(__file__).resolve().parent.parent
TASKS_DIR = REPO / "v2" / "tasks"


def prepare_argv(argv: list[str]) -> list[str]:
    """lm_eval's argv with our tasks folder included and model_path= renamed to pretrained=
    (lm_eval names the results folder after pretrained=; model_path= gets a random name)."""
    argv = list(argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(TASKS_DIR)]
    in_model_args = False
    for i, a in enumerate(argv):
        if a in ("--model_args", "-a"):
            in_model_args = True
            continue
        if a.startswith("-"):
            in_model_args = False
            if a.startswith("--model_args="):
                argv[i] = "--model_args=" + _rename_model_path(a.split("=", 1)[1])
            continue
        if in_model_args:
            argv[i] = _rename_model_path(a)
    return argv


def _rename_model_path(value: str) -> str:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        if "model_path" in parsed and "pretrained" not in parsed:
            parsed["pretrained"] = parsed.pop("model_path")
        return json.dumps(parsed)
    if re.search(r"(^|,)pretrained=", value):
        return value
    return re.sub(r"(^|,)model_path=", r"\1pretrained=", value)


def _preparse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--output_path", "-o", default=None)
    p.add_argument("--limit", "-L", type=float, default=None)
    return p.parse_known_args(argv)[0]


def model_args_given(values: list[str] | None) -> dict:
    """--model_args as lm_eval reads them: each value `key=value,key=value` or a JSON object,
    merged in order (lm_eval.utils.simple_parse_args_string types the values)."""
    from lm_eval.utils import simple_parse_args_string

    merged: dict = {}
    for value in values or []:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        merged.update(parsed if isinstance(parsed, dict) else simple_parse_args_string(value))
    return merged


def precheck(argv: list[str], default_policy: str | None) -> None:
    """Fail in a second on bad model_args, batch size or checkpoint path, before lm_eval spends
    its start-up indexing tasks (the model checks the same things again when lm_eval builds it)."""
    from v2.checkpoint import read_config
    from v2.lm_adapter import MODEL_NAME, parse_model_args

    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--model", "-M", default=None)
    p.add_argument("--model_args", "-a", nargs="+", action="extend", default=None)
    p.add_argument("--batch_size", "-b", default=None)
    ns = p.parse_known_args(argv)[0]
    if ns.model != MODEL_NAME:
        return
    given = model_args_given(ns.model_args)
    settings = parse_model_args(given, ns.batch_size or 1, default_policy)
    path = settings.path
    hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    block_size = None
    if Path(path).expanduser().exists() or not hub_id:  # hub ids are fetched by the model
        block_size = read_config(path).block_size
    # every generation setting (threshold, top_p, ...) now, not after lm_eval's start-up logs;
    # a hub id's block size is known only once fetched: a size the sub-block always divides
    config = settings.gen_config
    config.validate(config.block_size or block_size or max(2, config.small_block_size))


def find_results_file(run_dir: str | Path) -> Path:
    """The newest `results_*.json` lm_eval wrote under `<output_path>/<model name>/`."""
    files = sorted(
        Path(run_dir).glob("results_*.json"), key=lambda f: (f.stat().st_mtime_ns, f.name)
    )
    if not files:
        raise FileNotFoundError(f"no results_*.json under {run_dir}")
    return files[-1]


def _results_file(output_path: str, pretrained: str) -> Path:
    from lm_eval.utils import sanitize_model_name

    out = Path(output_path)
    if out.suffix == ".json":  # lm_eval writes <stem>_<timestamp>.json beside it
        files = sorted(out.parent.glob(f"{out.stem}_*.json"), key=lambda f: f.stat().st_mtime_ns)
        if not files:
            raise FileNotFoundError(f"no {out.stem}_*.json in {out.parent}")
        return files[-1]
    return find_results_file(out / sanitize_model_name(pretrained))


def readable_name(pretrained: str) -> str:
    """The checkpoint folder's name for a local directory, the hub id otherwise."""
    p = Path(pretrained).expanduser()
    return p.resolve().name if p.is_dir() else pretrained


def _leaves(name: str, group_subtasks: dict) -> list[str]:
    subs = group_subtasks.get(name) or []
    return [leaf for s in subs for leaf in _leaves(s, group_subtasks)] if subs else [name]


def _metrics(entry: dict) -> dict:
    out = {}
    for key, value in entry.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filt = key.split(",", 1)
        stderr = entry.get(f"{metric}_stderr,{filt}")
        out[key] = {
            "value": value,
            "stderr": stderr if isinstance(stderr, int | float) else None,
        }
    return out


def speed_summary(generated_tokens: int, rank_seconds: list[float]) -> dict:
    """tokens/s of the whole run, labelled: the ranks decode at the same time, so the run's
    decoding wall is the slowest rank's (not the sum over ranks, which `stats.wall_seconds`
    is); aggregate = tokens / that wall, per GPU = aggregate / processes. One timed pass:
    comparable across configurations only with repeated rounds (docs/evaluation.md)."""
    wall = max(rank_seconds, default=0.0)
    aggregate = generated_tokens / wall if wall > 0 else 0.0
    world = max(len(rank_seconds), 1)
    return {
        "processes": world,
        "generated_tokens": generated_tokens,
        "rank_decode_seconds": list(rank_seconds),
        "wall_seconds": wall,
        "tokens_per_second": aggregate,
        "tokens_per_second_per_gpu": aggregate / world,
        "timed_passes": 1,
    }


def stats_coverage(results: dict, records: dict) -> dict[str, tuple[int, int]]:
    """Per generating task of lm_eval's `results`: (problems decoded here, problems answered
    from lm_eval's request cache). With --use_cache, lm_eval hands the model only the requests
    its cache cannot answer, so our statistics (`records`, keyed (task, doc_id, idx)) cover the
    decoded problems while lm_eval's metrics and `n` cover all: every problem not decoded here
    was answered from the cache. Tasks that generate nothing (loglikelihood) have no statistics
    and no entry; a task whose output type is not recorded counts as generating."""
    decoded: dict[str, set] = {}
    for task, doc_id, _idx in records:
        decoded.setdefault(task, set()).add(doc_id)
    configs = results.get("configs", {})
    out = {}
    for task, counts in results.get("n-samples", {}).items():
        kind = (configs.get(task) or {}).get("output_type")
        if kind not in (None, "generate_until") and task not in decoded:
            continue
        n = int(counts.get("effective", 0))
        done = min(len(decoded.get(task, ())), n)
        out[task] = (done, n - done)
    return out


def build_summary(
    results: dict,
    results_file: Path,
    run,
    records: dict,
    limit,
    command: str,
    rank_seconds: list[float] | None = None,
) -> dict:
    """summary.json (the record of v2/record.py) from lm_eval's results and the per-request
    statistics; `command`: what ran it; `rank_seconds`: each process's decoding wall time
    (default: this process's)."""
    from v2.lm_adapter import sum_stats
    from v2.record import Record, TaskResult, environment

    n_layers = run.num_layers
    by_task: dict[str, list] = {}
    for (task, _doc, _idx), stats in records.items():
        by_task.setdefault(task, []).extend(stats)
    groups = results.get("group_subtasks", {})
    n_samples = results.get("n-samples", {})
    coverage = stats_coverage(results, records)
    tasks = {}
    for name, entry in results.get("results", {}).items():
        leaves = _leaves(name, groups)
        # counts only where every leaf generates (a group mixing loglikelihood tasks in would
        # compare decoded problems with problems that never had statistics)
        covered = [coverage[t] for t in leaves] if all(t in coverage for t in leaves) else []
        tasks[name] = TaskResult(
            n=sum(int(n_samples.get(t, {}).get("effective", 0)) for t in leaves),
            metrics=_metrics(entry),
            stats=sum_stats((s for t in leaves for s in by_task.get(t, [])), n_layers).to_dict(),
            stats_problems=sum(c[0] for c in covered) if covered else None,
            cached_problems=sum(c[1] for c in covered) if covered else None,
        )
    total = sum_stats((s for v in records.values() for s in v), n_layers)
    return Record(
        model=readable_name(run.pretrained),
        pretrained=run.pretrained,
        config=run.config,
        limit=int(limit) if limit is not None and float(limit).is_integer() else limit,
        smoke_test=limit is not None,
        tasks=tasks,
        stats=total.to_dict(),
        speed=speed_summary(
            total.generated_tokens,
            rank_seconds if rank_seconds is not None else [run.decode_seconds],
        ),
        env=environment(),
        results_file=results_file.name,
        command=command,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    ).to_dict()


def _gathered_records(run) -> tuple[dict, list[float]] | None:
    """Every rank's per-request statistics on rank 0, first copy of a key wins, and each rank's
    decoding wall time (None on the other ranks)."""
    if run.world_size <= 1:
        return dict(run.requests), [run.decode_seconds]
    import torch.distributed as dist

    if not dist.is_initialized():
        return (dict(run.requests), [run.decode_seconds]) if run.rank == 0 else None
    parts = [None] * run.world_size if run.rank == 0 else None
    dist.gather_object((run.requests, run.decode_seconds), parts, dst=0)
    if run.rank != 0:
        return None
    merged: dict = {}
    for requests, _ in parts:
        for key, stats in requests.items():
            merged.setdefault(key, stats)
    return merged, [seconds for _, seconds in parts]


def write_summary(results: dict | None, results_file: Path | None, limit, command: str):
    """After lm_eval, on every process: gather the statistics; on rank 0, which holds lm_eval's
    `results` and the `results_file` it saved, write summary.json and request_stats.jsonl beside
    that file. Returns summary.json's path (rank 0)."""
    from v2 import lm_adapter
    from v2.record import write_json

    run = lm_adapter.RUN
    if not run.config:  # no fast_dllm_v2 model was built (another model or subcommand)
        return None
    gathered = _gathered_records(run)
    if gathered is None or results is None or results_file is None:
        return None
    records, rank_seconds = gathered
    summary = build_summary(results, results_file, run, records, limit, command, rank_seconds)
    path = write_json(results_file.parent / "summary.json", summary)
    with (results_file.parent / "request_stats.jsonl").open("w") as f:
        for (task, doc_id, idx), stats in sorted(records.items(), key=lambda kv: str(kv[0])):
            for s in stats:
                line = {"task": task, "doc_id": doc_id, "idx": idx, "stats": s.to_dict()}
                f.write(json.dumps(line) + "\n")
    print(f"[fast_dllm_v2] wrote {path}", file=sys.stderr)
    return path


def written_results(output_path: str | None) -> tuple[dict | None, Path | None]:
    """(results, file) that lm_eval's command line saved under --output_path, on rank 0 (the
    command line returns nothing: its output file is what it gives)."""
    from v2 import lm_adapter

    run = lm_adapter.RUN
    if not run.config or run.rank != 0 or output_path is None:
        return None, None
    results_file = _results_file(output_path, run.pretrained)
    return json.loads(results_file.read_text()), results_file


def model_help(prog: str, default_policy: str | None) -> str:
    """What `--help` says before lm_eval's own help: our model, its default policy, options."""
    from v2.lm_adapter import MODEL_ARGS, MODEL_NAME
    from v2.policies import options_of, policy_names

    def options(name: str) -> str:
        return ", ".join(f"{d.name} ({d.type_name})" for d in options_of(name))

    generation = {k: v for k, v in MODEL_ARGS.items() if k not in ("policy", "model_path")}
    lines = [
        f"{prog}: lm_eval with --model {MODEL_NAME} (Fast-dLLM v2, this repository's engine); the",
        "tasks in v2/tasks (tiny_gsm, gsm8k_boxed, ...) are found without --include_path, and",
        "summary.json is written beside lm_eval's results (docs/evaluation.md).",
        "",
        f"policy with no policy= in --model_args: {default_policy or 'none (no skipping)'}",
    ]
    if default_policy == "layer":
        lines.append("  (reuse when reuse_k, layer_subset or subset_size is given)")
    for name in policy_names()[1:]:
        lines += textwrap.wrap(
            f"policy={name}: {options(name)}", 98, initial_indent="  ", subsequent_indent="      "
        )
    if default_policy:
        lines.append(
            f"  with none of its options the {default_policy} policy skips nothing: the run is "
            "the baseline (it says so)"
        )
    generation["pretrained"] = "<checkpoint directory or hub id>"
    shown = "model_args (default): " + ", ".join(f"{k}={v}" for k, v in generation.items())
    lines += textwrap.wrap(shown, 98, subsequent_indent="    ")
    lines += [
        "",
        f"example: python {prog} --model {MODEL_NAME} \\",
        "    --model_args pretrained=v2/tiny/checkpoint"
        + (",cosine_threshold=0.95" if default_policy else "")
        + " --tasks tiny_gsm --apply_chat_template --limit 4 --output_path results/try",
        "",
        "lm_eval's own options follow.",
        "",
    ]
    return "\n".join(lines)


def unknown_tasks(error: ValueError) -> str | None:
    """lm_eval's 'Tasks not found: a, b' (raised after a traceback-worthy stack) as one line."""
    text = str(error)
    if not text.startswith("Tasks not found"):
        return None
    names = text.split(":", 1)[1].strip()
    return (
        f"unknown task {names}: not lm_eval's, not in v2/tasks or --include_path "
        "(`lm-eval ls tasks` lists lm_eval's)"
    )


def accelerate_launcher() -> int | None:
    """The process id of the `accelerate launch` that started this process, if one did."""
    if "ACCELERATE_MIXED_PRECISION" not in os.environ:  # set by every accelerate launcher
        return None
    try:
        import psutil  # accelerate's dependency

        args = psutil.Process(os.getppid()).cmdline()
    except Exception:
        return None
    names = [Path(a).name for a in args]
    launch = "launch" in names and any(n.startswith("accelerate") for n in names)
    if launch or "accelerate.commands.launch" in names or "accelerate-launch" in names:
        return os.getppid()
    return None


def user_error(message: str) -> int:
    """Say a user's error in one line; the exit status, 2. Under `accelerate launch`, which
    answers any failed process with its own traceback (a RuntimeError repeating the process's
    whole stderr, then a CalledProcessError or ChildFailedError), the launcher is stopped the
    way it stops without one, by SIGTERM: the user sees the one line and the launcher exits
    with status 143 (128 + SIGTERM)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    if (launcher := accelerate_launcher()) is not None:
        os.kill(launcher, signal.SIGTERM)
        time.sleep(10)  # stopped by the launcher meanwhile (it terminates its processes)
    return 2


def guarded(body, default_policy: str | None = None) -> int:
    """Run an evaluation, `body()`, with our model's run state fresh: a user's error is one line
    (user_error), the process group is closed either way. Exit status 0, or user_error's."""
    from v2 import lm_adapter
    from v2.checkpoint import CheckpointError
    from v2.generate import GenerationError

    lm_adapter.reset_run(default_policy)
    finished = False
    try:
        body()
        finished = True
    except (lm_adapter.EvalError, CheckpointError, GenerationError, FileNotFoundError) as e:
        return user_error(str(e))
    except ValueError as e:
        if (message := unknown_tasks(e)) is None:
            raise
        return user_error(message)
    finally:
        lm_adapter.close_process_group(finished)
    return 0


def main(argv: list[str] | None = None, default_policy: str | None = None) -> int:
    """lm_eval's command line with our model and tasks, then summary.json. `default_policy` is
    the policy used when model_args give no policy= (token_skip_eval.py, layer_skip_eval.py)."""
    argv = prepare_argv(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "v2/eval.py"
        print(model_help("v2/eval.py" if prog == "eval.py" else prog, default_policy), flush=True)
    opts = _preparse(argv)
    saved = sys.argv
    command = shlex.join(["python", *saved[:1], *argv])

    def evaluate() -> None:
        precheck(argv, default_policy)
        from lm_eval.__main__ import cli_evaluate

        sys.argv = [saved[0] if saved else "v2/eval.py", *argv]
        cli_evaluate()
        write_summary(*written_results(opts.output_path), opts.limit, command)

    try:
        return guarded(evaluate, default_policy)
    finally:
        sys.argv = saved


if __name__ == "__main__":
    sys.exit(main())
