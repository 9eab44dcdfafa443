"""CUDA graphs for the engine's static-shape steps.

A step is a callable that reads and writes only long-lived buffers (the K/V cache, the window's
hidden-state buffer, policy state) and keeps no tensor it allocates. `GraphRunner.run(key, step)`
runs it eagerly the first time (warm-up: torch.compile compiles, cuBLAS sets up its workspace),
captures it the second time and replays the graph from then on. Steps are replayed one after
another on one stream and keep nothing they allocate, so all graphs share one memory pool.

A capture that fails is never fatal: that key runs eagerly from then on and the runner says so
once on stderr (`failures` lists them). Python's garbage collector is paused during a capture:
a collection that frees a CUDA graph or releases pool memory mid-capture invalidates it (the
"operation failed due to a previous error during capture" seen at ded3493).

Forward graphs (`ForwardRecorder`). The first time a forward with a given signature runs, its
layer loop is recorded as it runs: each step of device work (run now, eagerly) and each host
effect (statistics, reference bits: what the engine applies). From then on the loop does not
run: the recorded steps are replayed through the GraphRunner as one graph keyed by the signature
and the engine applies the host effects again. A loop that reads the device (`not_replayable`)
is not replayed; its remaining steps run one graph each, as do all steps of a forward with no
signature.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from enum import Enum, auto

import torch

from v2.forward import Kind
from v2.policy import DeviceKey, Uniform


class Layout(Enum):
    """How one step runs a layer's units (engine.py's module docstring, "Static shapes")."""

    DENSE = auto()  # every unit of every cache row computes
    SCOPE = auto()  # the forward's units in scope, compacted into a capacity
    SCOPE_MASKED = auto()  # every unit runs; those out of scope are discarded
    GATHER_SCOPE = auto()  # the compaction of the forward's scope (once per forward)
    MASKED = auto()  # every unit runs; the plan decides what is kept
    BOUND = auto()  # the plan's units, compacted into a capacity its quota bounds
    SETTLE = auto()  # the plan resolved on the device, to be read back
    COMPACTED = auto()  # the plan's units compacted after that read-back
    REUSE_ALL = auto()  # every unit in scope re-adds its last update
    REUSE = auto()  # the plan's reused units re-add theirs; nothing computes


@dataclass(frozen=True)
class StepKey:
    """The graph of one step: a layout at a window size, and what makes its device work differ
    (the layer, whether updates are kept, the capacity, the plan's device work)."""

    layout: Layout
    window: int
    layer: int | None = None
    deltas: bool = False
    capacity: int | None = None
    plan: DeviceKey | None = None

    @property
    def graph_set(self) -> StepKey:
        """The key without its layer: steps alike in every layer (what `sets` counts)."""
        return replace(self, layer=None)


@dataclass(frozen=True)
class ForwardKey:
    """What determines a forward's layer loop (its layouts, graphs and host effects): the
    signature its record is found by (engine.py, "Forward graphs")."""

    kind: Kind
    window: int
    sub_block_rows: bool  # some rows compute only part of the window (the sub-block cache)
    every_unit: bool  # every unit of every cache row is in scope
    units: int | None  # units in scope, where the layouts depend on it (compaction pays)
    rows: int | None  # rows with a sequence, likewise
    layers: tuple[Uniform | DeviceKey, ...] = ()  # each layer's plan, as far as the host knows
    # Where updates are kept: the window's positions in the block (a bit each), and per layer
    # whether every unit there has a REUSE reference.
    window_bits: int | None = None
    references: tuple[bool, ...] | None = None


class GraphRunner:
    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = enabled and device.type == "cuda"
        self.device = device
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph | None] = {}  # None: capture failed
        self.warm: set[Hashable] = set()
        self.failures: list[str] = []
        self.sets: set[Hashable] = set()  # graph sets: keys without their layer index
        self.pool = torch.cuda.graph_pool_handle() if self.enabled else None
        self.stream = torch.cuda.Stream(device) if self.enabled else None

    @property
    def captured(self) -> int:
        return sum(g is not None for g in self.graphs.values())

    def clear(self) -> None:
        """Drop every graph (their buffers are being reallocated). The pool goes with them: the
        allocator releases a pool whose graphs are gone, and capturing into it again fails."""
        if self.enabled:
            torch.cuda.synchronize(self.device)
            self.pool = torch.cuda.graph_pool_handle()
        self.graphs.clear()
        self.warm.clear()

    def run(self, key: StepKey | ForwardKey, step: Callable[[], None]) -> None:
        """Replay the graph of `key`, or warm up / capture `step` (module docstring)."""
        if not self.enabled:
            step()
            return
        graph = self.graphs.get(key, False)
        if graph:
            graph.replay()
            return
        if graph is None:  # failed before: eager from now on
            step()
            return
        main = torch.cuda.current_stream(self.device)
        if key not in self.warm:
            self.warm.add(key)
            self.stream.wait_stream(main)
            with torch.cuda.stream(self.stream):
                step()
            main.wait_stream(self.stream)
            return
        graph = self._capture(key, step)
        if graph is None:
            step()
        else:
            graph.replay()

    def _capture(self, key: tuple, step: Callable[[], None]) -> torch.cuda.CUDAGraph | None:
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.stream(self.stream):
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                try:
                    step()
                finally:
                    graph.capture_end()
        except Exception as e:  # noqa: BLE001 - any failure: this key runs eagerly
            torch.cuda.synchronize(self.device)
            self.graphs[key] = None
            message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self.failures.append(f"{key}: {message}")
            if len(self.failures) == 1:
                print(
                    f"[v2.engine] CUDA graph capture failed for {key} ({message}); "
                    "that step runs eagerly (further failures are counted, not printed)",
                    file=sys.stderr,
                )
            return None
        finally:
            if collecting:
                gc.enable()
        self.graphs[key] = graph
        self.sets.add(key.graph_set if isinstance(key, StepKey) else key)
        return graph


class _Record:
    """A forward's layer loop as it ran: its device steps and its host effects. `replayable` is
    False when the loop had to read the device."""

    def __init__(self):
        self.steps: list[Callable[[], None]] = []
        self.effects: list[tuple] = []
        self.replayable = True

    def run_steps(self) -> None:
        for step in self.steps:
            step()


class ForwardRecorder:
    """Records forwards' layer loops and replays them (module docstring, "Forward graphs").
    `enabled` False: every forward runs its loop, one graph per step."""

    # Most signatures recorded; later ones run layer by layer (bounds the graphs' memory when a
    # batch keeps changing shape).
    MAX_RECORDS = 32

    def __init__(self, graphs: GraphRunner, enabled: bool = True):
        self.graphs = graphs
        self.enabled = enabled
        self.records: dict[ForwardKey, _Record | None] = {}  # None: cannot be replayed
        self.recording: _Record | None = None
        self.replays: dict[Kind, int] = {}  # forwards replayed, by kind

    def clear(self) -> None:
        self.records.clear()

    def forward(
        self, sig: ForwardKey | None, layers: Callable[[], None], apply: Callable[[tuple], None]
    ) -> None:
        """Run the forward whose loop is `layers`: replay its record (its steps as one graph,
        its effects through `apply`), or run the loop, recording it the first time `sig` is seen
        (None: never recorded)."""
        record = self.records.get(sig, False) if sig is not None else None
        if record:
            self.replays[sig.kind] = self.replays.get(sig.kind, 0) + 1
            self.graphs.run(sig, record.run_steps)
            for effect in record.effects:
                apply(effect)
            return
        if record is None or not self.enabled or len(self.records) >= self.MAX_RECORDS:
            layers()
            return
        self.recording = record = _Record()
        try:
            layers()
        finally:
            self.recording = None
        self.records[sig] = record if record.replayable else None

    def step(self, key: StepKey, step: Callable[[], None]) -> None:
        """One step of device work: into the record being made (run now, eagerly), or through
        its own graph."""
        if self.recording is None:
            self.graphs.run(key, step)
        else:
            self.recording.steps.append(step)
            step()

    def effect(self, effect: tuple) -> None:
        """A host effect the engine just applied: kept in the record being made, if any."""
        if self.recording is not None:
            self.recording.effects.append(effect)

    def not_replayable(self) -> None:
        """The loop reads the device here: the forward being recorded cannot be replayed; its
        remaining steps run one graph each."""
        if self.recording is not None:
            self.recording.replayable = False
            self.recording = None
