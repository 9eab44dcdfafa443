"""Layer-level skipping within a denoise forward, and the research group's scheduled layer reuse
(compute-skipping.md sections 2 and 3).

    python -m v2.generate ... --policy layer --cosine-threshold 0.99
    python -m v2.generate ... --policy reuse --reuse-k 2 --layer-subset middle

A PASSed layer is not executed for that row: the engine feeds the layer only the rows that run it.
A REUSEd layer re-adds the update it last computed (never its old absolute output) and is not
called at all for those units.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from v2.policy import COMPUTE, PASS, REUSE, ForwardContext, Policy


def row_cosine(x: torch.Tensor, ref: torch.Tensor, units: torch.Tensor | None) -> torch.Tensor:
    """Per row, the mean over its in-scope positions of cos(x, ref) ([batch, window, hidden] in,
    [batch] out): the score the layer policy thresholds."""
    cos = F.cosine_similarity(x.float(), ref.float(), dim=-1)
    scope = units if units is not None else torch.ones_like(cos, dtype=torch.bool)
    return (cos * scope).sum(1) / scope.sum(1).clamp(min=1)


class LayerSkipPolicy(Policy):
    """PASS layer l for row b when the mean over positions of cos(x_l, x_l') is above the
    threshold, l' being the last layer executed for b (a high score means that layer barely
    changed the state). At most `max_consecutive_skips` in a row; the first `protect_first` and
    last `protect_last` layers always run (the engine enforces it). >= 1 disables exactly."""

    name = "layer"

    def __init__(
        self,
        cosine_threshold: float = 1.0,
        max_consecutive_skips: int = 1,
        protect_first: int = 1,
        protect_last: int = 1,
    ):
        if not cosine_threshold >= -1:  # as the token policy: a cosine is never below -1
            raise ValueError(f"cosine_threshold must be >= -1, got {cosine_threshold}")
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        if protect_first < 1 or protect_last < 1:
            raise ValueError("protect_first and protect_last must be >= 1")
        self.cosine_threshold = float(cosine_threshold)
        self.max_consecutive_skips = max_consecutive_skips
        self.protect_first, self.protect_last = protect_first, protect_last

    @property
    def enabled(self) -> bool:
        return self.cosine_threshold < 1

    def acts_on(self, num_layers: int) -> bool:
        return self.enabled and self.protect_first + self.protect_last < num_layers

    def protected_layers(self, num_layers: int) -> set[int]:
        return set(range(self.protect_first)) | set(
            range(num_layers - self.protect_last, num_layers)
        )

    def begin_forward(self, ctx: ForwardContext) -> None:
        self.protected = self.protected_layers(ctx.num_layers)
        self.last_input: torch.Tensor | None = None  # input of the last layer run, per row
        self.run_of_skips: torch.Tensor | None = None

    def plan(self, layer: int, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        if self.cosine_threshold >= 1:
            return None
        if layer in self.protected or self.last_input is None:
            self.last_input = x.clone()  # x is the engine's buffer: valid only during this call
            self.run_of_skips = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            return None
        score = row_cosine(x, self.last_input, ctx.units)
        skip = (score > self.cosine_threshold) & (self.run_of_skips < self.max_consecutive_skips)
        active = ctx.units.any(1) if ctx.units is not None else torch.ones_like(skip)
        skip &= active  # rows out of this forward (waiting, or no sequence) are not decided on
        self.run_of_skips = torch.where(skip, self.run_of_skips + 1, 0)
        self.last_input = torch.where(skip[:, None, None], self.last_input, x)
        # The one device round trip of a layer decision.
        skipped, running = torch.stack((skip.sum(), active.sum())).tolist()
        if skipped == 0:
            return None
        if skipped == running:
            return PASS  # every row: the engine skips the layer outright
        return (skip[:, None] * PASS).expand(-1, x.shape[1]).to(torch.int8)

    def config(self) -> dict:
        return {
            "policy": self.name,
            "cosine_threshold": self.cosine_threshold,
            "max_consecutive_skips": self.max_consecutive_skips,
            "protect_first": self.protect_first,
            "protect_last": self.protect_last,
        }


SUBSETS = ("first", "middle", "last")


def subset_layers(subset: str | list[int], num_layers: int, size: int | None = None) -> list[int]:
    """`first` / `middle` / `last` n layers (n = 12 of 28 scaled with depth unless given), or an
    explicit list (a Python list, or indices separated by ';', '+' or spaces in a string)."""
    if isinstance(subset, str) and subset in SUBSETS:
        n = size if size is not None else max(1, round(12 * num_layers / 28))
        if not 1 <= n <= num_layers:
            raise ValueError(f"subset_size must be in [1, {num_layers}], got {n}")
        start = {"first": 0, "middle": (num_layers - n) // 2, "last": num_layers - n}[subset]
        return list(range(start, start + n))
    if isinstance(subset, str):
        try:
            subset = [int(t) for t in subset.replace(";", " ").replace("+", " ").split()]
        except ValueError:
            raise ValueError(
                f"layer_subset must be first, middle, last or layer indices like '3;5;7', "
                f"got {subset!r}"
            ) from None
    bad = [i for i in subset if not 0 <= i < num_layers]
    if not subset or bad:
        raise ValueError(f"layer_subset indices must be in [0, {num_layers}), got {subset}")
    return sorted(set(subset))


class LayerReusePolicy(Policy):
    """On denoise steps s (counted from the block start) with s % k != 0, every unit of the
    subset's layers is REUSED. k = 1 is the baseline exactly."""

    name = "reuse"
    reuses = True
    passes = False

    def __init__(
        self,
        reuse_k: int = 1,
        layer_subset: str | list[int] = "middle",
        subset_size: int | None = None,
    ):
        if reuse_k < 1:
            raise ValueError(f"reuse_k must be >= 1, got {reuse_k}")
        self.reuse_k, self.layer_subset, self.subset_size = reuse_k, layer_subset, subset_size
        if not (isinstance(layer_subset, str) and layer_subset in SUBSETS):
            subset_layers(layer_subset, 10**6)  # syntax now; bounds once the depth is known

    @property
    def enabled(self) -> bool:
        return self.reuse_k > 1

    def begin_block(self, batch_size: int, block_size: int, num_layers: int) -> None:
        self.layers = set(subset_layers(self.layer_subset, num_layers, self.subset_size))

    def _action(self, layer: int, ctx: ForwardContext) -> int:
        if self.reuse_k == 1 or layer not in self.layers or ctx.step % self.reuse_k == 0:
            return COMPUTE
        return REUSE  # every unit in scope

    def host_plan(self, layer: int, ctx: ForwardContext) -> int:
        return self._action(layer, ctx)

    def plan(self, layer: int, x: torch.Tensor, ctx: ForwardContext) -> int | None:
        action = self._action(layer, ctx)
        return None if action == COMPUTE else action

    def config(self) -> dict:
        return {
            "policy": self.name,
            "reuse_k": self.reuse_k,
            "layer_subset": self.layer_subset,
            "subset_size": self.subset_size,
        }
