"""Reading a sweep file into a checked `Sweep` (`load_sweep`): its keys, its runner, its
configurations (v2.runs.spec.build_specs: one rule for where a setting may be given), a local
`pretrained` that exists, and, before a run or --dry-run, its tasks (lm_eval's or v2/tasks'). A
bad file stops with one line (SweepError) before anything runs. Relative paths in a sweep file
start at the repository root.
"""

from __future__ import annotations

import contextlib
import sys
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

SWEEPS_DIR = REPO / "configs" / "sweeps"

# A sweep file's `lm_eval:` settings and their defaults: the arguments of lm_eval's
# simple_evaluate of the same names (v2/runs/harness.py), use_cache being a request cache per
# configuration (<run_dir>/lm_cache/)
LM_EVAL_DEFAULTS = {
    "batch_size": 32,
    "apply_chat_template": True,
    "fewshot_as_multiturn": None,  # None: as lm_eval's command line, on with the chat template
    "num_fewshot": None,
    "gen_kwargs": None,
    "include_path": None,
    "log_samples": False,
    "use_cache": True,
}
# keys of the command-line era: the job now calls lm_eval's Python API with this repository's model
RETIRED_LM_EVAL_KEYS = {
    "entry": "the job calls lm_eval's Python API (v2/runs/harness.py); remove it",
    "model": "the runner evaluates this repository's model (fast_dllm_v2); remove it",
    "extra_args": "name the setting itself (keys: " + ", ".join(LM_EVAL_DEFAULTS) + ")",
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
    return sweep_of(data, path, results)


def sweep_of(
    data: dict, path: Path, results: str | Path | None = None, notes: bool = True
) -> Sweep:
    """The checked Sweep of a sweep file's mapping `data` (read from `path`); `notes`: print the
    note on each configuration that can skip nothing."""
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown keys {', '.join(unknown)}; known: {sorted(SWEEP_KEYS)}")
    for key in ("pretrained", "tasks", "grid"):
        if not data.get(key):
            raise SweepError(f"{path}: `{key}` is required")
    tasks = alternatives(data["tasks"])
    lm_eval = {**LM_EVAL_DEFAULTS, **(data.get("lm_eval") or {})}
    for key in sorted(set(lm_eval) & set(RETIRED_LM_EVAL_KEYS)):
        raise SweepError(f"{path}: lm_eval.{key}: {RETIRED_LM_EVAL_KEYS[key]}")
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
    for c in configs if notes else ():  # a policy that can skip nothing: every entry point's note
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
    """(runner, direct settings): `runner: lm_eval` (default) or `direct` (v2/runs/direct.py), whose
    settings are `direct: {batch_size, speed: {batch: problems}, speed_rounds, max_new_tokens}`."""
    from v2.runs.direct import DEFAULTS

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


def check_direct_tasks(configs: list[RunSpec], where: str) -> None:
    from v2.runs.direct import TASKS

    for c in configs:
        if len(c.tasks) != 1 or c.tasks[0] not in TASKS:
            raise SweepError(
                f"{where}: {c.id}: runner direct scores one task of {', '.join(TASKS)}, "
                f"not {', '.join(c.tasks)}"
            )
