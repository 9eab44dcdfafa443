"""On the committed tiny model: disabled policies give the baseline token for token, and policies
that skip really remove executed FLOPs (so the equality is not vacuous).

The first 50 test-split problems run as one batch with the chat template, at decoding thresholds
1 and 0.9, with and without the sub-block cache (compute-skipping.md sections 1-3; issues 5, 6).
A forward over the 50 rows costs ~0.1-0.2 s of CPU, and at threshold 1 a row needs one forward per
token, so by default every row generates 12 tokens: the batch still runs commits and block
transitions (15 of the 50 rows cross a block boundary), rows leave it at different blocks, and
with the cache it runs sub-block forwards (~70 s of CPU for the module on one core).
FAST_DLLM_FULL_TESTS=1 runs the same checks to the end of every answer (max_new_tokens 256:
every row stops on EOS), several minutes of CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from layer_skip_generation_functions import LayerReusePolicy, LayerSkipPolicy
from token_skip_generation_functions import TokenSkipPolicy
from v2.generate import FastDLLM, GenerationConfig, generate
from v2.tiny.data import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "v2" / "tiny" / "checkpoint"
N_PROBLEMS = 50
FULL = os.environ.get("FAST_DLLM_FULL_TESTS", "") not in ("", "0")
MAX_NEW_TOKENS = 256 if FULL else 12

DISABLED = {
    "token_cos1": lambda: TokenSkipPolicy(cosine_threshold=1.0),
    "layer_cos1": lambda: LayerSkipPolicy(cosine_threshold=1.0),
    "reuse_k1_first": lambda: LayerReusePolicy(reuse_k=1, layer_subset="first"),
    "reuse_k1_middle": lambda: LayerReusePolicy(reuse_k=1, layer_subset="middle"),
    "reuse_k1_last": lambda: LayerReusePolicy(reuse_k=1, layer_subset="last"),
}
SETTINGS = [(cache, threshold) for cache in (False, True) for threshold in (1.0, 0.9)]


@pytest.fixture(scope="module")
def tiny():
    # One thread: on a busy 2-core machine OpenMP threads spinning against other processes
    # cost several times the CPU time, and these matmuls are small.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    lm = FastDLLM.load(CHECKPOINT, device="cpu")
    problems = read_jsonl(ROOT / "v2" / "tiny" / "data" / "test.jsonl")[:N_PROBLEMS]
    texts = [f"Question: {p['question']}\nAnswer:" for p in problems]
    yield lm, lm.encode(texts, chat=True)
    torch.set_num_threads(threads)


def config(cache: bool, threshold: float) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=MAX_NEW_TOKENS, threshold=threshold, use_block_cache=cache
    )


@pytest.fixture(scope="module")
def baselines(tiny):
    """The no-policy run, once per (cache, threshold)."""
    lm, prompts = tiny
    cache: dict = {}

    def get(block_cache: bool, threshold: float):
        key = (block_cache, threshold)
        if key not in cache:
            cache[key] = generate(lm.model, prompts, lm.ids, config(*key))
        return cache[key]

    return get


def test_baseline_batch_is_not_trivial(tiny, baselines):
    """The runs below cover what they claim: 50 rows, several blocks, sub-block forwards."""
    _, prompts = tiny
    assert len(prompts) == N_PROBLEMS
    base = baselines(True, 1.0)
    assert base.stats.forwards["commit"] >= 2 and base.stats.forwards["denoise_sub"] > 0
    assert all(len(o.token_ids) > 0 for o in base.outputs)
    if FULL:
        assert {o.finish_reason for o in base.outputs} == {"eos"}


@pytest.mark.parametrize("name", list(DISABLED))
@pytest.mark.parametrize(("block_cache", "threshold"), SETTINGS)
def test_disabled_policy_gives_the_baseline_on_the_tiny_model(
    tiny, baselines, name, block_cache, threshold
):
    lm, prompts = tiny
    base = baselines(block_cache, threshold)
    out = generate(lm.model, prompts, lm.ids, config(block_cache, threshold), DISABLED[name]())
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in base.outputs]
    assert [o.finish_reason for o in out.outputs] == [o.finish_reason for o in base.outputs]
    assert out.stats.forwards == base.stats.forwards
    assert out.stats.row_forwards == base.stats.row_forwards
    assert out.stats.executed_flops == base.stats.executed_flops


SKIPPING = {
    "token_cos0.9": lambda: TokenSkipPolicy(cosine_threshold=0.9),
    "reuse_k2_middle": lambda: LayerReusePolicy(reuse_k=2, layer_subset="middle"),
}


@pytest.mark.parametrize("name", list(SKIPPING))
def test_skipping_policy_removes_executed_flops_on_the_tiny_model(tiny, baselines, name):
    lm, prompts = tiny
    base = baselines(False, 0.9)
    out = generate(lm.model, prompts, lm.ids, config(False, 0.9), SKIPPING[name]())
    s = out.stats
    assert s.executed_flops < s.baseline_flops  # per forward: these forwards skipped work
    assert s.executed_flops < base.stats.executed_flops  # end to end: less than no policy
    assert sum(s.executed_units_per_layer) < sum(s.baseline_units_per_layer)
    assert s.executed_units_per_layer[0] == s.baseline_units_per_layer[0]  # layer 0 computes
