"""Results pages from tiny-model policy sweeps (`python -m v2.tiny.policy_sweep` JSONs).

    python -m v2.tiny.sweep_report SWEEP.json [SWEEP.json ...] --out docs/results \\
        [--meta SWEEP.json KEY=VALUE ...]

Writes `token-skip.md` (token configs + baseline) and `layer-skip.md` (layer skip and scheduled
reuse configs + baseline), each with a PNG of accuracy vs executed FLOPs and one of accuracy vs
tokens/s. A page whose family has no config in the input is not written (the command says so).

Several JSONs are merged by config name, later files winning. `--meta FILE KEY=VALUE` adds or
replaces a metadata field of one input file for the page (e.g. `command=...` for a file written
before the sweep recorded the command as typed, `date=...`, `log=PATH`, `note=...`); the value
the JSON holds is still shown beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

BASELINE = "baseline"
WITHIN = 0.01  # "within 1 point" of baseline flexible accuracy
EPS = 1e-9

FAMILIES = {
    "token": {
        "policies": ("token",),
        "page": "token-skip",
        "title": "Token-level skipping across denoise steps on the tiny model",
        "goal": "at least 30 % fewer executed FLOPs at no more than 1 point of accuracy lost, "
        "and a wall-clock gain at batch 32",
        "goal_saving": 0.30,
        "goal_batch": 32,
    },
    "layer": {
        "policies": ("layer", "reuse"),
        "page": "layer-skip",
        "title": "Layer-level skipping and scheduled layer reuse on the tiny model",
        "goal": "at least 20 % fewer executed FLOPs at no more than 1 point of accuracy lost, "
        "with a matching wall-clock gain at batch 1",
        "goal_saving": 0.20,
        "goal_batch": 1,
    },
}


# ---------------------------------------------------------------- loading


@dataclass
class Source:
    path: Path
    meta: dict  # the JSON's own top-level fields (configs removed)
    override: dict = field(default_factory=dict)
    baseline: Row | None = None  # this file's own baseline config, merged away or not

    def get(self, key: str):
        return self.override.get(key, self.meta.get(key))


@dataclass
class Row:
    name: str
    policy: str
    options: dict
    source: int  # index into the sources list
    strict: dict
    flexible: dict
    stats: dict
    forwards_per_problem: float | None
    tps32: float | None
    tps1: float | None
    # filled against the baseline
    flops_e2e: float | None = None  # executed FLOPs per problem / baseline's
    tps32_ratio: float | None = None
    tps1_ratio: float | None = None
    tps250_ratio: float | None = None

    @property
    def flops_fwd(self) -> float | None:
        """Executed / the same forwards with nothing skipped (the per-forward saving)."""
        return self.stats.get("flops_ratio")

    @property
    def flops(self) -> float | None:
        """FLOPs relative to the baseline: end-to-end where the baseline is known."""
        return self.flops_e2e if self.flops_e2e is not None else self.flops_fwd

    @property
    def n(self) -> int:
        return int(self.flexible.get("n", 0))

    @property
    def tps250(self) -> float | None:
        return self.stats.get("tokens_per_second")

    @property
    def flops_per_token(self) -> float | None:
        tok = self.stats.get("generated_tokens")
        fl = self.stats.get("executed_flops")
        return fl / tok if tok and fl is not None else None


def load(paths: list[Path], meta_args: list[list[str]] | None = None):
    """Merge sweep JSONs by config name (later files win). Returns (sources, rows by name)."""
    sources: list[Source] = []
    rows: dict[str, Row] = {}
    for i, path in enumerate(paths):
        d = json.loads(Path(path).read_text())
        configs = d.pop("configs", {}) or {}
        sources.append(Source(Path(path), d))
        for name, c in configs.items():
            acc = c.get("accuracy")
            if not acc or "flexible" not in acc:
                print(f"warning: {path}: {name} has no accuracy; ignored", file=sys.stderr)
                continue
            rows[name] = row = Row(
                name=name,
                policy=c.get("policy", "none" if name == BASELINE else "?"),
                options=c.get("options", {}) or {},
                source=i,
                strict=acc.get("strict", {}),
                flexible=acc["flexible"],
                stats=acc.get("stats", {}) or {},
                forwards_per_problem=acc.get("forwards_per_problem"),
                tps32=c.get("tokens_per_second_b32"),
                tps1=c.get("tokens_per_second_b1"),
            )
            if name == BASELINE:
                sources[-1].baseline = row
    for file, kv in meta_args or []:
        key, sep, value = kv.partition("=")
        if not sep:
            raise SystemExit(f"error: --meta {file} {kv}: expected KEY=VALUE")
        match = [s for s in sources if _same(s.path, Path(file))]
        if not match:
            raise SystemExit(f"error: --meta {file}: not one of the input files")
        for s in match:
            s.override[key] = value
    base = rows.get(BASELINE)
    if base is not None:
        for r in rows.values():
            _relate(r, base)
    return sources, rows


def page_baseline(sources: list[Source], rows: dict[str, Row], frows: list[Row]) -> Row | None:
    """The baseline a page compares with: that of the run which measured most of the page's
    configs, when that run has one (speed ratios then stay within one run); else the merged
    one. Relates the page's rows to it."""
    counts: dict[int, int] = {}
    for r in frows:
        counts[r.source] = counts.get(r.source, 0) + 1
    base = rows.get(BASELINE)
    if counts:
        main = max(counts, key=lambda i: (counts[i], i))
        base = sources[main].baseline or base
    if base is not None:
        for r in [base, *frows]:
            _relate(r, base)
    return base


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return str(a) == str(b)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _relate(r: Row, base: Row) -> None:
    e, be = r.stats.get("executed_flops"), base.stats.get("executed_flops")
    if e is not None and be and r.n and base.n:
        r.flops_e2e = (e / r.n) / (be / base.n)
    r.tps32_ratio = _ratio(r.tps32, base.tps32)
    r.tps1_ratio = _ratio(r.tps1, base.tps1)
    r.tps250_ratio = _ratio(r.tps250, base.tps250)


def family_rows(rows: dict[str, Row], family: str) -> list[Row]:
    pol = FAMILIES[family]["policies"]
    return [r for name, r in rows.items() if name != BASELINE and r.policy in pol]


def planned(sources: list[Source]) -> list[str] | None:
    """The config names the runs meant to measure: each JSON's `planned` list; for a JSON
    written before the sweep recorded one, the sweep's CONFIGS (imported only then: it pulls
    torch in; None where that import fails)."""
    names: list[str] = []
    for s in sources:
        want = s.meta.get("planned")
        if want is None:
            try:
                from v2.tiny.policy_sweep import CONFIGS
            except Exception:  # e.g. no torch here: we cannot list what is missing
                return None
            want = [cid for cid, _, _ in CONFIGS]
        names += [n for n in want if n not in names]
    return names


def policy_of(name: str) -> str | None:
    if name == BASELINE:
        return "none"
    for prefix in ("token", "layer", "reuse"):
        if name.startswith(prefix + "_"):
            return prefix
    return None


# ---------------------------------------------------------------- analysis


def best_within(rows: list[Row], base: Row | None) -> tuple[Row | None, list[Row]]:
    """The setting with the largest FLOPs saving whose flexible accuracy is at most 1 point
    below the baseline's (ties: higher accuracy, then more tokens/s at batch 32)."""
    if base is None:
        return None, []
    floor = base.flexible["value"] - WITHIN - EPS
    ok = [r for r in rows if r.flexible["value"] >= floor and r.flops is not None]
    saving = [r for r in ok if r.flops < 1.0 - 1e-6]
    if not saving:
        return None, ok
    best = min(saving, key=lambda r: (r.flops, -r.flexible["value"], -(r.tps32 or 0.0)))
    return best, ok


def null_rows(rows: list[Row], base: Row | None) -> list[Row]:
    """Policy configs that executed exactly the baseline's work (disabled policies)."""
    if base is None:
        return []
    be = base.stats.get("executed_flops")
    return [
        r
        for r in rows
        if r.stats.get("executed_flops") == be
        and r.stats.get("executed_flops") == r.stats.get("baseline_flops")
        and r.n == base.n
    ]


def rows_order(rows: list[Row], base: Row | None) -> list[str]:
    """Config names in measurement order (the sweep writes configs as it runs them), for the
    configs from the baseline's own file."""
    if base is None:
        return []
    return [BASELINE] + [r.name for r in rows if r.source == base.source]


def spearman(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        rk = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                rk[order[k]] = (i + j) / 2
            i = j + 1
        return rk

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    vy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (vx * vy) if vx and vy else None


# ---------------------------------------------------------------- formatting


def pct(acc: dict) -> str:
    return f"{100 * acc['value']:.1f} ± {100 * acc.get('stderr', 0.0):.2f}"


def num(x: float | None, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def times(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def options_text(opts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in opts.items()) or "–"


def time_change(ratio: float | None) -> str:
    """Tokens/s ratio -> change of wall-clock time per token."""
    if not ratio:
        return "–"
    d = 1.0 / ratio - 1.0
    return f"{'+' if d >= 0 else '−'}{abs(100 * d):.0f} % wall-clock per token"


def short(name: str) -> str:
    for prefix in ("token_", "layer_", "reuse_"):
        if name.startswith(prefix):
            return name[len(prefix) :] if prefix != "reuse_" else name
    return name


def rel(path: Path, out: Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(out).resolve())


TABLE_HEAD = (
    "| config | options | strict % | flexible % | n | FLOPs vs baseline | FLOPs vs same forwards "
    "| tokens/forward | forwards/problem | tok/s b32 | b32 vs base | tok/s b1 | b1 vs base |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def table_row(r: Row) -> str:
    return (
        f"| {r.name} | {options_text(r.options)} | {pct(r.strict) if r.strict else '–'} "
        f"| {pct(r.flexible)} | {r.n} | {num(r.flops)} | {num(r.flops_fwd)} "
        f"| {num(r.stats.get('tokens_per_forward'), '.2f')} "
        f"| {num(r.forwards_per_problem, '.1f')} | {num(r.tps32, '.0f')} | {times(r.tps32_ratio)} "
        f"| {num(r.tps1, '.0f')} | {times(r.tps1_ratio)} |\n"
    )


def source_block(sources: list[Source], used: list[int], out: Path) -> str:
    lines = []
    for i in used:
        s = sources[i]
        lines.append(f"- data: [`{rel(s.path, out)}`]({rel(s.path, out)})")
        if s.get("log"):
            lines.append(f"  - log: [`{s.get('log')}`]({s.get('log')})")
        lines.append(f"  - hardware: {s.get('device') or 'not recorded'}")
        if s.get("torch"):
            lines.append(f"  - torch: {s.get('torch')}")
        lines.append(f"  - date: {s.get('date') or 'not recorded in the JSON'}")
        cmd = s.get("command")
        lines.append(f"  - command: `{cmd}`" if cmd else "  - command: not recorded")
        if "command" in s.override and s.meta.get("command"):
            lines.append(f"    (the JSON records it as `{s.meta['command']}`)")
        if s.get("git_commit"):
            lines.append(f"  - code: commit {s.get('git_commit')}")
        lines.append(f"  - decoding threshold: {s.get('threshold')}")
        st = s.get("settings")
        if isinstance(st, dict):
            lines.append(
                "  - accuracy on n = {n} test problems at batch {b}; tokens/s at batch 32 over "
                "{n32} problems and at batch 1 over {n1}; max_new_tokens {m}".format(
                    n=st.get("n_accuracy", "?"),
                    b=st.get("batch_accuracy", "?"),
                    n32=st.get("n_speed32", "?"),
                    n1=st.get("n_speed1", "?"),
                    m=st.get("max_new_tokens", "?"),
                )
            )
        if s.get("note"):
            lines.append(f"  - note: {s.get('note')}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- text


def best_text(best: Row | None, ok: list[Row], base: Row | None, nulls: list[Row]) -> str:
    if base is None:
        return "No baseline in the input: nothing to compare against.\n"
    b = base.flexible["value"]
    head = (
        f"Criterion: flexible accuracy at least {100 * (b - WITHIN):.1f} % (baseline "
        f"{pct(base.flexible)} % minus 1 point); among those, the largest executed-FLOPs "
        "saving.\n\n"
    )
    if best is None:
        return head + "No setting saves FLOPs within 1 point of the baseline.\n"
    saved = 1.0 - best.flops
    text = (
        f"**{best.name}** ({options_text(best.options)}): flexible {pct(best.flexible)} %, "
        f"strict {pct(best.strict) if best.strict else '–'} % (n = {best.n}); "
        f"executed FLOPs {best.flops:.3f}× the baseline's (**{100 * saved:.1f} % saved**; "
        f"{best.flops_fwd:.3f}× the same forwards unskipped).\n\n"
        "Wall-clock against the baseline config:\n\n"
        f"- batch 32: {num(best.tps32, '.0f')} vs {num(base.tps32, '.0f')} tokens/s = "
        f"{times(best.tps32_ratio)} ({time_change(best.tps32_ratio)})\n"
        f"- batch 1: {num(best.tps1, '.0f')} vs {num(base.tps1, '.0f')} tokens/s = "
        f"{times(best.tps1_ratio)} ({time_change(best.tps1_ratio)})\n"
    )
    for nr in nulls:
        text += (
            f"- against {nr.name} (the policy disabled: the baseline's work exactly): "
            f"batch 32 {times(_ratio(best.tps32, nr.tps32))}, "
            f"batch 1 {times(_ratio(best.tps1, nr.tps1))}\n"
        )
    null_names = {nr.name for nr in nulls}
    for key, label in (("tps32", "batch 32"), ("tps1", "batch 1")):
        cand = [r for r in ok if getattr(r, key) is not None and r.name not in null_names]
        if cand:
            f = max(cand, key=lambda r, k=key: getattr(r, k))
            text += (
                f"\nFastest skipping setting within 1 point at {label}: {f.name}, "
                f"{getattr(f, key):.0f} tokens/s ({times(getattr(f, key + '_ratio'))} baseline), "
                f"FLOPs {num(f.flops)}×."
            )
    return head + text + "\n"


def limits_text(fam: dict, rows: list[Row], base: Row | None, best: Row | None) -> str:
    if base is None:
        return "No baseline in the input.\n"
    parts = []
    goal_batch = fam["goal_batch"]
    key = "tps32_ratio" if goal_batch == 32 else "tps1_ratio"
    if best is not None:
        saved = 1.0 - best.flops
        met_flops = saved >= fam["goal_saving"]
        r = getattr(best, key)
        met_time = r is not None and r > 1.0
        parts.append(
            f"Goal ({fam['goal']}): FLOPs {'met' if met_flops else 'not met'} "
            f"({100 * saved:.1f} % saved by {best.name}); wall-clock at batch {goal_batch} "
            f"{'met' if met_time else 'not met'} ({times(r)} the baseline's tokens/s)."
        )
    else:
        parts.append(f"Goal ({fam['goal']}): not met; no setting saves FLOPs within 1 point.")

    skipping = [r for r in rows if r.flops is not None and r.flops < 0.99]
    for k, label in (("tps32_ratio", "batch 32"), ("tps1_ratio", "batch 1")):
        vals = [(getattr(r, k), r) for r in skipping if getattr(r, k) is not None]
        if not vals:
            continue
        lo, hi = min(vals, key=lambda v: v[0]), max(vals, key=lambda v: v[0])
        faster = sum(1 for v, _ in vals if v > 1.0)
        fl = [r.flops for _, r in vals]
        parts.append(
            f"At {label}, the {len(vals)} settings that skip work (executed FLOPs "
            f"{min(fl):.2f}–{max(fl):.2f}× the baseline's) run at {lo[0]:.2f}× ({lo[1].name}) to "
            f"{hi[0]:.2f}× ({hi[1].name}) the baseline's tokens/s; {faster} of {len(vals)} "
            "are faster than the baseline."
        )
    sp = [r for r in skipping if r.tps32 is not None]
    rho = spearman([r.flops for r in sp], [r.tps32 for r in sp])
    if rho is not None:
        parts.append(
            f"Rank correlation between executed FLOPs and batch-32 tokens/s across them: "
            f"{rho:+.2f} (−1 would mean fewer FLOPs always ran faster)."
        )

    nulls = null_rows(rows, base)
    for nr in nulls:
        parts.append(
            f"{nr.name} executes exactly the baseline's FLOPs ({nr.stats.get('executed_flops')}) "
            f"yet measured {times(nr.tps32_ratio)} the baseline's tokens/s at batch 32, "
            f"{times(nr.tps1_ratio)} at batch 1 and {times(nr.tps250_ratio)} in the batch-250 "
            "accuracy run: identical work timed differently, so wall-clock ratios in this run "
            "carry at least that much run-to-run (or order) variation."
        )
        sk = [r for r in skipping if r.name not in {x.name for x in nulls}]
        spans = []
        for attr, label in (("tps32", "batch 32"), ("tps1", "batch 1"), ("tps250", "batch 250")):
            v = [_ratio(getattr(r, attr), getattr(nr, attr)) for r in sk]
            v = [x for x in v if x is not None]
            if v:
                spans.append(f"{min(v):.2f}–{max(v):.2f}× at {label}")
        if spans:
            parts.append(
                f"Against {nr.name} instead of the baseline, the skipping settings run at "
                f"{', '.join(spans)}."
            )
    order = list(rows_order(rows, base))
    if order and order[0] == BASELINE and nulls:
        parts.append(
            "The baseline was the first config measured in its run (the JSON's order: "
            f"{', '.join(order)})."
        )
    fpt = base.flops_per_token
    if fpt:
        rates = []
        for k, label in (("tps32", "batch 32"), ("tps1", "batch 1")):
            tps = getattr(base, k)
            if tps:
                alt = [getattr(nr, k) for nr in nulls if getattr(nr, k)]
                more = f" ({fpt * max(alt) / 1e12:.2f} at {nulls[0].name}'s)" if alt else ""
                rates.append(f"{fpt * tps / 1e12:.2f} TFLOP/s{more} at {label}")
        if rates:
            parts.append(
                f"The baseline executes {fpt / 1e6:.0f} MFLOP per generated token, i.e. "
                f"{' and '.join(rates)} at its measured tokens/s."
            )
        slow = [r for r in skipping if getattr(r, key) is not None and getattr(r, key) < 1.0]
        if slow and len(slow) == len([r for r in skipping if getattr(r, key) is not None]):
            parts.append(
                "Hypothesis, not measured by this sweep: at that rate the tiny model's forwards "
                "are bound by fixed per-forward costs (kernel launches, Python, the policy's own "
                "similarity and gather/scatter work) rather than by matmul FLOPs, so removing "
                "FLOPs cannot pay for the policy's overhead. Timing the phases of one forward "
                "(`python -m v2.bench`) on the same GPU would confirm or refute it; on a model "
                "whose forwards are compute- or weight-bound the outcome can differ."
            )
    return "".join(f"- {x}\n" for x in parts)


# ---------------------------------------------------------------- plots


def _place_labels(ax, pts: list[tuple[float, float, float, str]], fontsize: float = 7.0) -> None:
    """Label each (x, y, yerr, text) point (text starting with * = a ringed point) at the
    candidate offset of least cost: overlapping an earlier label costs most, then crossing a
    marker or error bar, then leaving the axes; nearer is better. Points within ~3 px of each
    other share one label. Call once the layout is final."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    frame = ax.get_window_extent(renderer)
    obstacles = []
    merged: dict[tuple[int, int], list] = {}
    for x, y, e, text in pts:
        px, py = to_px((x, y))
        r = 9 if text.startswith("*") else 5
        obstacles.append(Bbox.from_extents(px - r, py - r, px + r, py + r))
        if e:
            _, lo = to_px((x, y - e))
            _, hi = to_px((x, y + e))
            obstacles.append(Bbox.from_extents(px - 3, lo, px + 3, hi))
        key = (round(px / 3), round(py / 3))
        if key in merged:
            merged[key][2] += f", {text.lstrip('*')}"
        else:
            merged[key] = [x, y, text.lstrip("*")]
    dirs = [(math.cos(a), math.sin(a)) for a in (math.radians(d) for d in range(15, 360, 30))]
    offsets = [(r * dx, r * dy) for r in (6, 12, 20, 30, 42, 56, 72) for dx, dy in dirs]
    px_per_pt = fig.dpi / 72
    placed: list = []
    for x, y, text in merged.values():
        probe = ax.text(0, 0, text, fontsize=fontsize)
        size = probe.get_window_extent(renderer)
        probe.remove()
        w, h = size.width, size.height
        px, py = to_px((x, y))
        best = None
        for dx, dy in offsets:
            ox, oy = dx * px_per_pt, (dy - 4) * px_per_pt
            bb = Bbox.from_bounds(px + ox if dx >= 0 else px + ox - w, py + oy, w, h)
            inside = (
                bb.x0 >= frame.x0 and bb.x1 <= frame.x1 and bb.y0 >= frame.y0 and bb.y1 <= frame.y1
            )
            cost = (
                10 * sum(bb.overlaps(o) for o in placed)
                + 3 * sum(bb.overlaps(o) for o in obstacles)
                + (0 if inside else 100)
                + math.hypot(dx, dy) / 30
            )
            if best is None or cost < best[0]:
                best = (cost, (dx, dy - 4), bb)
        (dx, dy), bb = best[1], best[2]
        ax.annotate(
            text,
            (x, y),
            xytext=(dx, dy),
            textcoords="offset points",
            fontsize=fontsize,
            ha="left" if dx >= 0 else "right",
            va="bottom",
            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.55", "shrinkA": 0, "shrinkB": 3}
            if math.hypot(dx, dy) > 10
            else None,
        )
        placed.append(bb)


def _freeze(ax) -> None:
    ax.set_xlim(ax.get_xlim())
    ax.set_ylim(ax.get_ylim())


def _points(ax, rows: list[Row], xkey, base: Row | None, best: Row | None) -> list:
    """Plot the points; return (x, y, yerr, label) for _place_labels, which must run once the
    figure's layout is final (label offsets are in points, data positions move with layout)."""
    xs, ys, es, labels = [], [], [], []
    for r in rows:
        x = xkey(r)
        if x is None:
            continue
        xs.append(x)
        ys.append(100 * r.flexible["value"])
        es.append(100 * r.flexible.get("stderr", 0.0))
        labels.append(("*" if r is best else "") + short(r.name))  # * = ringed: a larger mark
    ax.errorbar(xs, ys, yerr=es, fmt="o", ms=4, capsize=2, lw=0.8, color="tab:blue", zorder=3)
    pts = list(zip(xs, ys, es, labels, strict=True))
    if best is not None and xkey(best) is not None:
        ax.plot(
            [xkey(best)],
            [100 * best.flexible["value"]],
            "o",
            ms=10,
            mfc="none",
            mec="tab:green",
            mew=1.5,
            zorder=4,
            label=f"best within 1 pt: {short(best.name)}",
        )
    if base is not None:
        by = 100 * base.flexible["value"]
        bx = xkey(base)
        ax.axhline(by, color="0.4", lw=0.7, ls="--", zorder=1)
        ax.axhspan(
            by - 100 * WITHIN,
            by,
            color="tab:green",
            alpha=0.08,
            zorder=0,
            label="within 1 point of baseline",
        )
        if bx is not None:
            ax.errorbar(
                [bx],
                [by],
                yerr=[100 * base.flexible.get("stderr", 0.0)],
                fmt="*",
                ms=11,
                color="tab:red",
                capsize=2,
                zorder=5,
                label="baseline",
            )
            pts.append((bx, by, 100 * base.flexible.get("stderr", 0.0), "baseline"))
    ax.margins(x=0.12, y=0.16)
    ax.grid(alpha=0.3, lw=0.5)
    return pts


def plot_flops(path: Path, rows: list[Row], base, best, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 5.2), dpi=100)
    if base is not None and base.flops is None:
        base.flops_e2e = 1.0
    pts = _points(ax, rows, lambda r: r.flops, base, best)
    ax.set_xlabel("executed FLOPs relative to the baseline (end to end)")
    ax.set_ylabel("flexible accuracy, % (± 1 s.e.)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _freeze(ax)
    _place_labels(ax, pts)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_speed(path: Path, rows: list[Row], base, best, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 5.2), dpi=100, sharey=True)
    all_pts = []
    for ax, key, label in ((axes[0], "tps32", "batch 32"), (axes[1], "tps1", "batch 1")):
        all_pts.append(_points(ax, rows, lambda r, k=key: getattr(r, k), base, best))
        if base is not None and getattr(base, key):
            ax.axvline(getattr(base, key), color="tab:red", lw=0.6, ls=":", zorder=1)
        ax.set_xlabel(f"tokens/s at {label}")
        ax.set_title(label, fontsize=9)
    axes[0].set_ylabel("flexible accuracy, % (± 1 s.e.)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    for ax, pts in zip(axes, all_pts, strict=True):
        _freeze(ax)
        _place_labels(ax, pts)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- pages


def write_page(
    family: str,
    sources: list[Source],
    rows: dict[str, Row],
    out: Path,
    command: str,
) -> Path | None:
    fam = FAMILIES[family]
    frows = family_rows(rows, family)
    if not frows:
        return None
    base = page_baseline(sources, rows, frows)
    best, ok = best_within(frows, base)
    nulls = null_rows(frows, base)
    page = fam["page"]
    used = sorted({r.source for r in frows} | ({base.source} if base else set()))
    devices = {sources[i].get("device") for i in used}
    thresholds = {sources[i].get("threshold") for i in used}

    want = [n for n in planned(sources) or [] if policy_of(n) in (*fam["policies"], "none")]
    missing = [n for n in want if n not in rows]

    title = fam["title"]
    dev = ", ".join(sorted(str(d) for d in devices))
    plot_title = f"{title}\n({dev}, decoding threshold {', '.join(sorted(map(str, thresholds)))})"
    png_flops = out / f"{page}-accuracy-vs-flops.png"
    png_speed = out / f"{page}-accuracy-vs-tokens-per-s.png"
    plot_flops(png_flops, frows, base, best, plot_title)
    plot_speed(png_speed, frows, base, best, plot_title)

    md = [f"# {title}\n\n"]
    md.append(
        "> Generated by `v2/tiny/sweep_report.py`; do not edit by hand. Regenerate with\n>\n"
        f">     {command}\n\n"
    )
    md.append("## The run\n\n")
    md.append(source_block(sources, used, out))
    if len(devices) > 1 or len(thresholds) > 1:
        md.append(
            "\n**Warning:** the configs below come from runs on different hardware or decoding "
            "thresholds; ratios across them mix runs.\n"
        )
    elif len(used) > 1:
        md.append(
            "\nThe configs come from several runs (merged by name, later files win); "
            "tokens/s ratios across runs also carry run-to-run variation.\n"
        )
    if base is not None and len(used) > 1:
        md.append(
            f"\nRatios are against the baseline config of `{rel(sources[base.source].path, out)}`"
            " (the run that measured most of this page's configs, when it has one).\n"
        )
    if missing:
        md.append(f"\nNot in the data (planned, not measured): {', '.join(missing)}.\n")
    if base is None:
        md.append("\n**No baseline config in the input:** ratios are not available.\n")

    md.append("\n## Results\n\n")
    md.append(TABLE_HEAD)
    for r in ([base] if base else []) + frows:
        md.append(table_row(r))
    md.append(
        "\nAccuracy: tiny_gsm scoring (strict = the `#### N` answer, flexible = the last number), "
        "± one standard error sqrt(p(1-p)/(n-1)). *FLOPs vs baseline*: executed FLOPs per problem "
        "over the baseline's (end to end: includes any change in the number of forwards); "
        "*FLOPs vs same forwards*: executed over what the same forwards would execute with "
        "nothing skipped. Tokens/forward: generated tokens per (row, decoding forward). "
        "Tokens/s: generated tokens over synchronised wall-clock (CUDA-synchronised on a GPU), "
        "model loading and warm-up excluded.\n"
    )
    md.append("\nPer-layer skip rates and the batch-250 accuracy run's wall-clock:\n\n")
    md.append(
        "| config | skip rate per layer | tok/s b250 (accuracy run) | b250 vs base |\n"
        "|---|---|---|---|\n"
    )
    for r in ([base] if base else []) + frows:
        sr = r.stats.get("skip_rate_per_layer")
        srt = " ".join(f"{x:.2f}" for x in sr) if sr else "–"
        md.append(f"| {r.name} | {srt} | {num(r.tps250, '.0f')} | {times(r.tps250_ratio)} |\n")

    md.append("\n## Best setting within 1 point of baseline accuracy\n\n")
    md.append(best_text(best, ok, base, nulls))
    md.append("\n## What limits it\n\n")
    md.append(limits_text(fam, frows, base, best))

    md.append("\n## Plots\n\n")
    data = " ".join(f"`{rel(sources[i].path, out)}`" for i in used)
    md.append(
        f"![accuracy vs executed FLOPs]({png_flops.name})\n\n"
        f"Accuracy (flexible, ± 1 s.e.) vs executed FLOPs relative to the baseline; the shaded "
        f"band is within 1 point of the baseline, the ring marks the best setting. "
        f"Produced by the command at the top of this page from {data}.\n\n"
        f"![accuracy vs tokens/s]({png_speed.name})\n\n"
        f"Accuracy vs wall-clock tokens/s at batch 32 (left) and batch 1 (right); the dotted "
        f"line is the baseline's tokens/s. Produced by the same command from the same data.\n"
    )
    path = out / f"{page}.md"
    path.write_text("".join(md))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", type=Path, help="policy_sweep JSONs (later files win)")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument(
        "--meta",
        nargs=2,
        action="append",
        metavar=("JSON", "KEY=VALUE"),
        help="add/replace a metadata field of one input (command, date, log, note, ...)",
    )
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "v2.tiny.sweep_report", *argv])
    for path in args.json:
        if not path.is_file():
            raise SystemExit(f"error: {path}: no such file")
    sources, rows = load(args.json, args.meta)
    args.out.mkdir(parents=True, exist_ok=True)
    for family in FAMILIES:
        page = write_page(family, sources, rows, args.out, command)
        if page is None:
            print(f"no {family} configs in the input: {FAMILIES[family]['page']}.md not written")
        else:
            print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
