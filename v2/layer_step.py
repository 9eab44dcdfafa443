"""One decoder layer run on a list of units: the engine's hot path.

A denoise or commit forward keeps the hidden state of every (row, window position) unit in one
flat buffer `x_all` [N + 1, hidden] (N = rows x window; the last row is a trash row). A layer step
gathers the units it computes (`UnitBatch.index`, padded to a static capacity), runs the layer on
them alone (projections, K/V written into the cache, attention of their queries, MLP), and
scatters the results back; padded slots read and write only trash. The units a plan REUSEs get
the residual update of their last computation re-added, and keep their K/V; units it neither
computes nor reuses (PASS, out of scope) are left untouched.

A step takes what stays for the engine (`LayerStack`: the layers' weights, RoPE tables, the
attention backend), what stays for the window (`Forward`, forward.py: its buffers, position maps
and key geometry), the layer, the units to compute, and the updates a plan reuses. The K/V it
computes go into the cache through the cache's write path, at the cache's slots (kv_cache.py).

On CUDA the step is compiled with torch.compile (one fused kernel per elementwise stretch:
gather + RMSNorm, RoPE + K/V slots, residual + RMSNorm, SiLU x up, residual + scatter), so a layer
is the four matmuls, the K/V write, attention and a few fused kernels; the engine then captures
it in a CUDA graph. On the CPU it runs as the plain PyTorch below, which is also the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from v2.attention import UnitBatch
from v2.forward import Forward, Units
from v2.model import DecoderLayer, apply_rope
from v2.policy import PASS, REUSE


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's tensors and its norms' epsilon."""

    ln1: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor
    o: torch.Tensor
    ln2: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    eps: float

    @classmethod
    def of(cls, layer: DecoderLayer) -> LayerWeights:
        a, m = layer.self_attn, layer.mlp
        tensors = (
            layer.input_layernorm.weight,
            a.qkv_proj.weight,
            a.qkv_proj.bias,
            a.o_proj.weight,
            layer.post_attention_layernorm.weight,
            m.gate_up_proj.weight,
            m.down_proj.weight,
        )
        return cls(*(t.detach() for t in tensors), eps=layer.input_layernorm.eps)


@dataclass(frozen=True)
class LayerStack:
    """The network's layers as the layer step runs them, constant for an engine: each layer's
    weights, the RoPE tables (cos, sin [positions, head_dim]), the attention backend
    (attention.py), the head counts, and `compile_fn` (compiled.compiled on CUDA, None: plain)."""

    weights: list[LayerWeights]
    rope: tuple[torch.Tensor, torch.Tensor]
    attention: Any
    heads: int
    kv_heads: int
    compile_fn: Callable | None = None

    @classmethod
    def of(cls, model, attention, compile_fn: Callable | None) -> LayerStack:
        w = model.embed_tokens.weight
        cos, sin = model._rope_table(w.device)
        cfg = model.cfg
        weights = [LayerWeights.of(layer) for layer in model.layers]
        rope = (cos.to(w.dtype), sin.to(w.dtype))
        return cls(
            weights, rope, attention, cfg.num_attention_heads, cfg.num_key_value_heads, compile_fn
        )


@dataclass
class Deltas:
    """The last residual update of every (row, block position) at one layer, [rows * B + 1,
    hidden] (last row: trash), whether it exists ([rows * B + 1] bool), and the units this step
    re-adds it to (`reuse` [N] bool, None: none)."""

    delta: torch.Tensor
    has_ref: torch.Tensor
    reuse: torch.Tensor | None
    block: int


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2's RMSNorm: normalise in float32, cast back, then the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def layer_step(
    stack: LayerStack,
    fwd: Forward,
    i: int,
    batch: UnitBatch,
    deltas: Deltas | None,
    planned: tuple | None = None,
) -> None:
    """Run layer i of `stack` on `batch`'s units of the window `fwd` (its hidden states `fwd.x`,
    in place; module docstring). The two elementwise-heavy halves are compiled with
    `stack.compile_fn`; the K/V write (the cache's, kv_cache.py) and the attention call between
    them stay plain in-place calls, so the cache is written where it lives (a compiled in-place
    write into a tensor that an opaque kernel then reads was seen to copy the whole cache).

    `planned` = (plan_fn, plan_args, settle_args): a policy's device plan and `settle`'s arguments
    after the plan, run first in the same compiled half (masked layout: the plan's `compute`
    is the batch's `valid`), so that the plan's kernels fuse with the layer's."""
    run = stack.compile_fn or _plain
    w = stack.weights[i]
    inputs, first = attention_inputs, ()
    if planned is not None:
        inputs, first = planned_inputs, planned
    x, q, kk, vv, slot = run(inputs)(*first, fwd.x, batch.index, batch.valid, fwd, w, stack)
    k, v = fwd.cache.write(i, slot, kk, vv)
    o = stack.attention(q, k, v, batch, fwd)
    run(attention_outputs)(fwd, batch, x, o, w, deltas)


def _plain(fn: Callable) -> Callable:
    return fn


def attention_inputs(x_all, index, valid, fwd: Forward, w: LayerWeights, stack: LayerStack):
    """Gather the units, RMSNorm, QKV projection, RoPE, the queries in the layout the attention
    backend takes (its `prepare`); and each unit's cache slot (the cache's trash slot for a
    padded one). `index`, `valid`: the batch's (or, planned, the settled plan's)."""
    units, heads, kv_heads = fwd.units, stack.heads, stack.kv_heads
    row, pos = units.row[index], units.pos[index]
    x = x_all[index]
    qkv = F.linear(rms_norm(x, w.ln1, w.eps), w.qkv, w.qkv_bias)
    hd = w.qkv.shape[0] // (heads + 2 * kv_heads)
    q, kk, vv = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], -1)
    cos, sin = stack.rope[0][pos].unsqueeze(1), stack.rope[1][pos].unsqueeze(1)
    q = apply_rope(q.reshape(-1, heads, hd), cos, sin)
    kk = apply_rope(kk.reshape(-1, kv_heads, hd), cos, sin)
    slot = fwd.cache.slots(row, pos, valid)
    return x, stack.attention.prepare(q, kv_heads), kk, vv.reshape(-1, kv_heads, hd), slot


def planned_inputs(plan_fn, plan_args, settling, x_all, index, valid, *rest):
    """A device plan, settled, then `attention_inputs` on the units it computes (`valid` is
    settle's output buffer; the value is passed on directly, not read back)."""
    compute = settle(plan_fn(*plan_args), settling)
    return attention_inputs(x_all, index, compute, *rest)


def attention_outputs(fwd: Forward, batch: UnitBatch, x, o, w: LayerWeights, deltas):
    """Output projection and residual, RMSNorm, SwiGLU MLP and residual; the results (and the
    units' updates) scattered back into `fwd.x`; reused units get their last update re-added."""
    x_all, units, index, valid = fwd.x, fwd.units, batch.index, batch.valid
    h = x + F.linear(o.reshape(x.shape[0], -1), w.o)
    gate, up = F.linear(rms_norm(h, w.ln2, w.eps), w.gate_up).chunk(2, dim=-1)
    out = h + F.linear(F.silu(gate) * up, w.down)
    n_units = x_all.shape[0] - 1
    target = index if valid is None else torch.where(valid, index, n_units)
    if deltas is not None:
        d_slot = delta_slots(units, index, deltas.block)
        if valid is not None:
            d_slot = torch.where(valid, d_slot, deltas.delta.shape[0] - 1)
        deltas.delta.index_copy_(0, d_slot, out - x)
        deltas.has_ref.index_fill_(0, d_slot, True)
    x_all.index_copy_(0, target, out)
    if deltas is not None and deltas.reuse is not None:
        reuse_add(x_all, units, deltas)


def reuse_add(x_all: torch.Tensor, units: Units, deltas: Deltas) -> None:
    """x += the last update, for the units in `deltas.reuse` (their K/V stay as they are)."""
    n = x_all.shape[0] - 1
    d_slot = delta_slots(units, slice(0, n), deltas.block)
    x = x_all[:n]
    x.copy_(torch.where(deltas.reuse[:, None], x + deltas.delta[d_slot], x))


def delta_slots(units: Units, which, block: int) -> torch.Tensor:
    """The slots in a layer's delta / has_ref buffers of the window's units `which` (an index
    tensor of unit ids, or a slice)."""
    return units.row[which] * block + units.block_offset + units.t[which]


def resolve(
    plan: torch.Tensor,
    scope: torch.Tensor,
    has_ref: torch.Tensor | None,
    units: Units,
    block: int,
    full_window: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A plan [rows, w] (COMPUTE / REUSE / PASS) -> the units to compute and to reuse ([N] bool
    each; reuse None when the engine keeps no updates). Out of scope: neither. REUSE without a
    reference: compute. Under the sub-block cache (`full_window`), a row that runs the full block
    computes it: the sub-block forwards after it need every layer's block K/V."""
    passed = plan == PASS
    if full_window:
        passed = passed & ~scope.all(1, keepdim=True)
    live = scope & ~passed
    if has_ref is None:
        return live.view(-1), None
    n = scope.numel()
    reuse = (
        (plan == REUSE).view(-1) & has_ref[delta_slots(units, slice(0, n), block)] & live.view(-1)
    )
    return live.view(-1) & ~reuse, reuse


def compact(mask: torch.Tensor, capacity: int, rows: int) -> UnitBatch:
    """The units of `mask` [N] bool (row-major) as a UnitBatch of `capacity` slots, with no host
    synchronisation: slot j holds the j-th unit of the mask, slots past the last hold the trash id
    N. If the mask has more units than slots, the ones that do not fit are dropped: a caller that
    cannot rule that out checks the count on the device (settle's overflow counter)."""
    n = mask.numel()
    rank = mask.cumsum(0) - 1
    target = torch.where(mask & (rank < capacity), rank, capacity)
    index = torch.full((capacity + 1,), n, dtype=torch.long, device=mask.device)
    index.scatter_(0, target, torch.arange(n, device=mask.device))
    index = index[:capacity]
    counts = mask.view(rows, -1).sum(1)
    cu_q = torch.zeros(rows + 1, dtype=torch.int32, device=mask.device)
    cu_q[1:] = counts.cumsum(0).clamp(max=capacity)
    return UnitBatch(index, index < n, cu_q, None)


def compact_into(mask: torch.Tensor, capacity: int, rows: int, out: UnitBatch) -> None:
    """`compact`, written into the static buffers of `out` (what captured layer steps read)."""
    b = compact(mask, capacity, rows)
    out.index.copy_(b.index)
    out.valid.copy_(b.valid)
    out.cu_q.copy_(b.cu_q)


@dataclass(frozen=True)
class Settling:
    """What settling one layer's plan over a window reads and writes (the same object every
    forward: engine buffers). `scope` [rows, w] bool: the units in scope; `has_ref` the layer's
    reference bits (None: no updates kept); `block` B; `full_window`: a full-block window under
    the sub-block cache; `compute` / `reuse` [N] bool: the resolved plan (out); `counters` [4,
    layers] long: reused, useful units, attention pairs, overflows; `layer` [1]: this layer's
    column."""

    scope: torch.Tensor
    has_ref: torch.Tensor | None
    units: Units
    block: int
    full_window: bool
    compute: torch.Tensor
    reuse: torch.Tensor
    counters: torch.Tensor
    layer: torch.Tensor


def settle(
    plan: torch.Tensor,
    s: Settling,
    capacity: int | None = None,
    rows: int = 0,
    batch_out: UnitBatch | None = None,
    pair_keys: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """All of a planned layer's bookkeeping in one function (one compiled graph on CUDA): the
    plan resolved into `s.compute` / `s.reuse`; the units reused and the units computed (the
    layer's useful units, whatever layout then runs them) counted; and, given a `capacity`, the
    computed units compacted into `batch_out`'s buffers, with the overflow flag and the attention
    pairs (n x `pair_keys`) counted on the device. Returns the units to compute ([N] bool, what
    `s.compute` now holds)."""
    compute, reuse = resolve(plan, s.scope, s.has_ref, s.units, s.block, s.full_window)
    s.compute.copy_(compute)
    zero = compute.new_zeros((), dtype=torch.long)
    reused = zero
    if reuse is not None:
        s.reuse.copy_(reuse)
        reused = reuse.sum()
    n = compute.sum()
    pairs = over = zero
    if capacity is not None:
        if capacity:
            compact_into(compute, capacity, rows, batch_out)
        pairs = n * pair_keys
        over = (n > capacity).long()
    # One update of the counters: (reused, useful, pairs, overflow) into this layer's column
    # (pairs and overflow are summed over layers when read), as one elementwise kernel: an
    # integer index_add_ is not compiled (torch.compile falls back to aten's sort-based
    # index_put, twelve kernels with bounds-check asserts, seen on an H200).
    counters = s.counters
    column = torch.arange(counters.shape[1], device=counters.device) == s.layer
    added = torch.stack((reused, n, pairs, over)).view(4, 1)
    counters.copy_(torch.where(column, counters + added, counters))
    return compute
