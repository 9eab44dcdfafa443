"""Speculative decoding against the autoregressive decode, token for token, on the whole tiny_gsm
test split, float32 on the CPU (docs/concepts/speculative-decoding.md):

    PYTHONPATH=. python docs/results/data/cpu_speculative_identity/check.py OUT.json
"""

import json
import sys
import time

import torch

from v2.generate import FastDLLM, GenerationConfig
from v2.policies import make_policy
from v2.tiny.data import read_jsonl
from v2.tiny.train import extract_answers, user_message

BATCH = 50


def main(out: str) -> None:
    lm = FastDLLM.load("v2/tiny/checkpoint", dtype=torch.float32, device="cpu")
    problems = read_jsonl("v2/tiny/data/test.jsonl")
    texts = [user_message(p["question"]) for p in problems]
    gold = [p["answer"].split("####")[-1].strip() for p in problems]
    draft = dict(max_new_tokens=256, threshold=0.7, small_block_size=8, decode="speculative")
    runs = {
        "autoregressive": (
            GenerationConfig(max_new_tokens=256, threshold=1.0, decode="autoregressive"),
            None,
        ),
        "speculative_thr0.7_s8": (GenerationConfig(**draft), None),
        "speculative_thr0.7_s8_reuse_k2_middle": (
            GenerationConfig(**draft),
            ("reuse", {"reuse_k": 2, "layer_subset": "middle"}),
        ),
    }
    record = {"n": len(texts), "dtype": "float32", "device": "cpu", "runs": {}}
    tokens = {}
    for name, (cfg, policy_spec) in runs.items():
        start, ids, hits = time.time(), [], []
        policy = make_policy(policy_spec[0], **policy_spec[1]) if policy_spec else None
        for s in range(0, len(texts), BATCH):
            result = lm.generate(texts[s : s + BATCH], cfg, policy, chat=True)
            for o, g in zip(result.outputs, gold[s : s + BATCH], strict=True):
                ids.append(o.token_ids)
                hits.append(extract_answers(o.text)[1] == g)
            print(name, s + BATCH, f"{time.time() - start:.0f}s", flush=True)
        tokens[name] = ids
        record["runs"][name] = {
            "flexible_accuracy": sum(hits) / len(hits),
            "seconds": time.time() - start,
        }
    for name in runs:
        pairs = zip(tokens[name], tokens["autoregressive"], strict=True)
        record["runs"][name]["differ_from_autoregressive"] = sum(a != b for a, b in pairs)
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
