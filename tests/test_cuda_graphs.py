"""The CUDA path (GPU only; skipped elsewhere). Run on the GPU machine:

    python -m pytest -q tests/test_cuda_graphs.py

- CUDA graphs replay exactly what the same engine computes without them: tokens and every
  statistic, for every policy, thresholds 1 and 0.5, the sub-block cache on and off; in bfloat16
  (flash attention) and float64 (the dense backend).
- The whole CUDA path (static layouts, torch.compile, graphs) gives the exact engine's tokens
  (float64), and flash attention agrees with the dense backend in bfloat16.
- The causal decodes' verify forward on the CUDA path gives the exact engine's tokens
  (float64), and flash's causal kernel agrees with the dense backend's mask in bfloat16;
  FlexAttention, compiled and captured, agrees with the dense backend (window and causal).
- A capture that fails is not fatal; an engine serves later generate calls with no new graphs.
- A long sequence of mixed calls (the bench's and lm_eval's: shrinking batches, varied prompt
  lengths, every policy, the sub-block cache on and off) runs with no error and no failed capture.
"""

from types import SimpleNamespace

import pytest
import torch

from layer_skip_generation_functions import LayerReusePolicy, LayerSkipPolicy
from tests.conftest import IDS, prompt, random_network
from token_skip_generation_functions import TokenSkipPolicy
from v2.attention import Dense, Flex, Geometry, Packed, UnitBatch, flex_window
from v2.bench.timing import Clock
from v2.compiled import compiled
from v2.cuda_graphs import GraphRunner
from v2.engine import Engine
from v2.generate import GenerationConfig, generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

POLICIES = {
    "none": lambda: None,
    "token_ct0.9": lambda: TokenSkipPolicy(cosine_threshold=0.9),
    "token_rr0.5": lambda: TokenSkipPolicy(reuse_ratio=0.5),
    "layer_ct0.5": lambda: LayerSkipPolicy(cosine_threshold=0.5),
    "reuse_k2_middle": lambda: LayerReusePolicy(reuse_k=2, layer_subset="middle", subset_size=2),
}
PROMPTS = [prompt(n, offset=n) for n in (5, 31, 33, 64, 70)]


def model_on_gpu(dtype, layers=6):
    return random_network(seed=3, num_hidden_layers=layers).to("cuda", dtype)


def same(a, b):
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]


def same_stats(a, b):
    e, g = a.stats, b.stats
    assert (g.forwards, g.row_forwards, g.executed_flops, g.baseline_flops) == (
        e.forwards,
        e.row_forwards,
        e.executed_flops,
        e.baseline_flops,
    )
    assert g.executed_units_per_layer == e.executed_units_per_layer
    assert g.reused_units_per_layer == e.reused_units_per_layer
    assert g.padding_units_per_layer == e.padding_units_per_layer
    assert g.skip_rate_per_layer() == e.skip_rate_per_layer()


def with_and_without_graphs(model, name, cfg, prompts, attention=None, **engine) -> list:
    """One engine setting (static shapes) without and with CUDA graphs: both generations (a
    fresh policy and `attention()` each); the graphed one captured and failed nothing."""
    outs = []
    for graphs in (False, True):
        policy = POLICIES[name]()
        e = Engine(
            model,
            policy,
            32,
            cfg.use_block_cache,
            cuda_graphs=graphs,
            static_shapes=True,
            attention=attention and attention(),
            **engine,
        )
        outs.append(generate(model, prompts, IDS, cfg, policy, engine=e))
        if graphs:
            assert e.graphs.captured > 0 and not e.graphs.failures
    return outs


@pytest.mark.parametrize("compaction", ["auto", "always"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("block_cache", [False, True])
@pytest.mark.parametrize("threshold", [1.0, 0.5])
@pytest.mark.parametrize("name", list(POLICIES))
def test_graphs_equal_eager(name, threshold, block_cache, dtype, compaction):
    model = model_on_gpu(dtype)
    cfg = GenerationConfig(
        max_new_tokens=70, threshold=threshold, block_size=32, use_block_cache=block_cache
    )
    outs = with_and_without_graphs(model, name, cfg, PROMPTS, compaction=compaction)
    same(*outs)
    same_stats(*outs)


@pytest.mark.parametrize("block_cache", [False, True])
@pytest.mark.parametrize("name", list(POLICIES))
def test_cuda_path_equals_the_exact_engine(name, block_cache):
    """float64: static layouts + torch.compile + graphs vs the exact (packed, eager) engine."""
    model = model_on_gpu(torch.float64)
    cfg = GenerationConfig(max_new_tokens=70, threshold=0.5, use_block_cache=block_cache)
    exact = generate(
        model,
        PROMPTS,
        IDS,
        cfg,
        None,
        engine=Engine(model, POLICIES[name](), 32, block_cache, attention=Packed()),
    )
    policy = POLICIES[name]()
    fast = Engine(model, policy, 32, block_cache, compaction="always")
    assert fast.compiled and fast.graphs.enabled and fast.attention.name == "dense"
    same(exact, generate(model, PROMPTS, IDS, cfg, policy, engine=fast))


def test_flash_agrees_with_dense_attention():
    model = model_on_gpu(torch.bfloat16)
    ids = torch.tensor([prompt(32, r) for r in range(3)], device="cuda")
    hidden = []
    for attention in (None, Dense()):
        e = Engine(model, None, 32, attention=attention, compaction="always")
        e.allocate(3, 96)
        e.prefill(torch.tensor([prompt(32, 9 + r) for r in range(3)], device="cuda"))
        e.begin_block()
        units = torch.ones(3, 32, dtype=torch.bool, device="cuda")
        units[1, :] = False  # a waiting row: compacted scope
        hidden.append(e.denoise(ids, 0, torch.arange(32, device="cuda"), units).float())
    assert Engine(model).attention.name == "flash"
    live = torch.tensor([0, 2], device="cuda")
    err = (hidden[0][live] - hidden[1][live]).norm() / hidden[1][live].norm()
    assert err < 2e-2, err


@pytest.mark.parametrize("decode", ["autoregressive", "speculative"])
def test_causal_decodes_on_the_cuda_path_equal_the_exact_engine(decode):
    """float64: the verify forward through static layouts + torch.compile + forward graphs gives
    the exact (packed, eager) causal engine's tokens; its forwards are replayed, none failed."""
    model = model_on_gpu(torch.float64)
    cfg = GenerationConfig(max_new_tokens=70, threshold=0.5)
    cfg.decode = decode
    if decode == "autoregressive":
        exact_engine = Engine(model, causal=True, attention=Packed(causal=True))
        fast = Engine(model, causal=True)
        verifier = fast
    else:
        exact_engine = Engine(model, None, 32, attention=Packed())
        fast = Engine(model, None, 32)
        verifier = fast.verifier
    exact = generate(model, PROMPTS, IDS, cfg, engine=exact_engine)
    got = generate(model, PROMPTS, IDS, cfg, engine=fast)
    assert verifier.compiled and verifier.graphs.enabled and verifier.attention.name == "dense"
    same(exact, got)
    again = generate(model, PROMPTS, IDS, cfg, engine=fast)
    same(exact, again)
    assert verifier.replays["verify"] > 0 and not verifier.graphs.failures


def test_causal_flash_agrees_with_causal_dense_attention():
    """bfloat16: a verify forward (rows at their own positions and widths, one row waiting)
    through flash's causal kernel agrees with the dense backend's causal mask."""
    model = model_on_gpu(torch.bfloat16)
    seqs = torch.tensor([prompt(60, r) for r in range(3)], device="cuda")
    logits = []
    for attention in (None, Dense(causal=True)):
        e = Engine(model, causal=True, attention=attention)
        assert e.attention.name == ("flash" if attention is None else "dense")
        e.allocate(3, 80)
        e.prefill(seqs[:, :20], last=False)
        rows = torch.tensor([2, 0], device="cuda")
        starts = torch.tensor([20, 20], device="cuda")
        window = seqs[rows, 20:29]
        widths = torch.tensor([4, 9], device="cuda")
        logits.append(e.logits(e.verify(window, rows, starts, widths)))
    a, b = logits[0][1], logits[1][1]  # row 0, all 9 slots real
    assert (a - b).norm() / b.norm() < 2e-2
    a, b = logits[0][0, :4], logits[1][0, :4]  # row 2's 4 real slots
    assert (a - b).norm() / b.norm() < 2e-2


def test_flex_agrees_with_dense_attention_under_graphs():
    """bfloat16: FlexAttention (compiled, in the engine's CUDA graphs) agrees with the dense
    backend on a denoise forward (one row waiting) and on a causal verify forward; no capture
    failed, and the forward was replayed."""
    model = model_on_gpu(torch.bfloat16)
    ids = torch.tensor([prompt(32, r) for r in range(3)], device="cuda")
    units = torch.ones(3, 32, dtype=torch.bool, device="cuda")
    units[1, :] = False
    out = []
    for attention in (Flex(), Dense()):
        e = Engine(model, None, 32, attention=attention)
        e.allocate(3, 96)
        e.prefill(torch.tensor([prompt(32, 9 + r) for r in range(3)], device="cuda"))
        e.begin_block()
        for _ in range(4):  # record, warm-up, capture, replay
            hidden = e.denoise(ids, 0, torch.arange(32, device="cuda"), units).float()
        out.append(hidden)
        assert not e.graphs.failures and e.replays["denoise"] > 0
    live = torch.tensor([0, 2], device="cuda")
    err = (out[0][live] - out[1][live]).norm() / out[1][live].norm()
    assert err < 2e-2, err
    seqs = torch.tensor([prompt(60, r) for r in range(3)], device="cuda")
    logits = []
    for attention in (Flex(causal=True), Dense(causal=True)):
        e = Engine(model, causal=True, attention=attention)
        e.allocate(3, 80)
        e.prefill(seqs[:, :20], last=False)
        rows = torch.tensor([2, 0], device="cuda")
        for _ in range(4):
            got = e.logits(
                e.verify(
                    seqs[rows, 20:29],
                    rows,
                    torch.tensor([20, 20], device="cuda"),
                    torch.tensor([4, 9], device="cuda"),
                )
            )
        logits.append(got)
        assert not e.graphs.failures and e.replays["verify"] > 0
    a, b = logits[0][1], logits[1][1]
    assert (a - b).norm() / b.norm() < 2e-2


def flex_model(dtype, layers=4):
    """7 query heads per KV head, as Qwen2.5-7B's 28 / 4 (not a power of two), head_dim 32: a
    32-position window's 224 folded query rows per KV head split into 2 heads of 112, what
    FlexAttention's decoding kernel takes."""
    shape = dict(hidden_size=14 * 32, num_attention_heads=14, num_key_value_heads=2)
    return random_network(seed=3, num_hidden_layers=layers, **shape).to("cuda", dtype)


def flex_compiled() -> bool:
    """Whether Flex's torch.compile has not failed (a failure runs it eagerly: correct, slow)."""
    return not compiled(flex_window, dynamic=False).failed


@pytest.mark.parametrize("rows", [1, 3])
def test_flex_agrees_with_flash_under_cuda_graphs(rows):
    model = flex_model(torch.bfloat16)
    ids = torch.tensor([prompt(32, r) for r in range(rows)], device="cuda")
    units = torch.ones(rows, 32, dtype=torch.bool, device="cuda")
    if rows > 1:
        units[1, :] = False  # a waiting row: compacted scope
    hidden, engines = [], []
    for attention in (None, Flex()):
        e = Engine(model, None, 32, attention=attention, compaction="always")
        e.allocate(rows, 200)  # 100 + 32 keys: two key blocks, the second partly used
        e.prefill(torch.tensor([prompt(100, 9 + r) for r in range(rows)], device="cuda"))
        e.begin_block()
        for _ in range(4):  # record, warm up, capture, replay
            h = e.denoise(ids, 0, torch.arange(32, device="cuda"), units)
        hidden.append(h.float())
        engines.append(e)
    flash, flex = engines
    assert flash.attention.name == "flash" and flex.attention.name == "flex"
    assert flex.graphs.enabled and flex.graphs.captured > 0
    assert flex.stats.graph_failures == 0 and flex_compiled()
    live = units.any(1).nonzero().squeeze(1)
    err = (hidden[1][live] - hidden[0][live]).norm() / hidden[0][live].norm()
    assert err < 2e-2, err


@pytest.mark.parametrize("name", ["none", "token_rr0.5"])
def test_flex_graphs_equal_flex_without_graphs(name):
    """The same compiled flex engine with and without CUDA graphs: the same tokens and statistics
    (every kernel the same), batches of 5 and 1, the sub-block cache on (windows of 32 and 8)."""
    model = flex_model(torch.bfloat16)
    cfg = GenerationConfig(max_new_tokens=70, threshold=0.5, block_size=32, use_block_cache=True)
    for prompts in (PROMPTS, PROMPTS[3:4]):
        outs = with_and_without_graphs(
            model, name, cfg, prompts, compaction="always", attention=Flex
        )
        same(*outs)
        same_stats(*outs)
    assert flex_compiled()


def cuda_window(rows: int, w: int, max_len: int, lengths: list[int]):
    """A window forward's key geometry (attention.py) whose rows see keys [0, lengths[r])."""

    def ints(values):
        return torch.tensor(values, dtype=torch.int32, device="cuda")

    geo = Geometry(
        rows=rows,
        w=w,
        max_len=max_len,
        end=torch.tensor(max(lengths), device="cuda"),
        seqused=ints(lengths),
        dense_cu_q=ints([r * w for r in range(rows + 1)]),
        row_starts=ints([r * max_len for r in range(rows + 1)]),
        key_positions=torch.arange(max_len, device="cuda"),
    )
    batch = UnitBatch(torch.arange(rows * w, device="cuda"), None, None, rows * w)
    return SimpleNamespace(geo=geo, end=max(lengths)), batch


def test_flex_reads_no_key_block_past_a_rows_length():
    """Slots past a row's last key block hold NaN (a kernel that read them would return NaN), the
    rest of the last block huge values (masked): the output is the clean cache's, and agrees with
    attention in float32 over each row's keys."""
    rows, w, max_len, heads, kv, hd = 2, 32, 600, 14, 2, 32
    lengths = [300, 130]
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(torch.bfloat16)

    k, v = randn(rows * max_len + 1, kv, hd), randn(rows * max_len + 1, kv, hd)
    q = randn(rows * w, heads, hd)
    fwd, batch = cuda_window(rows, w, max_len, lengths)
    with torch.inference_mode():
        clean = Flex()(q, k, v, batch, fwd)
        dirty_k, dirty_v = k.clone(), v.clone()
        for r, n in enumerate(lengths):
            block_end = r * max_len + -(-n // Flex.KV_BLOCK) * Flex.KV_BLOCK
            for t in (dirty_k, dirty_v):
                t[r * max_len + n : block_end] = 1e4
                t[block_end : (r + 1) * max_len] = float("nan")
        dirty = Flex()(q, dirty_k, dirty_v, batch, fwd)
    torch.cuda.synchronize()
    assert flex_compiled()
    assert not dirty.isnan().any()
    assert torch.equal(dirty, clean)
    for r, n in enumerate(lengths):
        keys = k[r * max_len : r * max_len + n].float().transpose(0, 1)
        values = v[r * max_len : r * max_len + n].float().transpose(0, 1)
        want = torch.nn.functional.scaled_dot_product_attention(
            q[r * w : (r + 1) * w].float().transpose(0, 1), keys, values, enable_gqa=True
        ).transpose(0, 1)
        got = clean[r * w : (r + 1) * w].float()
        assert (got - want).norm() / want.norm() < 2e-2, r


def test_flex_copies_nothing_of_the_cache():
    """The keys are read through the cache's by-row view, not copied: a call's memory peak stays
    far below one layer's K buffer (8 MiB here; a copy of K or V would show)."""
    rows, w, max_len, heads, kv, hd = 1, 32, 1 << 16, 14, 2, 32
    k = torch.zeros(rows * max_len + 1, kv, hd, device="cuda", dtype=torch.bfloat16)
    v = torch.zeros_like(k)
    q = torch.randn(rows * w, heads, hd, device="cuda", dtype=torch.bfloat16)
    fwd, batch = cuda_window(rows, w, max_len, [1000])
    flex = Flex()
    with torch.inference_mode():
        flex(q, k, v, batch, fwd)  # compiles
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        flex(q, k, v, batch, fwd)
        torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert flex_compiled()
    assert extra < k.numel() * k.element_size() / 4, extra


def test_a_failed_capture_runs_eagerly_and_is_reported(capsys):
    runner = GraphRunner(torch.device("cuda"), True)
    x = torch.zeros(4, device="cuda")

    def step():
        x.add_(1)
        if torch.cuda.is_current_stream_capturing():
            x.sum().item()  # a host sync: illegal during capture

    for _ in range(4):
        runner.run((0, "t"), step)
    torch.cuda.synchronize()
    assert x.tolist() == [4.0] * 4
    assert len(runner.failures) == 1 and runner.captured == 0
    assert "capture failed" in capsys.readouterr().err


def test_an_engine_serves_later_calls_without_new_graphs():
    """A forward shape is recorded, warmed up and captured at its first three occurrences (a shape
    seen once per call, at the third call); after that a call captures nothing new."""
    model = model_on_gpu(torch.bfloat16)
    policy = TokenSkipPolicy(cosine_threshold=0.9)
    cfg = GenerationConfig(max_new_tokens=64, threshold=0.9, ignore_eos=True)
    first = generate(model, PROMPTS, IDS, cfg, policy)
    engine = model._v2_engine
    for _ in range(2):
        generate(model, PROMPTS, IDS, cfg, policy)
    captured, sets = engine.graphs.captured, len(engine.graphs.sets)
    later = generate(model, PROMPTS, IDS, cfg, policy)
    assert model._v2_engine is engine and engine.graphs.captured == captured > 0
    assert len(engine.graphs.sets) == sets
    same(first, later)


def test_bench_warm_up_leaves_only_replays_to_time():
    """Clock.warm_up (what the bench times after): a forward's first three calls record, warm up
    and capture its graph; every call after the warm-up is a replay that sets up nothing."""
    model = model_on_gpu(torch.bfloat16)
    engine = Engine(model)
    engine.allocate(2, 128)
    engine.prefill(torch.tensor([prompt(64), prompt(64, offset=1)], device="cuda"))
    engine.begin_block()
    block = torch.full((2, 32), IDS.mask, device="cuda")
    out = torch.arange(31, device="cuda")
    clock = Clock(torch.device("cuda"))

    def fn():
        engine.logits(engine.denoise(block, 0, out))

    assert clock.warm_up(fn, [engine], at_least=2) >= 3  # record, warm-up, capture
    setups, replays = engine.setups, engine.replays["denoise"]
    for _ in range(3):
        clock.once(fn)
    assert engine.setups == setups and engine.replays["denoise"] == replays + 3


def test_a_long_mixed_sequence_runs_with_no_failure():
    """What a bench run and an lm_eval run do to one model: batches that shrink, prompts of many
    lengths, rows leaving at different blocks, every policy, the sub-block cache on and off, and
    the causal decodes."""
    model = model_on_gpu(torch.bfloat16, layers=4)
    engines = []
    for name, make in POLICIES.items():
        policy = make()
        for block_cache in (False, True):
            for batch, threshold in ((8, 0.9), (5, 1.0), (3, 0.5), (1, 0.9)):
                prompts = [prompt(7 + 13 * r + batch, offset=r) for r in range(batch)]
                cfg = GenerationConfig(
                    max_new_tokens=40 + 9 * batch,
                    threshold=threshold,
                    use_block_cache=block_cache,
                )
                out = generate(model, prompts, IDS, cfg, policy)
                assert len(out.outputs) == batch, name
            engines.append(model._v2_engine)
    for decode in ("speculative", "autoregressive"):  # the causal engines' verify windows
        for batch in (8, 5, 1):
            prompts = [prompt(7 + 13 * r + batch, offset=r) for r in range(batch)]
            cfg = GenerationConfig(max_new_tokens=30 + 9 * batch, threshold=0.9)
            cfg.decode = decode
            assert len(generate(model, prompts, IDS, cfg).outputs) == batch, decode
    # the speculative decode's verifier (its draft is the model's engine) and the AR decode's
    engines += [model._v2_engine.verifier, model._v2_causal_engine]
    assert all(not e.graphs.failures for e in engines)
    assert all(e.graphs.captured > 0 for e in engines)
