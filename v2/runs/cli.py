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

State of a configuration (done, pending, running, failed, missing): v2/runs/state.py.
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

With `runner: lm_eval` (the default) each configuration is one job that evaluates through
lm_eval's Python API (v2/runs/harness.py; under `accelerate launch` with more than one GPU), run
here (v2/runs/local.py) or as a SLURM array task (v2/runs/slurm.py); with `runner: direct` every
configuration runs in this process through the engine (v2/runs/direct.py, --local only). Both
write the same record (v2/record.py). FAST_DLLM_EVAL_CMD (or the eval_cmd argument) replaces the
job's launcher and module, e.g. FAST_DLLM_EVAL_CMD="python my_fake_eval.py" in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
from pathlib import Path

from v2.runs.backend import backend
from v2.runs.slurm import num_gpus, sbatch_args_main, task_main, use_slurm
from v2.runs.spec import REPO, RunSpec, Sweep, SweepError
from v2.runs.state import STATES, Interrupted, State, archive, states
from v2.runs.sweep import SWEEPS_DIR, load_sweep


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def status_rows(
    sweep: Sweep, configs: list[RunSpec], st: dict[str, State], limit: int | None
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


def print_status(sweep: Sweep, configs: list[RunSpec], limit: int | None) -> dict[str, int]:
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


def select(sweep: Sweep, only: list[str] | None) -> list[RunSpec]:
    if not only:
        return list(sweep.configs)
    return [sweep.config(i) for i in dict.fromkeys(only)]


def plan(
    configs: list[RunSpec], st: dict[str, State], force: list[str] | None
) -> tuple[list[RunSpec], list[str]]:
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
        be = backend(sweep, eval_cmd)
        configs = select(sweep, args.only)
        if args.force:
            forced = {c.id for c in select(sweep, args.force)}
            if not forced <= {c.id for c in configs}:
                raise SweepError(f"--force {' '.join(sorted(forced))}: not all are in --only")
        slurm = use_slurm(args.local, runs=not (args.status or args.dry_run))
        if not args.status:
            be.check(sweep, slurm)
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
            if slurm:
                be.submit(sweep, todo, limit, dry_run=True)
            else:
                print("\n".join(be.dry_run(sweep, todo, limit, gpus)))
            return 0
        named = set(args.force or [c.id for c in configs]) if args.force is not None else set()
        forced = {c.id for c in todo if c.id in named}
        if slurm:
            for c in todo:
                if c.id in forced and (dest := archive(sweep, c, limit)):
                    print(f"moved the old {c.id} to {dest}")
            be.submit(sweep, todo, limit, dry_run=False)
            return 0
        results = be.run_local(sweep, todo, limit, gpus, forced)
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
