"""The one results record: what every evaluation run writes (`summary.json`), the runner checks
and the report reads, whichever backend produced it.

    results/<sweep>/<config_id>/<model>/summary.json

Backends (`runner:` in a sweep file, v2/runs/backend.py): `lm_eval` (v2/runs/harness.py, one
job per configuration) and `direct` (v2/runs/direct.py: the engine called directly, every
configuration of the sweep in one process, timed in interleaved rounds). Both fill the same fields:

- `config`: every generation setting and the policy with its options, as run (the decoding
  threshold included, whatever its default was where the run started);
- `tasks`: per task n, metrics ({name: {value, stderr}}) and decoding statistics (v2/stats.py),
  with how many problems those statistics cover: `stats_problems` (problems this process
  decoded) and `cached_problems` (answered from lm_eval's request cache, --use_cache: a rerun
  of an interrupted configuration). Metrics and `n` cover all `n` problems; the statistics only
  `stats_problems` of them: when that is less than `n` they do not describe the whole split
  (`TaskResult.partial_stats`; v2.report marks such rows). Absent (None) in records written
  before these fields and for tasks that generate nothing (loglikelihood: no statistics);
- `stats`: the statistics summed over the tasks;
- `speed`: the evaluation's own decoding wall and tokens/s (one timed pass: not comparable
  between configurations);
- `timing` (direct runner): tokens/s per batch size over `rounds` interleaved rounds; records
  with the same `timing.session` were timed together, so their tokens/s compare.

Old records (written before `runner`, `timing`, `command`, `date`, `note`, `stats_problems`,
`cached_problems`) still read: those fields are optional. Numbers are never rewritten: a record
is written once, atomically.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA = 1
RUNNERS = ("lm_eval", "direct")
REPO = Path(__file__).resolve().parents[1]


class RecordError(ValueError):
    """A summary.json that is not a valid record; the message lists what is wrong."""


def accuracy(scores: Sequence[bool | float]) -> dict:
    """A metric of per-problem scores (1 right, 0 wrong) as records hold it: {"value": the mean,
    "stderr": its standard error}, lm_eval's: the sample standard deviation / sqrt(n) (for 0/1
    scores sqrt(p(1-p)/(n-1))), computed as lm_eval's `mean_stderr` computes it. One problem has
    no spread to estimate: stderr None (lm_eval says "N/A", which v2/eval.py records as None).
    No problem: value and stderr None (nothing measured). The one accuracy with standard error:
    the direct backend's metrics, the training script's evaluation and the tuner's use it."""
    n = len(scores)
    if n == 0:
        return {"value": None, "stderr": None}
    mean = sum(scores) / n
    if n == 1:
        return {"value": mean, "stderr": None}
    stddev = math.sqrt(sum((x - mean) ** 2 for x in scores) / (n - 1))
    return {"value": mean, "stderr": stddev / math.sqrt(n)}


@dataclass
class TaskResult:
    n: int
    metrics: dict[str, dict]  # name -> {"value": float, "stderr": float | None}
    stats: dict = field(default_factory=dict)
    # problems the statistics cover (decoded in the run that wrote the record) and problems
    # answered from lm_eval's request cache; None: not recorded (old record, or no generation)
    stats_problems: int | None = None
    cached_problems: int | None = None

    @property
    def partial_stats(self) -> bool | None:
        """Whether the statistics cover fewer problems than the metrics (None: unknown)."""
        if self.stats_problems is None:
            return None
        return self.stats_problems < self.n


@dataclass
class Timing:
    """Tokens/s of one configuration timed together with the others of its session: per batch
    size (a string key, JSON's), the problems decoded and tokens/s of every round."""

    session: str
    rounds: int
    batches: dict[str, dict]  # "32" -> {"problems": int, "tokens_per_second_rounds": [float]}
    warmup: str | None = None


@dataclass
class Record:
    model: str
    pretrained: str
    config: dict
    tasks: dict[str, TaskResult]
    stats: dict
    limit: int | None = None
    smoke_test: bool = False
    runner: str = "lm_eval"
    speed: dict | None = None
    timing: Timing | None = None
    env: dict = field(default_factory=dict)
    results_file: str | None = None
    command: str | None = None
    date: str | None = None
    note: str | None = None
    schema: int = SCHEMA

    def to_dict(self) -> dict:
        d = asdict(self)
        for t in d["tasks"].values():  # old readers and records: no null coverage fields
            for k in ("stats_problems", "cached_problems"):
                if t.get(k) is None:
                    t.pop(k, None)
        return {k: v for k, v in d.items() if v is not None or k in ("limit", "speed")}

    @classmethod
    def from_dict(cls, d: dict) -> Record:
        bad = problems(d)
        if bad:
            raise RecordError("; ".join(bad))
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        kw["tasks"] = {name: TaskResult(**t) for name, t in d["tasks"].items()}
        if d.get("timing"):
            kw["timing"] = Timing(**d["timing"])
        return cls(**kw)

    @property
    def policy(self) -> str:
        return (self.config.get("policy") or {}).get("policy") or "none"


def problems(d) -> list[str]:
    """What makes `d` not a record ([] if nothing)."""
    if not isinstance(d, dict):
        return ["not a JSON object"]
    out = []
    if d.get("schema") != SCHEMA:
        out.append(f"schema {d.get('schema')!r}, expected {SCHEMA}")
    if d.get("runner", "lm_eval") not in RUNNERS:
        out.append(f"runner {d.get('runner')!r}, expected one of {', '.join(RUNNERS)}")
    for key in ("model", "pretrained"):
        if not isinstance(d.get(key), str):
            out.append(f"no {key}")
    if not isinstance(d.get("config"), dict):
        out.append("no config")
    tasks = d.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        out.append("no tasks")
    else:
        for name, t in tasks.items():
            if not isinstance(t, dict) or not t.get("metrics"):
                out.append(f"no metrics for task {name}")
            elif not isinstance(t.get("n"), int):
                out.append(f"no n for task {name}")
            else:
                for key in ("stats_problems", "cached_problems"):
                    v = t.get(key)
                    if v is not None and (not isinstance(v, int) or not 0 <= v <= t["n"]):
                        out.append(f"{key} {v!r} for task {name}: not 0..n")
    if not isinstance(d.get("stats"), dict) or "executed_flops" not in d["stats"]:
        out.append("no stats")
    timing = d.get("timing")
    if timing is not None and not (
        isinstance(timing, dict) and isinstance(timing.get("batches"), dict) and "session" in timing
    ):
        out.append("timing without session and batches")
    return out


def check(d, expect: dict) -> list[str]:
    """What is wrong with record `d` for the run `expect` describes (tasks, limit, policy)."""
    bad = problems(d)
    if not isinstance(d, dict):
        return bad
    tasks = d.get("tasks") if isinstance(d.get("tasks"), dict) else {}
    bad += [f"no metrics for task {t}" for t in expect["tasks"] if t not in tasks]
    if d.get("limit") != expect["limit"]:
        bad.append(f"limit {d.get('limit')!r}, expected {expect['limit']!r}")
    policy = ((d.get("config") or {}).get("policy") or {}).get("policy", "none")
    if policy != expect["policy"]:
        bad.append(f"policy {policy!r}, expected {expect['policy']!r}")
    return bad


def read(path: Path) -> Record | None:
    """The record at `path`, or None if it does not parse or is not a valid record."""
    try:
        return Record.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_text(path: Path, text: str) -> Path:
    """Atomically (temp file + os.replace): readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: Path, data) -> Path:
    return write_text(path, json.dumps(data, indent=1) + "\n")


def write(path: Path, record: Record) -> Path:
    return write_json(path, record.to_dict())


def git_commit() -> str | None:
    """HEAD of this repository, marked when tracked files have uncommitted changes."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0 or not head.stdout.strip():
        return None
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def environment() -> dict:
    """Versions and hardware of this process (lm_eval's and transformers' where installed)."""
    import platform

    import torch

    env = {
        "git_commit": git_commit(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for name in ("transformers", "lm_eval"):
        try:
            env[name] = getattr(__import__(name), "__version__", None)
        except ImportError:
            env[name] = None
    return env
