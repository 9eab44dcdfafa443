"""Token-level skipping across denoise steps (compute-skipping.md section 1).

A (row, position) whose input to layer l barely changed since the previous denoise forward of the
same block is not recomputed: the engine REUSEs it (adds back the residual update it had when last
computed and keeps that computation's K/V). Reused rows never enter the layer's projections,
attention queries or MLP; that is the engine's job, this module only decides.

    python -m v2.generate --model v2/tiny/checkpoint --chat --prompt "..." \\
        --policy token --cosine-threshold 0.99
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from v2.policy import COMPUTE, REUSE, ForwardContext, Policy


class TokenSkipPolicy(Policy):
    """REUSE a unit when cos(input now, input at the previous denoise forward) > threshold, or,
    with `reuse_ratio`, the most similar fraction of each row's positions (regular shapes).

    - cosine_threshold: >= 1 disables the policy exactly (cosine never exceeds 1: it is clamped).
    - min_layer: layers below it always compute (default 1: a layer-0 test would compare the same
      embeddings every step and freeze every token).
    - reuse_ratio: reuse this fraction of positions per row and layer instead of a threshold.
    - refresh_every: every n-th denoise forward of a block computes everything (off by default).
    State is kept per absolute block position, so it survives switching between full-block and
    sub-block windows, and is reset at every block.
    """

    name = "token"
    reuses = True

    def __init__(
        self,
        cosine_threshold: float | None = None,
        min_layer: int = 1,
        reuse_ratio: float | None = None,
        refresh_every: int | None = None,
    ):
        if cosine_threshold is not None and reuse_ratio is not None:
            raise ValueError("token policy: give cosine_threshold or reuse_ratio, not both")
        if cosine_threshold is not None and not cosine_threshold >= -1:
            raise ValueError(f"cosine_threshold must be >= -1, got {cosine_threshold}")
        if reuse_ratio is not None and not 0 <= reuse_ratio < 1:
            raise ValueError(f"reuse_ratio must be in [0, 1), got {reuse_ratio}")
        if min_layer < 1:
            raise ValueError(f"min_layer must be >= 1 (layer 0 always computes), got {min_layer}")
        if refresh_every is not None and refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        self.cosine_threshold = 1.0 if cosine_threshold is None else float(cosine_threshold)
        self.reuse_ratio = reuse_ratio
        self.min_layer = min_layer
        self.refresh_every = refresh_every

    @property
    def enabled(self) -> bool:
        return bool(self.reuse_ratio) or self.cosine_threshold < 1

    def begin_block(self, batch_size: int, block_size: int, num_layers: int) -> None:
        self.previous: torch.Tensor | None = None  # [layers, batch, B, hidden], inputs last seen
        self.seen: torch.Tensor | None = None  # [layers, batch, B] bool

    def begin_forward(self, ctx: ForwardContext) -> None:
        self.refresh = self.refresh_every is not None and ctx.step % self.refresh_every == 0

    def plan(self, layer: int, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        if not self.enabled or layer < self.min_layer:
            return None
        if self.previous is None:
            shape = (ctx.num_layers, x.shape[0], ctx.block_size)
            self.previous = x.new_zeros(*shape, x.shape[-1])
            self.seen = torch.zeros(shape, dtype=torch.bool, device=x.device)
        window = slice(ctx.window_start, ctx.window_start + ctx.window_size)
        previous, seen = self.previous[layer, :, window], self.seen[layer, :, window]
        cos = F.cosine_similarity(x.float(), previous.float(), dim=-1).clamp(max=1.0)
        cos = torch.where(seen, cos, -2.0)  # no reference yet: never reused
        # Remember this forward's inputs for the units it runs (out-of-scope rows keep theirs).
        scope = ctx.units if ctx.units is not None else torch.ones_like(seen)
        previous.copy_(torch.where(scope[..., None], x, previous))
        seen |= scope
        if self.refresh:
            return None
        if self.reuse_ratio:
            k = int(self.reuse_ratio * x.shape[1])
            reuse = torch.zeros_like(seen)
            if k:
                reuse.scatter_(1, cos.topk(k, dim=1).indices, True)
            reuse &= cos > -2.0
        else:
            reuse = cos > self.cosine_threshold
        return torch.where(reuse, REUSE, COMPUTE).to(torch.int8)

    def config(self) -> dict:
        return {
            "policy": self.name,
            "cosine_threshold": None if self.reuse_ratio else self.cosine_threshold,
            "reuse_ratio": self.reuse_ratio,
            "min_layer": self.min_layer,
            "refresh_every": self.refresh_every,
        }
