"""Token-level skipping across denoise steps (compute-skipping.md section 1).

A (row, position) whose input to layer l barely changed since the previous denoise forward of the
same block is not recomputed: the engine REUSEs it (adds back the residual update it had when last
computed and keeps that computation's K/V). Reused rows never enter the layer's projections,
attention queries or MLP; that is the engine's job, this module only decides.

    python -m v2.generate --model v2/tiny/checkpoint --chat --prompt "..." \\
        --policy token --cosine-threshold 0.99
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from v2.options import OptionError, Options, Range, at_least, option
from v2.policy import ALL_COMPUTE, COMPUTE, REUSE, ForwardContext, OnDevice, Plan, Policy


def cosine_and_remember(x, previous, seen, scope):
    """cos(x, the input last seen) per unit (-2 where there is none yet); then remember x for the
    units in scope (the others keep theirs). An unchanged input has cosine exactly 1 (not 1 give
    or take the rounding of whichever kernel computed it), so ties are ties everywhere."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    cos = F.cosine_similarity(x.to(dtype), previous.to(dtype), dim=-1).clamp(max=1.0)
    cos = torch.where((x == previous).all(-1), 1.0, cos)
    cos = torch.where(seen, cos, -2.0)
    previous.copy_(torch.where(scope[..., None], x, previous))
    seen |= scope
    return cos


def threshold_plan(x, previous, seen, scope, threshold: float):
    cos = cosine_and_remember(x, previous, seen, scope)
    return torch.where(cos > threshold, REUSE, COMPUTE).to(torch.int8)


def ratio_plan(x, previous, seen, scope, k: int):
    """Reuse each row's k most similar positions. Ties (unchanged inputs all have cosine 1) go to
    the lower position, so the choice is the same whatever computes it: a position's rank is the
    number of positions of its row ahead of it (a [w, w] comparison per row, one fused kernel)."""
    cos = cosine_and_remember(x, previous, seen, scope)
    w = cos.shape[1]
    j = torch.arange(w, device=cos.device)
    # ahead[r, i, j]: position j of row r comes before position i
    ahead = (cos[:, None, :] > cos[:, :, None]) | (
        (cos[:, None, :] == cos[:, :, None]) & (j[None, :] < j[:, None])
    )
    rank = ahead.sum(-1)  # [rows, w]
    reuse = (rank < k) & (cos > -2.0)
    return torch.where(reuse, REUSE, COMPUTE).to(torch.int8)


def remember(x, previous, seen, scope):
    """Remember the inputs and compute every unit (a refreshing forward)."""
    cosine_and_remember(x, previous, seen, scope)
    return torch.zeros(x.shape[:2], dtype=torch.int8, device=x.device)


@dataclass(frozen=True)
class TokenSkipOptions(Options):
    """The token policy's options (`cosine_threshold` or `reuse_ratio`, not both)."""

    cosine_threshold: float | None = option(
        None,
        "reuse a position whose layer input's cosine with the previous denoise forward's is "
        "above this (>= 1: the policy is off; none: 1 unless reuse_ratio is given)",
        id="ct",
        range=at_least(0),
    )
    min_layer: int = option(
        1,
        "first layer token skipping applies to (layer 0 always computes)",
        id="ml",
        range=at_least(1),
    )
    max_layer: int | None = option(
        None, "last layer token skipping applies to (none: the last)", id="xl", range=at_least(1)
    )
    reuse_ratio: float | None = option(
        None,
        "reuse this fraction of each row's positions per layer (the most similar) instead of a "
        "threshold",
        id="rr",
        range=Range(0, 1, high_open=True),
    )
    refresh_every: int | None = option(
        None,
        "every N-th denoise forward of a block computes everything (none: never)",
        id="re",
        range=at_least(1),
    )

    def check(self) -> None:
        if self.cosine_threshold is not None and self.reuse_ratio is not None:
            raise OptionError("give cosine_threshold or reuse_ratio, not both")
        if self.max_layer is not None and self.max_layer < self.min_layer:
            raise OptionError(
                f"max_layer ({self.max_layer}) must be >= min_layer ({self.min_layer})"
            )
        if self.reuse_ratio is None and self.cosine_threshold is None:
            object.__setattr__(self, "cosine_threshold", 1.0)  # resolved: off


class TokenSkipPolicy(Policy):
    """REUSE a unit when cos(input now, input at the previous denoise forward) > threshold, or,
    with `reuse_ratio`, the most similar fraction of each row's positions (regular shapes).

    - cosine_threshold: >= 1 disables the policy exactly (cosine never exceeds 1: it is clamped).
    - min_layer / max_layer: token skipping applies to layers min_layer .. max_layer (inclusive;
      default 1 .. the last). Layers below min_layer always compute (a layer-0 test would compare
      the same embeddings every step and freeze every token).
    - reuse_ratio: reuse this fraction of positions per row and layer instead of a threshold.
    - refresh_every: every n-th denoise forward of a block computes everything (off by default).
    State is kept per absolute block position, so it survives switching between full-block and
    sub-block windows, and is reset at every block. The plan is device work only (`OnDevice`):
    the engine runs it in its CUDA graphs, and sizes the ratio variant's computation by its quota.
    """

    name = "token"
    reuses = True
    passes = False
    Options = TokenSkipOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        o = self.options  # frozen: read into attributes once
        self.cosine_threshold = 1.0 if o.cosine_threshold is None else o.cosine_threshold
        self.reuse_ratio, self.refresh_every = o.reuse_ratio, o.refresh_every
        self.min_layer, self.max_layer = o.min_layer, o.max_layer
        self.previous: torch.Tensor | None = None  # [layers, batch, B, hidden], inputs last seen
        self.seen: torch.Tensor | None = None  # [layers, batch, B] bool
        self._shape: tuple[int, int, int] | None = None  # (layers, batch, B) of the next block
        self.refresh = False
        # Plans made, by (layer, window, refresh, units buffer): the same value every forward
        # while the state buffers stay (no per-forward views on a replayed forward's path).
        self._plans: dict[tuple, OnDevice] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.reuse_ratio) or self.cosine_threshold < 1

    def layers(self, num_layers: int) -> range:
        top = num_layers - 1 if self.max_layer is None else min(self.max_layer, num_layers - 1)
        return range(self.min_layer, top + 1) if self.enabled else range(0)

    def begin_block(self, batch_size: int, block_size: int, num_layers: int) -> None:
        shape = (num_layers, batch_size, block_size)
        if self.previous is not None and tuple(self.seen.shape) == shape:
            self.previous.zero_()  # in place: plans on the device read these buffers
            self.seen.zero_()
        else:
            self.previous = self.seen = None
            self._plans.clear()
            self._shape = shape

    def begin_forward(self, ctx: ForwardContext) -> None:
        self.refresh = self.refresh_every is not None and ctx.step % self.refresh_every == 0

    def plan(self, layer: int, ctx: ForwardContext) -> Plan:
        if layer not in self.layers(ctx.num_layers):
            return ALL_COMPUTE
        key = (layer, ctx.window_start, ctx.window_size, self.refresh, id(ctx.units))
        plan = self._plans.get(key)  # holds ctx.units: its id is not reused while cached
        if plan is None:
            plan = self._plans[key] = self._make_plan(layer, ctx)
        return plan

    def _make_plan(self, layer: int, ctx: ForwardContext) -> OnDevice:
        x = ctx.hidden
        if self.previous is None:
            shape = self._shape or (ctx.num_layers, x.shape[0], ctx.block_size)
            self.previous = x.new_zeros(*shape, x.shape[-1])
            self.seen = torch.zeros(shape, dtype=torch.bool, device=x.device)
        window = slice(ctx.window_start, ctx.window_start + ctx.window_size)
        scope = ctx.units if ctx.units is not None else torch.ones_like(self.seen[layer, :, window])
        state = (self.previous[layer, :, window], self.seen[layer, :, window], scope)
        key = (ctx.window_start, ctx.window_size)
        if self.refresh:  # remember the inputs, compute everything
            return OnDevice(remember, state, key, quota=0)
        if self.reuse_ratio is not None:
            k = int(self.reuse_ratio * ctx.window_size)
            return OnDevice(ratio_plan, (*state, k), key, quota=k)
        return OnDevice(threshold_plan, (*state, self.cosine_threshold), key)
