"""Running a denoise or commit forward's layers by their plans: the layouts (engine.py's module
docstring, "Static shapes"), the per-block reuse state and what each layer's work counts.

`Window` holds the static buffers of the forwards over windows of one size; `LayerRunner` runs
one layer of such a forward by its plan (policy.py: Uniform, OnDevice, OnHost) in the layout the
plan and the forward's size call for, each step through the forward recorder (one graph per
step, or recorded into the forward's graph), and keeps what REUSE needs: every unit's last
update per layer (`delta`, `has_ref`) and its host mirror (`ref_bits`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from v2 import flops
from v2.attention import Geometry, UnitBatch
from v2.compiled import compiled
from v2.cuda_graphs import ForwardRecorder, Layout, StepKey
from v2.forward import Forward, Kind, Units
from v2.kv_cache import KVCache
from v2.layer_step import (
    Deltas,
    LayerStack,
    Settling,
    compact_into,
    layer_step,
    reuse_add,
    settle,
)
from v2.ledger import LayerWork, Ledger, Reused
from v2.model import ModelConfig
from v2.observer import NOT_RUN
from v2.policy import COMPUTE, PASS, REUSE, OnDevice, OnHost, Plan, Policy, Uniform


class PolicyError(RuntimeError):
    """A policy answered with a plan the engine must not execute."""


@dataclass(frozen=True)
class Referenced:
    """Every unit of the forward's window has a REUSE reference at layer `layer` (an effect:
    ledger.py)."""

    layer: int


@dataclass(frozen=True)
class Execution:
    """How an engine runs its layer steps, fixed for its life (engine.py's arguments)."""

    block: int  # B
    block_cache: bool  # the sub-block cache
    static: bool  # static shapes (the layouts CUDA graphs need)
    compaction: str  # auto, always, never
    compiled: bool  # torch.compile the steps
    attention: object  # the attention backend (attention.py)


def capacity(n: int, total: int) -> int:
    """The bucket a compacted layout of n units gets: a multiple of total / 16 (at least 8)."""
    step = max(8, -(-total // 16))
    return min(total, -(-n // step) * step)


class Window:
    """Static buffers of the forwards over windows of `w` positions; `forward`, what a layer step
    takes: the description of the forward running over them (forward.py; `load` sets its kind
    and key length)."""

    def __init__(self, cache: KVCache, w: int, block: int, hidden: int, dtype: torch.dtype):
        d, R, dev = hidden, cache.rows, cache.k.device
        N = R * w
        self.w, self.N, self.block = w, N, block
        self.ids = torch.zeros(R, w, dtype=torch.long, device=dev)
        self.x = torch.zeros(N + 1, d, dtype=dtype, device=dev)  # last row: trash
        self.x_units = self.x[:N].view(R, w, d)  # what a policy sees
        self.scope = torch.zeros(R, w, dtype=torch.bool, device=dev)
        self.scope_flat = self.scope.view(-1)
        self.plan = torch.zeros(R, w, dtype=torch.int8, device=dev)
        self.compute = torch.zeros(N, dtype=torch.bool, device=dev)
        self.reuse = torch.zeros(N, dtype=torch.bool, device=dev)
        self.all_units = torch.ones(N, dtype=torch.bool, device=dev)
        u = torch.arange(N + 1, device=dev)
        row, t = u // w, u % w
        t[N] = 0
        zero = torch.zeros((), dtype=torch.long, device=dev)
        self.units = Units(row, t, torch.zeros_like(t), zero)
        self.row_start = torch.zeros(R + 1, dtype=torch.long, device=dev)  # a verify window's
        self.geo = Geometry(
            rows=R,
            w=w,
            max_len=cache.max_len,
            end=zero.clone(),
            seqused=torch.zeros(R, dtype=torch.int32, device=dev),
            dense_cu_q=torch.arange(R + 1, dtype=torch.int32, device=dev) * w,
            row_starts=cache.row_starts,
            key_positions=torch.arange(cache.max_len, device=dev),
        )
        self.dense = UnitBatch(torch.arange(N, device=dev), None, None, N)
        self.masked = UnitBatch(self.dense.index, self.compute, None, None)
        self.scope_masked = UnitBatch(self.dense.index, self.scope_flat, None, None)
        self._compacted: dict[tuple[bool, int], UnitBatch] = {}
        self.scope_batch: UnitBatch | None = None  # this forward's compacted scope
        self.settling: dict[int, Settling] = {}  # per layer (LayerRunner._settling)
        kind = Kind.DENOISE_FULL if w == block else Kind.DENOISE_SUB
        self.forward = Forward(kind, R, w, 0, cache, x=self.x, units=self.units, geo=self.geo)

    def load(self, ids: torch.Tensor, embed: torch.Tensor, start: int, units, kind: Kind) -> None:
        """A forward's inputs: token ids [b, w] (rows past b hold no sequence), embedded; the
        window's start in the block; the units each row computes ([b, w] bool, None: all)."""
        b = ids.shape[0]
        self.ids[:b].copy_(ids)
        if b < self.geo.rows or units is not None:
            self.scope.zero_()
            self.scope[:b] = True if units is None else units
        else:
            self.scope.fill_(True)
        cache = self.forward.cache
        P, end = cache.prefix_len, cache.prefix_len + self.block
        torch.add(self.units.t, P + start, out=self.units.pos)
        self.units.block_offset.fill_(start)
        self.geo.end.fill_(end)
        self.geo.seqused.fill_(end)
        self._embed(embed, kind, end)

    def load_verify(
        self,
        ids: torch.Tensor,
        embed: torch.Tensor,
        rows: torch.Tensor,
        starts: torch.Tensor,
        widths: torch.Tensor,
        end: int,
        max_pos: int,
    ) -> None:
        """A verify forward's inputs (a causal engine's, engine.py): token ids [b, w] of cache
        rows `rows` [b], row j's window at absolute positions starts[j] + [0, w), its first
        widths[j] slots in scope (the rest, and every other cache row, padding); `end`: the
        keys the longest row's queries see (max of starts + widths). Each row's keys end at its
        window's end (starts + w: FlashAttention aligns a causal mask to the keys' end), which
        the cache has room for (the caller allocates w positions more than a sequence needs).
        Padding positions are clamped below `max_pos` (the RoPE table's length)."""
        R, w = self.geo.rows, self.w
        self.ids.zero_()
        self.ids[rows] = ids
        self.scope.zero_()
        self.scope[rows] = torch.arange(w, device=ids.device)[None] < widths[:, None]
        self.row_start.zero_()
        self.row_start[rows] = starts
        torch.add(self.row_start[self.units.row], self.units.t, out=self.units.pos)
        self.units.pos.clamp_(max=max_pos - 1)
        self.geo.seqused.copy_(self.row_start[:R] + w)
        self.geo.end.fill_(end)
        self._embed(embed, Kind.VERIFY, end)

    def _embed(self, embed: torch.Tensor, kind: Kind, end: int) -> None:
        self.forward.kind, self.forward.end = kind, end
        torch.index_select(embed, 0, self.ids.view(-1), out=self.x[: self.N])
        self.scope_batch = None

    def compacted(self, C: int, scope: bool = False) -> UnitBatch:
        """Static buffers of a compacted layout of C slots; the forward's scope (`scope`, shared
        by its dense layers) and a layer's plan each have their own."""
        kind = (scope, C)
        if kind not in self._compacted:
            dev = self.x.device
            self._compacted[kind] = UnitBatch(
                torch.full((C,), self.N, dtype=torch.long, device=dev),
                torch.zeros(C, dtype=torch.bool, device=dev),
                torch.zeros(self.geo.rows + 1, dtype=torch.int32, device=dev),
                None,
            )
        return self._compacted[kind]


class LayerRunner:
    """Runs one layer of a window forward by its plan (module docstring). The engine sets
    `live` (rows with a sequence) and `watching` (an observer reads each plan back), and starts
    each forward with `begin_forward`."""

    def __init__(
        self,
        run: Execution,
        cfg: ModelConfig,
        policy: Policy | None,
        protected: set[int],
        recorder: ForwardRecorder,
        ledger: Ledger,
        stack: Callable[[], LayerStack],
    ):
        self.B, self.block_cache, self.static = run.block, run.block_cache, run.static
        self.compaction, self.compiled = run.compaction, run.compiled
        self.attention = run.attention
        self.cfg, self.policy, self.protected = cfg, policy, protected
        self.recorder, self.graphs = recorder, recorder.graphs
        self.ledger, self.stack = ledger, stack
        self.keeps_deltas = policy is not None and policy.reuses
        self.delta = self.has_ref = None
        self.ref_bits = [0] * cfg.num_hidden_layers
        self.live, self.watching, self.bits, self.keys = 0, False, None, 0

    def clear(self) -> None:
        """Drop the reuse buffers (the cache is being reallocated)."""
        self.delta = self.has_ref = None

    def begin_forward(self, bits: int | None, keys: int) -> None:
        """A forward starts: its window's positions in the block (a bit each; None when some
        rows compute only part of it) and its key count."""
        self.bits, self.keys = bits, keys

    def referenced(self, i: int) -> bool:
        """Every unit of the forward's window has a REUSE reference at layer i."""
        bits = self.bits
        return bits is not None and self.ref_bits[i] & bits == bits

    def begin_block(self, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        """Forget every unit's last update (zeroed in place: graphs write into the buffers)."""
        L = self.cfg.num_hidden_layers
        # Per layer, a bit per block offset: every row has a REUSE reference there (a host mirror
        # of has_ref, so a whole-layer REUSE needs no device round trip).
        self.ref_bits = [0] * L
        if not self.keeps_deltas:
            return
        if self.delta is None:
            shape = (L, rows * self.B + 1, self.cfg.hidden_size)
            self.delta = torch.zeros(shape, dtype=dtype, device=device)
            self.has_ref = torch.zeros(shape[:2], dtype=torch.bool, device=device)
        else:
            self.delta.zero_()
            self.has_ref.zero_()

    def effect(self, effect: LayerWork | Reused | Referenced) -> None:
        """Apply one host effect of the layer loop, and record it when recording."""
        if isinstance(effect, Referenced):
            self.ref_bits[effect.layer] |= self.bits
        else:
            self.ledger.apply(effect, self.keys)
        self.recorder.effect(effect)

    def layer(self, i: int, win: Window, plan: Plan, n_scope: int) -> int | None:
        """Run layer i of a denoise forward by its plan. Returns what it did with every unit in
        scope (COMPUTE, REUSE or PASS), or None for a per-unit plan, resolved in win.compute /
        win.reuse (what an observer reads back, `resolved`)."""
        if isinstance(plan, OnHost):
            self.recorder.not_replayable()
            plan = plan.decide(win.x_units)
        elif isinstance(plan, OnDevice) and (self.watching or not self.static):
            plan = self._fn(plan.fn)(win.x_units, *plan.args)  # read back: run it now
        if i in self.protected and not (isinstance(plan, Uniform) and plan.action == COMPUTE):
            raise PolicyError(f"{self.policy.name}: planned skipping on protected layer {i}")
        if isinstance(plan, Uniform):
            did = self._uniform_layer(i, win, plan.action, n_scope)
            if did is not None:
                return did
            plan = torch.full_like(win.plan, plan.action)  # the general path checks each unit
        if isinstance(plan, torch.Tensor):
            self._check(plan, win)
            win.plan.copy_(plan)
            plan = None
        self._planned_layer(i, win, plan, n_scope)
        return None

    def _uniform_layer(self, i: int, win: Window, action: int, n_scope: int) -> int | None:
        """A plan of one action for every unit, run with no device round trip where the host
        knows enough: returns the action done, or None when each unit must be checked."""
        if action == PASS and self.bits is not None:
            if not (win.w == self.B and self.block_cache):
                return PASS  # the layer does not run; x is its output
            action = COMPUTE  # the sub-block cache needs a full window's block K/V
        if action == COMPUTE:
            self.dense_layer(i, win, n_scope, deltas=self.keeps_deltas)
            return COMPUTE
        if action == REUSE and self.referenced(i) and self.keeps_deltas:
            deltas = Deltas(self.delta[i], self.has_ref[i], win.all_units, self.B)
            key = StepKey(Layout.REUSE_ALL, win.w, i)
            self.recorder.step(key, lambda: reuse_add(win.x, win.units, deltas))
            self.effect(Reused(i))
            return REUSE
        self.recorder.not_replayable()
        return None

    def resolved(self, win: Window, did: int | None) -> torch.Tensor:
        """What a layer did with each unit ([cache rows, w] int8, NOT_RUN out of scope), from
        what `_layer` returned and the plan it resolved on the device (for an observer)."""
        if did is None:
            compute, reuse = win.compute.view_as(win.plan), win.reuse.view_as(win.plan)
            if not self.keeps_deltas:  # win.reuse is written only where updates are kept
                reuse = torch.zeros_like(reuse)
            codes = torch.where(compute, COMPUTE, torch.where(reuse, REUSE, PASS))
        else:
            codes = torch.full_like(win.plan, did)
        return torch.where(win.scope, codes, NOT_RUN).to(torch.int8)

    def dense_layer(
        self, i: int, win: Window, n_scope: int, deltas: bool, compact: bool = True
    ) -> None:
        """Every unit in scope computes (`compact`: in a compacted layout where that pays)."""
        d = Deltas(self.delta[i], self.has_ref[i], None, self.B) if deltas else None
        w, N = win.w, win.N
        # (layout, rows through its matmuls, capacity); the n_scope units in scope are useful
        if n_scope == N:
            batch, layout, rows, C = win.dense, Layout.DENSE, N, None
        elif not self.static:
            if win.scope_batch is None:
                index = win.scope_flat.nonzero().squeeze(1)
                win.scope_batch = UnitBatch(index, None, None, n_scope)
            batch, layout, rows, C = win.scope_batch, Layout.SCOPE, n_scope, None
        elif compact and self.pays(n_scope):
            C = capacity(n_scope, N)
            if win.scope_batch is None:
                win.scope_batch = win.compacted(C, scope=True)
                self.recorder.step(
                    StepKey(Layout.GATHER_SCOPE, w, capacity=C),
                    lambda: self._compact(win, win.scope_flat, C, scope=True),
                )
                win.scope_batch.count = n_scope
            batch, layout, rows = win.scope_batch, Layout.SCOPE, C  # C - n_scope: bucket padding
        else:  # masked: every unit runs, those out of scope are discarded (padding)
            batch, layout, rows, C = win.scope_masked, Layout.SCOPE_MASKED, N, None
        key = StepKey(layout, w, i, deltas, C)
        self.recorder.step(key, lambda: self._step(i, win, batch, d))
        self._count(i, win, batch, rows=rows, planned=False)
        if self.bits is not None and deltas:
            self.effect(Referenced(i))

    def _planned_layer(self, i: int, win: Window, device: OnDevice | None, n_scope: int) -> None:
        """A per-unit plan: in win.plan (None), or `device`, computed inside the layer's graph."""
        d = None
        if self.keeps_deltas:
            d = Deltas(self.delta[i], self.has_ref[i], win.reuse, self.B)
        key = StepKey(Layout.MASKED, win.w, i, d is not None, plan=device and device.graph_key)
        if not self.static:  # exact shapes: read the plan
            self._settle(i, win, device)
            index = win.compute.nonzero().squeeze(1)
            n = index.numel()
            batch = UnitBatch(index, None, None, n)
            if n:
                self._step(i, win, batch, d)
                self._count(i, win, batch, rows=n, planned=True)
            elif d is not None:
                reuse_add(win.x, win.units, d)
        elif not self.pays(n_scope):  # masked: everything runs, the plan decides what is kept
            self.recorder.step(key, lambda: self._masked_step(i, win, device, d))
            self._count(i, win, win.masked, rows=win.N, planned=True)
        elif (bound := self._bound(i, device, win)) is not None:
            self._bound_step(i, win, device, d, key, bound)
        else:  # the plan's size only the device knows: read it (one sync for this layer)
            self._read_back_step(i, win, device, d, key)
        if self.bits is not None and not self.policy.passes:
            self.effect(Referenced(i))

    def _settle(self, i: int, win: Window, device: OnDevice | None, C: int | None = None):
        """The plan (on the device: computed here), resolved into win.compute / win.reuse and
        counted; compacted into C slots if given (layer_step.settle)."""
        plan = self._fn(device.fn)(win.x_units, *device.args) if device else win.plan
        extra = {}
        if C is not None:
            # Flash attends with the computed queries only: n x keys pairs, known on the
            # device; the dense backend's pairs do not depend on n (counted on the host).
            pair_keys = win.geo.end if self.attention.name == "flash" else 0
            batch = win.compacted(C) if C else None
            extra = dict(capacity=C, rows=win.geo.rows, batch_out=batch, pair_keys=pair_keys)
        self._fn(settle)(plan, self._settling(i, win), **extra)

    def _settling(self, i: int, win: Window) -> Settling:
        """Layer i's `Settling` over `win` (made once: the same object every forward)."""
        if i not in win.settling:
            win.settling[i] = Settling(
                win.scope,
                self.has_ref[i] if self.keeps_deltas else None,
                win.units,
                self.B,
                self.block_cache and win.w == self.B,
                win.compute,
                win.reuse,
                self.ledger.counters,
                self.ledger.layer_ids[i],
            )
        return win.settling[i]

    def _masked_step(self, i: int, win: Window, device: OnDevice | None, d) -> None:
        """Everything runs; the plan decides what is kept. A plan on the device runs inside the
        layer's first compiled half (its kernels fuse with the layer's)."""
        if device is None:
            self._settle(i, win, None)
            self._step(i, win, win.masked, d)
        else:
            planned = (device.fn, (win.x_units, *device.args), self._settling(i, win))
            self._step(i, win, win.masked, d, planned=planned)

    def _bound_step(self, i: int, win: Window, device: OnDevice, d, key: StepKey, bound: int):
        """The plan's units compacted into a capacity its quota bounds: no read-back."""
        C = capacity(bound, win.N) if bound else 0

        def work():
            self._settle(i, win, device, C)  # useful units, pairs and the overflow check counted
            if C:
                self._step(i, win, win.compacted(C), d)
            elif d is not None:
                reuse_add(win.x, win.units, d)

        self.recorder.step(replace(key, layout=Layout.BOUND, capacity=C), work)
        if C:
            host_pairs = self.attention.name != "flash"
            self._count(i, win, win.compacted(C), rows=C, planned=True, attention=host_pairs)

    def _read_back_step(self, i: int, win: Window, device: OnDevice | None, d, key: StepKey):
        """The plan resolved, its size read back (one synchronisation), then its units compacted
        into the capacity that size needs."""
        self.recorder.not_replayable()
        self.graphs.run(replace(key, layout=Layout.SETTLE), lambda: self._settle(i, win, device))
        n = int(win.compute.sum())
        C = capacity(n, win.N) if n else 0
        if C:
            batch = win.compacted(C)
            self.graphs.run(
                StepKey(Layout.COMPACTED, win.w, i, d is not None, C),
                lambda: (self._compact(win, win.compute, C), self._step(i, win, batch, d)),
            )
            batch.count = n
            self._count(i, win, batch, rows=C, planned=True)
        elif d is not None:
            reuse = Deltas(d.delta, d.has_ref, win.reuse, self.B)
            key = StepKey(Layout.REUSE, win.w, i)
            self.graphs.run(key, lambda: reuse_add(win.x, win.units, reuse))

    def _step(
        self, i: int, win: Window, batch: UnitBatch, deltas: Deltas | None, planned=None
    ) -> None:
        layer_step(self.stack(), win.forward, i, batch, deltas, planned)

    def _compact(self, win: Window, mask: torch.Tensor, C: int, scope: bool = False) -> None:
        self._fn(compact_into)(mask, C, win.geo.rows, win.compacted(C, scope))

    def _fn(self, fn: Callable) -> Callable:
        """`fn`, compiled when the engine compiles (CUDA; compiled.py)."""
        return compiled(fn) if self.compiled else fn

    def pays(self, units: int) -> bool:
        """Whether computing only `units` of a window (with graphs) is worth a compaction: in the
        compute-bound regime (hundreds of rows, a real layer), fewer rows are less time; below
        it a forward reads its weights or launches its kernels in the same time whatever the
        rows (compute-skipping.md section 6)."""
        if self.compaction != "auto":
            return self.compaction == "always"
        return units >= 256 and units * flops.unit(self.cfg) >= 40e9

    def _bound(self, i: int, device: OnDevice | None, win: Window) -> int | None:
        """Most units a plan on the device can compute, from its quota: every unit in scope for
        quota 0; otherwise only when every row in scope has a reference at every position of the
        window (else None)."""
        quota = device.quota if device is not None else None
        if quota == 0:
            return self.live * win.w
        if quota is None or not self.referenced(i):
            return None
        return self.live * max(0, win.w - quota)

    def _check(self, plan: torch.Tensor, win: Window) -> None:
        """An eager plan: shape, and PASS covering a row's whole window (a synchronisation)."""
        name = self.policy.name
        if plan.shape != win.plan.shape:
            raise PolicyError(f"{name}: plan shape {tuple(plan.shape)} != {tuple(win.plan.shape)}")
        if self.policy.passes_units:
            return
        passed, scope = plan == PASS, win.scope
        partial = ((passed & scope).any(1) & ~(passed | ~scope).all(1)).any()
        if bool(partial):
            raise PolicyError(f"{name}: PASS must cover a row's whole window")

    def _count(
        self,
        i: int,
        win: Window,
        batch: UnitBatch,
        rows: int,
        planned: bool,
        attention: bool = True,
    ) -> None:
        """Host-known work of one layer: `rows` through its matmuls (executed units; useful of
        them: the forward's units in scope, or, `planned`, the units the plan computed, counted
        on the device by `settle`), and (unless counted on the device) its attention's (query,
        key) pairs."""
        pairs0 = pairs1 = 0
        if attention:  # a backend's pairs are affine in the key count
            pairs0 = self.attention.pairs(batch, win.geo, 0)
            pairs1 = self.attention.pairs(batch, win.geo, 1) - pairs0
        self.effect(LayerWork(i, rows, planned, pairs0, pairs1))
