"""The forward-graph probe behind docs/benchmarks/README.md ("Forward graphs"): the engine with
forward records (one CUDA graph per forward) against the same engine with forward_graphs=False
(one graph per layer), in the same run, interleaved. (It ran with MAX_RECORDS = 0, which the
engine option now spells; part A's question is now also `python -m v2.bench --sections skip`
run with and without `--no-forward-graphs`, each against its own run's baseline.)

  A. 7B shapes, denoise 32-token window, prefix 512, batch 1 and 32, the bench's forced policies
     none, token_reuse_0 / 50, layer_pass_0 / 8, reuse_k2_12 (skipping steps only).
  B. The tiny checkpoint end to end (main-job settings: threshold 0.9): baseline, token_ct0.99,
     token_rr0.5; 128 problems at batch 32 and 8 at batch 1; one engine per (config, variant)
     kept across rounds; interleaved rounds, the first untimed.

    PYTHONPATH=. OUT=DIR python docs/benchmarks/forward-graphs/probe.py [A|B|AB]
"""

import copy
import json
import os
import statistics
import sys
import time

import torch

from v2.bench.forced import skip_policies
from v2.bench.models import build_random, special_ids, token_tensor
from v2.engine import Engine
from v2.generate import FastDLLM, GenerationConfig
from v2.model import ModelConfig
from v2.policies import make_policy
from v2.tiny.data import read_jsonl
from v2.tiny.train import user_message

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 3
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def ms(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t) * 1e3


def variants(make_engine):
    """The same engine twice: forward records on, and off."""
    on, off = make_engine(), make_engine()
    off.forward_graphs = False
    return (("records", on), ("loop", off))


def part_a(res: dict) -> None:
    big = DEV.type == "cuda"
    sizes = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28)
    if not big:  # a CPU smoke test of the script
        sizes = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    cfg = ModelConfig(
        vocab_size=152064 if big else 512,
        num_hidden_layers=28,
        num_key_value_heads=4 if big else 2,
        block_size=32,
        **sizes,
    )
    model = build_random(cfg, DEV, torch.bfloat16 if big else torch.float32)
    ids = special_ids(cfg.vocab_size)
    P, B, S = 512, 32, 8
    wanted = ("none", "token_reuse_0", "token_reuse_50", "layer_pass_0", "layer_pass_8")
    for b in (1, 32):
        prompt = token_tensor(ids, cfg.vocab_size, b, P, DEV)
        g = torch.Generator(device=DEV).manual_seed(b)
        blocks = [token_tensor(ids, cfg.vocab_size, b, B, DEV) for _ in range(7)]
        for i, blk in enumerate(blocks[1:], 1):
            blk[torch.rand(blk.shape, device=DEV, generator=g) < 0.1 * i] = ids.mask
        out = torch.arange(S, 2 * S, device=DEV) - 1
        runs = []
        for label, policy, _ in skip_policies(28):
            if label in wanted or label.startswith("reuse_k"):
                for variant, e in variants(lambda p=policy: Engine(model, copy.deepcopy(p))):
                    e.allocate(b, P + B)
                    e.prefill(prompt)
                    runs.append((label, variant, e, []))
        for r in range(1 + ROUNDS):
            for label, _, e, times in runs if r % 2 else runs[::-1]:
                e.begin_block()
                e.logits(e.denoise(blocks[0], 0, out))
                for step in range(1, 7):
                    t = ms(lambda e=e, blk=blocks[step], o=out: e.logits(e.denoise(blk, 0, o)))
                    if r and (not label.startswith("reuse_k") or step % 2):
                        times.append(t)
        base = {v: statistics.median(t) for label, v, _, t in runs if label == "none"}
        for label, variant, e, times in runs:
            m = statistics.median(times)
            row = dict(batch=b, policy=label, variant=variant, median_ms=m, n=len(times))
            row.update(min_ms=min(times), max_ms=max(times), ratio_vs_none=m / base[variant])
            row.update(replays=dict(e.replays), graph_sets=len(e.graphs.sets))
            res["A"].append(row)
            log(f"7b b{b} {label} {variant}: {m:.3f} ms, x{m / base[variant]:.3f} vs none")
            e.cache = None


def part_b(res: dict) -> None:
    probs = read_jsonl("v2/tiny/data/test.jsonl")
    texts = [user_message(p["question"]) for p in probs]
    gen = GenerationConfig(max_new_tokens=256, threshold=0.9)
    configs = [
        ("baseline", "none", {}),
        ("token_ct0.99", "token", {"cosine_threshold": 0.99}),
        ("token_rr0.5", "token", {"reuse_ratio": 0.5}),
    ]
    runs = []
    for cid, name, options in configs:
        for variant in ("records", "loop"):
            lm = FastDLLM.load("v2/tiny/checkpoint", device=DEV.type)
            policy = make_policy(name, **options)
            lm.generate(texts[:1], gen, policy, chat=True)  # makes the model's engine
            if variant == "loop":
                e = lm.model._v2_engine
                e.forward_graphs = False
                e._records.clear()
            runs.append((cid, variant, lm, policy, {"b32": [], "b1": []}))
    timed = (("b32", 32, 128), ("b1", 1, 8)) if DEV.type == "cuda" else (("b32", 4, 4),)
    for r in range(1 + ROUNDS):
        for _, _, lm, policy, speeds in runs if r % 2 else runs[::-1]:
            for key, batch, n in timed:
                sync()
                t, tokens = time.perf_counter(), 0
                for s in range(0, n, batch):
                    result = lm.generate(texts[s : s + batch], gen, policy, chat=True)
                    tokens += sum(len(o.token_ids) for o in result.outputs)
                sync()
                if r:
                    speeds[key].append(tokens / (time.perf_counter() - t))
    base = {(v, k): statistics.median(s[k]) for c, v, _, _, s in runs if c == "baseline" for k in s}
    for cid, variant, lm, _, speeds in runs:
        e = lm.model._v2_engine
        row = dict(config=cid, variant=variant, replays=dict(e.replays))
        row["graph_sets"] = len(e.graphs.sets)
        for key, values in speeds.items():
            if values:
                row[f"tok_s_{key}"] = values
                row[f"median_{key}"] = statistics.median(values)
                row[f"ratio_{key}"] = statistics.median(values) / base[(variant, key)]
        res["B"].append(row)
        log(cid, variant, {k: round(v, 3) for k, v in row.items() if k.startswith("ratio")})


def main() -> None:
    part = sys.argv[1] if len(sys.argv) > 1 else "AB"
    res = {"A": [], "B": []}
    if "A" in part:
        part_a(res)
    if "B" in part:
        part_b(res)
    out = os.environ.get("OUT", "/tmp")
    with open(f"{out}/probe_fwd.json", "w") as f:
        json.dump(res, f, indent=1)
    log("done")


if __name__ == "__main__":
    main()
