"""The policy hook: plans are executed with the skipped work really gone, REUSE re-adds the old
update, PASS is identity, and disabled policies give the baseline token for token."""

from __future__ import annotations

import pytest
import torch
from conftest import IDS, prompt, random_network
from torch.utils.flop_counter import FlopCounterMode

from layer_skip_generation_functions import LayerReusePolicy, LayerSkipPolicy, subset_layers
from token_skip_generation_functions import TokenSkipPolicy
from v2.engine import Engine, PolicyError
from v2.generate import GenerationConfig, generate
from v2.policy import COMPUTE, PASS, REUSE, Policy


class Scripted(Policy):
    """Answers plan(layer) from a table {(step, layer): actions}; records what it saw."""

    name = "scripted"

    def __init__(self, table=None, reuses=True, protected=()):
        self.table, self.reuses, self._protected = table or {}, reuses, set(protected)
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}
        self.calls = 0

    def protected_layers(self, num_layers):
        return self._protected

    def plan(self, layer, x, ctx):
        self.inputs[ctx.step, layer] = x.clone()
        self.calls += 1
        make = self.table.get((ctx.step, layer))
        return None if make is None else make(x)


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


def count_matmul_rows(model):
    rows: dict[str, int] = {}

    def hook(name):
        def fn(module, args):
            rows[name] = rows.get(name, 0) + args[0].reshape(-1, args[0].shape[-1]).shape[0]

        return fn

    handles = [
        m.register_forward_pre_hook(hook(n))
        for n, m in model.layers.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    return rows, handles


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
        policy = LayerSkipPolicy(cosine_threshold=-1.0, max_consecutive_skips=cap)  # always skip
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
