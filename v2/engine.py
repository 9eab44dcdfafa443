"""The engine's forwards: prefill, denoise and commit over a preallocated K/V cache (kv_cache.py),
with compute-skipping plans executed so that skipped units never enter a matmul.

Who does what (docs/reference/engine-map.md): `Engine` (here) owns the cache, the windows' static
buffers and the policy, and runs the forwards; layer_plans.LayerRunner runs one layer of a window
forward by its plan in the layouts below; layer_step.py is one layer over a list of units (the
hot path); ledger.Ledger keeps the statistics; cuda_graphs.py captures, records and replays.

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
steps above) and every host effect (typed values: ledger.LayerWork and Reused, statistics;
layer_plans.Referenced, reference bits). From then on the loop does not run: the recorded steps
are replayed as one CUDA graph and the host effects applied again, so a forward costs one graph
launch and no per-layer Python. A forward whose loop must read the device (a plan sized only by
a read-back, an OnHost plan) is not recorded; its layers run one graph each, as before. The
recording and replay are cuda_graphs.ForwardRecorder's; the engine gives it each forward's
signature and loop, its device steps and its host effects.

Causal engines (`causal=True`). The same network with a block of one token is a causal language
model (fast-dllm-v2.md section 4): the verifier of the self-speculative decode and the
autoregressive reference (speculative.py) run it as one, on an engine of their own (its cache
holds causal K/V). Its prefill is the block-causal prefill with B = 1; its window forward is
`verify`: a window of w positions per cache row at each row's own start, the units in scope a
prefix of each row's window, attention causal (attention.py). A verify forward has the window
machinery of a commit forward (static buffers, layer steps, forward graphs: one record per window
size), never compacted. A block-diffusion engine makes its causal engine on first use
(`verifier`), with its own settings.

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
(layer_step.settle), the executed slots on the host; the ledger holds the host's share until
`stats` reads the device's (one synchronisation).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from functools import wraps

import torch
import torch.nn.functional as F

from v2.attention import causal_copy, choose
from v2.compiled import compiled
from v2.cuda_graphs import ForwardKey, ForwardRecorder, GraphRunner
from v2.forward import Forward, Kind, cached_forward
from v2.kv_cache import KVCache
from v2.layer_plans import Execution, LayerRunner, PolicyError, Window
from v2.layer_step import LayerStack, rms_norm
from v2.ledger import Ledger
from v2.model import Network, block_causal_mask
from v2.observer import Observer
from v2.policy import ALL_COMPUTE, ForwardContext, OnHost, Policy, Uniform
from v2.stats import Stats

COMPACTION = ("auto", "always", "never")
__all__ = ["COMPACTION", "Engine", "PolicyError", "settings"]


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
        causal: bool = False,
    ):
        """cuda_graphs / compile: default on for a model on a GPU. static_shapes: the layouts
        CUDA graphs need (default: with graphs); on the CPU, for tests of those layouts.
        attention: a backend from attention.py (default: attention.choose). forward_graphs:
        record and replay whole forwards (module docstring); off, every forward runs its layer
        loop, one graph per layer step (what forward graphs are measured against). causal: a
        causal engine (module docstring, "Causal engines"), with no policy."""
        if compaction not in COMPACTION:
            raise ValueError(f"compaction must be one of {', '.join(COMPACTION)}")
        if causal and (policy is not None or block_cache):
            raise ValueError("a causal engine runs the full model: no policy, no block cache")
        if attention is not None and getattr(attention, "causal", False) != causal:
            raise ValueError(f"attention backend {attention.name!r}: causal must be {causal}")
        self.model = model
        self.cfg = cfg = model.cfg
        self.causal = causal
        self.B = 1 if causal else block_size or cfg.block_size
        self.block_cache = block_cache
        # A policy that can skip nothing on this model (e.g. cosine_threshold >= 1) is no
        # policy: same output, no per-layer planning cost.
        self.given_policy = policy
        L = cfg.num_hidden_layers
        skips = set(policy.layers(L)) if policy is not None else set()
        self.policy = policy if skips else None
        w = model.embed_tokens.weight
        self.device, self.dtype = w.device, w.dtype
        self.attention = attention or choose(self.device, self.dtype, model.eager_attention, causal)
        cuda, on = self.device.type == "cuda", self.attention.capturable
        graphs = (cuda if cuda_graphs is None else cuda_graphs) and on
        self.graphs = GraphRunner(self.device, graphs)
        self.static = self.graphs.enabled if static_shapes is None else static_shapes
        self.compiled = (cuda if compile is None else compile) and on
        # the settings `for_model` finds this engine by (cuda_graphs as given)
        how = (self.attention.name, model.eager_attention)
        self.key = (settings(policy), self.B, block_cache, cuda_graphs, how, causal)
        # how `verifier` makes its causal engine: these settings, the backend made causal
        self._settings = dict(
            cuda_graphs=cuda_graphs,
            compile=compile,
            compaction=compaction,
            static_shapes=static_shapes,
            attention=None if attention is None else causal_copy(attention),
            forward_graphs=forward_graphs,
        )
        self._verifier: Engine | None = None
        self.recorder = ForwardRecorder(self.graphs, forward_graphs)
        self.ledger = Ledger(cfg, self.device)
        run = Execution(self.B, block_cache, self.static, compaction, self.compiled, self.attention)
        protected = set(range(L)) - skips  # layers the policy may not skip
        self.runner = LayerRunner(
            run, cfg, self.policy, protected, self.recorder, self.ledger, self._layer_stack
        )
        self._stack: LayerStack | None = None  # what layer steps take (`_layer_stack`)
        self.embed = w.detach()
        self.cache: KVCache | None = None
        self._windows: dict[int, Window] = {}
        self.step = 0
        self._cleared_setups = 0  # setups made before the last clear of records and graphs
        self.timer: Callable | None = None  # kind -> context manager around each forward
        # The plan of the last denoise forward watched by an observer: [layers, cache rows,
        # window] int8 of COMPUTE / REUSE / PASS as each layer resolved it, NOT_RUN out of scope
        # (module docstring, "Observers").
        self.last_plan: torch.Tensor | None = None

    # ---- engines that outlive one generate call ----------------------------------------------

    @classmethod
    def for_model(
        cls,
        model: Network,
        policy: Policy | None,
        block_size: int,
        block_cache: bool,
        cuda_graphs: bool | None,
        causal: bool = False,
    ) -> Engine:
        """The model's engine for these settings, kept on the model so that the next generate
        call with the same settings reuses its buffers, CUDA graphs and policy object (a causal
        one apart: the autoregressive decode's, block_size 1)."""
        w = model.embed_tokens.weight
        how = (choose(w.device, w.dtype, model.eager_attention).name, model.eager_attention)
        B = 1 if causal else block_size
        key = (settings(policy), B, block_cache, cuda_graphs, how, causal)
        slot = "_v2_causal_engine" if causal else "_v2_engine"
        e = getattr(model, slot, None)
        if e is None or e.key != key:
            e = cls(model, policy, B, block_cache, cuda_graphs, causal=causal)
            setattr(model, slot, e)
        return e

    @property
    def verifier(self) -> Engine:
        """The causal engine of the self-speculative decodes drafted on this engine
        (speculative.py): made on first use with this engine's settings and kept with it (its
        buffers and graphs serve later decodes); its setups count as this engine's."""
        if self.causal:
            return self
        if self._verifier is None:
            self._verifier = Engine(self.model, causal=True, **self._settings)
        return self._verifier

    # ---- statistics ---------------------------------------------------------------------------

    def reset_stats(self) -> None:
        self.ledger.reset()

    @property
    def stats(self) -> Stats:
        """The statistics so far (reads the device's counters: a synchronisation)."""
        st, overflow = self.ledger.read()
        if overflow:
            name = self.policy.name if self.policy else "none"
            raise PolicyError(f"{name}: a plan on the device computed more than its quota allows")
        st.graph_sets = len(self.graphs.sets)
        st.graph_failures = len(self.graphs.failures)
        return st

    @property
    def replays(self) -> dict[str, int]:
        """Forwards replayed from their record (module docstring, "Forward graphs")."""
        by_kind = self.recorder.replays
        denoise = by_kind.get(Kind.DENOISE_FULL, 0) + by_kind.get(Kind.DENOISE_SUB, 0)
        return {
            "denoise": denoise,
            "commit": by_kind.get(Kind.COMMIT, 0),
            "verify": by_kind.get(Kind.VERIFY, 0),
        }

    @property
    def setups(self) -> int:
        """Forward records, graph warm-ups and captures made so far: a call that leaves this
        unchanged only replayed (what a benchmark times). A forward signature first seen takes
        three calls to get there: record, warm-up and capture of its forward graph."""
        own = (
            self._cleared_setups
            + len(self.recorder.records)
            + len(self.graphs.warm)
            + len(self.graphs.graphs)
        )
        return own + (self._verifier.setups if self._verifier is not None else 0)

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
            self.runner.clear()
            self.cache = None
            self.cache = KVCache(self.cfg, rows, length, self.dtype, self.device)
        self.cache.prefix_len = 0
        self.runner.live = batch

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
        self.runner.live = len(kept)

    @torch.inference_mode()
    def begin_block(self) -> None:
        """Reset per-position state; the policy's too."""
        self.step = 0
        self.runner.begin_block(self.cache.rows, self.dtype, self.device)
        if self.policy is not None:
            self.policy.begin_block(self.cache.rows, self.B, self.cfg.num_hidden_layers)

    # ---- the forwards ---------------------------------------------------------------------------

    @_forward()
    def prefill(self, ids: torch.Tensor, last: bool = True) -> torch.Tensor:
        """Complete prompt blocks [0, P): exact, block-causal, eager (once per generation).
        Returns the last position's hidden state (`last`: the caller computes its logits,
        counted here; else none are)."""
        b, P = ids.shape
        cache = self.cache
        self.ledger.forward("prefill", b, b * P)
        pos = torch.arange(P, device=ids.device)
        mask = block_causal_mask(pos, pos, self.B) if P > self.B else None
        slots = cache.slots(torch.arange(b, device=ids.device)[:, None], pos[None]).view(-1)
        keys = dict(end=P, mask=mask)  # keys [0, P) of rows [0, b)
        fwd = Forward(Kind.PREFILL, b, P, cache=cache, positions=pos, slots=slots, **keys)
        x = cached_forward(self.model, ids, fwd)
        # Every query's scores over all P keys: the block-causal mask discards some of them
        # after they are computed (flops.py).
        self.ledger.exact(b * P, keys=P, logit_rows=b if last else 0)
        cache.prefix_len = P
        return x[:, -1]

    @_forward()
    def commit(self, ids: torch.Tensor) -> torch.Tensor:
        """The clean current block: its exact K/V become part of the prefix. Returns the last
        position's hidden (its argmax is the next block's first token)."""
        b, w = ids.shape
        n = b * w
        win = self._load(ids, 0, None, Kind.COMMIT)
        self.ledger.forward("commit", b, n)
        pays = self.runner.pays(n)
        sig = None
        if self.static:
            sig = ForwardKey(Kind.COMMIT, w, False, n == win.N, n if pays else None, None)

        def layers():
            for i in range(self.cfg.num_hidden_layers):
                self.runner.dense_layer(i, win, n, deltas=False)

        self.runner.begin_forward(None, self.cache.prefix_len + self.B)
        self._run_layers(sig, layers)
        self.ledger.window(self.cache.prefix_len + self.B, logit_rows=b)
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
        L = self.cfg.num_hidden_layers
        if units is None:
            rows, n_scope = b, b * w
        else:
            rows, n_scope = (int(t) for t in (units.any(1).sum(), units.sum()))
        win = self._load(ids, window_start, units)
        self.ledger.forward("denoise_full" if w == self.B else "denoise_sub", rows, n_scope)
        R = self.cache.rows  # a policy plans over every cache row
        ctx = ForwardContext(self.step, window_start, w, R, L, self.B, win.scope, win.x_units)
        self.step += 1
        policy = self.policy
        if policy is not None:
            policy.begin_forward(ctx)
        plans = [policy.plan(i, ctx) if policy else ALL_COMPUTE for i in range(L)]
        bits = (((1 << w) - 1) << window_start) if units is None else None
        run = self.runner
        run.begin_forward(bits, self.cache.prefix_len + self.B)
        run.watching = observer is not None
        if observer is None:
            sig = self._signature(win, plans, n_scope)

            def layers():
                for i in range(L):
                    run.layer(i, win, plans[i], n_scope)

        else:  # watched: the layer loop runs (no replay), each layer's plan is read back
            sig, did = None, torch.empty(L, *win.plan.shape, dtype=torch.int8, device=self.device)

            def layers():
                for i in range(L):
                    observer.on_hidden(i, win.x_units, ctx)
                    did[i] = run.resolved(win, run.layer(i, win, plans[i], n_scope))

        self._run_layers(sig, layers)
        if observer is not None:
            observer.on_hidden(L, win.x_units, ctx)
            self.last_plan = did.cpu()
        if policy is not None:
            self.ledger.stats.executed_flops += policy.end_forward(ctx)
        self.ledger.window(self.cache.prefix_len + self.B, b * out_positions.numel())
        return win.x_units[:b, out_positions]

    @_forward()
    def verify(
        self, ids: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor, widths: torch.Tensor
    ) -> torch.Tensor:
        """A causal engine's window forward (module docstring, "Causal engines"): windows ids
        [b, w] of cache rows `rows` [b], row j's at absolute positions starts[j] + [0, w), whose
        cache holds the exact K/V of [0, starts[j]); its first widths[j] slots are tokens (in
        scope), the rest padding. Writes the tokens' K/V (the padding's go to the trash slot);
        returns the window's hidden states [b, w, hidden] (garbage at padding slots)."""
        if not self.causal:
            raise RuntimeError("verify is a causal engine's forward (Engine(causal=True))")
        b, w = ids.shape
        n, keys = int(widths.sum()), int((starts + widths).max())
        self.ledger.forward(Kind.VERIFY, b, n)
        win = self._window(w)
        max_pos = self.cfg.max_position_embeddings
        win.load_verify(ids, self.embed, rows, starts, widths, keys, max_pos)
        # Never compacted: the units in scope change with every round's accepted lengths, and
        # each count would be a forward graph of its own; rows not verifying run as padding.
        sig = ForwardKey(Kind.VERIFY, w, False, n == win.N, None, None) if self.static else None

        def layers():
            for i in range(self.cfg.num_hidden_layers):
                self.runner.dense_layer(i, win, n, deltas=False, compact=False)

        self.runner.begin_forward(None, keys)
        self._run_layers(sig, layers)
        self.ledger.window(keys, logit_rows=b * w)
        return win.x_units[rows]

    @_forward()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head on the rows whose logits are used; float32 out (compiled on
        CUDA: one norm kernel instead of seven)."""
        m = self.model
        head = compiled(logits) if self.compiled else logits
        return head(hidden, m.norm.weight, m.lm_head.weight, m.norm.eps)

    # ---- a forward's layers: recorded once, then replayed as one graph ----------------------

    def _signature(self, win: Window, plans: list, n_scope: int) -> ForwardKey | None:
        """What determines a denoise forward's layer loop (its layouts, graphs and host effects),
        or None when a layer's plan is decided on the host (module docstring, "Forward graphs")."""
        if not self.static:
            return None
        keys = []
        for plan in plans:
            if isinstance(plan, OnHost):
                return None
            keys.append(plan if isinstance(plan, Uniform) else plan.graph_key)
        run = self.runner
        bits, window_bits, references = run.bits, None, None
        if run.keeps_deltas:
            window_bits = bits
            references = tuple(map(run.referenced, range(len(plans)))) if bits else None
        # Units in scope change the layouts only where compaction pays (module docstring).
        pays = run.pays(n_scope)
        return ForwardKey(
            win.forward.kind,
            win.w,
            sub_block_rows=bits is None,
            every_unit=n_scope == win.N,
            units=n_scope if pays else None,
            rows=run.live if pays else None,
            layers=tuple(keys),
            window_bits=window_bits,
            references=references,
        )

    def _run_layers(self, sig: ForwardKey | None, layers: Callable[[], None]) -> None:
        """Run `layers` (the forward's loop over layers) through the recorder: recorded the first
        time `sig` is seen, replayed afterwards (module docstring, "Forward graphs")."""
        self.recorder.forward(sig, layers, self.runner.effect)

    def _load(self, ids, window_start: int, units, kind: Kind | None = None) -> Window:
        """The forward's inputs into the static buffers of its window size (`kind`: a denoise
        forward's by default)."""
        if self.causal:
            raise RuntimeError("a causal engine's window forwards are verify forwards")
        w = ids.shape[1]
        win = self._window(w)
        kind = kind or (Kind.DENOISE_FULL if w == self.B else Kind.DENOISE_SUB)
        win.load(ids, self.embed, window_start, units, kind)
        return win

    def _window(self, w: int) -> Window:
        """The static buffers of windows of w positions (made on first use)."""
        if w not in self._windows:
            self._windows[w] = Window(self.cache, w, self.B, self.cfg.hidden_size, self.dtype)
        return self._windows[w]

    def _layer_stack(self) -> LayerStack:
        """What a layer step takes from the engine (built on first use: the RoPE tables)."""
        if self._stack is None:
            compile_fn = compiled if self.compiled else None
            self._stack = LayerStack.of(self.model, self.attention, compile_fn)
        return self._stack
