"""The static-shape layouts that CUDA graphs replay (masked, compacted with a policy's quota,
compacted after one read-back, the forward's scope compacted), run on the CPU: each gives the exact
engine's tokens and statistics. The flash backend's packed queries, row starts and key lengths are
checked against a reference varlen attention that fills every slot it does not own with NaN, so a
padded slot that leaked into a real unit would show."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from enum import Enum

import pytest
import torch
from conftest import IDS, prompt, random_network

from layer_skip_generation_functions import LayerReusePolicy, LayerSkipPolicy
from token_skip_generation_functions import TokenSkipPolicy
from v2.attention import Dense, Flash, Flex, causal_copy
from v2.engine import Engine
from v2.generate import GenerationConfig, generate
from v2.policy import OnDevice

pytestmark = pytest.mark.usefixtures("one_thread")


def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug, **kw):
    """What aten._flash_attention_forward computes for packed queries: row r's queries
    q[cu_q[r]:cu_q[r+1]] attend to keys k[cu_k[r] : cu_k[r] + seqused_k[r]]; causal: the mask
    aligned to the keys' end (the row's i-th of m queries sees its first n - m + i + 1 keys)."""
    assert dropout == 0.0 and q.dtype == k.dtype
    seqused = kw["seqused_k"]
    assert cu_q.dtype == cu_k.dtype == seqused.dtype == torch.int32
    out = torch.full_like(q, float("nan"))
    lse = torch.full((q.shape[1], q.shape[0]), float("nan"), dtype=torch.float32)
    groups = q.shape[1] // k.shape[1]
    assert cu_q.numel() == cu_k.numel() == seqused.numel() + 1
    for r in range(cu_q.numel() - 1):
        a, b = int(cu_q[r]), int(cu_q[r + 1])
        start, n = int(cu_k[r]), int(seqused[r])
        assert a <= b <= q.shape[0] and b - a <= max_q and n <= max_k
        assert start >= 0 and start + n <= k.shape[0]
        if b == a:
            continue
        if n == 0:  # FlashAttention's answer for a row with no keys
            out[a:b], lse[:, a:b] = 0.0, float("inf")
            continue
        keys = k[start : start + n].repeat_interleave(groups, 1)  # [n, heads, hd]
        values = v[start : start + n].repeat_interleave(groups, 1)
        scores = torch.einsum("qhd,khd->hqk", q[a:b], keys) * q.shape[-1] ** -0.5
        if causal:
            assert n >= b - a
            seen = torch.arange(b - a)[:, None] + n - (b - a) >= torch.arange(n)[None]
            scores = scores.masked_fill(~seen, float("-inf"))
        out[a:b] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
        lse[:, a:b] = scores.float().logsumexp(-1)
    return out, lse, None, None, None


POLICIES = {
    "none": lambda: None,
    "token_ct0.5": lambda: TokenSkipPolicy(cosine_threshold=0.5),
    "token_rr0.5": lambda: TokenSkipPolicy(reuse_ratio=0.5),
    "token_rr0.25_refresh": lambda: TokenSkipPolicy(reuse_ratio=0.25, refresh_every=3),
    "layer_ct0.3": lambda: LayerSkipPolicy(cosine_threshold=0.3),
    "reuse_k2": lambda: LayerReusePolicy(reuse_k=2, layer_subset="1;2"),
}
LAYOUTS = {
    "masked": dict(compaction="never", attention=lambda: Dense()),
    "compacted": dict(compaction="always", attention=lambda: Dense()),
    "flash_masked": dict(compaction="never", attention=lambda: Flash(varlen_reference)),
    "flash_compacted": dict(compaction="always", attention=lambda: Flash(varlen_reference)),
    "flex_masked": dict(compaction="never", attention=lambda: Flex()),
    "flex_compacted": dict(compaction="always", attention=lambda: Flex()),
}


def run(model, policy, cfg, **engine_options):
    engine = None
    if engine_options:
        B = model.cfg.block_size
        make = engine_options.pop("attention")
        engine = Engine(
            model,
            policy,
            B,
            cfg.use_block_cache,
            static_shapes=True,
            attention=make(),
            **engine_options,
        )
    return generate(model, PROMPTS, IDS, cfg, policy, engine=engine)


PROMPTS = [prompt(n, offset=n) for n in (5, 31, 33, 64, 70)]


# FlexAttention's eager reference is slow on the CPU: its layouts run a subset of the grid.
FLEX_CASES = [
    (name, layout, True)
    for name in ("none", "token_rr0.5", "layer_ct0.3")
    for layout in ("flex_masked", "flex_compacted")
]


@pytest.mark.parametrize(
    ("name", "layout", "block_cache"),
    [
        (name, layout, block_cache)
        for name in POLICIES
        for layout in LAYOUTS
        for block_cache in (False, True)
        if not layout.startswith("flex")
    ]
    + FLEX_CASES,
)
def test_static_layouts_equal_the_exact_engine(name, layout, block_cache):
    # float64: the layouts round differently (different shapes, attention kernels); a top-k or
    # threshold decision on a near tie must not flip because of it.
    model = random_network(seed=3, num_hidden_layers=5).double()
    cfg = GenerationConfig(max_new_tokens=40, threshold=0.7, use_block_cache=block_cache)
    exact = run(model, POLICIES[name](), cfg)
    static = run(model, POLICIES[name](), cfg, **LAYOUTS[layout])
    assert [o.token_ids for o in static.outputs] == [o.token_ids for o in exact.outputs]
    e, s = exact.stats, static.stats
    assert (s.forwards, s.row_forwards) == (e.forwards, e.row_forwards)
    assert s.baseline_units_per_layer == e.baseline_units_per_layer
    assert s.reused_units_per_layer == e.reused_units_per_layer
    # The exact engine runs only the units it computes: no padding. A static layout runs more
    # (bucket slots, or every unit of every cache row), but its useful units are the exact
    # engine's units, unit for unit per layer, so the skip rates are the plan's, not the layout's.
    assert e.padding_units == 0
    assert s.useful_units_per_layer == e.executed_units_per_layer
    assert s.skip_rate_per_layer() == e.skip_rate_per_layer()
    assert all(p >= 0 for p in s.padding_units_per_layer)
    if LAYOUTS[layout]["compaction"] == "never":
        # Masked: rows wait and finish in this batch of 5 prompts; every row still runs.
        assert all(p > 0 for p in s.padding_units_per_layer)


def test_ratio_plans_are_sized_by_their_quota_without_reading_the_plan(monkeypatch):
    """With a reuse quota the compacted layout never reads the plan back: Tensor.__bool__,
    .item() and .tolist() are not called on a plan-derived count during the forward."""
    model = random_network(seed=3, num_hidden_layers=4)
    policy = TokenSkipPolicy(reuse_ratio=0.5)
    engine = Engine(model, policy, 32, static_shapes=True, compaction="always", attention=Dense())
    engine.allocate(2, 64)
    engine.begin_block()
    ids = torch.tensor([prompt(32), prompt(32, 3)])
    engine.denoise(ids, 0, torch.arange(8))  # step 0: no references yet, plans read back
    reads = []
    real = torch.Tensor.__int__
    monkeypatch.setattr(torch.Tensor, "__int__", lambda t: reads.append(t) or real(t))
    engine.denoise(ids, 0, torch.arange(8))  # step 1: every unit has a reference
    monkeypatch.undo()
    assert reads == []
    st = engine.stats
    assert st.executed_units_per_layer == [128, 96, 96, 96]  # 64 + 64; then 64 + 32 per layer


def test_a_plan_that_breaks_its_quota_is_an_error():
    from v2.engine import PolicyError

    class Liar(TokenSkipPolicy):
        def plan(self, layer, ctx):  # promises to reuse everything, reuses half
            plan = super().plan(layer, ctx)
            if isinstance(plan, OnDevice):
                plan = replace(plan, quota=ctx.window_size)
            return plan

    model = random_network(seed=3, num_hidden_layers=3)
    engine = Engine(
        model,
        Liar(reuse_ratio=0.5),
        32,
        static_shapes=True,
        compaction="always",
        attention=Dense(),
    )
    engine.allocate(1, 64)
    engine.begin_block()
    ids = torch.tensor([prompt(32)])
    for _ in range(2):
        engine.denoise(ids, 0, torch.arange(8))
    with pytest.raises(PolicyError, match="quota"):
        engine.stats  # noqa: B018 - reading the statistics checks the device flag


def static_engine(model, policy, layout: str, **options) -> Engine:
    """An engine with the GPU's static layouts on the CPU, in `layout` (LAYOUTS), with the
    sub-block cache."""
    how = LAYOUTS[layout]
    return Engine(
        model,
        policy,
        model.cfg.block_size,
        True,
        static_shapes=True,
        compaction=how["compaction"],
        attention=how["attention"](),
        **options,
    )


@pytest.mark.parametrize("layout", ["masked", "compacted", "flash_masked"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_replayed_forwards_equal_the_layer_loop(name, layout):
    """A forward replayed from its record (its steps without the per-layer Python, its host
    effects applied again) gives the tokens and every statistic of the loop run each time."""
    model = random_network(seed=3, num_hidden_layers=5).double()
    cfg = GenerationConfig(max_new_tokens=40, threshold=0.7, use_block_cache=True)
    results, replays = [], []
    for forward_graphs in (False, True):
        engine = static_engine(model, POLICIES[name](), layout, forward_graphs=forward_graphs)
        results.append(generate(model, PROMPTS, IDS, cfg, engine.policy, engine=engine))
        replays.append(dict(engine.replays))
    loop, replayed = results
    # A threshold plan in the compacted layout is sized by a read-back, the layer policy decides
    # with one: never replayed.
    read_back = (name == "token_ct0.5" and layout == "compacted") or name == "layer_ct0.3"
    assert replays[0] == {"denoise": 0, "commit": 0, "verify": 0}
    assert replays[1]["denoise"] == 0 if read_back else replays[1]["denoise"] > 0
    assert [o.token_ids for o in replayed.outputs] == [o.token_ids for o in loop.outputs]
    a, b = loop.stats.to_dict(), replayed.stats.to_dict()
    for k in ("tokens_per_second", "wall_seconds", "graph_sets"):
        a.pop(k, None), b.pop(k, None)
    assert a == b


@pytest.mark.parametrize("layout", ["exact", "masked", "flash_masked", "flex_masked"])
def test_verify_forward_is_the_model_run_causally(layout):
    """A causal engine's verify forwards give each token the logits of the model run causally
    over the whole sequence (float64): rows at their own positions with their own widths, a row
    not verifying, and a row whose cache holds stale K/V past its valid length (a rejected
    draft's) that no query may see."""
    model = random_network(seed=5, num_hidden_layers=3).double()
    if layout == "exact":
        engine = Engine(model, causal=True)
    else:
        attention = causal_copy(LAYOUTS[layout]["attention"]())
        engine = Engine(model, causal=True, static_shapes=True, attention=attention)
    seqs = torch.tensor([prompt(60, offset=r) for r in range(3)])
    W, rows = 9, torch.arange(3)
    engine.allocate(3, 60 + W)
    engine.prefill(seqs[:, :20], last=False)

    def verify(rows, starts, widths, ids=None):
        pos = starts[:, None] + torch.arange(W)[None]
        window = seqs[rows].gather(1, pos.clamp(max=59)) if ids is None else ids
        return engine.logits(engine.verify(window, rows, starts, widths))

    first = verify(rows, torch.tensor([20, 20, 20]), torch.tensor([9, 3, 5]))
    garbage = torch.tensor([prompt(W, offset=40)])
    verify(torch.tensor([2]), torch.tensor([25]), torch.tensor([9]), garbage)  # row 2: 25..33
    rows2, starts2, widths2 = torch.tensor([2, 0]), torch.tensor([25, 29]), torch.tensor([4, 9])
    second = verify(rows2, starts2, widths2)  # row 1 waits; row 2 must not see 29..33
    for out, rs, starts, widths in (
        (first, rows, [20] * 3, [9, 3, 5]),
        (second, rows2, starts2.tolist(), widths2.tolist()),
    ):
        for j, (r, s0, n) in enumerate(zip(rs.tolist(), starts, widths, strict=True)):
            length = s0 + n
            pos = torch.arange(length)
            causal = pos[:, None] >= pos[None, :]
            with torch.no_grad():
                want = model(seqs[r : r + 1, :length], pos, causal)[0, s0:length]
            torch.testing.assert_close(out[j, :n], want.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("decode", "layout", "policy"),
    [
        (decode, layout, None)
        for decode in ("autoregressive", "speculative")
        for layout in ("masked", "flash_masked", "flash_compacted")
    ]
    + [("speculative", "flash_compacted", "token_rr0.5")],
)
def test_causal_decodes_on_static_layouts_equal_the_exact_engine(decode, layout, policy):
    """The causal decodes' verify forward on the static layouts (a window of a fixed size over
    every cache row: slots past a row's draft and rows not verifying are padding; the forward
    recorded, then replayed) gives the exact engine's tokens and counts; what differs is only
    the padding it executes."""
    model = random_network(seed=4, std=0.05, num_hidden_layers=3).double()
    cfg = GenerationConfig(max_new_tokens=40, threshold=0.5)
    cfg.decode = decode
    make = POLICIES[policy or "none"]
    exact = generate(model, PROMPTS, IDS, cfg, make())
    how = LAYOUTS[layout]
    if decode == "autoregressive":
        attention = causal_copy(how["attention"]())
        engine = Engine(model, causal=True, static_shapes=True, attention=attention)
        verifier = engine
    else:
        engine = Engine(
            model,
            make(),
            32,
            static_shapes=True,
            compaction=how["compaction"],
            attention=how["attention"](),
        )
        verifier = engine.verifier
    static = generate(model, PROMPTS, IDS, cfg, engine.policy, engine=engine)
    assert [o.token_ids for o in static.outputs] == [o.token_ids for o in exact.outputs]
    e, s = exact.stats, static.stats
    for count in ("verify_forwards", "verify_row_forwards", "drafted_tokens", "accepted_tokens"):
        assert getattr(s, count) == getattr(e, count)
    assert s.baseline_units_per_layer == e.baseline_units_per_layer
    assert s.skip_rate_per_layer() == e.skip_rate_per_layer()
    assert (s.skip_rate_per_layer() == [0.0] * 3) == (policy is None)
    # The autoregressive window is one token, and every row verifies every forward here: no
    # padding; a speculative window's slots past a row's draft are padding.
    padded = [p > 0 for p in s.padding_units_per_layer]
    assert padded == [decode == "speculative"] * 3
    assert verifier.causal and verifier.attention.causal
    assert verifier.replays["verify"] > 0
    assert len(verifier.recorder.records) == 1  # one window size: one forward record


@pytest.mark.parametrize("layout", ["masked", "compacted"])
def test_graph_keys_are_typed_values_with_no_strings(layout, monkeypatch):
    """Every key a step's or a forward's graph is found by is a StepKey or a ForwardKey built of
    enums, numbers, flags and the plans' typed keys (Uniform, DeviceKey): no string tags, no
    sentinels. Collected over every policy of this file, on the GPU's static layouts."""
    from v2.cuda_graphs import ForwardKey, ForwardRecorder, GraphRunner, Layout, StepKey
    from v2.policy import DeviceKey, Uniform

    keys = []
    run_graph, record_step, run_forward = (
        GraphRunner.run,
        ForwardRecorder.step,
        ForwardRecorder.forward,
    )
    monkeypatch.setattr(
        GraphRunner, "run", lambda self, key, step: keys.append(key) or run_graph(self, key, step)
    )
    monkeypatch.setattr(
        ForwardRecorder, "step", lambda self, key, s: keys.append(key) or record_step(self, key, s)
    )

    def forward(self, sig, layers, apply):
        if sig is not None:
            keys.append(sig)
        return run_forward(self, sig, layers, apply)

    monkeypatch.setattr(ForwardRecorder, "forward", forward)
    model = random_network(seed=3, num_hidden_layers=4)
    cfg = GenerationConfig(max_new_tokens=40, threshold=0.7, use_block_cache=True)
    for name in POLICIES:
        engine = static_engine(model, POLICIES[name](), layout)
        generate(model, PROMPTS, IDS, cfg, engine.policy, engine=engine)

    def leaves(value):
        if isinstance(value, (StepKey, ForwardKey, Uniform, DeviceKey)):
            for field in dataclasses.fields(value):
                yield from leaves(getattr(value, field.name))
        elif isinstance(value, tuple):
            for item in value:
                yield from leaves(item)
        else:
            yield value

    assert {type(k) for k in keys} == {StepKey, ForwardKey}
    seen = {k.layout for k in keys if isinstance(k, StepKey)}
    assert seen <= set(Layout) and len(seen) >= 3
    for key in keys:
        for leaf in leaves(key):
            assert leaf is None or isinstance(leaf, (bool, int, Enum)) or callable(leaf), key
    plans = {p for k in keys if isinstance(k, ForwardKey) for p in k.layers}
    assert plans and all(isinstance(p, (Uniform, DeviceKey)) for p in plans)
