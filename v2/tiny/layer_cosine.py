"""How much each layer changes the hidden state on the tiny model: for every denoise forward and
busy row, the mean over its positions of cos(input of layer l, input of layer l-1), which is what
the layer-skip policy thresholds. Explains which cosine thresholds can skip anything here.

    python -m v2.tiny.layer_cosine --n 16 --out docs/results/data/tiny_layer_cosine_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from layer_skip_generation_functions import row_cosine
from v2.generate import FastDLLM, GenerationConfig
from v2.policy import Policy
from v2.tiny.data import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
CUTS = (0.9, 0.95, 0.98, 0.99)


class Probe(Policy):
    """Computes everything; records the per-row cosine the layer policy would see."""

    name = "probe"

    def __init__(self, num_layers: int):
        self.rows: list[list[float]] = [[] for _ in range(num_layers)]

    def begin_forward(self, ctx) -> None:
        self.previous = None

    def plan(self, layer, x, ctx):
        if self.previous is not None:
            busy = ctx.units.any(1) if ctx.units is not None else slice(None)
            self.rows[layer] += row_cosine(x, self.previous, ctx.units)[busy].tolist()
        self.previous = x.float().clone()
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m v2.tiny.layer_cosine", description=__doc__)
    p.add_argument("--n", type=int, default=16, help="test problems (batched)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    lm = FastDLLM.load(ROOT / "v2/tiny/checkpoint", dtype=torch.float32, device="cpu")
    problems = read_jsonl(ROOT / "v2/tiny/data/test.jsonl")[: args.n]
    probe = Probe(lm.model.cfg.num_hidden_layers)
    cfg = GenerationConfig(max_new_tokens=256, threshold=1.0)
    lm.generate([q["question"] for q in problems], cfg, probe, chat=True)
    layers = []
    for i, rows in enumerate(probe.rows):
        if rows:
            t = torch.tensor(rows)
            above = {str(c): float((t > c).float().mean()) for c in CUTS}
            layers.append(
                {
                    "layer": i,
                    "n": len(rows),
                    "mean": float(t.mean()),
                    "max": float(t.max()),
                    "fraction_above": above,
                }
            )
            print(
                f"layer {i}: mean {t.mean():.3f} max {t.max():.3f} "
                + " ".join(f">{c}: {v:.1%}" for c, v in above.items())
            )
    record = {
        "command": "python -m v2.tiny.layer_cosine " + " ".join(argv or sys.argv[1:]),
        "problems": args.n,
        "threshold": 1.0,
        "device": "cpu",
        "layers": layers,
    }
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
