"""The one interface between the engine and compute-skipping policies.

For every denoise forward and layer, the engine asks the active policy for the layer's plan: what
the layer does with each (batch row, window position) unit. The engine executes plans; policies
make them. Policies know nothing about kernels or CUDA graphs, the engine nothing about cosine
similarity.

Actions, one per unit (int8 codes on the device):
- COMPUTE: run the layer for the unit.
- REUSE: add back the residual update the unit had the last time it was computed and keep the
  K/V from that computation. A unit with no previous computation in this block is computed.
- PASS: identity; the layer does nothing for the unit and computes no K/V. A row is passed whole
  (all of its positions in the window) or not at all, unless the policy sets `passes_units`
  (it then passes only units whose K/V at that layer were computed earlier in the block).

A plan is one of three values, and its type is all the engine needs to know to run it fast:
- `Uniform(action)`: one action for every unit in scope, known on the host (`ALL_COMPUTE`,
  `ALL_REUSE`, `ALL_PASS`). No device work; a forward whose layers are all uniform or on the
  device is recorded once and replayed as one CUDA graph.
- `OnDevice(fn, args, key, quota)`: per-unit actions `fn(x, *args)` from the layer's input x
  [rows, window, hidden], as pure device work: no synchronisation, no branch on device values, an
  int8 tensor out, reading and writing only `args` state that stays at the same address between
  `begin_block` calls with the same batch size (zero it in place). The engine runs it inside the
  layer's compiled step and CUDA graph, so the plan costs a few fused kernels. `key` (hashable),
  with `fn` and the layer, determines that work; `quota`: the plan REUSEs at least that many units
  of every row in scope among those with a reference (0: it may compute everything), which lets
  the engine size the computation without reading the plan back.
- `OnHost(decide)`: the policy looks at the layer's input on the host: `decide(x)` returns a
  `Uniform` or an int8 tensor of actions [rows, window]; it may synchronise. Such a forward runs
  its layer loop every time (no forward graph).

Prefill and commit forwards write the exact prefix cache and never consult a policy.

What a policy implements (each method one job; all have defaults):
- `layers(num_layers)`: the layers it may skip on a model of that depth. The others always
  compute (the engine checks it); none: the engine runs as with no policy.
- `attach(model, ids)`: see the network and its special token ids before decoding.
- `begin_block(batch_size, block_size, num_layers)`: a new block starts; forget per-position state.
- `begin_forward(ctx)`: a denoise forward starts.
- `plan(layer, ctx)`: the layer's plan (above).
- `end_forward(ctx)`: the forward is done; returns the FLOPs of the policy's own work in it (a
  logit-lens head, say), which count as executed work.
Two flags say what plans it may make: `reuses` (REUSE: the engine keeps every unit's last update)
and `passes` (PASS; `passes_units` for single units rather than whole rows).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass
from functools import cached_property

import torch

from v2.options import OptionError, Options

COMPUTE, REUSE, PASS = 0, 1, 2


@dataclass(frozen=True)
class Uniform:
    """One action (COMPUTE, REUSE or PASS) for every unit in scope, known on the host."""

    action: int


ALL_COMPUTE, ALL_REUSE, ALL_PASS = Uniform(COMPUTE), Uniform(REUSE), Uniform(PASS)


@dataclass(frozen=True)
class DeviceKey:
    """What determines an `OnDevice` plan's device work (with the layer): a graph key part."""

    fn: Callable
    key: Hashable
    quota: int | None


@dataclass(frozen=True, eq=False)
class OnDevice:
    """Per-unit actions `fn(x, *args)` computed on the device (module docstring)."""

    fn: Callable[..., torch.Tensor]
    args: tuple = ()
    key: Hashable = ()
    quota: int | None = None

    @cached_property
    def graph_key(self) -> DeviceKey:
        return DeviceKey(self.fn, self.key, self.quota)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.args)


@dataclass(frozen=True, eq=False)
class OnHost:
    """Per-unit actions decided on the host from the layer's input: `decide(x)` returns a
    `Uniform` or an int8 tensor [rows, window] (module docstring)."""

    decide: Callable[[torch.Tensor], Uniform | torch.Tensor]


Plan = Uniform | OnDevice | OnHost


@dataclass(frozen=True)
class ForwardContext:
    """What a policy may know about the denoise forward it is planning."""

    step: int  # denoise forwards already run in this block (0 = the block's first)
    window_start: int  # block offset of the window's first position
    window_size: int  # B for a full-block window, S for a sub-block window
    batch_size: int
    num_layers: int
    block_size: int
    # [batch, window] bool: the units this forward runs for each row. Rows waiting for the rest
    # of the batch, rows of the cache that hold no sequence, and positions outside a
    # sub-block-cache row's sub-block are out of scope: their hidden states are not updated, so a
    # policy should not learn from them. The engine passes the same buffer every forward of a
    # window size (an OnDevice plan may read it). None = all (policy unit tests).
    units: torch.Tensor | None = None
    # [batch, window, hidden]: the buffer each layer's input is in when its plan runs (the same
    # every forward of a window size). For the shape, dtype and device of a policy's state; a
    # plan reads the input as its function's argument.
    hidden: torch.Tensor | None = None


class Policy:
    """Base class: computes everything. Subclasses override `plan` (and the methods they need;
    module docstring).

    A registered policy declares its options as a dataclass (`Options`, v2/options.py) and is
    built from an instance of it, or from its fields as arguments: `TokenSkipPolicy(
    cosine_threshold=0.9)` is `TokenSkipPolicy(TokenSkipOptions(cosine_threshold=0.9))`."""

    name = "none"
    Options: type[Options] | None = None  # the dataclass of the policy's options
    # True when the policy may answer REUSE: the engine then keeps every unit's last update.
    reuses = False
    # False when the policy never answers PASS (the engine then knows every unit in scope has a
    # reference after a forward, without reading the plan).
    passes = True
    # True when the policy may PASS single units (not whole rows). It promises that every unit it
    # passes at a layer was computed at that layer earlier in this block: the unit's K/V there
    # are then the ones from that computation (other positions still attend to it).
    passes_units = False

    def __init__(self, *args, **kwargs):
        options = args[0] if len(args) == 1 and not kwargs else None
        if self.Options is None:
            if args or kwargs:
                raise TypeError(f"policy {self.name!r} takes no options")
            self.options = None
        elif isinstance(options, self.Options):
            self.options = options
        else:
            try:
                self.options = self.Options(*args, **kwargs)
            except OptionError as e:
                raise OptionError(f"policy {self.name!r}: {e}") from None

    @property
    def enabled(self) -> bool:
        """False when the options can never skip anything (e.g. a threshold of 1), whatever the
        model: for the note that a run is the baseline (policies.baseline_note)."""
        return True

    def layers(self, num_layers: int) -> range | set[int]:
        """The layers this policy may skip on a model of `num_layers` layers; the others always
        compute (the engine checks it). Empty: it can skip nothing there, and the engine runs
        exactly as with no policy (no per-layer planning cost)."""
        return range(num_layers) if self.enabled else range(0)

    def attach(self, model, ids) -> None:
        """generate() shows the policy the network and its special token ids (TokenIds) before
        decoding, for policies that need weights (a logit-lens head) or the mask id."""

    def begin_block(self, batch_size: int, block_size: int, num_layers: int) -> None:
        """A new block starts: forget per-position state."""

    def begin_forward(self, ctx: ForwardContext) -> None:
        """A denoise forward starts."""

    def plan(self, layer: int, ctx: ForwardContext) -> Plan:
        """What layer `layer` does with each unit of this forward (module docstring)."""
        return ALL_COMPUTE

    def end_forward(self, ctx: ForwardContext) -> int:
        """The forward is done: the FLOPs of the work the policy itself ran in it (e.g. a
        logit-lens head), added to the executed FLOPs."""
        return 0

    def config(self) -> dict:
        """The policy's name and every option with its value (defaults included), for reports."""
        options = getattr(self, "options", None)
        return {"policy": self.name, **(asdict(options) if options else {})}
