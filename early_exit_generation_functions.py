"""Dynamic early exit in a denoise forward by the logit lens (docs/concepts/early-exit.md).

    python -m v2.generate ... --policy exit --exit-threshold 0.9 --check-every 2 --min-layer 2

The decoder predicts a masked position p from the hidden state at p - 1 (its predicting unit).
At the input of layer l (l >= min_layer, every check_every layers), the policy applies the head
(final norm + lm_head) to the predicting units of the masked positions that have not exited yet.
A unit whose top probability is above `exit_threshold` exits: for layers l .. L-1 of this
forward it is PASSED (its hidden state is frozen, so the decoder's logits for p are exactly the
lens prediction that was confident), and its K/V at those layers, which the other positions
still attend to, are the ones from its last computation at that layer in this block. A unit
with no such computation (in particular at the block's first denoise forward) cannot exit at
that layer: it computes it. Masked positions are recognised by their layer-0 input, the mask
token's embedding. The lens head is real work: 2 x hidden x vocab FLOPs per unit checked,
counted in the executed FLOPs. exit_threshold >= 1 disables the policy exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from v2 import flops
from v2.options import Options, above, at_least, option
from v2.policy import ALL_COMPUTE, COMPUTE, PASS, ForwardContext, OnHost, Policy, Uniform


@dataclass(frozen=True)
class EarlyExitOptions(Options):
    exit_threshold: float = option(
        1.0,
        "a masked position whose logit-lens probability is above this stops computing "
        "(>= 1: the policy is off)",
        id="et",
        range=above(0),
    )
    check_every: int = option(
        1, "check the lens every N layers from min_layer", id="ce", range=at_least(1)
    )
    min_layer: int = option(
        1,
        "first layer whose logit lens is checked (the lens needs a layer run)",
        id="ml",
        range=at_least(1),
    )


class EarlyExitPolicy(Policy):
    name = "exit"
    passes_units = True
    Options = EarlyExitOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        o = self.options  # frozen: read into attributes once
        self.exit_threshold, self.check_every, self.min_layer = (
            o.exit_threshold,
            o.check_every,
            o.min_layer,
        )
        self.model = None
        self._lens_rows = 0

    @property
    def enabled(self) -> bool:
        return self.exit_threshold < 1

    def layers(self, num_layers: int) -> range:
        return range(min(self.min_layer, num_layers), num_layers) if self.enabled else range(0)

    def attach(self, model, ids) -> None:
        self.model = model
        self.mask_embedding = model.embed_tokens.weight[ids.mask].detach()

    def begin_block(self, batch_size: int, block_size: int, num_layers: int) -> None:
        self.block_size = block_size
        self.computed: torch.Tensor | None = None  # [layers, rows, B] bool, in this block

    def begin_forward(self, ctx: ForwardContext) -> None:
        if self.model is None:
            raise RuntimeError("the exit policy needs generate() to attach the model first")
        self.exited: torch.Tensor | None = None  # [rows, w] bool
        self.targets: torch.Tensor | None = None
        self._lens_rows = 0

    def end_forward(self, ctx: ForwardContext) -> int:
        return flops.head(self.model.cfg, self._lens_rows) if self._lens_rows else 0

    def _checks(self, layer: int) -> bool:
        return layer >= self.min_layer and (layer - self.min_layer) % self.check_every == 0

    def plan(self, layer: int, ctx: ForwardContext) -> OnHost:
        return OnHost(partial(self.decide, layer, ctx))

    def decide(self, layer: int, ctx: ForwardContext, x: torch.Tensor) -> Uniform | torch.Tensor:
        """Check the lens where due; PASS the exited units that have K/V from earlier."""
        scope = ctx.units if ctx.units is not None else torch.ones(x.shape[:2], dtype=torch.bool)
        scope = scope.to(x.device)
        if self.computed is None:
            shape = (ctx.num_layers, x.shape[0], self.block_size)
            self.computed = torch.zeros(shape, dtype=torch.bool, device=x.device)
        w = slice(ctx.window_start, ctx.window_start + x.shape[1])
        computed = self.computed[layer][:, w]  # a view: updated in place below
        if layer == 0:
            masked = (x == self.mask_embedding.to(x.dtype)).all(-1) & scope
            self.targets = torch.zeros_like(masked)
            self.targets[:, :-1] = masked[:, 1:]
            self.exited = torch.zeros_like(masked)
        elif self._checks(layer):
            check = self.targets & ~self.exited
            n = int(check.sum())
            if n:
                m = self.model
                logits = m.lm_head(m.norm(x[check])).float()
                confident = F.softmax(logits, -1).amax(-1) > self.exit_threshold
                self._lens_rows += n
                self.exited[check] = confident
        # An exited unit passes this layer where it has K/V from earlier in the block.
        passing = self.exited & computed & scope
        computed |= scope & ~passing
        if not bool(passing.any()):
            return ALL_COMPUTE
        return torch.where(passing, PASS, COMPUTE).to(torch.int8)
