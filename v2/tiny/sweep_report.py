"""Results pages from tiny-model policy sweeps (`python -m v2.tiny.policy_sweep` JSONs).

    python -m v2.tiny.sweep_report SWEEP.json [SWEEP.json ...] --out docs/results \\
        [--meta SWEEP.json KEY=VALUE ...]

Writes `token-skip.md` (token configs + baseline) and `layer-skip.md` (layer skip and scheduled
reuse configs + baseline), each with a PNG of accuracy vs executed FLOPs and one of accuracy vs
tokens/s. A page whose family has no config in the input is not written (the command says so).

Several JSONs are merged by config name, later files winning; each input file is one run. Every
tokens/s ratio compares a config with the `baseline` config of its own run (the same JSON), never
with another run's: the runs may use different engine versions and orders. Executed FLOPs and
accuracy are deterministic; they are compared with the baseline of the same run too, or, for a
run without one, with the first input's baseline. `--meta FILE KEY=VALUE` adds or
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
        # "matching": the time per token falls at least as much as the FLOPs do
        "goal_matching": True,
    },
}


# ---------------------------------------------------------------- loading


@dataclass
class Source:
    path: Path
    meta: dict  # the JSON's own top-level fields (configs removed)
    override: dict = field(default_factory=dict)
    baseline: Row | None = None  # this file's own baseline config, merged away or not
    order: list[str] = field(default_factory=list)  # config names in the order measured
    run: int = 0  # 1-based run number (input file order)

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
    run_base: Row | None = None  # the baseline config of the same run (same JSON), if any
    run_order: list = field(default_factory=list)  # that run's config names, order measured
    # filled against the baseline (FLOPs) and the same run's baseline (tokens/s)
    flops_e2e: float | None = None  # executed FLOPs per problem / baseline's
    tps32_ratio: float | None = None
    tps1_ratio: float | None = None
    tps250_ratio: float | None = None

    @property
    def label(self) -> str:
        return f"{BASELINE} (run {self.source + 1})" if self.name == BASELINE else self.name

    @property
    def run(self) -> int:
        return self.source + 1

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
        sources.append(Source(Path(path), d, order=list(configs), run=i + 1))
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
                run_order=sources[-1].order,
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
    first = first_baseline(sources)
    for r in [*rows.values(), *(s.baseline for s in sources if s.baseline)]:
        _relate(r, sources[r.source].baseline, first)
    return sources, rows


def first_baseline(sources: list[Source], used: list[int] | None = None) -> Row | None:
    """The first input's baseline (among `used` runs first, where given): the reference for
    FLOPs and accuracy of a run that has no baseline of its own."""
    for group in ([i for i in used if sources[i].baseline] if used else [], range(len(sources))):
        for i in group:
            if sources[i].baseline is not None:
                return sources[i].baseline
    return None


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return str(a) == str(b)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _relate(r: Row, run_base: Row | None, first: Row | None) -> None:
    """FLOPs against the same run's baseline (else the first input's: FLOPs are
    deterministic); tokens/s only against the same run's baseline, never another run's."""
    r.run_base = run_base
    base = run_base or first
    if base is not None:
        e, be = r.stats.get("executed_flops"), base.stats.get("executed_flops")
        if e is not None and be and r.n and base.n:
            r.flops_e2e = (e / r.n) / (be / base.n)
    if run_base is not None:
        r.tps32_ratio = _ratio(r.tps32, run_base.tps32)
        r.tps1_ratio = _ratio(r.tps1, run_base.tps1)
        r.tps250_ratio = _ratio(r.tps250, run_base.tps250)


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


def acc_base(r: Row, ref: Row | None) -> Row | None:
    """The baseline whose accuracy r must stay within 1 point of: its own run's, else ref."""
    return r.run_base or ref


def best_within(rows: list[Row], ref: Row | None) -> tuple[Row | None, list[Row]]:
    """The setting with the largest FLOPs saving whose flexible accuracy is at most 1 point
    below the baseline of its own run (the first baseline `ref` for a run without one). Ties:
    higher accuracy, then the higher batch-32 tokens/s ratio to its own run's baseline."""
    ok = []
    for r in rows:
        b = acc_base(r, ref)
        if b is None or r.flops is None:
            continue
        if r.flexible["value"] >= b.flexible["value"] - WITHIN - EPS:
            ok.append(r)
    saving = [r for r in ok if r.flops < 1.0 - 1e-6]
    if not saving:
        return None, ok
    best = min(saving, key=lambda r: (r.flops, -r.flexible["value"], -(r.tps32_ratio or 0.0)))
    return best, ok


def is_disabled(r: Row) -> bool:
    """The policy switched off by its options (the engine then does the baseline's work):
    token cosine_threshold >= 1 without reuse_ratio, layer cosine_threshold >= 1, reuse_k 1."""
    o = r.options
    ct = o.get("cosine_threshold")
    if r.policy == "token":
        return ct is not None and ct >= 1.0 and not o.get("reuse_ratio")
    if r.policy == "layer":
        return ct is not None and ct >= 1.0
    if r.policy == "reuse":
        return o.get("reuse_k") == 1
    return False


def _unskipped(r: Row) -> bool:
    e = r.stats.get("executed_flops")
    return e is not None and e == r.stats.get("baseline_flops")


def null_rows(rows: list[Row], base: Row | None = None) -> list[Row]:
    """Configs whose policy is disabled by its options: exactly the baseline's work."""
    return [r for r in rows if is_disabled(r) and _unskipped(r)]


def idle_rows(rows: list[Row]) -> list[Row]:
    """Configs that ran the policy (its similarity checks, syncs) but skipped nothing: their
    wall-clock against the baseline is the policy's overhead, not noise."""
    return [r for r in rows if not is_disabled(r) and _unskipped(r)]


def span(vals: list[float]) -> str:
    lo, hi = min(vals), max(vals)
    return f"{lo:.2f}×" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}–{hi:.2f}×"


def names_by_run(rows: list[Row]) -> str:
    """'a, b (run 2); c (run 3)'."""
    runs: dict[int, list[str]] = {}
    for r in rows:
        runs.setdefault(r.run, []).append(r.name)
    return "; ".join(f"{', '.join(v)} (run {k})" for k, v in sorted(runs.items()))


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


NO_RUN_BASE = "no baseline in the same run"

TABLE_HEAD = (
    "| config | run | options | strict % | flexible % | n | FLOPs vs baseline "
    "| FLOPs vs same forwards | tokens/forward | forwards/problem | tok/s b32 | b32 vs base "
    "| tok/s b1 | b1 vs base |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def vs_base(r: Row, attr: str) -> str:
    """A tokens/s ratio cell: against the same run's baseline only."""
    if r.run_base is None:
        return NO_RUN_BASE
    return times(getattr(r, attr + "_ratio"))


def table_row(r: Row) -> str:
    return (
        f"| {r.label} | {r.run} | {options_text(r.options)} "
        f"| {pct(r.strict) if r.strict else '–'} "
        f"| {pct(r.flexible)} | {r.n} | {num(r.flops)} | {num(r.flops_fwd)} "
        f"| {num(r.stats.get('tokens_per_forward'), '.2f')} "
        f"| {num(r.forwards_per_problem, '.1f')} | {num(r.tps32, '.0f')} | {vs_base(r, 'tps32')} "
        f"| {num(r.tps1, '.0f')} | {vs_base(r, 'tps1')} |\n"
    )


def _first_clause(text: str) -> str:
    """Text up to the first ';' outside parentheses."""
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == ";" and depth == 0:
            return text[:i].strip()
    return text.strip()


def run_legend(sources: list[Source], used: list[int], out: Path) -> str:
    lines = []
    for i in used:
        s = sources[i]
        date = str(s.get("date") or "date not recorded").split(" (")[0]
        note = _first_clause(str(s.get("note"))) if s.get("note") else "no engine note"
        base = "" if s.baseline else f"; {NO_RUN_BASE}: its tokens/s are not compared"
        lines.append(f"- run {s.run}: `{rel(s.path, out)}`, {date}, {note}{base}")
    return "\n".join(lines) + "\n"


def source_block(sources: list[Source], used: list[int], out: Path) -> str:
    lines = []
    for i in used:
        s = sources[i]
        lines.append(f"- run {s.run}, data: [`{rel(s.path, out)}`]({rel(s.path, out)})")
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


def _criterion(rows: list[Row], ref: Row | None) -> str:
    bases: dict[str, list[int]] = {}
    for r in rows:
        b = acc_base(r, ref)
        if b is not None:
            bases.setdefault(pct(b.flexible), [])
            if b.run not in bases[pct(b.flexible)]:
                bases[pct(b.flexible)].append(b.run)
    which = "; ".join(
        f"{v} % in run{'s' if len(runs) > 1 else ''} {', '.join(map(str, sorted(runs)))}"
        for v, runs in bases.items()
    )
    fallback = (
        f" (a run without a baseline uses run {ref.run}'s)"
        if ref is not None and any(r.run_base is None for r in rows)
        else ""
    )
    return (
        "Criterion: flexible accuracy at most 1 point below the baseline of the config's own "
        f"run{fallback} (baseline flexible accuracy: {which}); among those, the largest "
        "executed-FLOPs saving.\n\n"
    )


def _wall_lines(r: Row, against: Row, why: str) -> str:
    out = []
    for attr, label in (("tps32", "batch 32"), ("tps1", "batch 1")):
        a, b = getattr(r, attr), getattr(against, attr)
        q = _ratio(a, b)
        out.append(
            f"{label} {num(a, '.0f')} vs {num(b, '.0f')} tokens/s = {times(q)} ({time_change(q)})"
        )
    return f"- against {why}: " + "; ".join(out) + "\n"


def best_text(best: Row | None, ok: list[Row], rows: list[Row], ref: Row | None) -> str:
    if ref is None:
        return "No baseline in the input: nothing to compare against.\n"
    head = _criterion(rows, ref)
    if best is None:
        return head + "No setting saves FLOPs within 1 point of the baseline.\n"
    saved = 1.0 - best.flops
    text = (
        f"**{best.name}** (run {best.run}; {options_text(best.options)}): flexible "
        f"{pct(best.flexible)} %, strict {pct(best.strict) if best.strict else '–'} % "
        f"(n = {best.n}); executed FLOPs {best.flops:.3f}× the baseline's "
        f"(**{100 * saved:.1f} % saved**; {best.flops_fwd:.3f}× the same forwards unskipped)."
        "\n\nWall-clock, in the same run only:\n\n"
    )
    if best.run_base is None:
        text += f"- {NO_RUN_BASE} (run {best.run}): no wall-clock ratio\n"
    else:
        text += _wall_lines(best, best.run_base, f"the baseline of run {best.run}")
    for nr in null_rows(rows):
        if nr.source == best.source:
            text += _wall_lines(
                best,
                nr,
                f"{nr.name} (run {nr.run}; the policy disabled by its options, so the "
                "baseline's work exactly)",
            )
    for key, label in (("tps32_ratio", "batch 32"), ("tps1_ratio", "batch 1")):
        cand = [r for r in ok if getattr(r, key) is not None and r.flops < 1.0 - 1e-6]
        if cand:
            f = max(cand, key=lambda r, k=key: getattr(r, k))
            text += (
                f"\nHighest tokens/s ratio to its own run's baseline among the skipping settings "
                f"within 1 point, at {label}: {f.name} (run {f.run}), {times(getattr(f, key))} "
                f"({getattr(f, key[:-6]):.0f} tokens/s), FLOPs {num(f.flops)}×."
            )
    return head + text + "\n"


def limits_text(fam: dict, rows: list[Row], ref: Row | None, best: Row | None) -> str:
    if ref is None:
        return "No baseline in the input.\n"
    parts = []
    goal_batch = fam["goal_batch"]
    key = "tps32_ratio" if goal_batch == 32 else "tps1_ratio"
    if best is not None:
        saved = 1.0 - best.flops
        met_flops = saved >= fam["goal_saving"]
        r = getattr(best, key)
        need = 1.0 / best.flops if fam.get("goal_matching") else 1.0
        met_time = r is not None and r > need - EPS if fam.get("goal_matching") else r > 1.0
        met_time = r is not None and met_time
        wall = (
            f"{times(r)} the tokens/s of run {best.run}'s baseline"
            + (f"; a matching gain is {times(need)}" if fam.get("goal_matching") else "")
            if best.run_base is not None
            else NO_RUN_BASE
        )
        parts.append(
            f"Goal ({fam['goal']}): FLOPs {'met' if met_flops else 'not met'} "
            f"({100 * saved:.1f} % saved by {best.name}); wall-clock at batch {goal_batch} "
            f"{'met' if met_time else 'not met'} ({wall})."
        )
    else:
        parts.append(f"Goal ({fam['goal']}): not met; no setting saves FLOPs within 1 point.")

    skipping = [r for r in rows if r.flops is not None and r.flops < 0.99]
    unrelated = [r for r in skipping if r.run_base is None]
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
            f"{hi[0]:.2f}× ({hi[1].name}) the tokens/s of their own run's baseline; {faster} of "
            f"{len(vals)} are faster than it."
            + (f" Not compared ({NO_RUN_BASE}): {names_by_run(unrelated)}." if unrelated else "")
        )
    sp = [r for r in skipping if r.tps32_ratio is not None]
    rho = spearman([r.flops for r in sp], [r.tps32_ratio for r in sp])
    if rho is not None:
        parts.append(
            "Rank correlation between executed FLOPs and the batch-32 tokens/s ratio (to the "
            f"same run's baseline) across them: {rho:+.2f} (−1 would mean fewer FLOPs always "
            "ran faster)."
        )

    nulls = [r for r in null_rows(rows) if r.run_base is not None]
    if nulls:
        each = "; ".join(
            f"{nr.name} (run {nr.run}) {times(nr.tps32_ratio)} at batch 32, "
            f"{times(nr.tps1_ratio)} at batch 1, {times(nr.tps250_ratio)} at batch 250"
            for nr in nulls
        )
        first = sorted(
            {nr.run for nr in nulls if nr.run_order.index(BASELINE) == 0}
            if all(BASELINE in nr.run_order for nr in nulls)
            else set()
        )
        order = (
            f" The baseline was the first config timed in run{'s' if len(first) > 1 else ''} "
            f"{', '.join(map(str, first))}."
            if first
            else ""
        )
        parts.append(
            "Identical work timed differently: with the policy disabled by its options the "
            "engine does exactly the baseline's forwards, yet measured (against their own run's "
            f"baseline) {each}. Same-run ratios therefore carry at least that much order or "
            f"run-to-run variation.{order}"
        )
        for run in sorted({nr.run for nr in nulls}):
            sk = [r for r in skipping if r.run == run]
            cl = []
            for nr in [x for x in nulls if x.run == run]:
                v32 = [_ratio(r.tps32, nr.tps32) for r in sk]
                v1 = [_ratio(r.tps1, nr.tps1) for r in sk]
                v32, v1 = [x for x in v32 if x], [x for x in v1 if x]
                if v32 and v1:
                    cl.append(f"{span(v32)} at batch 32 and {span(v1)} at batch 1 of {nr.name}'s")
            if cl:
                parts.append(
                    f"Against a disabled config instead of the baseline, run {run}'s skipping "
                    f"settings ({', '.join(r.name for r in sk)}) run at {'; '.join(cl)}."
                )

    idle = [r for r in idle_rows(rows) if r.run_base is not None]
    if idle:
        cl = []
        for ref_name, get in [("their run's baseline", lambda r: r.run_base)] + [
            (f"{nr.name}'s", lambda r, nr=nr: nr if r.source == nr.source else None)
            for nr in null_rows(rows)
        ]:
            v32 = [_ratio(r.tps32, get(r).tps32) for r in idle if get(r) is not None]
            v1 = [_ratio(r.tps1, get(r).tps1) for r in idle if get(r) is not None]
            v32, v1 = [x for x in v32 if x], [x for x in v1 if x]
            if v32 and v1:
                cl.append(f"{span(v32)} at batch 32 and {span(v1)} at batch 1 of {ref_name}")
        parts.append(
            f"Ran the policy, skipped nothing: {names_by_run(idle)} executed exactly the "
            "baseline's FLOPs while running the policy (its similarity checks and device "
            "syncs), so their wall-clock ratio is the policy's overhead, not noise: "
            f"{'; '.join(cl)}."
        )
    idle_any = [r for r in idle_rows(rows) if r.run_base is None]
    if idle_any:
        parts.append(
            f"Ran the policy, skipped nothing: {names_by_run(idle_any)} ({NO_RUN_BASE}: its "
            "overhead is not measured)."
        )

    bases = []
    for r in rows:
        if r.run_base is not None and r.run_base not in bases:
            bases.append(r.run_base)
    fpt = ref.flops_per_token
    if fpt and bases:
        rates = []
        for b in sorted(bases, key=lambda b: b.run):
            rr = [
                f"{fpt * getattr(b, k) / 1e12:.2f} at {label}"
                for k, label in (("tps32", "batch 32"), ("tps1", "batch 1"))
                if getattr(b, k)
            ]
            rates.append(f"run {b.run}: {', '.join(rr)}")
        text = (
            f"The baseline executes {fpt / 1e6:.0f} MFLOP per generated token; at the "
            f"baselines' measured tokens/s that is (TFLOP/s) {'; '.join(rates)}."
        )
        slow = [r for r in skipping if getattr(r, key) is not None and getattr(r, key) < 1.0]
        if slow and len(slow) == len([r for r in skipping if getattr(r, key) is not None]):
            text += (
                " Hypothesis, not measured by this sweep: at that rate the tiny model's forwards "
                "are bound by fixed per-forward costs (kernel launches, Python, the policy's own "
                "similarity and gather/scatter work) rather than by matmul FLOPs, so removing "
                "FLOPs cannot pay for the policy's overhead. Timing the phases of one forward "
                "(`python -m v2.bench`) on the same GPU would confirm or refute it; on a model "
                "whose forwards are compute- or weight-bound the outcome can differ."
            )
        parts.append(text)
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
        names = text.split(", ")
        if len(names) > 3:  # many configs on one spot (e.g. all that skipped nothing)
            text = f"{names[0]}, {names[1]} and {len(names) - 2} more"
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
    pts = []
    runs = sorted({r.run for r in rows})
    colors = ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:olive", "tab:cyan")
    for j, run in enumerate(runs):
        xs, ys, es, labels = [], [], [], []
        for r in rows:
            x = xkey(r)
            if x is None or r.run != run:
                continue
            xs.append(x)
            ys.append(100 * r.flexible["value"])
            es.append(100 * r.flexible.get("stderr", 0.0))
            labels.append(("*" if r is best else "") + short(r.name))  # * = ringed: larger mark
        if not xs:
            continue
        ax.errorbar(
            xs,
            ys,
            yerr=es,
            fmt="o",
            ms=4,
            capsize=2,
            lw=0.8,
            color=colors[j % len(colors)],
            zorder=3,
            label=f"run {run}" if len(runs) > 1 else None,
        )
        pts += list(zip(xs, ys, es, labels, strict=True))
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
                label="baseline" if len(runs) < 2 else "baseline (each run's)",
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
        # ratios to the baseline of the same run: runs are never compared with each other
        all_pts.append(_points(ax, rows, lambda r, k=key: getattr(r, k + "_ratio"), base, best))
        ax.axvline(1.0, color="tab:red", lw=0.6, ls=":", zorder=1)
        ax.set_xlabel(f"tokens/s at {label} / that of the baseline of the same run")
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
    page = fam["page"]
    used = sorted({r.source for r in frows})
    base = first_baseline(sources, used)  # reference line for accuracy (and FLOPs fallback)
    best, ok = best_within(frows, base)
    if base is not None and base.flops is None:
        base.flops_e2e = 1.0
    table = []
    for i in used:
        if sources[i].baseline is not None:
            table.append(sources[i].baseline)
        table += [r for r in frows if r.source == i]
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
    md.append(f"## The run{'s' if len(used) > 1 else ''}\n\n")
    md.append(source_block(sources, used, out))
    if len(devices) > 1 or len(thresholds) > 1:
        md.append(
            "\n**Warning:** the configs below come from runs on different hardware or decoding "
            "thresholds; their accuracy and FLOPs are compared across runs.\n"
        )
    if len(used) > 1:
        md.append(
            "\nThe configs come from several runs, merged by name (a later file wins); each "
            "run keeps its own baseline row, since the runs used different engine versions. "
            "**Every tokens/s ratio compares a config with the baseline of its own run** (the "
            "same JSON); executed FLOPs and accuracy, being deterministic, are compared across "
            f"runs (with the baseline of the config's own run, else with run {base.run}'s)."
            "\n\n" + run_legend(sources, used, out)
            if base is not None
            else "\n" + run_legend(sources, used, out)
        )
    if missing:
        md.append(f"\nNot in the data (planned, not measured): {', '.join(missing)}.\n")
    if base is None:
        md.append("\n**No baseline config in the input:** ratios are not available.\n")

    md.append("\n## Results\n\n")
    md.append(TABLE_HEAD)
    for r in table:
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
        "| config | run | skip rate per layer | tok/s b250 (accuracy run) | b250 vs base |\n"
        "|---|---|---|---|---|\n"
    )
    for r in table:
        sr = r.stats.get("skip_rate_per_layer")
        srt = " ".join(f"{x:.2f}" for x in sr) if sr else "–"
        md.append(
            f"| {r.label} | {r.run} | {srt} | {num(r.tps250, '.0f')} | {vs_base(r, 'tps250')} |\n"
        )

    md.append("\n## Best setting within 1 point of baseline accuracy\n\n")
    md.append(best_text(best, ok, frows, base))
    md.append("\n## What limits it\n\n")
    md.append(limits_text(fam, frows, base, best))

    md.append("\n## Plots\n\n")
    data = " ".join(f"`{rel(sources[i].path, out)}`" for i in used)
    bname = "the baseline" if base is None or len(used) < 2 else f"run {base.run}'s baseline"
    md.append(
        f"![accuracy vs executed FLOPs]({png_flops.name})\n\n"
        f"Accuracy (flexible, ± 1 s.e.) vs executed FLOPs relative to the baseline; the shaded "
        f"band is within 1 point of {bname}, the ring marks the best setting"
        f"{'; colours are runs' if len(used) > 1 else ''}. "
        f"Produced by the command at the top of this page from {data}.\n\n"
        f"![accuracy vs tokens/s]({png_speed.name})\n\n"
        f"Accuracy vs wall-clock tokens/s at batch 32 (left) and batch 1 (right), each as a "
        f"ratio to the tokens/s of the baseline of the same run (the dotted line at 1: every "
        f"run's baseline); configs from a run without a baseline are left out. Produced by the "
        f"same command from the same data.\n"
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
