"""The two backends of the sweep runner behind one interface (`Backend`): how a sweep's
configurations are checked before they run, shown by --dry-run, run on this machine, and sent to
SLURM. `runner: lm_eval` (the default): one job per configuration through lm_eval's Python API
(v2/runs/harness.py), started here (v2/runs/local.py) or as SLURM array tasks
(v2/runs/slurm.py); `runner: direct`: every configuration in this process through the engine,
timed in interleaved rounds (v2/runs/direct.py), here only.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Protocol

from v2.runs.spec import RunSpec, Sweep, SweepError


class Backend(Protocol):
    name: str

    def check(self, sweep: Sweep, slurm: bool) -> None:
        """Before a run or --dry-run, here or (`slurm`) as SLURM array tasks: what reading the
        sweep could not check (SweepError)."""

    def dry_run(self, sweep: Sweep, todo: list[RunSpec], limit: int | None, gpus: int) -> list:
        """What running `todo` here would do, a line each."""

    def run_local(
        self,
        sweep: Sweep,
        todo: list[RunSpec],
        limit: int | None,
        gpus: int,
        replace_ids: set[str] | frozenset,
    ) -> list[tuple[str, int]]:
        """Run `todo` on this machine: (id, exit status) each; Ctrl-C raises Interrupted."""

    def submit(self, sweep: Sweep, todo: list[RunSpec], limit: int | None, dry_run: bool):
        """Send `todo` to SLURM (the job id), or print what would be sent."""


@dataclass
class LmEvalBackend:
    """`eval_cmd`: replaces the job's launcher and module (tests: a fake evaluation)."""

    eval_cmd: list[str] | None = None
    name: str = "lm_eval"

    def check(self, sweep: Sweep, slurm: bool) -> None:
        from v2.runs.sweep import check_tasks

        check_tasks(sweep)

    def dry_run(self, sweep: Sweep, todo: list[RunSpec], limit: int | None, gpus: int) -> list:
        from v2.runs.harness import describe, eval_cmd_from_env, job_argv, make_task

        cmd = self.eval_cmd or eval_cmd_from_env()
        lines = []
        for c in todo:
            task = make_task(sweep, c, limit, max(gpus, 1))
            lines.append(f"  {c.id}: {shlex.join(job_argv(task, cmd, port=29500))}")
            lines.append(f"    {describe(task)}")
        return lines

    def run_local(self, sweep, todo, limit, gpus, replace_ids):
        from v2.runs.local import run_local

        return run_local(sweep, todo, limit, gpus, self.eval_cmd, replace_ids=replace_ids)

    def submit(self, sweep, todo, limit, dry_run):
        from v2.runs.slurm import submit_array

        return submit_array(sweep, todo, limit, dry_run=dry_run)


@dataclass
class DirectBackend:
    name: str = "direct"

    def check(self, sweep: Sweep, slurm: bool) -> None:
        """Its tasks were checked when the sweep was read (v2.runs.sweep.check_direct_tasks);
        it times every configuration in one process, so not as SLURM array tasks."""
        if slurm:
            raise SweepError(
                f"{sweep.file}: runner direct times every configuration in one process, here: "
                "run it with --local (inside a GPU job on a cluster)"
            )

    def dry_run(self, sweep: Sweep, todo: list[RunSpec], limit: int | None, gpus: int) -> list:
        return [f"  runner direct: {', '.join(c.id for c in todo)} in this process"]

    def run_local(self, sweep, todo, limit, gpus, replace_ids):
        from v2.runs.direct import run_local

        return run_local(sweep, todo, limit, replace_ids=replace_ids)

    def submit(self, sweep, todo, limit, dry_run):
        self.check(sweep, slurm=True)


def backend(sweep: Sweep, eval_cmd: list[str] | None = None) -> Backend:
    """The sweep's backend (`runner:`)."""
    return DirectBackend() if sweep.runner == "direct" else LmEvalBackend(eval_cmd)
