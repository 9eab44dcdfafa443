"""A sweep's results as one markdown table per task and Pareto plots, from its summary.json files.

    python -m v2.report results/tiny_default [--out DIR] [--include-limit] [--metric NAME]

Reads results/<sweep>/<config_id>/<model>/summary.json (written by v2/eval.py); --limit runs
(results/<sweep>/_limit<N>/...) are smoke tests and are left out unless --include-limit, or
unless the folder given is a _limit<N> folder itself. Folders starting with "_" (manifests,
replaced runs, reports) are never read. Writes <out>/results.md and, per task,
<out>/pareto_flops_<task>.png and <out>/pareto_speed_<task>.png (default out: <dir>/_report).

Two FLOPs figures, because skipping changes how many forwards a block takes:
- per forward: executed FLOPs / the FLOPs the same forwards would have run with no skipping
  (the summary's flops_ratio);
- end to end: executed FLOPs of this configuration / executed FLOPs of the baseline
  configuration (policy none, same task, limit and decoding threshold) on the same problems.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

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


def load_summary(path: Path) -> dict | None:
    """A summary.json that parses and has the fields a table needs, else None."""
    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(s, dict) or s.get("schema") != 1 or not isinstance(s.get("tasks"), dict):
        return None
    return s


def newest_summary(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest readable <run_dir>/<model>/summary.json."""
    found = [(p.stat().st_mtime, p) for p in run_dir.glob("*/summary.json")]
    for _, path in sorted(found, reverse=True):
        s = load_summary(path)
        if s is not None:
            return path, s
    return None


@dataclass
class Row:
    """One (configuration, task) of a sweep."""

    config_id: str
    task: str
    summary: dict = field(repr=False)
    path: Path
    metric: str | None
    value: float | None
    stderr: float | None
    n: int
    stats: dict = field(repr=False)
    resumed: bool = False
    baseline: Row | None = field(default=None, repr=False)

    @property
    def policy(self) -> dict:
        return self.summary.get("config", {}).get("policy") or {"policy": "none"}

    @property
    def policy_name(self) -> str:
        return self.policy.get("policy") or "none"

    @property
    def threshold(self):
        return self.summary.get("config", {}).get("threshold")

    @property
    def limit(self) -> int | None:
        return self.summary.get("limit")

    @property
    def smoke(self) -> bool:
        return bool(self.summary.get("smoke_test")) or self.limit is not None

    @property
    def decode(self) -> str:
        """diffusion, or a causal decode (autoregressive, speculative: v2/speculative.py)."""
        return self.summary.get("config", {}).get("decode") or "diffusion"

    @property
    def is_baseline(self) -> bool:
        return self.policy_name == "none" and self.decode == "diffusion"

    @property
    def speed(self) -> dict:
        """summary.json's "speed" (v2/eval.py: the run's decoding wall, processes, timed passes)."""
        return self.summary.get("speed") or {}

    @property
    def processes(self) -> int:
        return int(
            self.speed.get("processes") or self.summary.get("config", {}).get("num_processes") or 1
        )

    @property
    def on_cpu(self) -> bool:
        return (self.summary.get("env") or {}).get("gpu") == "cpu"

    @property
    def tokens_per_second(self) -> float | None:
        """Aggregate tokens/s: generated tokens / the run's decoding wall time, all processes
        together. With several processes, `stats` holds the ranks' walls summed (its rate is
        neither aggregate nor per GPU): only summary "speed" gives it, and only for a summary of
        this task alone."""
        if self.speed.get("tokens_per_second_rounds"):
            return statistics.median(self.speed["tokens_per_second_rounds"])
        if self.speed and len(self.summary.get("tasks") or {}) == 1:
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
    def tokens_per_forward(self) -> float | None:
        return self.stats.get("tokens_per_forward")

    @property
    def forwards_per_problem(self) -> float | None:
        """Decoding row-forwards (denoise full + sub-block + commit) per problem."""
        rows = self.stats.get("row_forwards")
        if not rows or not self.n:
            return None
        return sum(rows.get(k, 0) for k in ("denoise_full", "denoise_sub", "commit")) / self.n

    @property
    def flops_ratio(self) -> float | None:
        return self.stats.get("flops_ratio")

    @property
    def end_to_end_ratio(self) -> float | None:
        """Executed FLOPs / the baseline configuration's, on the same problems."""
        b = self.baseline
        if b is None or b.n != self.n or not b.stats.get("executed_flops"):
            return None
        return self.stats.get("executed_flops", 0) / b.stats["executed_flops"]

    @property
    def flops_saving(self) -> float | None:
        """1 - the end-to-end ratio (what a Pareto plot puts on its x axis)."""
        r = self.end_to_end_ratio
        return None if r is None else 1.0 - r

    @property
    def skip_rate(self) -> float | None:
        e, b = self.stats.get("executed_units"), self.stats.get("baseline_units")
        return 1.0 - e / b if e is not None and b else None


def rows_from_summary(
    config_id: str, path: Path, summary: dict, metric: str | None = None, resumed: bool = False
) -> list[Row]:
    """One row per task of a summary; a task's own stats when the summary has them."""
    rows = []
    for task, t in summary["tasks"].items():
        metrics = t.get("metrics") or {}
        name = main_metric(metrics, metric)
        m = metrics.get(name) or {}
        rows.append(
            Row(
                config_id=config_id,
                task=task,
                summary=summary,
                path=path,
                metric=name,
                value=m.get("value"),
                stderr=m.get("stderr"),
                n=int(t.get("n") or 0),
                stats=t.get("stats") or summary.get("stats") or {},
                resumed=resumed,
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


def collect(sweep_dir: Path, include_limit: bool = False, metric: str | None = None) -> list[Row]:
    """Every (configuration, task) with a summary, each paired with its baseline, sorted:
    per task, baseline first, then by policy and id."""
    rows: list[Row] = []
    for label, d in run_dirs(Path(sweep_dir), include_limit):
        found = newest_summary(d)
        if found:
            rows += rows_from_summary(label, found[0], found[1], metric, _resumed(d))
    for r in rows:
        r.baseline = find_baseline(r, rows)
    return sorted(rows, key=sort_key)


def find_baseline(row: Row, rows: list[Row]) -> Row | None:
    """The policy-none row of the same task, limit and decoding threshold (a baseline at another
    threshold decodes differently: comparing with it would credit the policy with that change)."""
    same = (
        b
        for b in rows
        if b.is_baseline and (b.task, b.limit, b.threshold) == (row.task, row.limit, row.threshold)
    )
    return next(same, None)


def sort_key(r: Row) -> tuple:
    order = POLICY_ORDER.index(r.policy_name) if r.policy_name in POLICY_ORDER else 99
    return (r.task, r.limit or 0, not r.is_baseline, order, r.config_id)


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


TABLE_HEADER = (
    "| config | n | accuracy % | tokens/s | tokens/fwd | fwd/problem "
    "| FLOPs/fwd vs no skip | FLOPs vs baseline run | skip rate |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


SINGLE_PASS = "‡"


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


def table_row(r: Row) -> str:
    mark = " †" if r.resumed else ""
    return (
        f"| {'**' + r.config_id + '**' if r.is_baseline else r.config_id}{mark} | {n_text(r)} "
        f"| {accuracy_text(r)} | {speed_text(r)} "
        f"| {_num(r.tokens_per_forward)} | {_num(r.forwards_per_problem, '.1f')} "
        f"| {_pct(r.flops_ratio)} | {_pct(r.end_to_end_ratio)} | {_pct(r.skip_rate)} |"
    )


CAUSAL_HEADER = (
    "| config | decode | n | accuracy % | tokens/s | tokens/verify fwd | acceptance "
    "| verify fwd/problem | GFLOPs/problem |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|"
)


def causal_row(r: Row) -> str:
    """A causal decode's row: tokens per full-model causal (verify) forward, draft acceptance."""
    s, n = r.stats, max(r.n, 1)
    spec = r.decode == "speculative"
    return (
        f"| {r.config_id} | {r.decode} | {n_text(r)} | {accuracy_text(r)} "
        f"| {speed_text(r)} | {_num(s.get('tokens_per_verify_forward'))} "
        f"| {_pct(s.get('acceptance_rate')) if spec else '-'} "
        f"| {_num(s.get('verify_row_forwards', 0) / n, '.1f')} "
        f"| {_num(s.get('executed_flops', 0) / n / 1e9, '.1f')} |"
    )


def markdown(rows: list[Row], sweep_dir: Path, plots: dict[str, list[Path]], command: str) -> str:
    d = Path(sweep_dir).resolve()
    name = f"{d.parent.name}/{d.name}" if d.name.startswith("_limit") else d.name
    lines = [f"# Results: {name}", "", f"Made by `{command}` from {len(rows)} rows.", ""]
    if any(r.smoke for r in rows):
        lines += [
            "> **Smoke test**: rows marked `limit` ran on the first N problems only (--limit);",
            "> they check that the pipeline works and are not results.",
            "",
        ]
    lines += speed_notes(rows)
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
        lines += [f"![{p.stem}]({p.name})" for p in plots.get(task, [])]
        lines.append("")
    lines += [
        "Columns: tokens/fwd = generated tokens per decoding row-forward; fwd/problem = decoding",
        "row-forwards (denoise + commit) per problem; FLOPs/fwd vs no skip = executed FLOPs / the",
        "same forwards with every unit computed (per-forward saving); FLOPs vs baseline run =",
        "executed FLOPs / those of the baseline configuration on the same problems (end to end);",
        "skip rate = 1 - executed / no-skip (row, position, layer) units; tokens/s = generated",
        "tokens / the run's decoding wall time, all processes together (data-parallel runs add",
        "tokens/s per GPU = that / the processes).",
    ]
    if any(r.tokens_per_second is not None and len(r.speed_rounds) < 2 for r in rows):
        lines.append(
            f"{SINGLE_PASS} tokens/s from a single timed pass: not comparable between "
            "configurations (no spread over repeated, interleaved rounds; "
            "`python -m v2.tiny.policy_sweep` times in rounds)."
        )
    if any(r.resumed for r in rows):
        lines.append(
            "† resumed from lm_eval's request cache after an interruption: accuracy covers every "
            "problem, but the speed and FLOPs figures cover only the problems run in the last "
            "attempt."
        )
    lines += ["", "## Runs", "", "| config | policy | threshold | batch | gpu | git | summary |"]
    lines.append("|---|---|---|---|---|---|---|")
    for r in {id(r.summary): r for r in rows}.values():
        cfg, env = r.summary.get("config", {}), r.summary.get("env", {})
        opts = ", ".join(f"{k}={v}" for k, v in r.policy.items() if k != "policy" and v is not None)
        lines.append(
            f"| {r.config_id} | {r.policy_name}{' (' + opts + ')' if opts else ''} "
            f"| {cfg.get('threshold', '-')} | {cfg.get('batch_size', '-')} "
            f"| {env.get('gpu', '-')} | {str(env.get('git_commit', '-'))[:10]} "
            f"| `{r.path.relative_to(sweep_dir)}` |"
        )
    return "\n".join(lines) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (higher is better on both), by x."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return sorted(front)


def point_labels(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """One label per plotted position, by x: configurations that land on the same point (to 0.1
    on both axes, e.g. settings that skip nothing) share one label, a name per line."""
    merged: dict[tuple[float, float], list[str]] = {}
    for x, y, name in points:
        merged.setdefault((round(x, 1), round(y, 1)), []).append(name)
    return [(x, y, "\n".join(names)) for (x, y), names in sorted(merged.items())]


def plot(rows: list[Row], x_of, x_label: str, title: str, path: Path, speed: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(x_of(r), r) for r in rows if x_of(r) is not None and r.value is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for x, r in pts:
        y, err = 100 * r.value, 100 * (r.stderr or 0)
        style = dict(marker="o")
        if r.is_baseline:
            style = dict(marker="*", ms=14, color="tab:red", zorder=3)
        ax.errorbar(x, y, yerr=err, capsize=3, ls="none", **style)
    labels = point_labels([(x, 100 * r.value, r.config_id) for x, r in pts])
    for i, (x, y, text) in enumerate(labels):
        # neighbours (by x) go above, below, further above, further below their points
        dy = (5, -5, 15, -15)[i % 4]
        ax.annotate(
            text,
            (x, y),
            textcoords="offset points",
            xytext=(5, dy),
            va="bottom" if dy > 0 else "top",
            fontsize=7,
        )
    front = pareto_front([(x, 100 * r.value) for x, r in pts])
    if len(front) > 1:
        ax.plot(*zip(*front, strict=True), ls="--", lw=1, color="gray", label="Pareto front")
        ax.legend(loc="lower left", fontsize=8)
    ax.margins(x=0.15, y=0.1)
    ax.set_xlabel(x_label)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title + (" [smoke test: --limit]" if any(r.smoke for _, r in pts) else ""))
    if speed and pts:
        if any(r.on_cpu for _, r in pts):
            warning = "CPU: tokens/s are not results"
        elif any(len(r.speed_rounds) < 2 for _, r in pts):
            warning = "tokens/s of one timed pass each: not comparable"
        else:
            warning = "median of timed rounds; bars: min - max"
            for x, r in pts:
                lo, hi = min(r.speed_rounds), max(r.speed_rounds)
                ax.errorbar(
                    x, 100 * r.value, xerr=[[x - lo], [hi - x]], capsize=2, ls="none", color="gray"
                )
        ax.text(
            0.99,
            0.01,
            warning,
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=8,
            color="tab:red",
        )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def flops_x(r: Row) -> float | None:
    """Executed-FLOPs saving in percent: end to end when the baseline ran, else per forward."""
    if r.flops_saving is not None:
        return 100 * r.flops_saving
    return None if r.flops_ratio is None else 100 * (1 - r.flops_ratio)


def build(
    sweep_dir: Path,
    out: Path | None = None,
    include_limit: bool = False,
    metric: str | None = None,
    command: str | None = None,
) -> tuple[Path, list[Path], list[Row]]:
    """Write <out>/results.md and the plots; returns (results.md, plots, rows)."""
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out else sweep_dir / "_report"
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(sweep_dir, include_limit, metric)
    plots: dict[str, list[Path]] = {}
    for task in dict.fromkeys(r.task for r in rows):
        trows = [r for r in rows if r.task == task]
        safe = task.replace("/", "_")
        e2e = any(r.flops_saving is not None for r in trows)
        plots[task] = [
            plot(
                trows,
                flops_x,
                "executed FLOPs saved vs the baseline run (%)"
                if e2e
                else "executed FLOPs saved per forward (%)",
                f"{task}: accuracy vs compute",
                out / f"pareto_flops_{safe}.png",
            ),
            plot(
                trows,
                lambda r: r.tokens_per_second,
                "tokens/s (all processes together)",
                f"{task}: accuracy vs speed",
                out / f"pareto_speed_{safe}.png",
                speed=True,
            ),
        ]
    command = command or f"python -m v2.report {sweep_dir}" + (
        " --include-limit" if include_limit else ""
    )
    md = out / "results.md"
    md.write_text(markdown(rows, sweep_dir, plots, command))
    return md, [p for ps in plots.values() for p in ps], rows


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
    md, plots, rows = build(args.sweep_dir, args.out, args.include_limit, args.metric)
    if not rows:
        print(f"no summary.json under {args.sweep_dir} (--include-limit for --limit runs)")
        return 1
    print(md.read_text())
    print(f"written: {md}")
    for p in plots:
        print(f"plot: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
