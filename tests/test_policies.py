"""The policy hook: plans are executed with the skipped work really gone, REUSE re-adds the old
update, PASS is identity, and disabled policies give the baseline token for token."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import IDS, prompt, random_network
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from layer_skip_generation_functions import LayerReusePolicy, LayerSkipPolicy, subset_layers
from token_skip_generation_functions import TokenSkipPolicy
from v2.engine import Engine, PolicyError
from v2.generate import GenerationConfig, generate
from v2.policy import ALL_COMPUTE, COMPUTE, PASS, REUSE, OnHost, Policy, Uniform


def always_skipping(cls, **options):
    """A token or layer policy that skips whenever the engine allows it: threshold -1, below any
    cosine (a test device: users may not set a negative threshold, issue 25)."""
    settings = cls.Options(cosine_threshold=0.0, **options)
    object.__setattr__(settings, "cosine_threshold", -1.0)  # frozen, and past its range check
    return cls(settings)  # its settings say what it does (engines are kept by them)


pytestmark = pytest.mark.usefixtures("one_thread")


class Scripted(Policy):
    """Answers plan(layer) from a table {(step, layer): actions}; records what it saw."""

    name = "scripted"

    def __init__(self, table=None, reuses=True, protected=()):
        self.table, self.reuses, self._protected = table or {}, reuses, set(protected)
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}
        self.calls = 0

    def layers(self, num_layers):
        return set(range(num_layers)) - self._protected

    def plan(self, layer, ctx):
        return OnHost(partial(self.decide, layer, ctx))

    def decide(self, layer, ctx, x):
        self.inputs[ctx.step, layer] = x.clone()
        self.calls += 1
        make = self.table.get((ctx.step, layer))
        made = ALL_COMPUTE if make is None else make(x)
        return Uniform(made) if isinstance(made, int) else made


def run_denoise(model, policy, ids_list, steps=2):
    """Forwards over one block (no prefix): returns the engine and the hidden per step."""
    engine = Engine(model, policy)
    engine.allocate(len(ids_list[0]), 64)
    engine.begin_block()
    outs = []
    for ids in ids_list[:steps]:
        outs.append(engine.denoise(torch.tensor(ids), 0, torch.arange(32)))
    return engine, outs


def block(offset=0, masks=range(10, 32)):
    ids = prompt(32, offset)
    for j in masks:
        ids[j] = IDS.mask
    return ids


class WeightRows(TorchDispatchMode):
    """Records, for every op that reads a layer's weight (projections, MLP, norm weights), how
    many rows it fed: {(layer, "self_attn.qkv_proj"): rows, ...}. Seen at the dispatcher, so it
    does not depend on how the engine calls the weights."""

    def __init__(self, model):
        super().__init__()
        self.names = {
            p.untyped_storage().data_ptr(): (i, name.removesuffix(".weight"))
            for i, layer in enumerate(model.layers)
            for name, p in layer.named_parameters()
            if name.endswith(".weight")
        }
        self.rows: dict[tuple[int, str], int] = {}
        self.last_layer: int | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        weights = [t for t in tensors if t.untyped_storage().data_ptr() in self.names]
        if weights and func not in (torch.ops.aten.detach.default, torch.ops.aten.t.default):
            others = [t for t in tensors if t.untyped_storage().data_ptr() not in self.names]
            if others:
                data = max(others, key=lambda t: t.numel())
                key = self.names[weights[0].untyped_storage().data_ptr()]
                self.last_layer = key[0]
                self.rows[key] = self.rows.get(key, 0) + data.numel() // data.shape[-1]
        return func(*args, **(kwargs or {}))

    def layer(self, i: int) -> dict[str, int]:
        """{weight name: rows} for layer i (empty if nothing of it ran)."""
        return {name: n for (j, name), n in self.rows.items() if j == i}


def count_matmul_rows(model):
    rec = WeightRows(model)
    rec.__enter__()
    rows = {f"{i}.{name}": n for (i, name), n in rec.rows.items()}

    class Handle:
        def remove(self):
            rec.__exit__(None, None, None)
            rows.update({f"{i}.{name}": n for (i, name), n in rec.rows.items()})

    return rows, [Handle()]


def test_all_compute_plan_is_identical_to_no_policy(model):
    always = Scripted(
        {
            (s, layer): (lambda x: torch.zeros(x.shape[:2], dtype=torch.int8))
            for s in range(2)
            for layer in range(4)
        }
    )
    _, base = run_denoise(model, None, [[block()], [block(masks=range(11, 32))]])
    _, planned = run_denoise(model, always, [[block()], [block(masks=range(11, 32))]])
    for a, b in zip(base, planned, strict=True):
        assert torch.equal(a, b)


def test_pass_is_identity_and_passed_rows_skip_the_matmuls(model):
    def pass_row0(x):
        a = torch.full(x.shape[:2], COMPUTE, dtype=torch.int8)
        a[0] = PASS
        return a

    policy = Scripted({(0, 2): pass_row0}, reuses=False)
    rows, handles = count_matmul_rows(model)
    run_denoise(model, policy, [[block(0), block(5)]], steps=1)
    for h in handles:
        h.remove()
    assert torch.equal(policy.inputs[0, 3][0], policy.inputs[0, 2][0])  # row 0 unchanged
    assert not torch.equal(policy.inputs[0, 3][1], policy.inputs[0, 2][1])
    # Layer 2's projections and MLP saw row 1 only (32 units), the others both rows (64).
    assert rows["2.self_attn.qkv_proj"] == rows["2.mlp.down_proj"] == 32
    assert rows["1.self_attn.qkv_proj"] == rows["3.mlp.gate_up_proj"] == 64


def reuse_positions(layer_positions):
    def make(x):
        a = torch.full(x.shape[:2], COMPUTE, dtype=torch.int8)
        a[:, layer_positions] = REUSE
        return a

    return make


def test_reuse_of_unchanged_inputs_reproduces_the_computation(model):
    ids = [[block()], [block()]]  # the same tokens twice: every input is unchanged
    reuse_all = {(1, layer): reuse_positions(list(range(32))) for layer in range(1, 4)}
    _, base = run_denoise(model, None, ids)
    engine, planned = run_denoise(model, Scripted(reuse_all), ids)
    assert torch.allclose(planned[1], base[1], atol=1e-5)
    assert engine.stats.executed_units_per_layer == [64, 32, 32, 32]


def test_reuse_re_adds_the_old_update_not_the_old_output(model):
    """The group's bug returned the old absolute output; with a changed input that differs."""
    q = 20
    policy = Scripted({(1, 2): reuse_positions([q])})
    run_denoise(model, policy, [[block()], [block(masks=range(11, 32))]])  # slot 10 committed
    x2_old, x3_old = policy.inputs[0, 2][0, q], policy.inputs[0, 3][0, q]
    x2_new, x3_new = policy.inputs[1, 2][0, q], policy.inputs[1, 3][0, q]
    assert not torch.allclose(x2_new, x2_old)  # the unit's input did change
    assert torch.allclose(x3_new, x2_new + (x3_old - x2_old), atol=1e-5)
    assert not torch.allclose(x3_new, x3_old, atol=1e-3)


def test_reused_units_do_not_enter_the_matmuls(model):
    policy = Scripted({(1, 2): reuse_positions(list(range(0, 32, 2)))})
    engine, _ = run_denoise(model, policy, [[block()], [block()]], steps=1)
    rows, handles = count_matmul_rows(model)
    engine.denoise(torch.tensor([block()]), 0, torch.arange(32))
    for h in handles:
        h.remove()
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        assert rows[f"2.{name}"] == 16 and rows[f"1.{name}"] == 32


def test_policy_is_never_consulted_by_prefill_or_commit(model):
    policy = Scripted()
    out = generate(
        model,
        [prompt(40)],
        IDS,
        GenerationConfig(max_new_tokens=30, threshold=1.0, ignore_eos=True),
        policy,
    )
    denoise = out.stats.forwards["denoise_full"] + out.stats.forwards["denoise_sub"]
    assert out.stats.forwards["prefill"] == out.stats.forwards["commit"] == 1
    assert policy.calls == denoise * model.cfg.num_hidden_layers  # denoise forwards only


def test_engine_refuses_bad_plans(model):
    with pytest.raises(PolicyError, match="protected"):
        run_denoise(
            model, Scripted({(0, 0): reuse_positions([3])}, protected={0}), [[block()]], steps=1
        )

    def half_pass(x):
        a = torch.full(x.shape[:2], COMPUTE, dtype=torch.int8)
        a[:, :5] = PASS
        return a

    with pytest.raises(PolicyError, match="whole window"):
        run_denoise(model, Scripted({(0, 1): half_pass}), [[block()]], steps=1)


def test_flops_formula_matches_flop_counter(model):
    model.eager_attention = True
    try:
        policy = Scripted(
            {(1, 2): reuse_positions(list(range(8))), (1, 3): reuse_positions(list(range(16)))}
        )
        engine, _ = run_denoise(model, policy, [[block(0), block(3)]], steps=1)
        engine.stats.executed_flops = 0
        for step_ids, commit in (
            ([block(0), block(3)], False),
            ([prompt(32), prompt(32, 3)], True),
        ):
            before = engine.stats.executed_flops
            with FlopCounterMode(display=False) as counter:
                ids = torch.tensor(step_ids)
                if commit:
                    model.logits(engine.commit(ids)[:, None])
                else:
                    model.logits(engine.denoise(ids, 0, torch.arange(8)))
            assert engine.stats.executed_flops - before == counter.get_total_flops()
    finally:
        model.eager_attention = False


DISABLED = [
    TokenSkipPolicy(cosine_threshold=1.0),
    LayerSkipPolicy(cosine_threshold=1.0),
    LayerReusePolicy(reuse_k=1, layer_subset="middle"),
]


@pytest.mark.parametrize("block_cache", [False, True])
def test_disabled_policies_give_the_baseline_token_for_token(block_cache):
    model = random_network(seed=2, std=0.05)
    prompts = [prompt(n, n) for n in (5, 20, 33, 40)]
    cfg = GenerationConfig(max_new_tokens=40, threshold=0.9, use_block_cache=block_cache)
    base = generate(model, prompts, IDS, cfg)
    for policy in DISABLED:
        out = generate(model, prompts, IDS, cfg, policy)
        assert [o.token_ids for o in out.outputs] == [o.token_ids for o in base.outputs]
        assert out.stats.forwards == base.stats.forwards


def test_layer_skip_protections_and_consecutive_cap(model):
    for cap in (1, 2):
        policy = always_skipping(LayerSkipPolicy, max_consecutive_skips=cap)
        engine, _ = run_denoise(model, policy, [[block()]], steps=1)
        ran = [n > 0 for n in engine.stats.executed_units_per_layer]
        assert ran[0] and ran[-1]
        assert ran == ([True, False, True, True] if cap == 1 else [True, False, False, True])


def test_scheduled_reuse_never_calls_the_subset_on_reuse_steps(model):
    policy = LayerReusePolicy(reuse_k=2, layer_subset="1;2")
    engine, _ = run_denoise(model, policy, [[block()]] * 3, steps=3)
    rows, handles = count_matmul_rows(model)
    engine.denoise(torch.tensor([block()]), 0, torch.arange(32))  # step 3: reuse step
    for h in handles:
        h.remove()
    assert "1.self_attn.qkv_proj" not in rows and "2.mlp.down_proj" not in rows
    assert rows["0.self_attn.qkv_proj"] == rows["3.mlp.down_proj"] == 32
    # A whole-layer REUSE is counted as reused units (steps 1 and 3 of this block: 2 x 32).
    st = engine.stats
    assert st.reused_units_per_layer == [0, 64, 64, 0]
    executed, reused, baseline = (
        st.executed_units_per_layer,
        st.reused_units_per_layer,
        st.baseline_units_per_layer,
    )
    assert [e + r for e, r in zip(executed, reused, strict=True)] == baseline
    assert subset_layers("middle", 28) == list(range(8, 20))
    assert subset_layers("first", 8) == [0, 1, 2]


def test_token_policy_reuses_unchanged_positions(model):
    policy = TokenSkipPolicy(cosine_threshold=0.999)
    engine, _ = run_denoise(model, policy, [[block()], [block()]])
    # Second forward, identical inputs: every unit of layers >= 1 is reused; layer 0 computes.
    assert engine.stats.executed_units_per_layer == [64, 32, 32, 32]
    ratio = TokenSkipPolicy(reuse_ratio=0.5)
    engine, _ = run_denoise(model, ratio, [[block()], [block(masks=range(11, 32))]])
    assert engine.stats.executed_units_per_layer == [64, 48, 48, 48]


# ---- audit against issues 5 and 6 ("what must be shown") ----------------------------------------


class Recorder:
    """Per layer: the rows each of its weights is fed (WeightRows; "" = the layer ran at all) and
    the (batch rows, queries) of every attention call the engine makes for it."""

    def __init__(self, model, monkeypatch):
        import v2.attention

        self.attention: dict[int, list[tuple[int, int]]] = {}
        self.ops = WeightRows(model)
        self.ops.__enter__()
        real = v2.attention.sdpa

        def counting(q, k, v, mask=None, eager=False):
            self.attention.setdefault(self.ops.last_layer, []).append((q.shape[0], q.shape[2]))
            return real(q, k, v, mask, eager)

        monkeypatch.setattr(v2.attention, "sdpa", counting)

    @property
    def rows(self):
        return self.ops.rows

    def layer_rows(self, i):
        """{weight name: rows fed} for layer i, "" being the rows of its first norm (the rows the
        layer ran on); empty if the layer never ran."""
        got = self.ops.layer(i)
        if got:
            got[""] = got["input_layernorm"]
        return got

    def close(self):
        self.ops.__exit__(None, None, None)


def uneven_plan(x):
    """Row 0 reuses 8 positions, row 1 reuses 20, row 2 computes everything."""
    a = torch.full(x.shape[:2], COMPUTE, dtype=torch.int8)
    a[0, :8] = REUSE
    a[1, :20] = REUSE
    return a


def pass_row(r):
    def make(x):
        a = torch.full(x.shape[:2], COMPUTE, dtype=torch.int8)
        a[r] = PASS
        return a

    return make


def test_flops_match_flop_counter_with_uneven_rows_passed_rows_and_idle_rows(model):
    """Executed FLOPs equal what runs (FlopCounterMode, eager attention) when rows compute
    different numbers of units, when a row is PASSED, and when a row is out of the forward's
    units (waiting for the batch): no hidden padded work."""
    model.eager_attention = True
    try:
        three = [block(0), block(3), block(5)]
        idle_row2 = torch.tensor([[True] * 32, [True] * 32, [False] * 32])
        policy = Scripted({(1, 2): uneven_plan, (2, 1): pass_row(0), (2, 3): uneven_plan})
        engine, _ = run_denoise(model, policy, [three], steps=1)
        for units in (None, idle_row2):
            before = engine.stats.executed_flops
            with FlopCounterMode(display=False) as counter:
                hidden = engine.denoise(torch.tensor(three), 0, torch.arange(8), units)
                model.logits(hidden)
            assert engine.stats.executed_flops - before == counter.get_total_flops()
    finally:
        model.eager_attention = False


GENERATION_POLICIES = {
    "token_ratio": lambda: TokenSkipPolicy(reuse_ratio=0.5),
    "token_cos": lambda: TokenSkipPolicy(cosine_threshold=0.5),
    "layer": lambda: LayerSkipPolicy(cosine_threshold=0.0),
    "reuse": lambda: LayerReusePolicy(reuse_k=2, layer_subset="1;2"),
}


@pytest.mark.parametrize("block_cache", [False, True])
@pytest.mark.parametrize("name", list(GENERATION_POLICIES))
def test_executed_flops_equal_flop_counter_over_a_whole_generation(name, block_cache):
    """Every matmul of a whole batched generation (prefill, denoise, commit, logits) is counted
    by the statistics, no more, no less, and the policy did skip work."""
    model = random_network(seed=2, std=0.05)
    model.eager_attention = True
    prompts = [prompt(n, n) for n in (34, 45, 58, 63)]  # rows idle at different times
    cfg = GenerationConfig(max_new_tokens=16, threshold=0.9, use_block_cache=block_cache)
    with FlopCounterMode(display=False) as counter:
        out = generate(model, prompts, IDS, cfg, GENERATION_POLICIES[name]())
    s = out.stats
    assert s.forwards["prefill"] == 1 and s.forwards["commit"] >= 1
    assert s.executed_flops == counter.get_total_flops()
    assert s.executed_flops < s.baseline_flops


def test_passed_row_reaches_no_module_and_no_attention(model, monkeypatch):
    """A PASSED row is not fed to any module of the layer (norms, projections, MLP) nor to its
    attention; a row out of the forward's units neither."""
    rec = Recorder(model, monkeypatch)
    try:
        engine, _ = run_denoise(
            model, Scripted({(0, 2): pass_row(0)}, reuses=False), [[block(0), block(5)]], steps=1
        )
        layer2 = rec.layer_rows(2)
        assert layer2 and set(layer2.values()) == {32}  # row 1 only, in every module
        assert set(rec.layer_rows(1).values()) == {64}
        assert rec.attention[2] == [(1, 32)] and rec.attention[1] == [(2, 32)]
        rec.rows.clear(), rec.attention.clear()
        engine.denoise(
            torch.tensor([block(0), block(5)]),
            0,
            torch.arange(32),
            torch.tensor([[False] * 32, [True] * 32]),
        )
        assert all(n == 32 for n in rec.rows.values())
        assert all(calls == [(1, 32)] for calls in rec.attention.values())
    finally:
        rec.close()


def test_layer_skip_policy_passed_layer_is_never_called(model, monkeypatch):
    policy = always_skipping(LayerSkipPolicy)  # layer 1 here
    rec = Recorder(model, monkeypatch)
    try:
        engine, _ = run_denoise(model, policy, [[block(0), block(5)]], steps=1)
    finally:
        rec.close()
    assert rec.layer_rows(1) == {} and 1 not in rec.attention
    for i in (0, 2, 3):
        assert set(rec.layer_rows(i).values()) == {64} and rec.attention[i] == [(2, 32)]
    assert engine.stats.executed_units_per_layer == [64, 0, 64, 64]


@pytest.mark.parametrize(
    ("protect", "cap", "ran"),
    [
        ((1, 1), 1, "RSRSRSRR"),
        ((2, 2), 1, "RRSRSRRR"),
        ((2, 2), 2, "RRSSRSRR"),
        ((2, 2), 3, "RRSSSRRR"),
        ((1, 3), 9, "RSSSSRRR"),
    ],
)
def test_layer_skip_protections_and_cap_on_a_deeper_model(protect, cap, ran):
    model = random_network(num_hidden_layers=8)
    policy = always_skipping(
        LayerSkipPolicy,
        max_consecutive_skips=cap,
        protect_first=protect[0],
        protect_last=protect[1],
    )
    engine, _ = run_denoise(model, policy, [[block(0), block(5)]] * 2, steps=2)
    got = "".join("R" if n else "S" for n in engine.stats.executed_units_per_layer)
    assert got == ran
    assert all(n in (0, 128) for n in engine.stats.executed_units_per_layer)  # rows alike


def test_engine_enforces_protection_on_a_policy_that_ignores_it(model):
    class Careless(LayerSkipPolicy):
        def decide(self, layer, ctx, x):
            return torch.full(x.shape[:2], PASS, dtype=torch.int8)

    with pytest.raises(PolicyError, match="protected layer 0"):
        run_denoise(model, Careless(cosine_threshold=0.5), [[block()]], steps=1)


SKIP_EVERYTHING = {
    "token": lambda: always_skipping(TokenSkipPolicy),
    "layer": lambda: always_skipping(LayerSkipPolicy),
    "reuse": lambda: LayerReusePolicy(reuse_k=2, layer_subset="0;1;2;3"),
    "pass_all": lambda: Scripted(
        {(s, i): pass_row(slice(None)) for s in range(3) for i in range(4)}, reuses=False
    ),
}


@pytest.mark.parametrize("name", list(SKIP_EVERYTHING))
def test_prefill_and_commit_write_the_exact_prefix_under_skipping(model, name):
    """No skip in prefill or commit forwards: after denoise forwards that skipped, the committed
    block's K/V (all layers) and the commit's last hidden equal an exact prefill of the same
    tokens with no policy."""
    ids = torch.tensor([prompt(64), prompt(64, 9)])
    engine = Engine(model, SKIP_EVERYTHING[name]())
    engine.allocate(2, 96)
    engine.prefill(ids[:, :32])
    engine.begin_block()
    noisy = torch.tensor([block(0), block(9)])
    for _ in range(3):
        engine.denoise(noisy, 0, torch.arange(32))
    st = engine.stats
    assert sum(st.executed_units_per_layer) < sum(st.baseline_units_per_layer)  # it skipped
    last = engine.commit(ids[:, 32:64])
    exact = Engine(model, None)
    exact.allocate(2, 96)
    ref_last = exact.prefill(ids)
    for which in ("k", "v"):
        got, ref = engine.cache.by_row(which), exact.cache.by_row(which)
        assert torch.allclose(got[:, :2, :64], ref[:, :2, :64], atol=1e-5)
    assert torch.allclose(last, ref_last, atol=1e-5)
    # Prefill and commit ran every unit of every layer.
    assert st.forwards["prefill"] == st.forwards["commit"] == 1


@pytest.mark.parametrize(
    ("name", "make", "reused_layers"),
    [
        ("token", lambda: always_skipping(TokenSkipPolicy), (1, 2, 3)),
        ("reuse", lambda: LayerReusePolicy(reuse_k=2, layer_subset="1;2"), (1, 2)),
    ],
)
def test_reuse_path_never_calls_the_layer(model, monkeypatch, name, make, reused_layers):
    """A forward whose plan reuses every unit of a layer does not call the layer, any of its
    modules or its attention; the statistics say so too."""
    engine, _ = run_denoise(model, make(), [[block(0), block(5)]], steps=1)
    rec = Recorder(model, monkeypatch)
    try:
        engine.denoise(torch.tensor([block(0), block(5)]), 0, torch.arange(32))  # step 1
    finally:
        rec.close()
    for i in range(4):
        if i in reused_layers:
            assert rec.layer_rows(i) == {} and i not in rec.attention
        else:
            assert rec.layer_rows(i)[""] == 64 and rec.attention[i] == [(2, 32)]


def test_scheduled_reuse_re_adds_the_old_update_not_the_old_output(model):
    """The research group's bug returned the layer's old absolute output. On a reuse step whose
    layer input changed, the layer's output must be the new input plus the old update."""

    class Recording(LayerReusePolicy):
        def begin_block(self, *a):
            super().begin_block(*a)
            self.inputs = {}

        def plan(self, layer, ctx):  # decided on the host: sees every layer's input
            return OnHost(partial(self.decide, layer, ctx))

        def decide(self, layer, ctx, x):
            self.inputs[ctx.step, layer] = x.clone()
            return super().plan(layer, ctx)

    policy = Recording(reuse_k=2, layer_subset="2")
    run_denoise(model, policy, [[block()], [block(masks=range(11, 32))]])  # slot 10 committed
    old_in, old_out = policy.inputs[0, 2][0], policy.inputs[0, 3][0]
    new_in, new_out = policy.inputs[1, 2][0], policy.inputs[1, 3][0]
    assert not torch.allclose(new_in, old_in, atol=1e-3)  # the input did change
    assert torch.allclose(new_out, new_in + (old_out - old_in), atol=1e-5)
    assert not torch.allclose(new_out, old_out, atol=1e-3)  # the group's bug would give this


def test_a_policy_that_cannot_act_on_the_model_is_no_policy():
    """Layer options past the model's depth skip nothing: the engine runs as with no policy (no
    per-layer planning cost), and the same options on a deeper model do act."""
    from early_exit_generation_functions import EarlyExitPolicy
    from layer_skip_generation_functions import LayerSkipPolicy
    from token_skip_generation_functions import TokenSkipPolicy

    model = random_network(num_hidden_layers=4)
    for policy, acts_on_5 in [
        (TokenSkipPolicy(cosine_threshold=0.5, min_layer=4), True),
        (EarlyExitPolicy(exit_threshold=0.5, min_layer=4), True),
        (LayerSkipPolicy(cosine_threshold=0.5, protect_first=2, protect_last=2), True),
        (LayerSkipPolicy(cosine_threshold=0.5, protect_first=3, protect_last=2), False),
    ]:
        assert policy.enabled and not policy.layers(4) and bool(policy.layers(5)) == acts_on_5
        assert Engine(model, policy).policy is None
    acting = TokenSkipPolicy(cosine_threshold=0.5, min_layer=3)
    assert Engine(model, acting).policy is acting


def test_the_documented_policy_example_runs():
    """docs/concepts/writing-a-policy.md's example, as written: it reuses in its layers only, and
    the GPU's static layouts (its OnDevice plan sized by its quota, no read-back) give the exact
    path's tokens and reuse counts."""
    from pathlib import Path

    from v2.attention import Dense

    page = Path(__file__).resolve().parents[1] / "docs" / "concepts" / "writing-a-policy.md"
    code = page.read_text().split("```python\n")[1].split("```")[0]
    scope: dict = {}
    exec(compile(code, str(page), "exec"), scope)  # noqa: S102 - our own documentation
    model = random_network(seed=4, num_hidden_layers=4).double()
    cfg = GenerationConfig(max_new_tokens=40, threshold=0.7)
    prompts = [prompt(20), prompt(35, 2)]
    exact = generate(model, prompts, IDS, cfg, scope["SecondHalf"](2))
    policy = scope["SecondHalf"](2)
    engine = Engine(model, policy, 32, static_shapes=True, compaction="always", attention=Dense())
    static = generate(model, prompts, IDS, cfg, policy, engine=engine)
    reused = exact.stats.reused_units_per_layer
    assert reused[:2] == [0, 0] and all(n > 0 for n in reused[2:])
    assert [o.token_ids for o in static.outputs] == [o.token_ids for o in exact.outputs]
    assert static.stats.reused_units_per_layer == reused
    assert engine.replays["denoise"] > 0  # planned on the device, replayed from its record


def test_token_plans_are_made_once_per_window_and_layer(model):
    """A replayed forward asks for every layer's plan: the token policy hands back the value it
    made the first time (no new views of its state), until its state buffers change shape."""
    policy = TokenSkipPolicy(cosine_threshold=0.9)
    engine, _ = run_denoise(model, policy, [[block()]] * 3, steps=3)
    seen = {}
    original = policy._make_plan

    def counting(layer, ctx):
        seen[layer] = seen.get(layer, 0) + 1
        return original(layer, ctx)

    policy._make_plan = counting
    engine.begin_block()
    for _ in range(3):
        engine.denoise(torch.tensor([block()]), 0, torch.arange(32))
    assert seen == {}  # same window, same buffers: every plan reused
    engine.allocate(2, 64)  # a new batch shape: new state, new plans
    engine.begin_block()
    engine.denoise(torch.tensor([block(), block(3)]), 0, torch.arange(32))
    assert seen == dict.fromkeys(range(1, model.cfg.num_hidden_layers), 1)
