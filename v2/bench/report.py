"""The bench record's targets, markdown, plot and the README's speed table."""

from __future__ import annotations

import json
from pathlib import Path

# Targets (H200, bf16; issues 12 and 13). Token-skipping goals hold for 7B shapes; 1.5B shapes get
# the same goals + 0.1 on the wall ratios. Evaluated on every model measured.
TARGET_GOALS = {
    "denoise32_b1_p512_over_bandwidth_bound": ("<=", 1.25),
    "denoise32_b32_p512_over_compute_bound": ("<=", 1.3),
    "e2e_b1_over_compiled_ar": (">=", 1.35),
    "e2e_b32_block_cache_over_compiled_ar": (">=", 1.2),
    "e2e_b1_k3_over_compiled_ar": (">=", 3.0),
    "e2e_b32_tokens_per_s": (">=", 1300.0),
    "denoise8_over_denoise32_max": ("<=", 1.0),
    "e2e_b1_loop_overhead": ("<=", 0.05),
    "disabled_policy_wall_ratio_max": ("<=", 1.02),
    "token_reuse0_wall_ratio_max": ("<=", 1.03),
    "token_reuse25_b32_wall_ratio": ("<=", 0.85),
    "token_reuse50_b32_wall_ratio": ("<=", 0.65),
    "token_reuse75_b32_wall_ratio": ("<=", 0.45),
    "token_reuse_b1_wall_ratio_max": ("<=", 1.05),
    "layer_pass8_b1_wall_ratio": ("<=", 0.75),
    "verify9_b1_p512_over_denoise32": ("<=", 1.1),
}
RELAXED_FOR_1_5B = {n for n in TARGET_GOALS if n.startswith("token_reuse") and "b32" in n}


def _find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def e2e_row(rows: list[dict], model: str, batch: int, k: int = 1, cache: bool = False):
    """The end-to-end row of a forced schedule: k slots per forward, the sub-block cache on or
    off (records written before the schedules were measured hold k = 1, no cache)."""
    return next(
        (
            r
            for r in rows
            if (r["model"], r["batch"]) == (model, batch)
            and (r.get("commit_per_forward", 1), r.get("block_cache", False)) == (k, cache)
        ),
        None,
    )


def _over(a: dict | None, b: dict | None) -> float | None:
    return a and b and a["tokens_per_s"] / b["tokens_per_s"]


def default_forwards(data: dict) -> list[dict]:
    """The forward rows of the engine's default attention backend (not the flex comparison)."""
    return [r for r in data["forwards"] if r.get("attention") != "flex"]


def _values(data: dict, model: str) -> dict:
    sk, e2, ar = data["skip"], data["e2e"], data["ar"]
    fw = default_forwards(data)
    f1 = _find(fw, model=model, kind="denoise32", batch=1, prefix=512)
    f32 = _find(fw, model=model, kind="denoise32", batch=32, prefix=512)
    ratios8 = [
        r["median_ms"] / d["median_ms"]
        for r in fw
        if r["model"] == model and r["kind"] == "denoise8"
        for d in [_find(fw, model=model, kind="denoise32", batch=r["batch"], prefix=r["prefix"])]
        if d
    ]
    e1, e32 = e2e_row(e2, model, 1), e2e_row(e2, model, 32)
    a1, a32 = _find(ar, model=model, batch=1), _find(ar, model=model, batch=32)
    v1 = _find(data.get("verify", []), model=model, kind="verify9", batch=1, prefix=512)

    def wall(policy, batch):
        r = _find(sk, model=model, policy=policy, batch=batch)
        return r and r["wall_ratio"]

    skip_rows = [r for r in sk if r["model"] == model]
    dis = [r["wall_ratio"] for r in skip_rows if r["policy"] == "disabled"]
    t0 = [r["wall_ratio"] for r in skip_rows if r["policy"] == "token_reuse_0"]
    b1 = [
        r["wall_ratio"]
        for r in skip_rows
        if r["policy"].startswith("token_reuse") and r["batch"] == 1
    ]
    return {
        "denoise32_b1_p512_over_bandwidth_bound": f1 and f1["median_ms"] / f1["bw_bound_ms"],
        "denoise32_b32_p512_over_compute_bound": f32 and f32["median_ms"] / f32["compute_bound_ms"],
        "e2e_b1_over_compiled_ar": _over(e1, a1),
        "e2e_b32_block_cache_over_compiled_ar": _over(e2e_row(e2, model, 32, cache=True), a32),
        "e2e_b1_k3_over_compiled_ar": _over(e2e_row(e2, model, 1, k=3), a1),
        "e2e_b32_tokens_per_s": e32 and e32["tokens_per_s"],
        "denoise8_over_denoise32_max": max(ratios8) if ratios8 else None,
        "e2e_b1_loop_overhead": e1 and e1["loop_overhead"],
        "disabled_policy_wall_ratio_max": max(dis) if dis else None,
        "token_reuse0_wall_ratio_max": max(t0) if t0 else None,
        "token_reuse25_b32_wall_ratio": wall("token_reuse_25", 32),
        "token_reuse50_b32_wall_ratio": wall("token_reuse_50", 32),
        "token_reuse75_b32_wall_ratio": wall("token_reuse_75", 32),
        "token_reuse_b1_wall_ratio_max": max(b1) if b1 else None,
        "layer_pass8_b1_wall_ratio": wall("layer_pass_8", 1),
        "verify9_b1_p512_over_denoise32": v1 and v1["vs_denoise32"],
    }


def targets(data: dict) -> list[dict]:
    out = []
    for model in data["models"]:
        if model in ("tiny", "test") and len(data["models"]) > 1:
            continue
        values = _values(data, model)
        for name, (op, goal) in TARGET_GOALS.items():
            if model == "1.5b" and name in RELAXED_FOR_1_5B:
                goal = round(goal + 0.1, 3)
            v = values[name]
            met = None if v is None else (v <= goal if op == "<=" else v >= goal)
            out.append(
                {
                    "name": name,
                    "model": model,
                    "value": v,
                    "goal": f"{op} {goal}",
                    "met": met,
                    "official": model == "7b"
                    and "H200" in (data.get("gpu") or "")
                    and data["grid"] == "full",
                }
            )
    return out


def _attention_table(rows: list[dict], default: list[dict]) -> list[str]:
    """FlexAttention's rows against the default backend's same forward (attention.py)."""
    flex = [r for r in rows if r.get("attention") == "flex"]
    if not flex:
        return []
    lines = [
        "",
        "Attention backend (same forwards; ratio = flex / default, below 1: flex is faster):",
        "",
        "| model | kind | batch | prefix | default | ms | flex ms | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in flex:
        same = ("model", "kind", "batch", "prefix")
        d = _find(default, **{k: r[k] for k in same})
        ratio = d and r["median_ms"] / d["median_ms"]
        lines.append(
            f"| {r['model']} | {r['kind']} | {r['batch']} | {r['prefix']} | "
            f"{d.get('attention', 'flash') if d else '-'} | {_f(d and d['median_ms'])} | "
            f"{_f(r['median_ms'])} | {_f(ratio, '.3f')} |"
        )
    return lines


def _top_kernels(rows: list[dict], n: int = 6) -> list[str]:
    """Per profiled configuration, its `n` kernels taking the most time (records written before
    they were kept have none)."""
    lines = []
    for r in rows:
        top = r.get("top_kernels")
        if not top:
            continue
        lines += ["", f"Top kernels, {r['model']} batch {r['batch']} {r['policy']} (per forward):"]
        lines += ["", "| kernel | calls | ms |", "|---|---|---|"]
        for k in top[:n]:
            name = k["name"].replace("|", "/")
            lines.append(f"| `{name[:90]}` | {k['calls']:.0f} | {_f(k['ms'], '.3f')} |")
    return lines


def _f(x, spec: str = ".2f", scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, spec)


def _gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:.1f}"


def markdown(data: dict) -> str:
    bw, mm = data.get("bandwidth", {}), data.get("matmul", {})
    lines = [
        f"# v2.bench: {data['gpu'] or data['device']}",
        "",
        f"`{data['command']}`  ",
        f"torch {data['torch']} (CUDA {data['cuda']}), {data['dtype']}, grid {data['grid']}, "
        f"{data['elapsed_s']:.0f} s{'' if data['complete'] else ' (INCOMPLETE)'}  ",
        f"measured copy bandwidth {_f(bw.get('bytes_per_s'), '.0f', 1e-9)} GB/s (read + write); "
        f"matmul {_f(mm.get('flops_per_s'), '.1f', 1e-12)} TFLOP/s ({mm.get('n')}^3)",
    ]
    if data.get("continues"):
        c = data["continues"]
        lines += [
            f"Continues `{c['command']}` (started {c['started']}, same device and grid): its "
            f"{', '.join(c['kept']) or 'nothing'} rows kept.  ",
        ]
    lines += [
        "",
        "## Targets",
        "",
        "| target | model | value | goal | met |",
        "|---|---|---|---|---|",
    ]
    for t in data["targets"]:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(
            f"| {t['name']} | {t['model']} | {_f(t['value'], '.3f')} | {t['goal']} | {met} |"
        )
    lines += [
        "",
        "## Forward latency",
        "",
        "| model | kind | batch | prefix | tokens | median ms | bw bound ms | compute bound ms "
        "| bound/measured | TFLOP/s | peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    default = default_forwards(data)
    for r in default:
        lines.append(
            f"| {r['model']} | {r['kind']} | {r['batch']} | {r['prefix']} | {r['tokens']} | "
            f"{_f(r['median_ms'])} | {_f(r['bw_bound_ms'])} | {_f(r['compute_bound_ms'])} | "
            f"{_f(r.get('bound_fraction'), '.0%')} | {_f(r.get('achieved_tflops'), '.1f')} | "
            f"{_gb(r['peak_memory_bytes'])} |"
        )
    lines += _attention_table(data["forwards"], default)
    lines += [
        "",
        "## Forced skipping (denoise forward, 32-token window, interleaved rounds)",
        "",
        "| model | batch | prefix | policy | median ms | min-max ms | wall ratio | FLOPs ratio "
        "| units computed | padding | layers run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["skip"]:
        extra = ""
        if r.get("cycle_wall_ratio") is not None:
            extra = f" (cycle x{r['cycle_wall_ratio']:.3f})"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['prefix']} | {r['policy']} | "
            f"{_f(r['median_ms'])} | {_f(r['min_ms'])}-{_f(r['max_ms'])} | "
            f"{_f(r['wall_ratio'], '.3f')}{extra} | {_f(r['flops_ratio'], '.3f')} | "
            f"{_f(r['units_ratio'], '.3f')} | {_f(r.get('padding_ratio'), '.3f')} | "
            f"{r['layers_run']} |"
        )
    lines += [
        "",
        "## End to end (a forced commit schedule, ignore_eos)",
        "",
        "`generate()` on the real loop, committing k slots per row and denoise forward (the k "
        "most confident; k = 1 is threshold 1), with the sub-block cache off and on.",
        "",
        "| model | batch | k | sub-block cache | prompt | new | tokens/s | tokens/forward "
        "| forwards/s | forwards | wall s | forward sum s | loop overhead | graph sets | peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["e2e"]:
        cache = "on" if r.get("block_cache") else "off"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r.get('commit_per_forward', 1)} | {cache} | "
            f"{r['prompt_tokens']} | {r['new_tokens']} | "
            f"{_f(r['tokens_per_s'], '.1f')} | {_f(r.get('tokens_per_forward'), '.2f')} | "
            f"{_f(r['forwards_per_s'], '.1f')} | "
            f"{r['forwards_total']} | {_f(r['wall_s'])} | {_f(r['forward_sum_s'])} | "
            f"{_f(r['loop_overhead'], '.1%')} | {r.get('graph_sets', '-')} | "
            f"{_gb(r['peak_memory_bytes'])} |"
        )
    lines += [
        "",
        "## Autoregressive baseline: transformers Qwen2, static cache, torch.compile",
        "",
        "Same weights, prompt and new tokens; greedy, EOS ignored. Each dLLM column is a measured "
        "end-to-end run of the schedule above (k slots per forward; `+cache`: the sub-block "
        "cache), as tokens/s and its ratio to the AR decoder in the same run.",
        "",
    ]
    lines += _ar_table(data)
    if data.get("tokens_per_forward"):
        lines += ["", "Tokens per forward of the tiny model on its test problems (batch 32):", ""]
        for r in data["tokens_per_forward"]:
            lines.append(
                f"- threshold {r['threshold']}: {r['tokens_per_forward']:.2f} "
                f"({r['problems']} problems)"
            )
    if data.get("verify"):
        lines += [
            "",
            "## Verify forward vs denoise forward (speculative decoding)",
            "",
            "verify9: the causal window of a speculative round (last verified token + 8 drafted) "
            "through a causal engine as configured (the window forward denoising runs: static "
            "shapes, CUDA graphs on a GPU); denoise32: the engine's block forward as configured; "
            "_eager: the same without CUDA graphs or compilation.",
            "",
            "| model | batch | prefix | kind | ms | x denoise32 | bound ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in data["verify"]:
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['prefix']} | {r['kind']} "
                f"| {_f(r['median_ms'])} | {_f(r['vs_denoise32'])} | {_f(r['bound_ms'])} |"
            )
    if data.get("profile"):
        lines += [
            "",
            "## Profile (torch.profiler; denoise forward, 32-token window, prefix 512)",
            "",
            "| model | batch | policy | ms/forward | matmul ms | attention ms | other ms "
            "| kernels | GPU idle | host syncs |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in data["profile"]:
            k = r["kernel_ms"]
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['policy']} | {_f(r['wall_ms'])} | "
                f"{_f(k['matmul'])} | {_f(k['attention'])} | {_f(k['other'])} | "
                f"{r['kernels_per_forward']:.0f} | {_f(r['gpu_idle_share'], '.1%')} | "
                f"{r['host_syncs_per_forward']:.1f} |"
            )
        lines += _top_kernels(data["profile"])
    if data["errors"] or data["skipped"]:
        lines += ["", "## Errors and skipped work", ""]
        lines += [f"- error in {e['section']} ({e['model']}): {e['error']}" for e in data["errors"]]
        lines += [f"- skipped: {s}" for s in data["skipped"]]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


SHORT = {
    "none": "",
    "disabled": "off",
    "token_reuse_0": "t0",
    "token_reuse_25": "t25",
    "token_reuse_50": "t50",
    "token_reuse_75": "t75",
    "layer_pass_0": "p0",
    "layer_pass_4": "p4",
    "layer_pass_8": "p8",
    "reuse_k2_12": "k2",
}


def write_plot(data: dict, path: Path) -> None:
    """Every measured point is drawn; axes are scaled to include all of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    models = list(data["models"])
    colors = {m: f"C{i}" for i, m in enumerate(models)}

    ax = axes[0]
    for m in models:
        rows = [r for r in data["forwards"] if r["model"] == m and r["kind"] == "denoise32"]
        P = max((r["prefix"] for r in rows), key=lambda p: p == 512, default=None)
        rows = sorted((r for r in rows if r["prefix"] == P), key=lambda r: r["batch"])
        if rows:
            xs = [r["batch"] for r in rows]
            ax.plot(xs, [r["median_ms"] for r in rows], "o-", color=colors[m], label=m)
            ax.plot(xs, [r["bound_ms"] for r in rows], "--", color=colors[m], alpha=0.6)
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="ms")
    ax.set_title("denoise forward (32 tokens, prefix 512)\nsolid: measured, dashed: bound")
    ax.legend(fontsize=8)

    ax = axes[1]
    for m in models:
        for b, marker in ((1, "o"), (32, "s")):
            rows = [r for r in data["skip"] if r["model"] == m and r["batch"] == b]
            if rows:
                ax.scatter(
                    [r["flops_ratio"] for r in rows],
                    [r["wall_ratio"] for r in rows],
                    marker=marker,
                    color=colors[m],
                    label=f"{m} batch {b}",
                )
                for r in rows:
                    ax.annotate(
                        SHORT.get(r["policy"], r["policy"]),
                        (r["flops_ratio"], r["wall_ratio"]),
                        fontsize=6,
                        xytext=(3, 2),
                        textcoords="offset points",
                    )
    ax.plot([0, 1.05], [0, 1.05], "k:", lw=1)
    ax.set(xlabel="executed FLOPs / no skip", ylabel="wall / no skip")
    ax.set_title("forced skipping: wall-clock vs FLOPs\n(dotted: time follows FLOPs)")
    ax.legend(fontsize=8)

    ax = axes[2]
    markers = "os^Dv"
    for m in models:
        schedules = sorted(
            {(r.get("block_cache", False), r.get("commit_per_forward", 1)) for r in data["e2e"]}
        )
        for j, (cache, k) in enumerate(schedules):
            batches = sorted({r["batch"] for r in data["e2e"]})
            rows = [e2e_row(data["e2e"], m, b, k, cache) for b in batches]
            rows = [r for r in rows if r]
            if rows:
                ax.plot(
                    [r["batch"] for r in rows],
                    [r["tokens_per_s"] for r in rows],
                    markers[j % len(markers)] + (":" if cache else "-"),
                    color=colors[m],
                    label=f"{m} dLLM, {k}/forward{', sub-block cache' if cache else ''}",
                )
        rows = sorted((r for r in data["ar"] if r["model"] == m), key=lambda r: r["batch"])
        if rows:
            ax.plot(
                [r["batch"] for r in rows],
                [r["tokens_per_s"] for r in rows],
                "x--",
                color=colors[m],
                label=f"{m} AR: transformers, static cache, compiled",
            )
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="generated tokens/s")
    ax.set_title("end to end: dLLM (k tokens per forward, measured) vs compiled AR")
    ax.legend(fontsize=8)

    fig.suptitle(f"v2.bench on {data['gpu'] or data['device']} ({data['dtype']})")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


README_BEGIN = "<!-- speed table: python -m v2.bench --readme JSON -->"
README_END = "<!-- /speed -->"


def _ar_table(data: dict) -> list[str]:
    """The AR baseline next to every measured schedule of the same model and batch."""
    schedules = sorted(
        {(r.get("block_cache", False), r.get("commit_per_forward", 1)) for r in data["e2e"]}
    )
    names = [f"k={k}{' +cache' if cache else ''}" for cache, k in schedules]
    lines = [
        "| model | batch | AR tokens/s | " + " | ".join(names) + " | warm-up s |",
        "|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for r in data["ar"]:
        cells = []
        for cache, k in schedules:
            e = e2e_row(data["e2e"], r["model"], r["batch"], k, cache)
            ratio = _over(e, r)
            cells.append(
                f"{_f(e and e['tokens_per_s'], '.1f')} ({_f(ratio, '.2f')}x)" if e else "-"
            )
        lines.append(
            f"| {r['model']} | {r['batch']} | {_f(r['tokens_per_s'], '.1f')} | "
            + " | ".join(cells)
            + f" | {_f(r['warmup_s'], '.0f')} |"
        )
    return lines


def readme_table(data: dict, source: str) -> str:
    """The README's speed table: the 7B (or first model's) targets, end to end vs compiled AR."""
    model = next((t["model"] for t in data["targets"]), None)
    lines = [
        f"Measured by `{data['command']}` on {data['gpu'] or data['device']} "
        f"({model} shapes, random {data['dtype']} weights; [{source}]({source})):",
        "",
        "| measure | value | goal | met |",
        "|---|---|---|---|",
    ]
    for t in data["targets"]:
        if t["model"] != model:
            continue
        met = {True: "yes", False: "no", None: "-"}[t["met"]]
        lines.append(f"| {t['name']} | {_f(t['value'], '.3f')} | {t['goal']} | {met} |")
    e2e = data["e2e"]
    rows = [r for r in e2e if r["model"] == model and e2e_row(e2e, model, r["batch"]) is r]
    if rows:
        ar = {r["batch"]: r for r in data["ar"] if r["model"] == model}
        lines += [
            "",
            "| end to end, 256 new tokens, tokens/s | "
            + " | ".join(f"batch {r['batch']}" for r in rows)
            + " |",
            "|---|" + "---|" * len(rows),
            "| this engine, threshold 1 | "
            + " | ".join(_f(r["tokens_per_s"], ".0f") for r in rows)
            + " |",
            *(
                f"| this engine, {label} | "
                + " | ".join(
                    _f(
                        (e2e_row(e2e, model, r["batch"], k, cache) or {}).get("tokens_per_s"),
                        ".0f",
                    )
                    for r in rows
                )
                + " |"
                for k, cache, label in (
                    (1, True, "threshold 1, sub-block cache"),
                    (3, False, "3 tokens per forward (forced)"),
                )
                if any(e2e_row(data["e2e"], model, r["batch"], k, cache) for r in rows)
            ),
            "| transformers AR, static cache + torch.compile | "
            + " | ".join(_f(ar.get(r["batch"], {}).get("tokens_per_s"), ".0f") for r in rows)
            + " |",
        ]
    return "\n".join(lines)


def update_readme(json_path: Path, readme: Path) -> None:
    from v2.record import write_text

    data = json.loads(json_path.read_text())
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"error: {readme} has no {README_BEGIN} ... {README_END} block")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    source = json_path.resolve().relative_to(readme.resolve().parent).as_posix()
    write_text(readme, f"{head}{README_BEGIN}\n{readme_table(data, source)}\n{README_END}{tail}")
