"""Write a trained tiny checkpoint's model card (README.md) and plots from its own records.

    python -m v2.tiny.card OUT/checkpoint [--analysis OUT/checkpoint/analysis] [--commit SHA]

Reads `train_log.json` (written by `python -m v2.tiny.train`) and, when present,
`analysis/analysis.json` (written by `python -m v2.analyze`). Writes beside them `loss.png`,
`dev_accuracy.png`, `layer_profile.png` and `README.md`. Every number in the card comes from
those two files; a missing part (no evaluation, no analysis) is said to be missing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

TOKENS_PER_FORWARD_TARGET = 2.0  # issue 16: at threshold 0.9


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(log: dict, out: Path) -> list[str]:
    """loss.png and dev_accuracy.png; returns the names written."""
    plt = _plt()
    written = []
    if log.get("loss_curve"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([p["seconds"] for p in log["loss_curve"]], [p["loss"] for p in log["loss_curve"]])
        ax.set_yscale("log")
        ax.set_xlabel("seconds of training")
        ax.set_ylabel("loss (mean of 20 steps)")
        ax.set_title(f"{log['steps']} steps on {log['device_name']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=80)
        plt.close(fig)
        written.append("loss.png")
    if log.get("dev_curve"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = [p["seconds"] for p in log["dev_curve"]]
        ax.plot(x, [100 * p["dev_accuracy"] for p in log["dev_curve"]], marker="o")
        ax.set_xlabel("seconds of training")
        ax.set_ylabel("dev accuracy at threshold 1 (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "dev_accuracy.png", dpi=80)
        plt.close(fig)
        written.append("dev_accuracy.png")
    return written


def layer_profile(analysis: dict) -> dict[str, list[float | None]]:
    """Per layer, the unweighted mean over denoise steps of analyze's per-(step, layer) means:
    cos(x_l, x_{l-1}) (what the layer policy thresholds) and cos(x_l now, x_l at the previous
    denoise step) (what the token policy thresholds)."""
    profile = {}
    for key in ("layer_cosine", "token_cosine"):
        rows = analysis["by_step_layer"][key]  # [steps][layers]
        per_layer = []
        for layer in range(analysis["num_layers"]):
            vals = [row[layer] for row in rows if row[layer] is not None]
            per_layer.append(sum(vals) / len(vals) if vals else None)
        profile[key] = per_layer
    return profile


def plot_layer_profile(profile: dict, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    labels = {
        "layer_cosine": "cos(x_l, x_{l-1}): consecutive layers' inputs",
        "token_cosine": "cos(x_l, same position at the previous denoise step)",
    }
    for key, values in profile.items():
        pts = [(i, v) for i, v in enumerate(values) if v is not None]
        ax.plot([i for i, _ in pts], [v for _, v in pts], marker="o", label=labels[key])
    ax.set_xlabel("layer l")
    ax.set_ylabel("cosine (mean over denoise steps)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _pct(acc: dict) -> str:
    """Accuracy +- its standard error (v2.record.accuracy: none for one problem, "-" for none)."""
    if acc["accuracy"] is None:
        return "-"
    err = acc.get("stderr")
    return f"{100 * acc['accuracy']:.1f} %" + (f" +- {100 * err:.1f}" if err is not None else "")


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def render(
    log: dict, analysis: dict | None, plots: list[str], commit: str, run: str | None = None
) -> str:
    mc = log["model_config"]
    tc = log["train_config"]
    n = log["parameters"]
    lines = [
        f"# tiny-gsm-{log.get('task', 'basic')}: a {mc['num_hidden_layers']}-layer "
        "Fast-dLLM-v2-format model we train ourselves",
        "",
        f"A {n / 1e6:.2f}M-parameter Qwen2 network ({mc['num_hidden_layers']} layers, hidden "
        f"{mc['hidden_size']}, {mc['num_attention_heads']} query / {mc['num_key_value_heads']} "
        f"KV heads, intermediate {mc['intermediate_size']}, vocabulary {mc['vocab_size']}, "
        f"untied lm_head; {log['weights_mb_bf16']:.1f} MB of bf16 safetensors) trained from "
        "scratch with the Fast-dLLM v2 block-diffusion objective (block "
        f"{mc['block_size']}) on synthetic GSM8K-format problems of the `{log.get('task')}` "
        "family of `v2/tiny/data.py`, in the release layout (loads with "
        "`v2.checkpoint.load_model`). This card is generated by `python -m v2.tiny.card` from "
        "`train_log.json` and `analysis/analysis.json` beside it.",
        "",
        "## How it was made",
        "",
        *([f"    {run}", "", "which ran (its training stage):", ""] if run else []),
        f"    {log['command']}",
        "",
        f"on {log['device_name']}, seed {log['seed']}, code at commit {commit}: "
        f"{log['steps']} steps of {tc['batch_size']} problems (each in two complementary noisy "
        f"views), {log['wall_seconds']:.0f} s of training loop (dev evaluations included; "
        f"+{log['setup_seconds']:.0f} s setup), stopped by: {log.get('stopped', 'budget')}; "
        f"final loss {log['final_loss']:.4f} (mean of the last 50 steps), "
        f"{log['problems_per_second']:.0f} problems/s"
        + (
            f", peak GPU memory {log['peak_gpu_memory_gb']:.1f} GB."
            if log.get("peak_gpu_memory_gb")
            else "."
        ),
        *(
            [
                f"Trained by {len(log['processes'])} processes, each resuming the saved state of "
                "the one before (`--state`, `--resume`); the loop seconds above are their sum: "
                + "; ".join(
                    f"steps {p['steps'][0]}-{p['steps'][1]} in {p['seconds']:.0f} s"
                    + (
                        f" ({p['compile_warm_up_s']:.0f} s compiling)"
                        if p.get("compile_warm_up_s")
                        else ""
                    )
                    + f", stopped by {p['stopped'] or 'a kill'}"
                    for p in log["processes"]
                )
                + "."
            ]
            if len(log.get("processes") or []) > 1
            else []
        ),
        f"Training data: {log['train_samples']} generated problems (seed {log['seed']}; "
        f"{log.get('train_samples_dropped', 0)} longer than {tc['max_len']} tokens dropped) that "
        f"exclude every question of `{log.get('test_file')}`"
        + (f" and `{log['dev_file']}`." if log.get("dev_file") else "."),
        f"Settings: lr {tc['lr']} (warmup {tc['warmup_steps']} steps, cosine to "
        f"{tc['min_lr_ratio']}x over the budget of {tc['minutes']} min), length buckets "
        f"{'on' if tc.get('bucket') else 'off'}, compile {'on' if tc['compile'] else 'off'}, "
        f"stop at dev accuracy {tc.get('stop_at_dev_acc') or 'off'}.",
        "",
    ]
    if log.get("task_levels"):
        lines += [
            "Each problem draws one of these levels uniformly (`HARD_LEVELS`, `v2/tiny/data.py`):",
            "",
            "| level | operations | start up to | operands up to | results up to | factors up to "
            "| compound steps | distractors |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for i, lv in enumerate(log["task_levels"]):
            lines.append(
                f"| {i} | {lv['steps'][0]}-{lv['steps'][1]} | {lv['max_start']} | "
                f"{lv['max_operand']} | {lv['max_result']} | {lv['max_factor']} | "
                f"{lv['compound']:.0%} | {lv['distractors'][0]}-{lv['distractors'][1]} |"
            )
        lines.append("")
    if "loss.png" in plots:
        lines += ["![loss curve](loss.png)", ""]
    if log.get("dev_curve"):
        lines += [
            "## Dev accuracy during training",
            "",
            f"Strict accuracy at threshold 1 on `{log.get('dev_file')}` (n = "
            f"{log.get('dev_problems', '?')}), every "
            f"{tc.get('dev_every_s')} s of the budget and once at the end:",
            "",
            "| seconds | step | dev accuracy |",
            "|---|---|---|",
        ]
        lines += [
            f"| {p['seconds']:.0f} | {p['step']} | {100 * p['dev_accuracy']:.1f} % |"
            for p in log["dev_curve"]
        ]
        lines += ["", "![dev accuracy](dev_accuracy.png)", ""]
    lines += ["## Measured accuracy", ""]
    ev = log.get("eval")
    if not ev:
        lines += ["Not evaluated (the run's evaluation did not finish).", ""]
    else:
        first = next(iter(ev.values()))
        lines += [
            "The same command evaluated the saved checkpoint with our engine (greedy, chat "
            f"template, 0-shot, max_new_tokens 256) on `{log.get('test_file')}` (n = "
            f"{first['n']}); standard error sqrt(p(1-p)/(n-1)):",
            "",
            "| threshold | n | strict (`#### N`) | flexible (last number) | tokens per forward |",
            "|---|---|---|---|---|",
        ]
        for r in ev.values():
            lines.append(
                f"| {r['threshold']} | {r['n']} | {_pct(r['strict_match'])} | "
                f"{_pct(r['flexible_extract'])} | {r['tokens_per_forward']:.2f} |"
            )
        lines.append("")
        levels = [r for r in ev.values() if r.get("strict_by_level")]
        if levels:
            lines += [
                "Strict accuracy by difficulty level (`HARD_LEVELS` in `v2/tiny/data.py`):",
                "",
                "| threshold | "
                + " | ".join(f"level {k}" for k in levels[0]["strict_by_level"])
                + " |",
                "|---|" + "---|" * len(levels[0]["strict_by_level"]),
            ]
            for r in levels:
                cells = [
                    f"{100 * v['accuracy']:.1f} % (n {v['n']})"
                    for v in r["strict_by_level"].values()
                ]
                lines.append(f"| {r['threshold']} | " + " | ".join(cells) + " |")
            lines.append("")
        at09 = ev.get("threshold_0.9")
        if at09:
            tpf = at09["tokens_per_forward"]
            verdict = "meets" if tpf >= TOKENS_PER_FORWARD_TARGET else "does NOT meet"
            lines += [
                f"Tokens per forward at threshold 0.9: {tpf:.2f} ({verdict} the issue's "
                f">= {TOKENS_PER_FORWARD_TARGET:g}; generated tokens per row and decoding "
                "forward, batches of the evaluation).",
                "",
            ]
    lines += ["## Layer profile", ""]
    if analysis is None:
        lines += ["No analysis (`analysis/analysis.json` is missing).", ""]
    else:
        profile = layer_profile(analysis)
        lines += [
            f"    {analysis['command']}",
            "",
            f"({analysis['prompts']} problems, {analysis['forwards']} denoise forwards.) Per "
            "layer l, the mean over denoise steps (unweighted) of (a) cos(x_l, x_{l-1}), the "
            "inputs of consecutive layers, which the layer policy thresholds, and (b) "
            "cos(x_l now, x_l at the previous denoise step of the block) per position, which "
            "the token policy thresholds:",
            "",
            "![layer profile](layer_profile.png)",
            "",
            "| layer | " + " | ".join(str(i) for i in range(analysis["num_layers"])) + " |",
            "|---|" + "---|" * analysis["num_layers"],
            "| (a) consecutive layers | "
            + " | ".join(_fmt(v, ".3f") for v in profile["layer_cosine"])
            + " |",
            "| (b) adjacent steps | "
            + " | ".join(_fmt(v, ".3f") for v in profile["token_cosine"])
            + " |",
            "",
            "Thresholds that would skip 10 / 25 / 50 % of the units in scope on this data:",
            "",
        ]
        for name, th in analysis["thresholds"].items():
            cells = [f"{f}: {_fmt(v and v.get('threshold'))}" for f, v in th.items()]
            lines.append(f"- {name}: " + ", ".join(cells))
        lines += ["", "Heatmaps by denoise step and layer: `analysis/analysis.png`.", ""]
    return "\n".join(lines)


def write_card(
    checkpoint: Path,
    analysis_dir: Path | None = None,
    commit: str = "unknown",
    run: str | None = None,
) -> Path:
    """Plots and README.md in `checkpoint` from its train_log.json (and analysis, if any)."""
    checkpoint = Path(checkpoint)
    log = json.loads((checkpoint / "train_log.json").read_text())
    analysis_path = Path(analysis_dir or checkpoint / "analysis") / "analysis.json"
    analysis = json.loads(analysis_path.read_text()) if analysis_path.exists() else None
    plots = plot_curves(log, checkpoint)
    if analysis is not None:
        title = f"per-layer cosines over {analysis['prompts']} problems"
        plot_layer_profile(layer_profile(analysis), checkpoint / "layer_profile.png", title)
    readme = checkpoint / "README.md"
    readme.write_text(render(log, analysis, plots, commit, run) + "\n")
    return readme


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m v2.tiny.card", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--analysis", type=Path, help="folder of analysis.json (default: analysis/)")
    p.add_argument("--commit", default="unknown", help="the code's commit, for the card")
    p.add_argument("--run", help="the command that ran the whole job (sbatch/train_deep_tiny.sh)")
    args = p.parse_args(argv)
    print(f"wrote {write_card(args.checkpoint, args.analysis, args.commit, args.run)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
