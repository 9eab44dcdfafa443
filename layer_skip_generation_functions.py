"""Layer-level skipping within a denoise forward, and the research group's scheduled layer reuse
(compute-skipping.md sections 2 and 3).

    python -m v2.generate ... --policy layer --cosine-threshold 0.99
    python -m v2.generate ... --policy reuse --reuse-k 2 --layer-subset middle

A PASSed layer is not executed for that row: the engine feeds the layer only the rows that run it.
A REUSEd layer re-adds the update it last computed (never its old absolute output) and is not
called at all for those units.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from v2.options import LAYER_SUBSETS, LayerSubset, Options, at_least, option
from v2.policy import (
    ALL_COMPUTE,
    ALL_PASS,
    ALL_REUSE,
    PASS,
    ForwardContext,
    OnHost,
    Policy,
    Uniform,
)


def row_cosine(x: torch.Tensor, ref: torch.Tensor, units: torch.Tensor | None) -> torch.Tensor:
    """Per row, the mean over its in-scope positions of cos(x, ref) ([batch, window, hidden] in,
    [batch] out): the score the layer policy thresholds."""
    cos = F.cosine_similarity(x.float(), ref.float(), dim=-1)
    scope = units if units is not None else torch.ones_like(cos, dtype=torch.bool)
    return (cos * scope).sum(1) / scope.sum(1).clamp(min=1)


@dataclass(frozen=True)
class LayerSkipOptions(Options):
    cosine_threshold: float = option(
        1.0,
        "pass a layer for a row whose input barely changed across the last layer run: mean "
        "cosine above this (>= 1: the policy is off)",
        id="ct",
        range=at_least(0),
    )
    max_consecutive_skips: int = option(
        1, "most layers passed in a row", id="mcs", range=at_least(1)
    )
    protect_first: int = option(1, "first N layers always run", id="pf", range=at_least(1))
    protect_last: int = option(1, "last N layers always run", id="pl", range=at_least(1))


class LayerSkipPolicy(Policy):
    """PASS layer l for row b when the mean over positions of cos(x_l, x_l') is above the
    threshold, l' being the last layer executed for b (a high score means that layer barely
    changed the state). At most `max_consecutive_skips` in a row; the first `protect_first` and
    last `protect_last` layers always run (the engine enforces it). >= 1 disables exactly."""

    name = "layer"
    Options = LayerSkipOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        o = self.options  # frozen: read into attributes once
        self.cosine_threshold = o.cosine_threshold
        self.max_consecutive_skips = o.max_consecutive_skips
        self.protect_first, self.protect_last = o.protect_first, o.protect_last

    @property
    def enabled(self) -> bool:
        return self.cosine_threshold < 1

    def layers(self, num_layers: int) -> range:
        return (
            range(self.protect_first, num_layers - self.protect_last) if self.enabled else range(0)
        )

    def begin_forward(self, ctx: ForwardContext) -> None:
        self.last_input: torch.Tensor | None = None  # input of the last layer run, per row
        self.run_of_skips: torch.Tensor | None = None

    def plan(self, layer: int, ctx: ForwardContext) -> OnHost:
        return OnHost(partial(self.decide, layer, ctx))

    def decide(self, layer: int, ctx: ForwardContext, x: torch.Tensor) -> Uniform | torch.Tensor:
        """The plan from the layer's input: every row, none, or some rows PASS (one device round
        trip). x is the engine's buffer, overwritten by the layer: what must outlive the call is
        copied."""
        if layer not in self.layers(ctx.num_layers) or self.last_input is None:
            self.last_input = x.clone()
            self.run_of_skips = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            return ALL_COMPUTE
        score = row_cosine(x, self.last_input, ctx.units)
        skip = (score > self.cosine_threshold) & (self.run_of_skips < self.max_consecutive_skips)
        active = ctx.units.any(1) if ctx.units is not None else torch.ones_like(skip)
        skip &= active  # rows out of this forward (waiting, or no sequence) are not decided on
        self.run_of_skips = torch.where(skip, self.run_of_skips + 1, 0)
        self.last_input = torch.where(skip[:, None, None], self.last_input, x)
        skipped, running = torch.stack((skip.sum(), active.sum())).tolist()
        if skipped == 0:
            return ALL_COMPUTE
        if skipped == running:
            return ALL_PASS  # every row: the engine skips the layer outright
        return (skip[:, None] * PASS).expand(-1, x.shape[1]).to(torch.int8)


SUBSETS = LAYER_SUBSETS


def subset_layers(subset: str | list[int], num_layers: int, size: int | None = None) -> list[int]:
    """`first` / `middle` / `last` n layers (n = 12 of 28 scaled with depth unless given), or an
    explicit list (a Python list, or indices separated by ';', '+', ',' or spaces in a string)."""
    if isinstance(subset, str) and subset in SUBSETS:
        n = size if size is not None else max(1, round(12 * num_layers / 28))
        if not 1 <= n <= num_layers:
            raise ValueError(f"subset_size must be in [1, {num_layers}], got {n}")
        start = {"first": 0, "middle": (num_layers - n) // 2, "last": num_layers - n}[subset]
        return list(range(start, start + n))
    if isinstance(subset, str):  # checked by LayerReuseOptions: digits and separators
        subset = [
            int(t) for t in subset.replace(";", " ").replace("+", " ").replace(",", " ").split()
        ]
    bad = [i for i in subset if not 0 <= i < num_layers]
    if not subset or bad:
        raise ValueError(f"layer_subset indices must be in [0, {num_layers}), got {subset}")
    return sorted(set(subset))


@dataclass(frozen=True)
class LayerReuseOptions(Options):
    reuse_k: int = option(
        1,
        "on denoise steps s with s % k != 0, the subset's layers reuse their last update "
        "(1: the baseline)",
        id="k",
        range=at_least(1),
    )
    layer_subset: LayerSubset = option(
        "middle", "the layers that reuse: first, middle, last n layers, or layer indices"
    )
    subset_size: int | None = option(
        None,
        "n, the layers in first / middle / last (none: 12 of 28, scaled with depth)",
        id="n",
        range=at_least(1),
    )


class LayerReusePolicy(Policy):
    """On denoise steps s (counted from the block start) with s % k != 0, every unit of the
    subset's layers is REUSED. k = 1 is the baseline exactly."""

    name = "reuse"
    reuses = True
    passes = False
    Options = LayerReuseOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        o = self.options  # frozen: read into attributes once
        self.reuse_k, self.layer_subset, self.subset_size = o.reuse_k, o.layer_subset, o.subset_size

    @property
    def enabled(self) -> bool:
        return self.reuse_k > 1

    def layers(self, num_layers: int) -> set[int]:
        if not self.enabled:
            return set()
        return set(subset_layers(self.layer_subset, num_layers, self.subset_size))

    def begin_block(self, batch_size: int, block_size: int, num_layers: int) -> None:
        self.subset = self.layers(num_layers)

    def plan(self, layer: int, ctx: ForwardContext) -> Uniform:
        if layer not in self.subset or ctx.step % self.reuse_k == 0:
            return ALL_COMPUTE
        return ALL_REUSE  # every unit in scope
