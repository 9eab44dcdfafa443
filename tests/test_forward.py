"""The forward's description and the cache's ownership of K/V (issue 26, items 3 and 4):

- the hot path's functions take a few typed values, not long parameter lists;
- every K/V write of every decode (block diffusion, exact and in the static layouts, with a
  policy that reuses, the sub-block cache; the speculative and autoregressive decodes) goes
  through the cache's write path, and no module but kv_cache.py spells out the slot formula;
- a window's `Forward` says which forward runs over it; prefill through the one eager cached
  forward agrees with the network's uncached forward.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from conftest import IDS, prompt, random_network

from layer_skip_generation_functions import LayerReusePolicy
from token_skip_generation_functions import TokenSkipPolicy
from v2 import kv_cache, layer_step
from v2.attention import Dense, Flash, Packed
from v2.engine import Engine
from v2.forward import Kind, cached_forward
from v2.generate import GenerationConfig, generate
from v2.layer_plans import LayerRunner
from v2.model import block_causal_mask

pytestmark = pytest.mark.usefixtures("one_thread")

V2 = Path(__file__).resolve().parents[1] / "v2"


def test_hot_path_functions_take_at_most_six_parameters():
    functions = [
        layer_step.layer_step,
        layer_step.attention_inputs,
        layer_step.attention_outputs,
        cached_forward,
        kv_cache.slot_of,
        kv_cache.KVCache.slots,
        kv_cache.KVCache.write,
        kv_cache.KVCache.read,
        LayerRunner._step,
        Dense.__call__,
        Flash.__call__,
        Packed.__call__,
    ]
    for fn in functions:
        params = inspect.signature(fn).parameters
        assert len(params) <= 6, f"{fn.__qualname__}: {len(params)} parameters"


class Shadow:
    """Every KVCache made while installed gets a shadow cache that only the cache's own methods
    (its write path and its row moves) update: a K/V write that bypasses them shows as a
    difference between the two."""

    def __init__(self, monkeypatch):
        self.pairs: list[tuple[kv_cache.KVCache, kv_cache.KVCache]] = []
        self.writes = 0
        cls = kv_cache.KVCache
        init, write, keep_rows = cls.__init__, cls.write, cls.keep_rows
        shadows: dict[int, kv_cache.KVCache] = {}

        def shadow_init(cache, cfg, rows, max_len, dtype, device):
            init(cache, cfg, rows, max_len, dtype, device)
            shadow = object.__new__(cls)
            init(shadow, cfg, rows, max_len, dtype, device)
            shadows[id(cache)] = shadow
            self.pairs.append((cache, shadow))

        def shadow_write(cache, layer, slots, k, v):
            self.writes += 1
            out = write(cache, layer, slots, k, v)
            write(shadows[id(cache)], layer, slots, k, v)
            return out

        def shadow_keep_rows(cache, rows):
            shadow = shadows[id(cache)]
            shadow.prefix_len = cache.prefix_len
            keep_rows(shadow, rows)
            keep_rows(cache, rows)

        monkeypatch.setattr(cls, "__init__", shadow_init)
        monkeypatch.setattr(cls, "write", shadow_write)
        monkeypatch.setattr(cls, "keep_rows", shadow_keep_rows)

    def check(self) -> None:
        assert self.pairs and self.writes
        for cache, shadow in self.pairs:
            assert torch.equal(cache.k, shadow.k) and torch.equal(cache.v, shadow.v)


DECODES = {
    "exact": dict(),
    "masked_reuse_block_cache": dict(
        policy=lambda: LayerReusePolicy(reuse_k=2, layer_subset="1;2"),
        engine=dict(compaction="never", attention=Dense),
        config=dict(use_block_cache=True),
    ),
    "compacted_token_skip": dict(
        policy=lambda: TokenSkipPolicy(reuse_ratio=0.5),
        engine=dict(compaction="always", attention=Dense),
    ),
    "flash_layout": dict(engine=dict(compaction="always", attention=lambda: Flash(varlen))),
    "speculative": dict(config=dict(decode="speculative", threshold=0.5)),
    "autoregressive": dict(config=dict(decode="autoregressive")),
}


def varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug, seqused_k):
    """A plain stand-in for the flash kernel (its signature; what test_static_layouts checks
    against a NaN-filled reference)."""
    out = torch.zeros_like(q)
    g = q.shape[1] // k.shape[1]
    for r in range(cu_q.numel() - 1):
        a, b, s, n = int(cu_q[r]), int(cu_q[r + 1]), int(cu_k[r]), int(seqused_k[r])
        if b > a and n:
            keys = k[s : s + n].repeat_interleave(g, 1)
            values = v[s : s + n].repeat_interleave(g, 1)
            scores = torch.einsum("qhd,khd->hqk", q[a:b], keys) * q.shape[-1] ** -0.5
            out[a:b] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
    return out, None, None, None, None


@pytest.mark.parametrize("name", list(DECODES))
def test_every_k_v_write_goes_through_the_cache(monkeypatch, name):
    spec = DECODES[name]
    shadow = Shadow(monkeypatch)
    model = random_network(seed=3, num_hidden_layers=3)
    policy = spec.get("policy", lambda: None)()
    cfg = GenerationConfig(**{"max_new_tokens": 24, "threshold": 0.7, **spec.get("config", {})})
    engine = None
    if "engine" in spec:
        options = dict(spec["engine"])
        options["attention"] = options["attention"]()
        B = model.cfg.block_size
        engine = Engine(model, policy, B, cfg.use_block_cache, static_shapes=True, **options)
    prompts = [prompt(n, offset=n) for n in (5, 33, 40)]
    generate(model, prompts, IDS, cfg, policy, engine=engine)
    shadow.check()


def test_no_module_but_the_cache_spells_out_the_slot_formula():
    """`row * max_len + position` (either order) appears in kv_cache.py alone."""

    def is_max_len(node) -> bool:
        return getattr(node, "id", getattr(node, "attr", None)) == "max_len"

    def is_slot_formula(side) -> bool:  # x * max_len or max_len * x
        mult = isinstance(side, ast.BinOp) and isinstance(side.op, ast.Mult)
        return mult and (is_max_len(side.left) or is_max_len(side.right))

    found = []
    for path in sorted(V2.rglob("*.py")):
        if path.name == "kv_cache.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            add = isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add)
            if add and (is_slot_formula(node.left) or is_slot_formula(node.right)):
                found.append(f"{path.relative_to(V2.parent)}:{node.lineno}")
    assert found == []


def test_the_window_says_which_forward_runs_over_it():
    model = random_network(seed=3, num_hidden_layers=2)
    engine = Engine(model, None, 32)
    engine.allocate(2, 128)
    ids = torch.tensor([prompt(64), prompt(64, 3)])
    engine.prefill(ids)
    engine.begin_block()
    block = torch.tensor([prompt(32), prompt(32, 5)])
    engine.denoise(block, 0, torch.arange(4))
    fwd = engine._windows[32].forward
    assert (fwd.kind, fwd.end, fwd.rows, fwd.w) == (Kind.DENOISE_FULL, 96, 2, 32)
    engine.denoise(block[:, 8:16], 8, torch.arange(4))
    assert engine._windows[8].forward.kind == Kind.DENOISE_SUB
    engine.commit(block)
    assert (fwd.kind, engine.prefix_len) == (Kind.COMMIT, 96)
    assert fwd.cache is engine.cache and fwd.x is engine._windows[32].x


def test_prefill_is_the_uncached_forward():
    model = random_network(seed=3, num_hidden_layers=3).double()
    engine = Engine(model, None, 32)
    engine.allocate(2, 96)
    ids = torch.tensor([prompt(64), prompt(64, 3)])
    got = model.logits(engine.prefill(ids))
    pos = torch.arange(64)
    want = model(ids, pos, block_causal_mask(pos, pos, 32))[:, -1]
    torch.testing.assert_close(got, want)
