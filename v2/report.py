"""A sweep's results as one markdown table per task and Pareto plots, from its records
(summary.json, v2/record.py), whichever runner (lm_eval or direct) wrote them.

    python -m v2.report results/tiny_default [--out DIR] [--include-limit] [--metric NAME]
    python -m v2.report docs/results/data --out docs/results     (a folder of sweeps)

Reads results/<sweep>/<config_id>/<model>/summary.json; given a folder of sweeps instead, writes
one page per sweep, <out>/<sweep>.md with its plots beside it. --limit runs
(results/<sweep>/_limit<N>/...) are smoke tests and are left out unless --include-limit, or
unless the folder given is a _limit<N> folder itself. Folders starting with "_" (manifests,
replaced runs, reports) are never read. Writes <out>/results.md and, per task,
<out>/pareto_flops_<task>.png and <out>/pareto_speed_<task>.png (default out: <dir>/_report).

Rows (and the run numbers, counted in table order) follow one order, `run_order`, shared with the
runner's --status: the sweep file's order where the sweep is known (the runner's closing report);
records found on disk with no sweep known (this command): the baseline first, then by policy
(none, token, layer, reuse, others) and id.

Baselines come from the same sweep: for accuracy and FLOPs the policy-none configuration of the
same task, limit and decoding threshold; for tokens/s only a baseline timed in the same session
(the direct runner's interleaved rounds, `timing.session`), shown as median [min - max] over the
rounds. A tokens/s from one timed pass (lm_eval's, or a session of one round) is marked
not comparable. Conclusions are prose in docs/, not generated here.

Two FLOPs figures, because skipping changes how many forwards a block takes:
- per forward: executed FLOPs / the FLOPs the same forwards would have run with no skipping
  (the summary's flops_ratio);
- end to end: executed FLOPs of this configuration / executed FLOPs of the baseline
  configuration (policy none, same task, limit and decoding threshold) on the same problems.

Skip rate and padding (v2/stats.py): skip rate = 1 - useful / no-skip units, 0 for the baseline;
padding = executed units that are not useful / no-skip units, its own column, per layer too.
A record written before padding was counted apart is marked "padding not separated" (¶): its
skip rate is the recorded 1 - executed / no-skip units. A configuration with nothing measured
in the run that wrote its record (every answer from lm_eval's request cache) shows `-` for
tokens/s, tokens per forward and FLOPs (§), and neither plot draws it; both say so. Markers
that would overlap on a plot are drawn apart around their point and listed (v2/plotting.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from v2 import record
from v2.record import Record

# First present wins; gsm-like tasks report flexible-extract exact match.
METRIC_PREFERENCE = (
    "exact_match,flexible-extract",
    "exact_match,strict-match",
    "exact_match,none",
    "pass@1,create_test",
    "pass_at_1,none",
    "prompt_level_strict_acc,none",
    "acc,none",
    "acc_norm,none",
)
POLICY_ORDER = ("none", "token", "layer", "reuse")


def main_metric(metrics: dict, preferred: str | None = None) -> str | None:
    """The metric a table shows for a task: `preferred` if present, else the first of
    METRIC_PREFERENCE present, else the first metric in the summary."""
    if preferred and preferred in metrics:
        return preferred
    for name in METRIC_PREFERENCE:
        if name in metrics:
            return name
    return next(iter(metrics), None)


def newest_summary(run_dir: Path) -> tuple[Path, Record] | None:
    """The newest valid record <run_dir>/<model>/summary.json."""
    found = [(p.stat().st_mtime, p) for p in run_dir.glob("*/summary.json")]
    for _, path in sorted(found, reverse=True):
        rec = record.read(path)
        if rec is not None:
            return path, rec
    return None


@dataclass
class Row:
    """One (configuration, task) of a sweep."""

    config_id: str
    task: str
    rec: Record = field(repr=False)
    path: Path
    metric: str | None
    value: float | None
    stderr: float | None
    n: int
    stats: dict = field(repr=False)
    resumed: bool = False
    # problems the statistics cover / answered from lm_eval's request cache (None: not recorded)
    stats_problems: int | None = None
    cached_problems: int | None = None
    baseline: Row | None = field(default=None, repr=False)
    # the baseline timed in the same session (interleaved rounds), the only one to compare speed
    session_baseline: Row | None = field(default=None, repr=False)

    @property
    def policy(self) -> dict:
        return self.rec.config.get("policy") or {"policy": "none"}

    @property
    def policy_name(self) -> str:
        return self.rec.policy

    @property
    def threshold(self):
        return self.rec.config.get("threshold")

    @property
    def limit(self) -> int | None:
        return self.rec.limit

    @property
    def smoke(self) -> bool:
        return self.rec.smoke_test or self.limit is not None

    @property
    def decode(self) -> str:
        """diffusion, or a causal decode (autoregressive, speculative: v2/speculative.py)."""
        return self.rec.config.get("decode") or "diffusion"

    @property
    def is_baseline(self) -> bool:
        return self.policy_name == "none" and self.decode == "diffusion"

    @property
    def speed(self) -> dict:
        """The record's "speed" (v2/eval.py: the run's decoding wall, processes, timed passes)."""
        return self.rec.speed or {}

    @property
    def processes(self) -> int:
        return int(self.speed.get("processes") or self.rec.config.get("num_processes") or 1)

    @property
    def on_cpu(self) -> bool:
        return self.rec.env.get("gpu") == "cpu"

    @property
    def tokens_per_second(self) -> float | None:
        """Aggregate tokens/s of the evaluation: generated tokens / the run's decoding wall time,
        all processes together. With several processes, `stats` holds the ranks' walls summed
        (its rate is neither aggregate nor per GPU): only the record's "speed" gives it, and
        only for a record of this task alone. None where nothing was measured."""
        if not self.measured:
            return None
        if self.speed.get("tokens_per_second_rounds"):
            return statistics.median(self.speed["tokens_per_second_rounds"])
        if self.speed and len(self.rec.tasks) == 1:
            return self.speed.get("tokens_per_second")
        return self.stats.get("tokens_per_second") if self.processes == 1 else None

    @property
    def tokens_per_second_per_gpu(self) -> float | None:
        tps = self.tokens_per_second
        return None if tps is None else tps / self.processes

    @property
    def speed_rounds(self) -> list[float]:
        """tokens/s of each repeated timed round, where the run had several ([] otherwise)."""
        return list(self.speed.get("tokens_per_second_rounds") or [])

    @property
    def session(self) -> str | None:
        return self.rec.timing.session if self.rec.timing else None

    def timed(self, batch: str) -> list[float]:
        """tokens/s of each interleaved round at this batch size ([] if not timed)."""
        t = self.rec.timing
        return list((t.batches.get(batch) or {}).get("tokens_per_second_rounds") or []) if t else []

    def timed_ratio(self, batch: str) -> float | None:
        """Median tokens/s at `batch` over that of the baseline of the same timing session."""
        b = self.session_baseline
        mine, theirs = self.timed(batch), b.timed(batch) if b else []
        if not mine or not theirs:
            return None
        return statistics.median(mine) / statistics.median(theirs)

    @property
    def partial_stats(self) -> bool:
        """The statistics cover fewer problems than the accuracy: the record's counts say so
        (stats_problems < n), or, for a record without them, the runner's DONE marker says the
        run resumed from a request cache."""
        if self.stats_problems is not None:
            return self.stats_problems < self.n
        return self.resumed

    @property
    def measured(self) -> bool:
        """Whether the run that wrote the record decoded any problem of this row: False when
        every answer came from lm_eval's request cache (a rerun after an interruption:
        stats_problems 0), or when its statistics hold no generated token and no forward (the
        same in a record from before the counts; or a task that generates nothing). Then its
        tokens/s, tokens per forward and FLOPs are not numbers: the table shows `-` and no plot
        draws it (NOTHING_NOTE)."""
        if self.stats_problems == 0:
            return False
        s = self.stats
        forwards = sum((s.get("row_forwards") or {}).values()) + (s.get("verify_row_forwards") or 0)
        return bool(s.get("generated_tokens")) or forwards > 0

    @property
    def stats_n(self) -> int:
        """The problems the statistics cover (n where the record does not say)."""
        return self.n if self.stats_problems is None else self.stats_problems

    @property
    def tokens_per_forward(self) -> float | None:
        return self.stats.get("tokens_per_forward") if self.measured else None

    @property
    def forwards_per_problem(self) -> float | None:
        """Decoding row-forwards (denoise full + sub-block + commit) per problem decoded."""
        rows = self.stats.get("row_forwards")
        if not rows or not self.stats_n or not self.measured:
            return None
        return sum(rows.get(k, 0) for k in ("denoise_full", "denoise_sub", "commit")) / self.stats_n

    @property
    def flops_ratio(self) -> float | None:
        return self.stats.get("flops_ratio") if self.measured else None

    @property
    def end_to_end_ratio(self) -> float | None:
        """Executed FLOPs / the baseline configuration's, on the same problems (none when
        either's statistics cover only part of them)."""
        b = self.baseline
        if b is None or b.n != self.n or not b.stats.get("executed_flops"):
            return None
        if not (self.measured and b.measured):
            return None
        if self.partial_stats or b.partial_stats:
            return None
        return self.stats.get("executed_flops", 0) / b.stats["executed_flops"]

    @property
    def flops_saving(self) -> float | None:
        """1 - the end-to-end ratio (what a Pareto plot puts on its x axis)."""
        r = self.end_to_end_ratio
        return None if r is None else 1.0 - r

    @property
    def padding_separated(self) -> bool:
        """Whether the record counts padding apart from useful units (stats.py): records
        written before it do not (their executed units include the padding)."""
        return "padding_units" in self.stats

    @property
    def skip_rate(self) -> float | None:
        """1 - useful / no-skip units; in a record that does not separate padding, 1 - executed
        / no-skip units as it was recorded (padding included: negative where it exceeds the
        skipping)."""
        e, b = self.stats.get("executed_units"), self.stats.get("baseline_units")
        if e is None or not b or not self.measured:
            return None
        return 1.0 - (e - self.stats.get("padding_units", 0)) / b

    @property
    def padding_rate(self) -> float | None:
        """Padding / no-skip units (None where the record does not separate it)."""
        b = self.stats.get("baseline_units")
        if not self.padding_separated or not b or not self.measured:
            return None
        return self.stats["padding_units"] / b

    def per_layer(self) -> tuple[list[float], list[float] | None] | None:
        """(skip rate, padding rate) per layer, as `skip_rate` and `padding_rate` (padding None
        where not separated); None where nothing was measured or nothing is recorded."""
        s = self.stats
        skip = s.get("skip_rate_per_layer")
        if not skip or not self.measured:
            return None
        return list(skip), s.get("padding_rate_per_layer") if self.padding_separated else None


def rows_from_summary(
    config_id: str, path: Path, rec: Record, metric: str | None = None, resumed: bool = False
) -> list[Row]:
    """One row per task of a record; a task's own stats when the record has them."""
    rows = []
    for task, t in rec.tasks.items():
        name = main_metric(t.metrics, metric)
        # counts of a task with statistics of its own, or of the record's only task
        own = bool(t.stats) or len(rec.tasks) == 1
        m = t.metrics.get(name) or {}
        rows.append(
            Row(
                config_id=config_id,
                task=task,
                rec=rec,
                path=path,
                metric=name,
                value=m.get("value"),
                stderr=m.get("stderr"),
                n=int(t.n or 0),
                stats=t.stats or rec.stats or {},
                resumed=resumed,
                stats_problems=t.stats_problems if own else None,
                cached_problems=t.cached_problems if own else None,
            )
        )
    return rows


def _resumed(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / "DONE").read_text()).get("resumed_from_cache"))
    except (OSError, ValueError, AttributeError):
        return False


def run_dirs(sweep_dir: Path, include_limit: bool = False) -> list[tuple[str, Path]]:
    """(label, folder) of every configuration folder; limit runs are labelled _limit<N>/<id>."""
    out = []
    for d in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        if d.name.startswith("_limit") and include_limit:
            out += [(f"{d.name}/{c.name}", c) for c in sorted(d.iterdir()) if c.is_dir()]
        elif not d.name.startswith("_"):
            out.append((d.name, d))
    return out


def collect(
    sweep_dir: Path, include_limit: bool = False, metric: str | None = None, order=()
) -> list[Row]:
    """Every (configuration, task) with a summary, each paired with its baseline, sorted per
    task by `run_order` (`order`: the sweep's configuration ids, where the sweep is known)."""
    rows: list[Row] = []
    for label, d in run_dirs(Path(sweep_dir), include_limit):
        found = newest_summary(d)
        if found:
            rows += rows_from_summary(label, found[0], found[1], metric, _resumed(d))
    for r in rows:
        r.baseline = find_baseline(r, rows)
    return sorted(rows, key=lambda r: sort_key(r, order))


def find_baseline(row: Row, rows: list[Row]) -> Row | None:
    """The policy-none row of the same task, limit and decoding threshold (a baseline at another
    threshold decodes differently: comparing with it would credit the policy with that change).
    Also sets row.session_baseline: such a row timed in the same session, if any."""
    same = [
        b
        for b in rows
        if b.is_baseline and (b.task, b.limit, b.threshold) == (row.task, row.limit, row.threshold)
    ]
    row.session_baseline = next(
        (b for b in same if row.session is not None and b.session == row.session), None
    )
    return same[0] if same else None


def run_order(config_id: str, sweep_ids=(), policy: str = "", baseline: bool = False) -> tuple:
    """The one order of a sweep's configurations, for the report's tables and run numbers and
    for the runner's --status and its closing report (v2/runs/cli.py). Where the sweep is
    known (`sweep_ids`: its configurations' ids in the sweep file's order), that order. The
    records of configurations not in it, or all records where no sweep is known (`python -m
    v2.report DIR` reads what it finds on disk), come after, in this order: the baseline first,
    then by policy (POLICY_ORDER, others last), then by id. A `_limit<N>/` label is its id."""
    ids = list(sweep_ids)
    cid = config_id.rsplit("/", 1)[-1]
    if cid in ids:
        return (0, ids.index(cid))
    rank = POLICY_ORDER.index(policy) if policy in POLICY_ORDER else len(POLICY_ORDER)
    return (1, not baseline, rank, config_id)


def sort_key(r: Row, sweep_ids=()) -> tuple:
    """A row's place: per task and limit, `run_order`."""
    return (r.task, r.limit or 0, *run_order(r.config_id, sweep_ids, r.policy_name, r.is_baseline))


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f} %"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def accuracy_text(r: Row) -> str:
    if r.value is None:
        return "-"
    err = f" ± {100 * r.stderr:.2f}" if r.stderr is not None else ""
    return f"{100 * r.value:.2f}{err}"


def n_text(r: Row) -> str:
    return f"{r.n} (limit {r.limit})" if r.limit is not None else str(r.n)


def coverage_text(r: Row) -> str:
    """The problems the statistics cover, of the accuracy's (and answered from the cache)."""
    if r.stats_problems is None:
        return "-"
    cached = f" ({r.cached_problems} cached)" if r.cached_problems else ""
    return f"{r.stats_problems} of {r.n}{cached}"


TABLE_HEADER = (
    "| config | n | accuracy % | tokens/s | tokens/fwd | fwd/problem "
    "| FLOPs/fwd vs no skip | FLOPs vs baseline run | skip rate | padding |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


SINGLE_PASS = "‡"
PARTIAL = "†"
NOTHING = "§"
NOT_SEPARATED = "¶"
# what a row with nothing measured is (Row.measured), in the table's note and under the plots
NOTHING_WHY = (
    "nothing measured: no problem of it was decoded in the run that wrote its record (every "
    "answer came from lm_eval's request cache, e.g. a rerun after an interruption, or the task "
    "generates nothing)"
)
NOTHING_NOTE = (
    f"{NOTHING} {NOTHING_WHY}: its tokens/s, tokens/fwd, fwd/problem, FLOPs, skip rate and "
    "padding are `-`, not numbers, and no plot draws it (each names it under the axes). "
    "`python -m v2.experiments SWEEP.yaml --force ID` decodes the configuration again."
)
NOT_SEPARATED_NOTE = (
    f"{NOT_SEPARATED} padding not separated: a record written before padding was counted apart "
    "from useful units. Its executed units include the padding (rows waiting or finished in the "
    "batch, graph-bucket slots, units computed and discarded by the masked layout), so its skip "
    "rate is 1 - executed / no-skip units, negative where the padding exceeds the skipping, and "
    "its padding is `-`. A CPU run (exact shapes) has no padding: there the rate is the skip rate."
)
PARTIAL_NOTE = (
    f"{PARTIAL} statistics over part of the problems: the configuration was resumed from "
    "lm_eval's request cache after an interruption (the runner keeps the cache: greedy answers "
    "are deterministic), so its accuracy covers every problem but tokens/s, tokens/fwd, "
    "fwd/problem, FLOPs and acceptance cover only the problems decoded in the last attempt "
    "(the runs table's `stats cover`{unknown}) and are not compared end to end with the "
    "baseline. "
    "`python -m v2.experiments SWEEP.yaml --force ID` redoes the configuration from scratch "
    "(its old folder, cache included, is moved to `_replaced/`)."
)


def speed_text(r: Row) -> str:
    """tokens/s with its spread over repeated rounds (`median [min - max]`), or marked ‡ when
    it comes from one timed pass (not comparable); data-parallel runs add the per-GPU rate."""
    tps = r.tokens_per_second
    if tps is None:
        return "-"
    rounds = r.speed_rounds
    text = (
        f"{tps:.1f} [{min(rounds):.1f} - {max(rounds):.1f}]"
        if len(rounds) > 1
        else f"{tps:.1f} {SINGLE_PASS}"
    )
    if r.processes > 1:
        text += f" ({r.processes} GPUs: {r.tokens_per_second_per_gpu:.1f}/GPU)"
    return text


def speed_notes(rows: list[Row]) -> list[str]:
    """What the tokens/s of these rows can and cannot say."""
    notes = []
    if any(r.on_cpu and r.tokens_per_second is not None for r in rows):
        notes += [
            "> **CPU run**: tokens/s measured on a CPU are not results: on a shared 2-core machine",
            "> identical work swung 25-40x between runs and re-ranked the policies.",
            "",
        ]
    return notes


def row_mark(r: Row) -> str:
    """§ for a row with nothing measured, else † for statistics over part of the problems."""
    if not r.measured:
        return f" {NOTHING}"
    return f" {PARTIAL}" if r.partial_stats else ""


def skip_text(r: Row) -> str:
    if r.skip_rate is None:
        return "-"
    return _pct(r.skip_rate) + ("" if r.padding_separated else f" {NOT_SEPARATED}")


def table_row(r: Row) -> str:
    return (
        f"| {'**' + r.config_id + '**' if r.is_baseline else r.config_id}{row_mark(r)} "
        f"| {n_text(r)} | {accuracy_text(r)} | {speed_text(r)} "
        f"| {_num(r.tokens_per_forward)} | {_num(r.forwards_per_problem, '.1f')} "
        f"| {_pct(r.flops_ratio)} | {_pct(r.end_to_end_ratio)} | {skip_text(r)} "
        f"| {_pct(r.padding_rate)} |"
    )


CAUSAL_HEADER = (
    "| config | decode | n | accuracy % | tokens/s | tokens/verify fwd | acceptance "
    "| verify fwd/problem | GFLOPs/problem |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|"
)


def causal_row(r: Row) -> str:
    """A causal decode's row: tokens per full-model causal (verify) forward, draft acceptance."""
    s, n = (r.stats if r.measured else {}), max(r.stats_n, 1)
    spec = r.decode == "speculative" and r.measured

    def per_problem(key: str, scale: float = 1.0) -> str:
        return _num(s[key] / n / scale, ".1f") if key in s else "-"

    return (
        f"| {r.config_id}{row_mark(r)} | {r.decode} | {n_text(r)} | {accuracy_text(r)} "
        f"| {speed_text(r)} | {_num(s.get('tokens_per_verify_forward'))} "
        f"| {_pct(s.get('acceptance_rate')) if spec else '-'} "
        f"| {per_problem('verify_row_forwards')} | {per_problem('executed_flops', 1e9)} |"
    )


def timing_batches(rows: list[Row]) -> list[str]:
    """The batch sizes any row was timed at in interleaved rounds, largest first."""
    found = {b for r in rows if r.rec.timing for b in r.rec.timing.batches}
    return sorted(found, key=int, reverse=True)


def rounds_text(values: list[float]) -> str:
    """`median [min - max]` over rounds; one round is marked not comparable."""
    if not values:
        return "-"
    if len(values) < 2:
        return f"{values[0]:.0f} {SINGLE_PASS}"
    return f"{statistics.median(values):.0f} [{min(values):.0f} - {max(values):.0f}]"


def ratio_text(r: Row, batch: str) -> str:
    if not r.timed(batch):
        return "-"
    if r.session_baseline is None:
        return "no baseline in its session"
    x = r.timed_ratio(batch)
    if x is None:
        return "-"
    one = len(r.timed(batch)) < 2 or len(r.session_baseline.timed(batch)) < 2
    return f"{x:.2f}x" + (f" {SINGLE_PASS}" if one else "")


def runs(rows: list[Row]) -> dict[tuple, int]:
    """Number each distinct run (command, date, hardware, commit, note), in table order."""
    out: dict[tuple, int] = {}
    for r in rows:
        out.setdefault(run_key(r), len(out) + 1)
    return out


def run_key(r: Row) -> tuple:
    e = r.rec.env
    return (r.rec.runner, r.rec.command, r.rec.date, e.get("gpu"), e.get("git_commit"), r.rec.note)


def markdown(rows: list[Row], sweep_dir: Path, plots: dict[str, list[Path]], command: str) -> str:
    d = Path(sweep_dir).resolve()
    name = f"{d.parent.name}/{d.name}" if d.name.startswith("_limit") else d.name
    lines = [
        f"# Results: {name}",
        "",
        f"Generated by `{command}` from {len(rows)} rows; do not edit by hand.",
        "",
    ]
    if any(r.smoke for r in rows):
        lines += [
            "> **Smoke test**: rows marked `limit` ran on the first N problems only (--limit);",
            "> they check that the pipeline works and are not results.",
            "",
        ]
    lines += speed_notes(rows)
    numbers = runs(rows)
    for task in dict.fromkeys(r.task for r in rows):
        trows = [r for r in rows if r.task == task]
        metrics = ", ".join(dict.fromkeys(str(r.metric) for r in trows))
        lines += [f"## {task}", "", f"Accuracy: `{metrics}`, mean ± standard error.", ""]
        lines += [TABLE_HEADER, *(table_row(r) for r in trows), ""]
        causal = [r for r in trows if r.decode != "diffusion"]
        if causal:
            lines += [
                "Causal decodes (the checkpoint as a causal model; speculative decoding gives the",
                "autoregressive decode's tokens by construction):",
                "",
                CAUSAL_HEADER,
                *(causal_row(r) for r in causal),
                "",
            ]
        batches = timing_batches(trows)
        if batches:
            lines += [
                "Tokens/s timed in interleaved rounds (after an untimed warm-up pass where the",
                "session says so), median [min - max] over the rounds, and the median over that of",
                "the baseline timed in the same session:",
                "",
                "| config | run | "
                + " | ".join(f"batch {b}: tokens/s | vs baseline" for b in batches)
                + " |",
                "|---|---:|" + "---:|---:|" * len(batches),
            ]
            for r in trows:
                if r.rec.timing:
                    cells = " | ".join(
                        f"{rounds_text(r.timed(b))} | {ratio_text(r, b)}" for b in batches
                    )
                    lines.append(f"| {r.config_id} | {numbers[run_key(r)]} | {cells} |")
            lines.append("")
        layers = [(r, r.per_layer()) for r in trows if r.per_layer()]
        if any(any(skip) or any(pad or ()) for _, (skip, pad) in layers):
            lines += [
                "Per layer, first to last: skip rate (1 - useful / no-skip units) and padding",
                "(padding / no-skip units):",
                "",
                "| config | skip rate per layer | padding per layer |",
                "|---|---|---|",
            ]
            for r, (skip, pad) in layers:
                mark = "" if r.padding_separated else f" {NOT_SEPARATED}"
                pads = "-" if pad is None else " ".join(f"{x:.2f}" for x in pad)
                skips = " ".join(f"{x:.2f}" for x in skip)
                lines.append(f"| {r.config_id} | {skips}{mark} | {pads} |")
            lines.append("")
        lines += [f"![{p.stem}]({p.name})" for p in plots.get(task, [])]
        lines.append("")
    lines += [
        "Columns: tokens/fwd = generated tokens per decoding row-forward; fwd/problem = decoding",
        "row-forwards (denoise + commit) per problem; FLOPs/fwd vs no skip = executed FLOPs / the",
        "same forwards with every unit computed (per-forward saving); FLOPs vs baseline run =",
        "executed FLOPs / those of the baseline configuration (same task, limit and decoding",
        "threshold) on the same problems (end to end); skip rate = 1 - useful / no-skip",
        "(row, position, layer) units (0 with no policy), useful = the executed units in scope",
        "that the plan computed; padding = the other executed units (rows waiting or finished in",
        "the batch, graph-bucket slots, units computed and discarded by the masked layout) /",
        "no-skip units: real work, in the executed FLOPs, never counted as skipping (executed /",
        "no-skip units = 1 - skip rate + padding); tokens/s = generated tokens / the evaluation's",
        "decoding wall time, all processes together (data-parallel runs add tokens/s per GPU =",
        "that / the processes).",
    ]
    if any(r.tokens_per_second is not None and len(r.speed_rounds) < 2 for r in rows):
        lines.append(
            f"{SINGLE_PASS} tokens/s from a single timed pass: not comparable between "
            "configurations (no spread over repeated, interleaved rounds; a sweep with "
            "`runner: direct` times in rounds)."
        )
    if any(not r.padding_separated and r.skip_rate is not None for r in rows):
        lines.append(NOT_SEPARATED_NOTE)
    if any(not r.measured for r in rows):
        lines.append(NOTHING_NOTE)
    if any(r.partial_stats and r.measured for r in rows):
        unknown = any(r.partial_stats and r.measured and r.stats_problems is None for r in rows)
        lines.append(
            PARTIAL_NOTE.format(
                unknown="; `-` there: a record from before the counts, flagged by the runner's "
                "DONE marker"
                if unknown
                else ""
            )
        )
    lines += ["", "## Runs", ""]
    lines += ["| config | run | runner | policy | threshold | batch | stats cover | record |"]
    lines.append("|---|---:|---|---|---|---|---|---|")
    by_record: dict[int, list[Row]] = {}
    for r in rows:
        by_record.setdefault(id(r.rec), []).append(r)
    for rs in by_record.values():
        r = rs[0]
        cover = (
            coverage_text(r)
            if len(rs) == 1
            else "; ".join(f"{x.task}: {coverage_text(x)}" for x in rs)
        )
        cfg = r.rec.config
        opts = ", ".join(f"{k}={v}" for k, v in r.policy.items() if k != "policy" and v is not None)
        lines.append(
            f"| {r.config_id} | {numbers[run_key(r)]} | {r.rec.runner} "
            f"| {r.policy_name}{' (' + opts + ')' if opts else ''} "
            f"| {cfg.get('threshold', '-')} | {cfg.get('batch_size', '-')} | {cover} "
            f"| `{r.path.relative_to(sweep_dir)}` |"
        )
    lines.append("")
    for (runner, cmd, date, gpu, git, note), k in numbers.items():
        lines.append(
            f"- run {k} ({runner} runner): {gpu or '-'}, git {git or '-'}, {date or 'no date'}"
        )
        if cmd:
            lines.append(f"  - command: `{cmd}`")
        if note:
            lines.append(f"  - note: {note}")
    return "\n".join(lines) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (higher is better on both), by x."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return sorted(front)


MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "h", "p", "d")


def styles(rows: list[Row]) -> dict[str, dict]:
    """One marker and colour per configuration (the same in every plot of a page); the baseline
    a large hollow red star, and no configuration red."""
    import matplotlib

    # strong colours first, then their light shades; red is the baseline's
    tab20 = matplotlib.colormaps["tab20"].colors
    palette = [tab20[i] for i in [*range(0, 20, 2), *range(1, 20, 2)] if i not in (6, 7)]
    out, k = {}, 0
    for r in rows:
        if r.config_id in out:
            continue
        if r.is_baseline:
            # hollow, on top: a configuration on the same spot shows through
            out[r.config_id] = dict(
                marker="*", ms=17, color="tab:red", mfc="none", mew=1.4, zorder=4
            )
        else:
            color = palette[k % len(palette)]
            out[r.config_id] = dict(marker=MARKERS[k % len(MARKERS)], ms=6, color=color, zorder=3)
            k += 1
    return out


def draw(ax, pts: list[tuple[Row, float, tuple[float, float] | None]], style: dict) -> list:
    """Each (row, x, x spread) as a marker with error bars, named in the legend (no text on the
    plot: labels cannot overlap); the baseline's accuracy as a dashed line; the Pareto front.
    Returns the markers (plotting.Marker) for `plotting.separate`, once the figure is laid out."""
    from v2.plotting import Marker

    markers = []
    for r, x, xerr in pts:
        y, err = 100 * r.value, 100 * (r.stderr or 0)
        label = r.config_id + (" (baseline)" if r.is_baseline and r.config_id != "baseline" else "")
        xe = None if xerr is None else [[x - xerr[0]], [xerr[1] - x]]
        st = style[r.config_id]
        bars = ax.errorbar(x, y, yerr=err, xerr=xe, capsize=2, ls="none", lw=0.8, label=label, **st)
        markers.append(Marker(r.config_id, x, y, bars.lines[0], st["ms"], r.is_baseline))
    base = [r for r, _, _ in pts if r.is_baseline]
    if base:
        ax.axhline(
            100 * base[0].value,
            color="tab:red",
            lw=0.7,
            ls=":",
            zorder=1,
            label="baseline accuracy",
        )
    front = pareto_front([(x, 100 * r.value) for r, x, _ in pts])
    if len(front) > 1:
        ax.plot(
            *zip(*front, strict=True), ls="--", lw=1, color="gray", zorder=2, label="Pareto front"
        )
    ax.margins(x=0.08, y=0.12)  # autoscaled: every point and error bar is inside the axes
    ax.grid(alpha=0.3)
    return markers


def build_figure(
    panels: list[tuple[str, list]], rows: list[Row], title: str, note: str | None = None
):
    """One plot per panel (x label, points), shared accuracy axis, one legend to the right;
    markers that would hide each other drawn around their common point and named in a note
    under the axes (v2/plotting.py). Returns (figure, notes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from v2.plotting import separate, spots_text

    style = styles(rows)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.6 * len(panels) + 2.6, 4.6), sharey=True, squeeze=False
    )
    notes = [note] if note else []
    markers = []
    for ax, (x_label, pts) in zip(axes[0], panels, strict=True):
        markers.append(draw(ax, pts, style))
        ax.set_xlabel(x_label)
    axes[0][0].set_ylabel("accuracy (%), bars: ± 1 s.e.")
    smoke = " [smoke test: --limit]" if any(r.smoke for r in rows) else ""
    fig.suptitle(title + smoke, fontsize=10)
    handles: dict[str, object] = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    if handles:
        fig.legend(
            handles.values(),
            handles.keys(),
            loc="upper left",
            bbox_to_anchor=(1.0, 0.93),
            fontsize=7,
            ncol=1 if len(handles) <= 24 else 2,
            frameon=False,
        )
    fig.tight_layout()
    for ax, ms, (x_label, _) in zip(axes[0], markers, panels, strict=True):
        if spots := separate(ax, ms):  # the axes' size is final: overlap is measured in points
            where = f"{x_label.split(':')[0]}: " if len(panels) > 1 else ""
            notes.append(where + spots_text(spots))
    if notes:  # below the axes; the saved image's bounding box takes it in
        text = "\n".join(textwrap.fill(n, 150, subsequent_indent="    ") for n in notes)
        fig.text(0.01, -0.01, text, fontsize=7.5, color="tab:red", ha="left", va="top")
    return fig, notes


def figure(
    panels: list[tuple[str, list]], rows: list[Row], title: str, path: Path, note: str | None = None
) -> Path:
    """`build_figure`, saved to `path`."""
    import matplotlib.pyplot as plt

    fig, _ = build_figure(panels, rows, title, note)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def flops_x(r: Row) -> float | None:
    """Executed-FLOPs saving in percent: end to end when the baseline ran, else per forward."""
    if r.flops_saving is not None:
        return 100 * r.flops_saving
    return None if r.flops_ratio is None else 100 * (1 - r.flops_ratio)


def not_drawn(rows: list[Row], partial: list[str] | None = None) -> str | None:
    """The note naming the rows a plot leaves out: nothing measured (NOTHING_WHY) and, where
    given, `partial` (statistics over part of the problems)."""
    parts = []
    if empty := [r.config_id for r in rows if not r.measured]:
        parts.append(f"not drawn: {', '.join(empty)} ({NOTHING} {NOTHING_WHY})")
    if partial:
        parts.append(
            f"not drawn: {', '.join(partial)} ({PARTIAL} statistics over part of the problems)"
        )
    return "; ".join(parts) or None


def flops_data(rows: list[Row]) -> tuple[str, list, str | None]:
    """The FLOPs plot's x label, points and note."""
    e2e = any(r.flops_saving is not None for r in rows)
    # statistics over part of the problems: no end-to-end saving, so not on an end-to-end axis
    left_out = [
        r.config_id
        for r in rows
        if e2e and r.measured and r.partial_stats and r.baseline is not None
    ]
    pts = [
        (r, flops_x(r), None)
        for r in rows
        if flops_x(r) is not None and r.value is not None and r.config_id not in left_out
    ]
    label = (
        "executed FLOPs saved vs the baseline run (%)"
        if e2e
        else "executed FLOPs saved per forward (%)"
    )
    return label, pts, not_drawn(rows, left_out)


def flops_plot(rows: list[Row], task: str, path: Path) -> Path:
    label, pts, note = flops_data(rows)
    return figure([(label, pts)], rows, f"{task}: accuracy vs compute", path, note)


def speed_data(rows: list[Row]) -> tuple[list, str | None]:
    """The speed plot's panels and note (`speed_plot`)."""
    batches = timing_batches(rows)
    panels, note = [], None
    for b in batches:
        pts = []
        for r in rows:
            x, base = r.timed_ratio(b), r.session_baseline
            if x is None or r.value is None:
                continue
            m = statistics.median(base.timed(b))
            pts.append((r, x, (min(r.timed(b)) / m, max(r.timed(b)) / m)))
        panels.append((f"batch {b}: tokens/s / the same session's baseline (bars: min - max)", pts))
    if batches:
        one = [len(r.timed(b)) < 2 for r in rows for b in batches if r.timed(b)]
        if any(one):
            who = "every configuration was" if all(one) else "some configurations were"
            note = f"{SINGLE_PASS} {who} timed in one round: ratios not comparable"
    else:
        pts = [
            (r, r.tokens_per_second, None)
            for r in rows
            if r.tokens_per_second is not None and r.value is not None
        ]
        panels = [("tokens/s (all processes together)", pts)]
        note = "tokens/s of one timed pass each: not comparable"
    if any(r.on_cpu for r in rows):
        note = "CPU: tokens/s are not results" + (f"; {note}" if note else "")
    if missing := not_drawn(rows):
        note = f"{note}; {missing}" if note else missing
    return panels, note


def speed_plot(rows: list[Row], task: str, path: Path) -> Path:
    """Timed rounds: tokens/s over the same session's baseline per batch size, bars min - max;
    otherwise the evaluations' single-pass tokens/s, marked not comparable."""
    panels, note = speed_data(rows)
    return figure(panels, rows, f"{task}: accuracy vs speed", path, note)


def build(
    sweep_dir: Path,
    out: Path | None = None,
    include_limit: bool = False,
    metric: str | None = None,
    command: str | None = None,
    stem: str | None = None,
    order=(),
) -> tuple[Path, list[Path], list[Row]]:
    """Write <out>/results.md (<out>/<stem>.md, plots prefixed <stem>_) and the plots; returns
    (the page, plots, rows); with no record found, writes nothing and returns (None, [], []).
    `order`: the sweep's configuration ids in its file's order, where known (`run_order`)."""
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out else sweep_dir / "_report"
    rows = collect(sweep_dir, include_limit, metric, order)
    if not rows:
        return None, [], []
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"{stem}_" if stem else ""
    plots: dict[str, list[Path]] = {}
    for task in dict.fromkeys(r.task for r in rows):
        trows = [r for r in rows if r.task == task]
        safe = task.replace("/", "_")
        plots[task] = [
            flops_plot(trows, task, out / f"{prefix}pareto_flops_{safe}.png"),
            speed_plot(trows, task, out / f"{prefix}pareto_speed_{safe}.png"),
        ]
    command = command or f"python -m v2.report {sweep_dir}" + (
        " --include-limit" if include_limit else ""
    )
    md = out / (f"{stem}.md" if stem else "results.md")
    md.write_text(markdown(rows, sweep_dir, plots, command))
    return md, [p for ps in plots.values() for p in ps], rows


def sweeps_in(folder: Path) -> list[Path]:
    """The sweep folders inside `folder` (a folder of sweeps has no records of its own)."""
    if any(any(d.glob("*/summary.json")) for _, d in run_dirs(folder)):
        return []
    return [d for _, d in run_dirs(folder) if any(d.glob("*/*/summary.json"))]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m v2.report", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", type=Path, help="results/<sweep> (or results/<sweep>/_limit<N>)")
    p.add_argument("--out", type=Path, default=None, help="default: <sweep_dir>/_report")
    p.add_argument("--include-limit", action="store_true", help="also read _limit<N> runs")
    p.add_argument("--metric", default=None, help="main metric, e.g. 'exact_match,strict-match'")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: no such folder {args.sweep_dir}", file=sys.stderr)
        return 2
    many = sweeps_in(args.sweep_dir)
    if many:
        argv = sys.argv[1:] if argv is None else argv
        command = shlex.join(["python", "-m", "v2.report", *argv])
        out = args.out or args.sweep_dir / "_report"
        for d in many:
            md, plots, rows = build(d, out, args.include_limit, args.metric, command, stem=d.name)
            if rows:
                print(f"written: {md} ({len(plots)} plots)")
        return 0
    md, plots, rows = build(args.sweep_dir, args.out, args.include_limit, args.metric)
    if not rows:
        print(
            f"error: no summary.json under {args.sweep_dir} (--include-limit for --limit runs); "
            "nothing written",
            file=sys.stderr,
        )
        return 1
    if args.metric and all(r.metric != args.metric for r in rows):
        shown = sorted({r.metric for r in rows if r.metric})
        print(
            f"warning: no record has the metric {args.metric!r}; shown instead: {', '.join(shown)}",
            file=sys.stderr,
        )
    print(md.read_text())
    print(f"written: {md}")
    for p in plots:
        print(f"plot: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
