"""The one interface between the engine and compute-skipping policies.

For every denoise forward and layer, the engine shows the active policy the layer's input and asks
for a plan: one action per (batch row, window position) unit. The engine executes plans; policies
make them. Policies know nothing about kernels, the engine nothing about cosine similarity.

- COMPUTE: run the layer for the unit.
- REUSE: add back the residual update the unit had the last time it was computed and keep the
  K/V from that computation. A unit with no previous computation in this block is computed.
- PASS: identity; the layer does nothing for the unit and computes no K/V. A row is passed whole
  (all of its positions in the window) or not at all.

Prefill and commit forwards write the exact prefix cache and never consult a policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    # [batch, window] bool: the units this forward runs for each row (None = all). Rows waiting
    # for the rest of the batch, and positions outside a sub-block-cache row's sub-block, are
    # out of scope: their hidden states are not updated, so a policy should not learn from them.
    units: torch.Tensor | None = None


class Policy:
    """Base class: computes everything. Subclasses override `plan` (and the hooks they need)."""

    name = "none"
    # True when the policy may answer REUSE: the engine then keeps every unit's last update.
    reuses = False

    @property
    def enabled(self) -> bool:
        """False when the policy can never skip anything (e.g. a threshold of 1): the engine
        then runs exactly as with no policy."""
        return True

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

    def protected_layers(self, num_layers: int) -> set[int]:
        """Layers the engine must always compute, whatever the plan says."""
        return set()

    def config(self) -> dict:
        """The policy's options, for reports."""
        return {"policy": self.name}
