"""A plan given as one int for every unit (PASS / REUSE) runs without a device round trip and
gives exactly what the same plan given as a tensor gives."""

import pytest
import torch

from layer_skip_generation_functions import LayerReusePolicy
from tests.conftest import IDS, prompt, random_network
from v2.bench.forced import ForcedLayerPass
from v2.generate import GenerationConfig, generate
from v2.layer_plans import LayerRunner
from v2.policy import ALL_COMPUTE, OnHost


class AsTensor:
    """Wraps a policy and hands the engine its int plans expanded to tensors."""

    def __init__(self, policy):
        self.inner = policy

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def plan(self, layer, ctx):
        a = self.inner.plan(layer, ctx)
        if a == ALL_COMPUTE:
            return a
        return OnHost(lambda x: torch.full(x.shape[:2], a.action, dtype=torch.int8))


POLICIES = {
    "reuse_k2": lambda: LayerReusePolicy(reuse_k=2, layer_subset=[1, 2]),
    "reuse_k3": lambda: LayerReusePolicy(reuse_k=3, layer_subset="last", subset_size=2),
    "pass_2": lambda: ForcedLayerPass(2),
}


def run(policy, prompts, block_cache, threshold):
    cfg = GenerationConfig(
        max_new_tokens=48, threshold=threshold, block_size=16, use_block_cache=block_cache
    )
    return generate(random_network(seed=5), prompts, IDS, cfg, policy)


@pytest.mark.parametrize("block_cache", [False, True])
@pytest.mark.parametrize("name", list(POLICIES))
def test_int_plan_equals_tensor_plan(name, block_cache):
    prompts = [prompt(n, offset=n) for n in (3, 17, 30)]  # batched: some forwards have idle rows
    for threshold in (1.0, 0.3):
        fast = run(POLICIES[name](), prompts, block_cache, threshold)
        slow = run(AsTensor(POLICIES[name]()), prompts, block_cache, threshold)
        assert [o.token_ids for o in fast.outputs] == [o.token_ids for o in slow.outputs]
        f, s = fast.stats, slow.stats
        assert f.executed_units_per_layer == s.executed_units_per_layer
        assert (f.executed_flops, f.forwards) == (s.executed_flops, s.forwards)
    assert f.executed_flops < f.baseline_flops  # something was skipped


@pytest.mark.parametrize("name", list(POLICIES))
def test_whole_layer_skip_takes_no_gather(name, monkeypatch):
    """At batch 1 a whole-layer PASS or REUSE never reaches the per-unit gather path."""
    calls = []
    original = LayerRunner._planned_layer

    def counting(self, i, *args):
        calls.append(i)
        return original(self, i, *args)

    monkeypatch.setattr(LayerRunner, "_planned_layer", counting)
    result = run(POLICIES[name](), [prompt(20)], False, 1.0)
    assert result.stats.executed_flops < result.stats.baseline_flops
    assert calls == []
