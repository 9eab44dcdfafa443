"""The one interface between the engine and compute-skipping policies.

For every denoise forward and layer, the engine shows the active policy the layer's input and asks
for a plan: one action per (batch row, window position) unit. The engine executes plans; policies
make them. Policies know nothing about kernels, the engine nothing about cosine similarity.

- COMPUTE: run the layer for the unit.
- REUSE: add back the residual update the unit had the last time it was computed and keep the
  K/V from that computation. A unit with no previous computation in this block is computed.
- PASS: identity; the layer does nothing for the unit and computes no K/V. A row is passed whole
  (all of its positions in the window) or not at all, unless the policy sets `passes_units`
  (it then passes only units whose K/V at that layer were computed earlier in the block).

Prefill and commit forwards write the exact prefix cache and never consult a policy.

Plans and CUDA graphs. By default the engine calls `plan` eagerly for every layer of every denoise
forward, and a policy may synchronise with the host there (e.g. to skip a whole layer). A policy
whose plan for a layer is pure device work can say so with `capture_key`: the engine then runs
`plan` inside that layer's CUDA graph (once at warm-up, once at capture; replays afterwards), so
the plan costs a few fused kernels and no launches. Such a plan must not synchronise, must not
branch on device values, must return a tensor (never None or an int), and must read and write only
state that stays at the same address between `begin_block` calls with the same batch size (zero it
in place). `reuse_quota` lets the engine size the compacted computation of such a plan without
reading it back: the plan promises to REUSE at least that many units of every row in scope, among
those that have a reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from v2.options import OptionError, Options

COMPUTE, REUSE, PASS = 0, 1, 2


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
    # window size (a captured plan reads it). None = all (policy unit tests).
    units: torch.Tensor | None = None


class Policy:
    """Base class: computes everything. Subclasses override `plan` (and the hooks they need).

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
        """False when the policy can never skip anything (e.g. a threshold of 1): the engine
        then runs exactly as with no policy."""
        return True

    def acts_on(self, num_layers: int) -> bool:
        """False when, on a model of `num_layers` layers, the policy can skip nothing (its layer
        options lie past the last layer, say): the engine then runs as with no policy."""
        return self.enabled

    def attach(self, model, ids) -> None:
        """generate() shows the policy the network and its special token ids (TokenIds) before
        decoding, for policies that need weights (a logit-lens head) or the mask id."""

    def extra_flops(self) -> int:
        """FLOPs of work the policy itself ran since last asked (e.g. a logit-lens head), added
        to the executed FLOPs by the engine; asking resets the count."""
        return 0

    def begin_block(self, batch_size: int, block_size: int, num_layers: int) -> None:
        """A new block starts: forget per-position state."""

    def begin_forward(self, ctx: ForwardContext) -> None:
        """A denoise forward starts."""

    def plan(self, layer: int, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        """Actions [batch, window] (int8 of COMPUTE / REUSE / PASS) for layer `layer` given its
        input x [batch, window, hidden]; None means compute every unit, and a plain int the same
        action for every unit in scope (the engine then needs no device round trip). x is the
        engine's buffer, overwritten by the layer: copy what must outlive the call."""
        return None

    def device_plan(self, layer: int, x: torch.Tensor, ctx: ForwardContext):
        """For a captured plan, optionally: `(fn, args)` with `fn(*args)` doing exactly what
        `plan` does, `fn` a plain function of tensors and numbers (the same object every call).
        The engine may then run it inside its own compiled layer step, where its reductions share
        kernels with the layer's (the cosine with the RMSNorm). None: the engine calls `plan`."""
        return None

    def host_plan(self, layer: int, ctx: ForwardContext) -> int | None:
        """The plan for this layer when the host knows it without the layer's input and without
        device work: one action (COMPUTE, REUSE or PASS) for every unit in scope. The engine then
        does not call `plan` for the layer. None: call `plan`. A forward whose every layer has a
        host plan or a capture key runs as one CUDA graph (engine.py, "Forward graphs")."""
        return None

    def capture_key(self, layer: int, ctx: ForwardContext):
        """None: call `plan` eagerly for this layer. Otherwise a hashable that, with the layer,
        determines the device work `plan` does for it (module docstring)."""
        return None

    def reuse_quota(self, layer: int, ctx: ForwardContext) -> int | None:
        """Units per row in scope that a captured plan for this layer REUSEs at least, among those
        with a reference (None: no promise)."""
        return None

    def protected_layers(self, num_layers: int) -> set[int]:
        """Layers the engine must always compute, whatever the plan says."""
        return set()

    def config(self) -> dict:
        """The policy's name and every option with its value (defaults included), for reports."""
        options = getattr(self, "options", None)
        return {"policy": self.name, **(asdict(options) if options else {})}
