"""The FLOP ledger against torch's FlopCounterMode, one forward kind at a time: prefill, denoise
over the full block, denoise over a sub-block (the sub-block cache), commit, the speculative
verify forward, and denoise forwards whose plan computes only some units.

Each test runs exactly one forward (and the logits its caller computes) under FlopCounterMode
and checks three numbers against each other:
- torch's count, split into layer and head matmuls (aten.mm / addmm) and attention (aten.bmm: the
  model's `eager_attention` spells attention out as two batched matmuls; on the CPU
  scaled_dot_product_attention's kernel is not in FlopCounterMode's table, so it would count 0);
- the work the forward's shapes imply, computed here from the model's parameters and the
  forward's sizes (not with v2/flops.py): 2 x (a layer's matmul weights) per row through a layer,
  2 x hidden x vocab per logit row, 4 x (attention width) per (query, key) pair whose score is
  computed;
- the increase of the statistics' executed FLOPs (and baseline FLOPs, equal to it when every unit
  computes).
Attention pairs are those whose score is computed. The prefill's block-causal mask and the
verifier's causal mask are applied to a full score matrix, so its masked pairs are computed (then
discarded) and count: each of those tests also computes the pairs the mask keeps, to show that
the two numbers differ there and that torch sees the full matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import prompt, random_network
from torch.utils.flop_counter import FlopCounterMode

from token_skip_generation_functions import TokenSkipPolicy
from v2.engine import Engine
from v2.policy import ALL_COMPUTE, COMPUTE, REUSE, OnHost, Policy

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS, BLOCK, SUB = 2, 32, 8  # batch, block size (the model's), sub-block size
PREFIX = 2 * BLOCK  # two prompt blocks: the block-causal mask hides a quarter of the scores


@dataclass
class Work:
    """What a forward ran, summed over the layers it ran in: rows through a layer's matmuls,
    attention (query, key) pairs whose scores were computed, rows through the head."""

    rows: int
    pairs: int
    logit_rows: int

    def matmul_flops(self, model) -> int:
        layer_weights = sum(p.numel() for p in model.layers[0].parameters() if p.dim() == 2)
        return 2 * layer_weights * self.rows + 2 * model.lm_head.weight.numel() * self.logit_rows

    def attention_flops(self, model) -> int:
        a = model.layers[0].self_attn
        return 4 * a.n_heads * a.head_dim * self.pairs  # q @ k^T, then scores @ v


@dataclass
class Measured:
    """torch's count of one forward, split as `Work` is, and the ledger's increase over it."""

    matmul: int
    attention: int
    executed: int
    baseline: int


def measure(stats, run) -> Measured:
    """Run `run()` under FlopCounterMode; `stats()` reads the ledger before and after."""
    s = stats()
    executed, baseline = s.executed_flops, s.baseline_flops
    with FlopCounterMode(display=False) as counter:
        run()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert set(by_op) <= {"aten.mm", "aten.addmm", "aten.bmm"}, by_op
    s = stats()
    return Measured(
        by_op.get("aten.mm", 0) + by_op.get("aten.addmm", 0),
        by_op.get("aten.bmm", 0),
        s.executed_flops - executed,
        s.baseline_flops - baseline,
    )


def check(model, got: Measured, work: Work, baseline: Work | None = None) -> None:
    """torch = the shapes' work = the ledger's executed increase; its baseline increase is
    `baseline`'s work (default: the same, every unit computed)."""
    assert (got.matmul, got.attention) == (work.matmul_flops(model), work.attention_flops(model))
    assert got.executed == got.matmul + got.attention
    baseline = baseline or work
    assert got.baseline == baseline.matmul_flops(model) + baseline.attention_flops(model)


def eager_model():
    model = random_network()
    model.eager_attention = True  # attention in matmuls that FlopCounterMode counts
    return model


@pytest.fixture(scope="module")
def engine_forwards() -> tuple:
    """One engine (sub-block cache on) through a block as generation runs it: prefill of two
    prompt blocks, a full-block denoise, a sub-block denoise, commit; each forward measured."""
    model = eager_model()
    engine = Engine(model, block_cache=True)
    engine.allocate(ROWS, PREFIX + 2 * BLOCK)
    stats = lambda: engine.stats  # noqa: E731
    block = torch.tensor([prompt(BLOCK, 1), prompt(BLOCK, 2)])
    out = torch.arange(SUB)  # the sub-block's positions, whose logits a denoise computes
    got = {}
    prompts = torch.tensor([prompt(PREFIX), prompt(PREFIX, 3)])
    got["prefill"] = measure(stats, lambda: engine.logits(engine.prefill(prompts)))
    engine.begin_block()
    got["denoise_full"] = measure(stats, lambda: engine.logits(engine.denoise(block, 0, out)))
    window = block[:, SUB : 2 * SUB]
    got["denoise_sub"] = measure(stats, lambda: engine.logits(engine.denoise(window, SUB, out)))
    got["commit"] = measure(stats, lambda: engine.logits(engine.commit(block)))
    return model, got


def test_prefill_counts_every_score_of_its_block_causal_attention(engine_forwards):
    """Each of the 2 x 64 prompt positions runs every layer; its query's scores are computed over
    all 64 keys (the block-causal mask then hides the next block's); one logit row per row."""
    model, got = engine_forwards
    L = model.cfg.num_hidden_layers
    rows = L * ROWS * PREFIX
    check(model, got["prefill"], Work(rows, rows * PREFIX, ROWS))
    # the pairs the mask keeps: a query of block j sees blocks 0..j
    kept = L * ROWS * sum((q // BLOCK + 1) * BLOCK for q in range(PREFIX))
    assert kept == 3 * rows * PREFIX // 4
    assert got["prefill"].attention != Work(rows, kept, ROWS).attention_flops(model)


@pytest.mark.parametrize(
    "kind, window, logit_rows",
    [
        ("denoise_full", BLOCK, ROWS * SUB),
        ("denoise_sub", SUB, ROWS * SUB),
        ("commit", BLOCK, ROWS),
    ],
)
def test_block_forward_counts_its_window_over_prefix_and_block(
    engine_forwards, kind, window, logit_rows
):
    """A denoise or commit forward over `window` positions of each row: every position through
    every layer, its query over the prefix and the whole block (the sub-block's against the
    block K/V the full-block forward wrote); logits of the sub-block (denoise) or of the last
    position (commit)."""
    model, got = engine_forwards
    rows = model.cfg.num_hidden_layers * ROWS * window
    check(model, got[kind], Work(rows, rows * (PREFIX + BLOCK), logit_rows))


def test_verify_forward_counts_its_tokens_and_every_query_over_the_longest_row():
    """A causal engine's verify forward of windows of w = 5 slots for cache rows (2, 0) of 3, at
    positions 40 and 10, with 5 and 2 real tokens (the exact CPU layout: only the tokens run
    the layers; the rows' queries padded to the widest, 5, for attention): each query's scores
    are computed over the keys [0, 45) of the longest row (the causal mask and the shorter row's
    length then hide most); logits at every slot. The baseline is the tokens alone."""
    model = eager_model()
    engine = Engine(model, causal=True)
    engine.allocate(3, 64)
    ids = torch.tensor([prompt(5), prompt(5, 1)])
    starts, widths = torch.tensor([40, 10]), torch.tensor([5, 2])
    rows_used = torch.tensor([2, 0])
    got = measure(
        lambda: engine.stats,
        lambda: engine.logits(engine.verify(ids, rows_used, starts, widths)),
    )
    L, tokens, keys, w = model.cfg.num_hidden_layers, 7, 45, 5
    executed = Work(L * tokens, L * 2 * w * keys, 2 * w)
    check(model, got, executed, baseline=Work(L * tokens, L * tokens * keys, 2 * w))
    kept = L * sum(s + t + 1 for s, n in ((40, 5), (10, 2)) for t in range(n))
    assert got.attention != Work(0, kept, 0).attention_flops(model)
    st = engine.stats
    assert (st.verify_forwards, st.verify_row_forwards) == (1, 2)
    assert st.executed_units_per_layer == [tokens] * L


class SkipFirst(Policy):
    """A token-skip plan: from a block's second forward, layers 1 and 2 reuse the first
    `skip[r]` positions of row r and compute the rest."""

    name = "skip_first"
    reuses, passes = True, False

    def __init__(self, skip: tuple[int, ...]):
        super().__init__()
        self.skip = skip

    def plan(self, layer, ctx):
        if ctx.step == 0 or layer not in (1, 2):
            return ALL_COMPUTE
        return OnHost(self.actions)

    def actions(self, x):
        plan = torch.full(x.shape[:2], COMPUTE, dtype=torch.int8)
        for r, n in enumerate(self.skip):
            plan[r, :n] = REUSE
        return plan


# (policy, engine layout, units each planned layer computes per row, rows each planned layer
# runs through its matmuls, planned layers)
SKIPPING = {
    # the CPU's exact layout: only the computed units (24 + 12)
    "exact": (lambda: SkipFirst((8, 20)), {}, (24, 12), 36, 2),
    # a compacted layout sized after reading the plan: 36 units in a bucket of 40 slots (buckets
    # are multiples of 8 for a window of 64 units); the 4 padding slots run the matmuls (on the
    # trash row) but no attention (the packed backend drops invalid slots)
    "compacted": (
        lambda: SkipFirst((8, 20)),
        dict(static_shapes=True, compaction="always"),
        (24, 12),
        40,
        2,
    ),
    # the compacted layout a captured plan gets from its quota: token skip reusing half of each
    # row (16 of 32) on layers 1 to 3, 2 x 16 units in a bucket of 32
    "compacted_quota": (
        lambda: TokenSkipPolicy(reuse_ratio=0.5),
        dict(static_shapes=True, compaction="always"),
        (16, 16),
        32,
        3,
    ),
}


@pytest.mark.parametrize("layout", list(SKIPPING))
def test_skipping_forward_counts_only_the_units_that_ran(layout):
    """A full-block denoise (no prefix) whose plan reuses units of some layers: the skipped units
    reach no matmul, and the ledger counts what ran (the planned layers' rows, padding slots
    included; the packed attention of each row's computed queries, padded to the widest row)
    against a baseline of every unit."""
    make_policy, settings, computed, planned_rows, planned = SKIPPING[layout]
    model = eager_model()
    engine = Engine(model, make_policy(), **settings)
    engine.allocate(ROWS, 2 * BLOCK)
    engine.begin_block()
    block = torch.tensor([prompt(BLOCK, 1), prompt(BLOCK, 2)])
    out = torch.arange(SUB)
    engine.denoise(block, 0, out)  # every unit computes: the plan's references
    got = measure(lambda: engine.stats, lambda: engine.logits(engine.denoise(block, 0, out)))
    L, units, keys = model.cfg.num_hidden_layers, ROWS * BLOCK, BLOCK
    dense = L - planned
    work = Work(
        rows=dense * units + planned * planned_rows,
        pairs=(dense * units + planned * ROWS * max(computed)) * keys,
        logit_rows=ROWS * SUB,
    )
    check(model, got, work, baseline=Work(L * units, L * units * keys, ROWS * SUB))
    assert got.executed < got.baseline
