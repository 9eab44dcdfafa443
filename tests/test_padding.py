"""Padding apart from skipping (stats.py, engine.py "Statistics"): executed units = useful +
padding; skip rate = 1 - useful / no-skip units, 0 with no policy whatever the layout; a plan's
skip rate is exactly the share it reused or passed. Run on the CPU through the static layouts
that CUDA graphs replay (masked: every unit of every cache row runs; compacted: bucketed
capacities), where padding occurs, and the exact engine, where it does not."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import IDS, prompt, random_network

from v2.attention import Dense
from v2.engine import Engine
from v2.generate import GenerationConfig, generate
from v2.policy import ALL_COMPUTE, COMPUTE, PASS, REUSE, OnHost, Policy
from v2.stats import Stats

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUTS = {
    "exact": dict(static_shapes=False),
    "masked": dict(static_shapes=True, compaction="never", attention=Dense()),
    "compacted": dict(static_shapes=True, compaction="always", attention=Dense()),
}


class Fixed(Policy):
    """At the block's second forward: layer 1 reuses window positions 0-7 of every row, layer 2
    passes row 0 whole; everything else computes."""

    name = "fixed"
    reuses = True

    def plan(self, layer, ctx):
        if ctx.step == 0 or layer not in (1, 2):
            return ALL_COMPUTE
        return OnHost(partial(self.actions, layer))

    def actions(self, layer, x):
        a = torch.full(x.shape[:2], COMPUTE, dtype=torch.int8)
        if layer == 1:
            a[:, :8] = REUSE
        else:
            a[0] = PASS
        return a


def two_forwards(layout: str, policy) -> Stats:
    """Two denoise forwards of a batch of 2 rows in a cache of 3 (the third holds no sequence):
    row 0 computes its whole window of 32, row 1 only positions 0-12 (45 units in scope)."""
    model = random_network(seed=3)
    engine = Engine(model, policy, 32, **LAYOUTS[layout])
    engine.allocate(3, 64)
    engine.begin_block()
    ids = torch.tensor([prompt(32), prompt(32, 5)])
    units = torch.zeros(2, 32, dtype=torch.bool)
    units[0] = True
    units[1, :13] = True
    for _ in range(2):
        engine.denoise(ids, 0, torch.arange(8), units)
    return engine.stats


# (executed, padding) units per layer over the two forwards; useful = 90 74 58 90 in every one
EXPECTED = {
    "exact": ([90, 74, 58, 90], [0, 0, 0, 0]),
    # 3 rows x 32 positions run in every layer of both forwards
    "masked": ([192] * 4, [102, 118, 134, 102]),
    # 45 units -> 48 slots; 29 -> 32; 13 -> 16: 3 padding slots per layer and forward
    "compacted": ([96, 80, 64, 96], [6, 6, 6, 6]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_plans_skip_rate_is_what_it_reused_or_passed(layout):
    st = two_forwards(layout, Fixed())
    executed, padding = EXPECTED[layout]
    assert st.baseline_units_per_layer == [90] * 4
    assert st.executed_units_per_layer == executed
    assert st.padding_units_per_layer == padding
    assert st.useful_units_per_layer == [90, 74, 58, 90]
    # layer 1 reused 8 + 8 units in scope; layer 2 passed row 0's 32
    assert st.reused_units_per_layer == [0, 16, 0, 0]
    passed = [0, 0, 32, 0]
    assert st.skip_rate_per_layer() == pytest.approx(
        [(r + p) / 90 for r, p in zip(st.reused_units_per_layer, passed, strict=True)], abs=1e-12
    )
    assert st.padding_rate_per_layer() == [p / 90 for p in padding]
    d = st.to_dict()
    assert d["executed_units"] == d["useful_units"] + d["padding_units"]
    assert d["padding_units_per_layer"] == padding and d["useful_units"] == 312


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_no_policy_skips_nothing_whatever_the_padding(layout):
    st = two_forwards(layout, None)
    assert st.useful_units_per_layer == st.baseline_units_per_layer == [90] * 4
    assert st.skip_rate_per_layer() == [0.0] * 4
    assert st.padding_units_per_layer == {"exact": [0] * 4, "masked": [102] * 4}.get(
        layout, [6] * 4
    )


@pytest.mark.parametrize("block_cache", [False, True])
def test_waiting_and_finished_rows_are_padding_not_negative_skipping(block_cache):
    """A batch whose rows wait (a long prompt while a short one decodes its first blocks) and
    finish at different blocks: in the masked layout every cache row runs every forward. The
    baseline's executed units and FLOPs exceed the no-skip ones by exactly that padding; its
    skip rate is 0 on every layer."""
    model = random_network(seed=3, num_hidden_layers=3)
    prompts = [prompt(5), prompt(45, 3), prompt(20, 7)]
    cfg = GenerationConfig(max_new_tokens=40, threshold=0.7, use_block_cache=block_cache)
    engine = Engine(model, None, 32, block_cache, **LAYOUTS["masked"])
    st = generate(model, prompts, IDS, cfg, engine=engine).stats
    exact = generate(model, prompts, IDS, cfg).stats
    assert st.padding_units > 0 and all(p > 0 for p in st.padding_units_per_layer)
    assert st.skip_rate_per_layer() == [0.0] * 3
    assert st.useful_units_per_layer == st.baseline_units_per_layer
    assert st.executed_flops > st.baseline_flops  # padding is executed work
    assert exact.padding_units == 0 and exact.skip_rate_per_layer() == [0.0] * 3
    d = st.to_dict()
    assert d["executed_units"] == d["useful_units"] + d["padding_units"]
    assert d["skip_rate_per_layer"] == [0.0] * 3
    assert d["padding_rate_per_layer"] == [
        p / b for p, b in zip(st.padding_units_per_layer, st.baseline_units_per_layer, strict=True)
    ]


def test_statistics_from_before_padding_say_so():
    """A record's stats without padding fields: read back as not separated (its executed units
    hold the padding; the skip rate is the old 1 - executed / no-skip); written back without
    padding fields; a sum with it is not separated either."""
    old = Stats(2, executed_units_per_layer=[13, 13], baseline_units_per_layer=[10, 10])
    d = old.to_dict()
    for key in ("useful_units", "padding_units", "padding_units_per_layer"):
        d.pop(key)
    back = Stats.from_dict(d)
    assert not back.padding_separated
    assert back.skip_rate_per_layer() == pytest.approx([-0.3, -0.3])
    assert "padding_units" not in back.to_dict()
    new = Stats(2, executed_units_per_layer=[13, 13], baseline_units_per_layer=[10, 10])
    new.padding_units_per_layer = [3, 3]
    assert Stats.from_dict(new.to_dict()).padding_units_per_layer == [3, 3]
    assert new.skip_rate_per_layer() == [0.0, 0.0]
    new.add(back)
    assert not new.padding_separated and "padding_units" not in new.to_dict()
