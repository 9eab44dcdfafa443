"""Two bench records row by row: how much slower or faster each measured row is in the second.

    python -m v2.bench.compare docs/benchmarks/before.json docs/benchmarks/after.json \
        [--tolerance 0.02] [--out compare.md]

A row is found in both records by what it measured (section, model, batch, kind or policy, ...).
Times (ms) compare as after / before, throughputs (tokens/s) as before / after, so in both a
ratio above 1 is slower. Rows slower by more than the tolerance are flagged; rows in only one
record are listed. Timings compare only when both records come from the same card (checked:
`gpu`), and from runs on a quiet machine: run both in one device call, one after the other.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# section -> (fields that identify a row, the measurement, True when lower is better)
SECTIONS = {
    "forwards": (("model", "kind", "batch", "prefix", "attention"), "median_ms", True),
    "skip": (("model", "batch", "prefix", "policy"), "median_ms", True),
    "verify": (("model", "kind", "batch", "prefix"), "median_ms", True),
    "e2e": (("model", "batch", "commit_per_forward", "block_cache"), "tokens_per_s", False),
    "ar": (("model", "batch"), "tokens_per_s", False),
}
# a row written before a field existed has its default
DEFAULTS = {"attention": "flash", "commit_per_forward": 1, "block_cache": False}


def _key(section: str, row: dict) -> tuple:
    fields = SECTIONS[section][0]
    return (section, *(row.get(f, DEFAULTS.get(f)) for f in fields))


def _rows(data: dict) -> dict[tuple, float]:
    out = {}
    for section, (_, value, _) in SECTIONS.items():
        for row in data.get(section, []):
            if row.get(value) is not None:
                out[_key(section, row)] = row[value]
    return out


def compare(before: dict, after: dict, tolerance: float = 0.02) -> dict:
    """Matched rows with their slowdown (ratio > 1: slower), rows only in one record, and the
    rows slower than `tolerance`."""
    if before.get("gpu") != after.get("gpu"):
        raise ValueError(
            f"the records come from different devices ({before.get('gpu')!r} and "
            f"{after.get('gpu')!r}): their timings do not compare"
        )
    a, b = _rows(before), _rows(after)
    rows = []
    for key in sorted(a.keys() & b.keys(), key=str):
        lower_better = SECTIONS[key[0]][2]
        if not (a[key] and b[key]):
            continue
        slowdown = b[key] / a[key] if lower_better else a[key] / b[key]
        rows.append({"key": key, "before": a[key], "after": b[key], "slowdown": slowdown})
    slower = [r for r in rows if r["slowdown"] > 1 + tolerance]
    return {
        "device": after.get("gpu") or after.get("device"),
        "tolerance": tolerance,
        "rows": rows,
        "slower": slower,
        "only_before": sorted(a.keys() - b.keys(), key=str),
        "only_after": sorted(b.keys() - a.keys(), key=str),
    }


def _label(key: tuple) -> str:
    section, *values = key
    fields = SECTIONS[section][0]
    return section + " " + ", ".join(f"{f} {v}" for f, v in zip(fields, values, strict=True))


def markdown(result: dict, names: tuple[str, str]) -> str:
    tol = result["tolerance"]
    lines = [
        f"# {names[1]} against {names[0]} ({result['device']})",
        "",
        f"{len(result['rows'])} rows in both; {len(result['slower'])} slower by more than "
        f"{tol:.0%} (slowdown: after / before for times, before / after for tokens/s).",
        "",
        "| row | before | after | slowdown | |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        flag = "SLOWER" if r in result["slower"] else ""
        lines.append(
            f"| {_label(r['key'])} | {r['before']:.3f} | {r['after']:.3f} | "
            f"{r['slowdown']:.3f} | {flag} |"
        )
    for which in ("only_before", "only_after"):
        if result[which]:
            lines += ["", f"Rows {which.replace('_', ' ')}:", ""]
            lines += [f"- {_label(k)}" for k in result[which]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--tolerance", type=float, default=0.02, help="slowdown flagged above 1 + this")
    p.add_argument("--out", type=Path, default=None, help="write the table here too")
    args = p.parse_args(argv)
    try:
        records = [json.loads(path.read_text()) for path in (args.before, args.after)]
        result = compare(*records, tolerance=args.tolerance)
    except (OSError, json.JSONDecodeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = markdown(result, (args.before.stem, args.after.stem))
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
