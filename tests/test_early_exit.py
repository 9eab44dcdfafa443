"""The early-exit policy: what exits stays frozen and is predicted by its lens, nothing without
an earlier computation exits, its lens work is counted in FLOPs, and disabled is the baseline."""

from __future__ import annotations

import pytest
import torch
from conftest import IDS, prompt, random_network
from torch.utils.flop_counter import FlopCounterMode

from early_exit_generation_functions import EarlyExitPolicy
from v2.engine import Engine
from v2.generate import GenerationConfig, generate
from v2.observer import Observer
from v2.policies import make_policy
from v2.policy import COMPUTE, PASS

pytestmark = pytest.mark.usefixtures("one_thread")


class Watch(Observer):
    """Keeps every layer's input and the output of each forward it watches."""

    def __init__(self):
        self.inputs = []

    def on_hidden(self, depth, x, ctx):
        if depth == 0:
            self.inputs.append([])
        self.inputs[-1].append(x.clone())


def block_steps():
    """The ids of two denoise forwards over one block of two rows: masks after a prompt, then
    four of them decoded."""
    step0 = [prompt(8, r) + [IDS.mask] * 24 for r in range(2)]
    step1 = [row[:] for row in step0]
    for row in step1:
        row[8:12] = prompt(4, 3)
    return step0, step1


def two_steps(model, policy, eager=False, observer=None):
    """Two denoise forwards over one block of two rows; returns the engine, outputs and the
    FLOPs FlopCounterMode saw in each (with the logits of every position); an observer's plans
    are in `engine.plans`."""
    step0, step1 = block_steps()
    model.eager_attention = eager  # the engine picks its attention when built
    try:
        engine = Engine(model, policy)
        policy.attach(model, IDS)
        engine.allocate(2, 64)
        engine.begin_block()
        outs, counted, seen, engine.plans = [], [], [], []
        for ids in (step0, step1):
            before = engine.stats.executed_flops
            with FlopCounterMode(display=False) as counter:
                hidden = engine.denoise(torch.tensor(ids), 0, torch.arange(32), observer=observer)
                model.logits(hidden)
            engine.plans.append(engine.last_plan)
            outs.append(hidden.clone())
            counted.append(counter.get_total_flops())
            seen.append(engine.stats.executed_flops - before)
    finally:
        model.eager_attention = False
    return engine, outs, counted, seen


def test_exited_units_are_frozen_and_predicted_by_their_lens():
    model = random_network(seed=5, std=0.5)
    L = model.cfg.num_hidden_layers
    watch = Watch()
    engine, outs, _, _ = two_steps(
        model, EarlyExitPolicy(exit_threshold=0.4, min_layer=1), False, watch
    )
    st = engine.stats
    # the first forward has no earlier computation: nothing passes
    assert not (engine.plans[0] == PASS).any()
    n_passed = int((engine.plans[1] == PASS).sum())
    assert n_passed, "the test needs exits at the second forward"
    assert sum(st.executed_units_per_layer) == sum(st.baseline_units_per_layer) - n_passed
    xs = watch.inputs[1]  # inputs of layers 0..L-1, then the output
    for i, p in enumerate(engine.plans[1]):
        frozen = p == PASS
        if not frozen.any():
            continue
        # a unit passing layer i passes every later layer, and its state never changes again
        for later in range(i, L + 1):
            torch.testing.assert_close(xs[later][frozen], xs[i][frozen], atol=0, rtol=0)
        lens = model.logits(xs[i][frozen]).softmax(-1)
        final = model.logits(outs[1][frozen])
        assert torch.equal(lens.argmax(-1), final.argmax(-1))


def test_exited_units_keep_the_k_v_of_their_last_computation():
    """The other positions attend to an exited unit through the K/V it had when it last ran
    that layer (here: the block's first forward); the units that run write new ones."""
    model = random_network(seed=5, std=0.5)
    policy = EarlyExitPolicy(exit_threshold=0.4, min_layer=1)
    engine = Engine(model, policy)
    policy.attach(model, IDS)
    engine.allocate(2, 64)
    engine.begin_block()
    step0, step1 = block_steps()
    engine.denoise(torch.tensor(step0), 0, torch.arange(32))
    before = [k.clone() for k in engine.cache.k]
    engine.denoise(torch.tensor(step1), 0, torch.arange(32), observer=Observer())
    slots = engine.cache.slots(torch.arange(2)[:, None], torch.arange(32)[None])  # [2, 32]
    checked = 0
    for i, p in enumerate(engine.last_plan):
        passed, ran = p == PASS, p == COMPUTE
        after = engine.cache.k[i]
        assert torch.equal(after[slots[passed]], before[i][slots[passed]])
        assert not torch.equal(after[slots[ran]], before[i][slots[ran]])
        checked += int(passed.sum())
    assert checked, "the test needs exits at the second forward"


def test_lens_flops_are_counted_like_flop_counter_mode():
    model = random_network(seed=5, std=0.5)
    policy = EarlyExitPolicy(exit_threshold=0.4, check_every=2, min_layer=1)
    engine, _, counted, seen = two_steps(model, policy, eager=True)
    assert seen == counted
    assert engine.stats.executed_units < engine.stats.baseline_units  # something exited


@pytest.mark.parametrize("block_cache", [False, True])
def test_disabled_exit_gives_the_baseline_token_for_token(block_cache):
    model = random_network(seed=2, std=0.05)
    prompts = [prompt(n, n) for n in (5, 20, 33, 40)]
    cfg = GenerationConfig(max_new_tokens=40, threshold=0.9, use_block_cache=block_cache)
    base = generate(model, prompts, IDS, cfg)
    for t in (1.0, 1.5):
        out = generate(model, prompts, IDS, cfg, make_policy("exit", exit_threshold=t))
        assert [o.token_ids for o in out.outputs] == [o.token_ids for o in base.outputs]
        assert out.stats.executed_flops == base.stats.executed_flops


@pytest.mark.parametrize("block_cache", [False, True])
def test_exit_runs_under_generate_and_skips(block_cache):
    model = random_network(seed=2, std=0.5)
    prompts = [prompt(n, n) for n in (5, 20, 40)]
    cfg = GenerationConfig(max_new_tokens=40, threshold=0.9, use_block_cache=block_cache)
    out = generate(model, prompts, IDS, cfg, make_policy("exit", exit_threshold=0.3))
    assert out.stats.executed_units < out.stats.baseline_units
    assert all(len(o.token_ids) > 0 for o in out.outputs)


def test_bad_options_are_one_line_errors():
    for bad, msg in (
        (dict(exit_threshold=0), "exit_threshold"),
        (dict(check_every=0), "check_every"),
        (dict(min_layer=0), "min_layer"),
    ):
        with pytest.raises(ValueError, match=msg):
            make_policy("exit", **{"exit_threshold": 0.5, **bad})
    with pytest.raises(ValueError, match="policy 'exit' takes"):
        make_policy("exit", cosine_threshold=0.5)
