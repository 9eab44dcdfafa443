"""Skipping policies on the tiny model, measured with the engine directly (no lm_eval needed, so
it runs on a bare GPU machine): accuracy on the whole test split, executed FLOPs, tokens per
forward, forwards per problem, and wall-clock tokens/s at batch 32 and batch 1.

    python -m v2.tiny.policy_sweep --out docs/results/tiny_sweep.json

Scoring is tiny_gsm's filters (`v2.tiny.train.extract_answers`): strict = the `#### N` answer,
flexible = the last number in the output.
Accuracy and FLOPs come first for every config; wall-clock is then timed in `--speed-rounds`
interleaved rounds (order reversed every other round), after one untimed pass of every config's
timed work (compilation, graph capture), and the median kept with the spread (min / median / max
over the rounds, `tokens_per_second_<batch>_spread`), because timing each config once, in list
order, measured the first config (the baseline) up to 1.6x slower than configs doing exactly its
work.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from v2.generate import FastDLLM, GenerationConfig
from v2.policies import make_policy
from v2.tiny.data import read_jsonl
from v2.tiny.train import score

ROOT = Path(__file__).resolve().parents[2]

# (config id, policy name, options)
CONFIGS = [
    ("baseline", "none", {}),
    *[
        (f"token_ct{t}", "token", {"cosine_threshold": t})
        for t in (1.0, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9)
    ],
    *[(f"token_rr{r}", "token", {"reuse_ratio": r}) for r in (0.25, 0.5, 0.75)],
    *[
        (f"layer_ct{t}", "layer", {"cosine_threshold": t})
        for t in (1.0, 0.999, 0.995, 0.99, 0.98, 0.95)
    ],
    *[
        (
            f"layer_ct{t}_pf2_pl2",
            "layer",
            {"cosine_threshold": t, "protect_first": 2, "protect_last": 2},
        )
        for t in (0.999, 0.99, 0.95)
    ],
    ("reuse_k1", "reuse", {"reuse_k": 1, "layer_subset": "middle"}),
    *[
        (f"reuse_k{k}_{s}", "reuse", {"reuse_k": k, "layer_subset": s})
        for k in (2, 3)
        for s in ("first", "middle", "last")
    ],
]


def accuracy(hits: list[bool]) -> dict:
    n = len(hits)
    p = sum(hits) / n
    return {"value": p, "stderr": math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0, "n": n}


def run(lm, texts, gold, policy_name, options, batch, threshold) -> dict:
    cfg = GenerationConfig(max_new_tokens=256, threshold=threshold)
    strict, flexible, stats = score(
        lm, texts, gold, cfg, batch, lambda: make_policy(policy_name, **options)
    )
    d = stats.to_dict()
    return {
        "strict": accuracy(strict),
        "flexible": accuracy(flexible),
        "stats": d,
        "forwards_per_problem": sum(d["row_forwards"].values()) / len(texts),
    }


def _command(argv: list[str] | None) -> str:
    """The command line as typed (`python -m ...`), not the script path sys.argv holds."""
    if argv is not None:
        return shlex.join(["python", "-m", "v2.tiny.policy_sweep", *argv])
    args = list(getattr(sys, "orig_argv", sys.argv))
    return shlex.join([Path(args[0]).name, *args[1:]])


def _git_commit() -> str | None:
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0 or not head.stdout.strip():
        return None
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def _save(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "tiny_sweep.json")
    p.add_argument("--threshold", type=float, default=1.0, help="decoding threshold")
    p.add_argument("--n", type=int, default=None, help="problems for accuracy (default: all)")
    p.add_argument("--n-speed32", type=int, default=128)
    p.add_argument("--n-speed1", type=int, default=16)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--budget-seconds", type=float, default=1e9)
    p.add_argument(
        "--speed-rounds", type=int, default=3, help="interleaved timing rounds (median reported)"
    )
    args = p.parse_args(argv)
    problems = read_jsonl(ROOT / "v2" / "tiny" / "data" / "test.jsonl")[: args.n]
    texts = [f"Question: {q['question']}\nAnswer:" for q in problems]
    gold = [q["answer"].split("####")[-1].strip() for q in problems]
    lm = FastDLLM.load(ROOT / "v2" / "tiny" / "checkpoint")
    device = str(lm.model.embed_tokens.weight.device)
    record = {
        "command": _command(argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "git_commit": _git_commit(),
        "threshold": args.threshold,
        "settings": {
            "n_accuracy": len(problems),
            "batch_accuracy": 250,
            "n_speed32": min(args.n_speed32, len(problems)),
            "n_speed1": min(args.n_speed1, len(problems)),
            "max_new_tokens": 256,
            "budget_seconds": args.budget_seconds,
            "speed_rounds": args.speed_rounds,
        },
        "planned": [cid for cid, _, _ in CONFIGS if not args.only or cid in args.only],
        "configs": {},
    }
    t0 = time.time()
    chosen = [(cid, n, o) for cid, n, o in CONFIGS if not args.only or cid in args.only]
    measured = []
    # Accuracy and FLOPs (deterministic) first, within 60 % of the budget.
    for cid, name, options in chosen:
        if time.time() - t0 > 0.6 * args.budget_seconds:
            print(f"budget spent; skipping {cid}", flush=True)
            continue
        full = run(lm, texts, gold, name, options, 250, args.threshold)
        record["configs"][cid] = {"policy": name, "options": options, "accuracy": full}
        measured.append((cid, name, options))
        s = full["stats"]
        print(
            f"{cid:24s} flex {full['flexible']['value']:.3f}+-{full['flexible']['stderr']:.3f} "
            f"flops/fwd {s['flops_ratio']:.3f} tpf {s['tokens_per_forward']:.2f}",
            flush=True,
        )
        _save(args.out, record)
    # Wall-clock in interleaved rounds (the order reversed every other round), median over the
    # rounds: a config's speed then does not depend on its place in the list. Round 1 always
    # completes; later rounds run while the budget lasts.
    timed = (("b32", 32, args.n_speed32), ("b1", 1, args.n_speed1))
    speeds: dict[str, dict[str, list[float]]] = {
        cid: {"b32": [], "b1": []} for cid, _, _ in measured
    }
    # Warm-up: one untimed pass of the timed work of every config, so that no config's first
    # timed round pays for lazy CUDA/cuBLAS initialisation, torch.compile or CUDA-graph capture
    # of its plans (a first run of this sweep, warming the baseline alone, measured the baseline
    # 0.67x as fast as token_ct1.0, which executes exactly the same forwards).
    for _cid, name, options in measured:
        for _, batch, n in timed:
            run(lm, texts[:n], gold[:n], name, options, batch, args.threshold)
    record["settings"]["warmup"] = "one untimed pass of each config's timed work"
    for r in range(args.speed_rounds):
        if r and time.time() - t0 > args.budget_seconds:
            print(f"budget spent after {r} speed round(s)", flush=True)
            break
        for cid, name, options in measured if r % 2 == 0 else measured[::-1]:
            for key, batch, n in timed:
                out = run(lm, texts[:n], gold[:n], name, options, batch, args.threshold)
                speeds[cid][key].append(out["stats"]["tokens_per_second"])
        for cid, _, _ in measured:
            c = record["configs"][cid]
            for key in ("b32", "b1"):
                c[f"tokens_per_second_{key}"] = statistics.median(speeds[cid][key])
                c[f"tokens_per_second_{key}_rounds"] = speeds[cid][key]
                c[f"tokens_per_second_{key}_spread"] = spread(speeds[cid][key])
        record["settings"]["speed_rounds_done"] = r + 1
        _save(args.out, record)
        print(
            f"speed round {r + 1}: "
            + ", ".join(
                f"{cid} {speeds[cid]['b32'][-1]:.0f}/{speeds[cid]['b1'][-1]:.0f}"
                for cid, _, _ in measured
            )
            + " tok/s (b32/b1)",
            flush=True,
        )
    if measured and speeds[measured[0][0]]["b32"]:
        print(f"tokens/s on {record['device']}: median [min - max] over rounds", flush=True)
        for cid, _, _ in measured:
            c = record["configs"][cid]
            print(
                f"  {cid:24s} b32 {spread_text(c['tokens_per_second_b32_spread'])}   "
                f"b1 {spread_text(c['tokens_per_second_b1_spread'])}",
                flush=True,
            )
        if record["device"] == "cpu":
            print("  (CPU timings are not results: they swing between runs)", flush=True)
    return 0


def spread(values: list[float]) -> dict:
    """The spread of one config's tokens/s over the timing rounds."""
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "rounds": len(values),
    }


def spread_text(s: dict) -> str:
    """`123.4 [120.1 - 130.2]` (median [min - max]); a single round is marked as such."""
    if s["rounds"] < 2:
        return f"{s['median']:.1f} (1 round: not comparable)"
    return f"{s['median']:.1f} [{s['min']:.1f} - {s['max']:.1f}]"


if __name__ == "__main__":
    sys.exit(main())
