"""The engine's forwards: prefill, denoise and commit over a preallocated K/V cache (kv_cache.py),
with compute-skipping plans executed so that skipped units never enter a matmul.

Static shapes. A denoise or commit forward runs over a window of w positions (the block, or a
sub-block) of every row of the cache: N = rows x w units, their hidden states in one buffer. Each
layer computes a list of units (layer_step.py) in one of three layouts:
- dense: every unit, when every unit is in scope and the plan computes them all;
- compacted: the units to compute, gathered on the device into a bucketed capacity (rows waiting
  for the batch, units a plan reuses or passes are left out), when leaving them out saves more
  than the gather costs (`compaction`);
- masked: every unit runs, and the results of the units outside the plan are discarded (their
  K/V, hidden state and last update stay as they were): for forwards that are weight- or
  latency-bound, where fewer rows would save no time.
Attention takes the key length as a device scalar (attention.py), so one CUDA graph per (layer,
window, layout, capacity) serves every block of a generation and every later generation on the
same buffers.

Per device:
- CUDA: the layer step is compiled (torch.compile), and each layer's work, including a policy's
  plan when the policy allows it (policy.py), is captured in a CUDA graph (cuda_graphs.py). A
  plan that only the device knows is sized by its quota (policy.OnDevice), or else read back
  with one synchronisation for that layer.
- CPU: plain PyTorch with exact shapes (no padding), attention over the computed queries only.

Forward graphs. The first time a forward with a given signature (cuda_graphs.ForwardKey: kind,
window, the layout its units in scope imply, its layers' plan keys, the reference state its
layouts depend on) runs, its layer loop is recorded as it runs: every layer's device work (the
steps above) and every host effect (statistics, reference bits). From then on the loop does not run:
the recorded steps are replayed as one CUDA graph and the host effects applied again, so a
forward costs one graph launch and no per-layer Python. A forward whose loop must read the
device (a plan sized only by a read-back, an OnHost plan) is not recorded; its layers run
one graph each, as before. The recording and replay are cuda_graphs.ForwardRecorder's; the
engine gives it each forward's signature and loop, its device steps and its host effects.

Observers (observer.py). A denoise forward given an `observer` runs its layer loop eagerly (not
recorded, no plan captured) and shows it each layer's input and the output; each layer's plan,
as it resolved on the device, is read back into `last_plan`. With none, nothing of this runs.

Statistics (stats.py): baseline units are the units in scope; executed units are the row slots
fed through a layer's matmuls (all counted in executed FLOPs); of those, the useful units are the
units in scope that the plan computes, the rest padding. Per layout:
- dense: N executed, all useful (every unit is in scope and computes);
- exact (CPU): the units computed, all useful;
- compacted: C slots executed (the bucket), useful the units compacted into them (the forward's
  scope for a dense layer, the plan's computed units for a planned one), padding the C - n slots
  past them;
- masked: N executed (every unit of every cache row), useful the units in scope that the plan
  computes (all in scope for a dense layer), padding the rest: rows waiting or finished, cache
  rows with no sequence, units the plan reuses or passes (run, then discarded).
Skipped units (baseline - useful) are the units a plan reused or passed, so with no policy the
skip rate is 0 whatever the layout. The useful units of a planned layer are counted on the device
(`settle`), the executed slots on the host: `_settled_rows` holds the host's share until `stats`
reads the device's. What only the device knows is accumulated there and read when `stats` is
read.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from functools import wraps

import torch
import torch.nn.functional as F

from v2 import flops
from v2.attention import Geometry, UnitBatch, choose
from v2.compiled import compiled
from v2.cuda_graphs import ForwardKey, ForwardRecorder, GraphRunner, Layout, StepKey
from v2.forward import Forward, Kind, Units, cached_forward
from v2.kv_cache import KVCache
from v2.layer_step import (
    Deltas,
    LayerStack,
    LayerWeights,
    compact_into,
    layer_step,
    reuse_add,
    rms_norm,
    settle,
)
from v2.model import Network, block_causal_mask
from v2.observer import NOT_RUN, Observer
from v2.policy import (
    ALL_COMPUTE,
    COMPUTE,
    PASS,
    REUSE,
    ForwardContext,
    OnDevice,
    OnHost,
    Plan,
    Policy,
    Uniform,
)
from v2.stats import Stats

COMPACTION = ("auto", "always", "never")


def logits(hidden, norm_weight, head_weight, eps: float) -> torch.Tensor:
    """The network's head (Network.logits) as a function of its weights, for torch.compile."""
    return F.linear(rms_norm(hidden, norm_weight, eps), head_weight).float()


def settings(policy: Policy | None):
    """What makes two policies plan alike, so that one engine serves both: for a policy built
    from declared options (a registered one), its class and `config()` (its name and options,
    and what a subclass adds there); a policy that declares none is only itself."""
    if getattr(policy, "options", None) is None:
        return policy
    return type(policy), policy.config()


class PolicyError(RuntimeError):
    """A policy answered with a plan the engine must not execute."""


def _forward(kind: str | None = None):
    """Marks an engine method as a forward: inference mode, and timed by `Engine.timer` (a
    callable kind -> context manager, e.g. the bench's CUDA-event timer) when one is set."""

    def decorate(method):
        @wraps(method)
        def run(self, *args, **kwargs):
            with (
                torch.inference_mode(),
                self.timer(kind or method.__name__) if self.timer else nullcontext(),
            ):
                return method(self, *args, **kwargs)

        return run

    return decorate


def capacity(n: int, total: int) -> int:
    """The bucket a compacted layout of n units gets: a multiple of total / 16 (at least 8)."""
    step = max(8, -(-total // 16))
    return min(total, -(-n // step) * step)


class _Window:
    """Static buffers of the forwards over windows of `w` positions; `forward`, what a layer step
    takes: the description of the forward running over them (forward.py; `_load` sets its kind
    and key length)."""

    def __init__(self, engine: Engine, w: int):
        cache, d = engine.cache, engine.cfg.hidden_size
        R, dev = cache.rows, engine.device
        N = R * w
        self.w, self.N = w, N
        self.ids = torch.zeros(R, w, dtype=torch.long, device=dev)
        self.x = torch.zeros(N + 1, d, dtype=engine.dtype, device=dev)  # last row: trash
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
        self.units = Units(row, t, zero.clone(), zero.clone())
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
        kind = Kind.DENOISE_FULL if w == engine.B else Kind.DENOISE_SUB
        self.forward = Forward(kind, R, w, 0, cache, x=self.x, units=self.units, geo=self.geo)

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


class Engine:
    def __init__(
        self,
        model: Network,
        policy: Policy | None = None,
        block_size: int | None = None,
        block_cache: bool = False,
        cuda_graphs: bool | None = None,
        compile: bool | None = None,
        compaction: str = "auto",
        static_shapes: bool | None = None,
        attention=None,
        forward_graphs: bool = True,
    ):
        """cuda_graphs / compile: default on for a model on a GPU. static_shapes: the layouts
        CUDA graphs need (default: with graphs); on the CPU, for tests of those layouts.
        attention: a backend from attention.py (default: attention.choose). forward_graphs:
        record and replay whole forwards (module docstring); off, every forward runs its layer
        loop, one graph per layer step (what forward graphs are measured against)."""
        if compaction not in COMPACTION:
            raise ValueError(f"compaction must be one of {', '.join(COMPACTION)}")
        self.model = model
        self.cfg = cfg = model.cfg
        self.B = block_size or cfg.block_size
        self.block_cache = block_cache
        # A policy that can never skip (e.g. cosine_threshold >= 1) is no policy: same output,
        # no per-layer planning cost.
        self.given_policy = policy
        L = cfg.num_hidden_layers
        skips = set(policy.layers(L)) if policy is not None else set()
        self.policy = policy if skips else None
        self._protected = set(range(L)) - skips  # layers the policy may not skip
        w = model.embed_tokens.weight
        self.device, self.dtype = w.device, w.dtype
        self.attention = attention or choose(self.device, self.dtype, model.eager_attention)
        cuda = self.device.type == "cuda"
        on = self.attention.capturable
        self.graphs = GraphRunner(
            self.device, (cuda if cuda_graphs is None else cuda_graphs) and on
        )
        self.static = self.graphs.enabled if static_shapes is None else static_shapes
        self.compiled = (cuda if compile is None else compile) and on
        self.compaction = compaction
        # the settings `for_model` finds this engine by (cuda_graphs as given)
        self.key = (settings(policy), self.B, block_cache, cuda_graphs, self.attention.name)
        self.recorder = ForwardRecorder(self.graphs, forward_graphs)
        self.weights = [LayerWeights.of(layer) for layer in model.layers]
        self._stack: LayerStack | None = None  # what layer steps take (`_layer_stack`)
        self.embed = w.detach()
        self.cache: KVCache | None = None
        self.delta = self.has_ref = None
        self._windows: dict[int, _Window] = {}
        self.step = 0
        self._ref_bits = [0] * L
        self._cleared_setups = 0  # setups made before the last clear of records and graphs
        self._n_scope = 0  # units in scope of the forward running (its effects' "every unit")
        self.timer: Callable | None = None  # kind -> context manager around each forward
        # The observer of the denoise forward running (`denoise`'s argument), and the plan of the
        # last one watched: [layers, cache rows, window] int8 of COMPUTE / REUSE / PASS as each
        # layer resolved it, NOT_RUN out of scope (module docstring, "Observers").
        self._watch: Observer | None = None
        self.last_plan: torch.Tensor | None = None
        dev = self.device
        # What only the device knows, per layer: units reused, useful units of planned layers
        # (the units their plans computed), attention pairs, plan overflows. Read and zeroed by
        # `stats`, with `_settled_rows`: the rows executed by those planned layers (host known),
        # so that padding = executed rows - useful units.
        self._counters = torch.zeros(4, L, dtype=torch.long, device=dev)
        self._settled_rows = [0] * L
        self._layer_ids = [torch.tensor([i], device=dev) for i in range(L)]
        self.reset_stats()

    # ---- engines that outlive one generate call ----------------------------------------------

    @classmethod
    def for_model(
        cls,
        model: Network,
        policy: Policy | None,
        block_size: int,
        block_cache: bool,
        cuda_graphs: bool | None,
    ) -> Engine:
        """The model's engine for these settings, kept on the model so that the next generate
        call with the same settings reuses its buffers, CUDA graphs and policy object."""
        w = model.embed_tokens.weight
        attention = choose(w.device, w.dtype, model.eager_attention).name
        key = (settings(policy), block_size, block_cache, cuda_graphs, attention)
        e = getattr(model, "_v2_engine", None)
        if e is None or e.key != key:
            e = cls(model, policy, block_size, block_cache, cuda_graphs)
            model._v2_engine = e
        return e

    # ---- statistics ---------------------------------------------------------------------------

    def reset_stats(self) -> None:
        self._stats = Stats(self.cfg.num_hidden_layers)
        self._counters.zero_()
        self._settled_rows = [0] * self.cfg.num_hidden_layers

    @property
    def stats(self) -> Stats:
        """The statistics so far (reads the device's counters: a synchronisation)."""
        st = self._stats
        reused, useful, pairs, overflow = self._counters.tolist()
        pairs, overflow = sum(pairs), any(overflow)
        if overflow:
            name = self.policy.name if self.policy else "none"
            raise PolicyError(f"{name}: a plan on the device computed more than its quota allows")
        self._counters.zero_()
        for i in range(self.cfg.num_hidden_layers):
            st.padding_units_per_layer[i] += self._settled_rows[i] - useful[i]
            st.reused_units_per_layer[i] += reused[i]
        self._settled_rows = [0] * self.cfg.num_hidden_layers
        st.executed_flops += flops.work(self.cfg, pairs=pairs)
        st.graph_sets = len(self.graphs.sets)
        st.graph_failures = len(self.graphs.failures)
        return st

    @property
    def replays(self) -> dict[str, int]:
        """Forwards replayed from their record (module docstring, "Forward graphs")."""
        by_kind = self.recorder.replays
        denoise = by_kind.get(Kind.DENOISE_FULL, 0) + by_kind.get(Kind.DENOISE_SUB, 0)
        return {"denoise": denoise, "commit": by_kind.get(Kind.COMMIT, 0)}

    @property
    def setups(self) -> int:
        """Forward records, graph warm-ups and captures made so far: a call that leaves this
        unchanged only replayed (what a benchmark times). A forward signature first seen takes
        three calls to get there: record, warm-up and capture of its forward graph."""
        return (
            self._cleared_setups
            + len(self.recorder.records)
            + len(self.graphs.warm)
            + len(self.graphs.graphs)
        )

    # ---- cache and per-block state -------------------------------------------------------

    @torch.inference_mode()
    def allocate(self, batch: int, max_len: int) -> None:
        """Room for `batch` sequences of up to `max_len` positions. Buffers that are big enough
        are kept (with their CUDA graphs); rows past `batch` hold no sequence."""
        c = self.cache
        if c is None or c.rows < batch or c.max_len < max_len:
            rows, length = batch, max_len
            if c is not None and self.static:  # grow, so that it happens rarely
                rows, length = max(rows, c.rows), max(length, c.max_len)
            if self.static:
                length = -(-length // 256) * 256
            self._cleared_setups = self.setups  # setups only grow, across a clear too
            self.graphs.clear()
            self.recorder.clear()
            self._windows.clear()
            self.delta = self.has_ref = None
            self.cache = None
            self.cache = KVCache(self.cfg, rows, length, self.dtype, self.device)
        self.cache.prefix_len = 0
        self.live = batch

    @property
    def prefix_len(self) -> int:
        return self.cache.prefix_len

    @prefix_len.setter
    def prefix_len(self, value: int) -> None:
        self.cache.prefix_len = value

    @torch.inference_mode()
    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep `rows` (at block ends): their prefix K/V move to the first rows of the cache."""
        kept = rows.tolist()
        self.cache.keep_rows(kept)
        self.live = len(kept)

    @torch.inference_mode()
    def begin_block(self) -> None:
        """Reset per-position state; the policy's too."""
        L, B, R = self.cfg.num_hidden_layers, self.B, self.cache.rows
        self.step = 0
        # Per layer, a bit per block offset: every row has a REUSE reference there (a host mirror
        # of has_ref, so a whole-layer REUSE needs no device round trip).
        self._ref_bits = [0] * L
        if self.policy is not None:
            self.policy.begin_block(R, B, L)
            if self.policy.reuses:
                if self.delta is None:  # zeroed in place afterwards: graphs write into these
                    shape = (L, R * B + 1, self.cfg.hidden_size)
                    self.delta = torch.zeros(shape, dtype=self.dtype, device=self.device)
                    self.has_ref = torch.zeros(shape[:2], dtype=torch.bool, device=self.device)
                else:
                    self.delta.zero_()
                    self.has_ref.zero_()

    # ---- the three forward kinds --------------------------------------------------------------

    @_forward()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Complete prompt blocks [0, P): exact, block-causal, eager (once per generation).
        Returns the last position's hidden state."""
        b, P = ids.shape
        cfg, cache = self.cfg, self.cache
        self._count_forward("prefill", b, b * P)
        pos = torch.arange(P, device=ids.device)
        mask = block_causal_mask(pos, pos, self.B) if P > self.B else None
        slots = cache.slots(torch.arange(b, device=ids.device)[:, None], pos[None]).view(-1)
        fwd = Forward(
            Kind.PREFILL,
            b,
            P,
            P,  # keys [0, P) of cache rows [0, b)
            cache,
            positions=pos,
            slots=slots,
            key_rows=slice(0, b),
            mask=mask,
        )
        x = cached_forward(self.model, ids, fwd)
        for i in range(cfg.num_hidden_layers):
            self._stats.executed_units_per_layer[i] += b * P
        # Every query's scores over all P keys: the block-causal mask discards some of them
        # after they are computed (flops.py).
        units = cfg.num_hidden_layers * b * P
        work = flops.work(cfg, rows=units, pairs=units * P, logit_rows=b)
        self._stats.executed_flops += work
        self._stats.baseline_flops += work
        cache.prefix_len = P
        return x[:, -1]

    @_forward()
    def commit(self, ids: torch.Tensor) -> torch.Tensor:
        """The clean current block: its exact K/V become part of the prefix. Returns the last
        position's hidden (its argmax is the next block's first token)."""
        b, w = ids.shape
        self._count_forward("commit", b, b * w)
        win = self._load(ids, 0, None, Kind.COMMIT)
        pays = self._pays(b * w)
        sig = None
        if self.static:
            every = b * w == win.N
            sig = ForwardKey(Kind.COMMIT, w, False, every, b * w if pays else None, None)

        def layers():
            for i in range(self.cfg.num_hidden_layers):
                self._dense_layer(i, win, b * w, None, deltas=False)

        self._run_layers(sig, None, b * w, layers)
        self._count_flops(b * w, b)
        self.cache.prefix_len += self.B
        return win.x_units[:b, -1].clone()

    @_forward()
    def denoise(
        self,
        ids: torch.Tensor,
        window_start: int,
        out_positions: torch.Tensor,
        units: torch.Tensor | None = None,
        observer: Observer | None = None,
    ) -> torch.Tensor:
        """One denoise forward over window [window_start, window_start + w) of the current block
        (ids [b, w]); `units` [b, w] marks the positions each row computes (None = all: the
        sub-block cache gives rows in sub-block mode only their sub-block). Returns the hidden
        states at window positions `out_positions` [b, p, hidden]. `observer`: shown each layer's
        input and the output; the resolved plan goes to `last_plan` (module docstring)."""
        b, w = ids.shape
        B, L = self.B, self.cfg.num_hidden_layers
        kind = "denoise_full" if w == B else "denoise_sub"
        if units is None:
            rows, n_scope = b, b * w
        else:
            rows, n_scope = (int(t) for t in (units.any(1).sum(), units.sum()))
        self._count_forward(kind, rows, n_scope)
        win = self._load(ids, window_start, units)
        ctx = ForwardContext(
            self.step, window_start, w, self.cache.rows, L, B, win.scope, win.x_units
        )
        self.step += 1
        policy = self.policy
        if policy is not None:
            policy.begin_forward(ctx)
        plans = [policy.plan(i, ctx) if policy else ALL_COMPUTE for i in range(L)]
        bits = (((1 << w) - 1) << window_start) if units is None else None

        self._watch = watch = observer
        if watch is None:
            sig = self._signature(win, plans, n_scope, bits)

            def layers():
                for i in range(L):
                    self._layer(i, win, plans[i], n_scope, bits)

        else:  # watched: the layer loop runs (no replay), each layer's plan is read back
            sig, did = None, torch.empty(L, *win.plan.shape, dtype=torch.int8, device=self.device)

            def layers():
                for i in range(L):
                    watch.on_hidden(i, win.x_units, ctx)
                    did[i] = self._resolved(win, self._layer(i, win, plans[i], n_scope, bits))

        self._run_layers(sig, bits, n_scope, layers)
        if watch is not None:
            watch.on_hidden(L, win.x_units, ctx)
            self.last_plan = did.cpu()
        if policy is not None:
            self._stats.executed_flops += policy.end_forward(ctx)
        self._count_flops(n_scope, b * out_positions.numel())
        return win.x_units[:b, out_positions]

    @_forward()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head on the rows whose logits are used; float32 out (compiled on
        CUDA: one norm kernel instead of seven)."""
        m = self.model
        return self._fn("logits", logits)(hidden, m.norm.weight, m.lm_head.weight, m.norm.eps)

    # ---- a forward's layers: recorded once, then replayed as one graph ----------------------

    def _signature(self, win: _Window, plans: list, n_scope: int, bits) -> ForwardKey | None:
        """What determines a denoise forward's layer loop (its layouts, graphs and host effects),
        or None when a layer's plan is decided on the host (module docstring, "Forward graphs")."""
        if not self.static:
            return None
        keys = []
        for plan in plans:
            if isinstance(plan, OnHost):
                return None
            keys.append(plan if isinstance(plan, Uniform) else plan.graph_key)
        window_bits = references = None
        if self._keeps_deltas:
            window_bits = bits
            references = tuple(r & bits == bits for r in self._ref_bits) if bits else None
        # Units in scope change the layouts only where compaction pays (module docstring).
        pays = self._pays(n_scope)
        return ForwardKey(
            win.forward.kind,
            win.w,
            sub_block_rows=bits is None,
            every_unit=n_scope == win.N,
            units=n_scope if pays else None,
            rows=self.live if pays else None,
            layers=tuple(keys),
            window_bits=window_bits,
            references=references,
        )

    def _run_layers(self, sig: ForwardKey | None, bits, n_scope: int, layers: Callable[[], None]):
        """Run `layers` (the forward's loop over layers) through the recorder: recorded the first
        time `sig` is seen, replayed afterwards (module docstring, "Forward graphs")."""
        self._n_scope = n_scope
        self.recorder.forward(sig, layers, lambda effect: self._effect(effect, bits))

    def _effect(self, effect: tuple, bits=None) -> None:
        """Apply one host effect of the layer loop (and record it when recording):
        ("layer", i, rows, planned, pairs0, pairs1): rows through layer i's matmuls (its executed
        units), of which useful: the units in scope (a dense layer; the forward's, not the
        recorded one's: layouts that do not depend on the scope's size are replayed for any
        size) or, `planned`, the units its plan computed (counted on the device by `settle`);
        its attention's (query, key) pairs pairs0 + pairs1 x keys;
        ("reused", i): layer i reused every unit in scope; ("ref", i): every unit of the window
        has a reference at layer i."""
        kind, i = effect[0], effect[1]
        st = self._stats
        if kind == "layer":
            _, _, rows, planned, pairs0, pairs1 = effect
            pairs = pairs0 + pairs1 * (self.cache.prefix_len + self.B)
            st.executed_units_per_layer[i] += rows
            if planned:
                self._settled_rows[i] += rows
            else:
                st.padding_units_per_layer[i] += rows - self._n_scope
            st.executed_flops += flops.work(self.cfg, rows, pairs)
        elif kind == "reused":
            st.reused_units_per_layer[i] += self._n_scope
        else:
            self._ref_bits[i] |= bits
        self.recorder.effect(effect)

    # ---- one layer ----------------------------------------------------------------------------

    def _layer(self, i: int, win: _Window, plan: Plan, n_scope: int, bits) -> int | None:
        """Run layer i of a denoise forward by its plan. Returns what it did with every unit in
        scope (COMPUTE, REUSE or PASS), or None for a per-unit plan, resolved in win.compute /
        win.reuse (what an observer reads back, `_resolved`)."""
        if isinstance(plan, OnHost):
            self.recorder.not_replayable()
            plan = plan.decide(win.x_units)
        elif isinstance(plan, OnDevice) and not (self.static and self._watch is None):
            plan = self._fn("plan", plan.fn)(win.x_units, *plan.args)  # read back: run it now
        if i in self._protected and not (isinstance(plan, Uniform) and plan.action == COMPUTE):
            raise PolicyError(f"{self.policy.name}: planned skipping on protected layer {i}")
        if isinstance(plan, Uniform):
            did = self._uniform_layer(i, win, plan.action, n_scope, bits)
            if did is not None:
                return did
            plan = torch.full_like(win.plan, plan.action)  # the general path checks each unit
        if isinstance(plan, torch.Tensor):
            self._check(plan, win)
            win.plan.copy_(plan)
            plan = None
        self._planned_layer(i, win, plan, n_scope, bits)
        return None

    def _uniform_layer(self, i: int, win: _Window, action: int, n_scope: int, bits) -> int | None:
        """A plan of one action for every unit, run with no device round trip where the host
        knows enough: returns the action done, or None when each unit must be checked."""
        if action == PASS and bits is not None:
            if not (win.w == self.B and self.block_cache):
                return PASS  # the layer does not run; x is its output
            action = COMPUTE  # the sub-block cache needs a full window's block K/V
        if action == COMPUTE:
            self._dense_layer(i, win, n_scope, bits, deltas=self._keeps_deltas)
            return COMPUTE
        referenced = bits is not None and self._ref_bits[i] & bits == bits  # every unit
        if action == REUSE and referenced and self._keeps_deltas:
            deltas = Deltas(self.delta[i], self.has_ref[i], win.all_units, self.B)
            key = StepKey(Layout.REUSE_ALL, win.w, i)
            self.recorder.step(key, lambda: reuse_add(win.x, win.units, deltas))
            self._effect(("reused", i))
            return REUSE
        self.recorder.not_replayable()
        return None

    def _resolved(self, win: _Window, did: int | None) -> torch.Tensor:
        """What a layer did with each unit ([cache rows, w] int8, NOT_RUN out of scope), from
        what `_layer` returned and the plan it resolved on the device (for an observer)."""
        if did is None:
            compute, reuse = win.compute.view_as(win.plan), win.reuse.view_as(win.plan)
            if not self._keeps_deltas:  # win.reuse is written only where updates are kept
                reuse = torch.zeros_like(reuse)
            codes = torch.where(compute, COMPUTE, torch.where(reuse, REUSE, PASS))
        else:
            codes = torch.full_like(win.plan, did)
        return torch.where(win.scope, codes, NOT_RUN).to(torch.int8)

    def _dense_layer(self, i: int, win: _Window, n_scope: int, bits, deltas: bool) -> None:
        """Every unit in scope computes."""
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
        elif self._pays(n_scope):
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
        self._count_layer(i, win, batch, rows=rows, planned=False)
        if bits is not None and deltas:
            self._effect(("ref", i), bits)

    def _planned_layer(self, i: int, win: _Window, device: OnDevice | None, n_scope, bits) -> None:
        """A per-unit plan: in win.plan (None), or `device`, computed inside the layer's graph."""
        d = None
        if self._keeps_deltas:
            d = Deltas(self.delta[i], self.has_ref[i], win.reuse, self.B)
        key = StepKey(Layout.MASKED, win.w, i, d is not None, plan=device and device.graph_key)
        if not self.static:  # exact shapes: read the plan
            self._settle(i, win, device)
            index = win.compute.nonzero().squeeze(1)
            n = index.numel()
            batch = UnitBatch(index, None, None, n)
            if n:
                self._step(i, win, batch, d)
                self._count_layer(i, win, batch, rows=n, planned=True)
            elif d is not None:
                reuse_add(win.x, win.units, d)
        elif not self._pays(n_scope):  # masked: everything runs, the plan decides what is kept
            self.recorder.step(key, lambda: self._masked_step(i, win, device, d))
            self._count_layer(i, win, win.masked, rows=win.N, planned=True)
        elif (bound := self._bound(i, device, win, bits)) is not None:
            self._bound_step(i, win, device, d, key, bound)
        else:  # the plan's size only the device knows: read it (one sync for this layer)
            self._read_back_step(i, win, device, d, key)
        if bits is not None and not self.policy.passes:
            self._effect(("ref", i), bits)

    def _settle(self, i: int, win: _Window, device: OnDevice | None, C: int | None = None):
        """The plan (on the device: computed here), resolved into win.compute / win.reuse and
        counted; compacted into C slots if given (layer_step.settle)."""
        plan = self._fn("plan", device.fn)(win.x_units, *device.args) if device else win.plan
        extra = {}
        if C is not None:
            # Flash attends with the computed queries only: n x keys pairs, known on the
            # device; the dense backend's pairs do not depend on n (counted on the host).
            pair_keys = win.geo.end if self.attention.name == "flash" else 0
            batch = win.compacted(C) if C else None
            extra = dict(capacity=C, rows=win.geo.rows, batch_out=batch, pair_keys=pair_keys)
        self._fn("settle", settle)(plan, *self._settle_args(i, win), **extra)

    def _settle_args(self, i: int, win: _Window) -> tuple:
        return (
            win.scope,
            self.has_ref[i] if self._keeps_deltas else None,
            win.units,
            self.B,
            self.block_cache and win.w == self.B,
            win.compute,
            win.reuse,
            self._counters,
            self._layer_ids[i],
        )

    def _masked_step(self, i: int, win: _Window, device: OnDevice | None, d) -> None:
        """Everything runs; the plan decides what is kept. A plan on the device runs inside the
        layer's first compiled half (its kernels fuse with the layer's)."""
        if device is None:
            self._settle(i, win, None)
            self._step(i, win, win.masked, d)
        else:
            planned = (device.fn, (win.x_units, *device.args), self._settle_args(i, win))
            self._step(i, win, win.masked, d, planned=planned)

    def _bound_step(self, i: int, win: _Window, device: OnDevice, d, key: StepKey, bound: int):
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
            self._count_layer(i, win, win.compacted(C), rows=C, planned=True, attention=host_pairs)

    def _read_back_step(self, i: int, win: _Window, device: OnDevice | None, d, key: StepKey):
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
            self._count_layer(i, win, batch, rows=C, planned=True)
        elif d is not None:
            reuse = Deltas(d.delta, d.has_ref, win.reuse, self.B)
            key = StepKey(Layout.REUSE, win.w, i)
            self.graphs.run(key, lambda: reuse_add(win.x, win.units, reuse))

    # ---- device work (what graphs capture) ----------------------------------------------------

    def _step(
        self, i: int, win: _Window, batch: UnitBatch, deltas: Deltas | None, planned=None
    ) -> None:
        layer_step(self._stack or self._layer_stack(), win.forward, i, batch, deltas, planned)

    def _compact(self, win: _Window, mask: torch.Tensor, C: int, scope: bool = False) -> None:
        self._fn("compact_into", compact_into)(mask, C, win.geo.rows, win.compacted(C, scope))

    def _fn(self, name: str, fn: Callable) -> Callable:
        """`fn`, compiled when the engine compiles (CUDA; compiled.py)."""
        return compiled(fn) if self.compiled else fn

    # ---- helpers ------------------------------------------------------------------------------

    def _load(
        self,
        ids: torch.Tensor,
        window_start: int,
        units: torch.Tensor | None,
        kind: Kind | None = None,
    ) -> _Window:
        """The forward's inputs into the window's static buffers (`kind`: a denoise forward's
        by default)."""
        b, w = ids.shape
        if w not in self._windows:
            self._windows[w] = _Window(self, w)
        win = self._windows[w]
        win.ids[:b].copy_(ids)
        if b < self.cache.rows or units is not None:
            win.scope.zero_()
            win.scope[:b] = True if units is None else units
        else:
            win.scope.fill_(True)
        P, B = self.cache.prefix_len, self.B
        win.units.start.fill_(P + window_start)
        win.units.block_offset.fill_(window_start)
        win.geo.end.fill_(P + B)
        win.geo.seqused.fill_(P + B)
        fwd = win.forward
        fwd.kind = kind or (Kind.DENOISE_FULL if w == B else Kind.DENOISE_SUB)
        fwd.end = P + B
        torch.index_select(self.embed, 0, win.ids.view(-1), out=win.x[: win.N])
        win.scope_batch = None
        return win

    def _layer_stack(self) -> LayerStack:
        """What a layer step takes from the engine (built on first use: the RoPE tables)."""
        cos, sin = self.model._rope_table(self.device)
        cfg = self.cfg
        self._stack = LayerStack(
            self.weights,
            (cos.to(self.dtype), sin.to(self.dtype)),
            self.attention,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            compiled if self.compiled else None,
        )
        return self._stack

    @property
    def _keeps_deltas(self) -> bool:
        return self.policy is not None and self.policy.reuses

    def _pays(self, units: int) -> bool:
        """Whether computing only `units` of a window (with graphs) is worth a compaction: in the
        compute-bound regime (hundreds of rows, a real layer), fewer rows are less time; below
        it a forward reads its weights or launches its kernels in the same time whatever the
        rows (compute-skipping.md section 6)."""
        if self.compaction != "auto":
            return self.compaction == "always"
        return units >= 256 and units * flops.unit(self.cfg) >= 40e9

    def _bound(self, i: int, device: OnDevice | None, win: _Window, bits) -> int | None:
        """Most units a plan on the device can compute, from its quota: every unit in scope for
        quota 0; otherwise only when every row in scope has a reference at every position of the
        window (else None)."""
        quota = device.quota if device is not None else None
        if quota == 0:
            return self.live * win.w
        if quota is None or bits is None or self._ref_bits[i] & bits != bits:
            return None
        return self.live * max(0, win.w - quota)

    def _check(self, plan: torch.Tensor, win: _Window) -> None:
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

    def _count_forward(self, kind: str, rows: int, units_per_layer: int) -> None:
        st = self._stats
        st.forwards[kind] += 1
        st.row_forwards[kind] += rows
        for i in range(self.cfg.num_hidden_layers):
            st.baseline_units_per_layer[i] += units_per_layer

    def _count_layer(
        self,
        i: int,
        win: _Window,
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
        self._effect(("layer", i, rows, planned, pairs0, pairs1))

    def _count_flops(self, n_scope: int, logit_rows: int) -> None:
        """Baseline: every unit in scope through every layer, each over every key (prefix and
        block); the logits of both (the layers' executed work is counted per layer, `_effect`)."""
        cfg, st = self.cfg, self._stats
        units = n_scope * cfg.num_hidden_layers
        keys = self.cache.prefix_len + self.B
        st.baseline_flops += flops.work(cfg, units, units * keys, logit_rows)
        st.executed_flops += flops.work(cfg, logit_rows=logit_rows)
