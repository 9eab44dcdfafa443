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

import pytest
import torch

from layer_skip_generation_functions import LayerReusePolicy, LayerSkipPolicy
from tests.conftest import IDS, prompt, random_network
from token_skip_generation_functions import TokenSkipPolicy
from v2.attention import Dense, Packed
from v2.bench.timing import Clock
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
    outs = []
    for graphs in (False, True):
        policy = POLICIES[name]()
        engine = Engine(
            model,
            policy,
            32,
            block_cache,
            cuda_graphs=graphs,
            static_shapes=True,
            compaction=compaction,
        )
        outs.append(generate(model, PROMPTS, IDS, cfg, policy, engine=engine))
        if graphs:
            assert engine.graphs.captured > 0 and not engine.graphs.failures
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
    from v2.attention import Flex

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
