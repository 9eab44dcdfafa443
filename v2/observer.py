"""Watching a decode without changing it: an Observer, given to `generate(..., observer=)`, sees
every denoise forward as the engine ran it. The web app and the chatbot (v2/chat.py) and
v2.analyze watch through it; none of them wraps the policy.

- `on_hidden(depth, x, ctx)`, called by the engine: the hidden states after `depth` layers of the
  denoise forward running (0: the embeddings, the first layer's input; num_layers: the output),
  x [cache rows, window, hidden], the engine's buffer (copy what must outlive the call).
- `on_forward(step)`, called by generate once the forward's tokens are committed: a DenoiseStep
  with the block, the commits, each layer's plan as the engine executed it, and the statistics.

With an observer the engine runs each denoise forward's layer loop eagerly (no forward replay,
no plan captured in a CUDA graph) and reads every layer's resolved plan back: a viewer pays that;
a decode with no observer runs as it would without this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from v2.policy import ForwardContext
from v2.stats import Stats

NOT_RUN = -1  # a plan cell outside the forward's window or scope (else COMPUTE / REUSE / PASS)


@dataclass(frozen=True)
class DenoiseStep:
    """What one denoise forward did. Row j of the tensors (on the CPU) is prompt `rows[j]`; rows
    leave the batch at block ends."""

    block_start: int  # absolute position of the block's first slot
    step: int  # denoise forward of this block (0 = its first)
    window_start: int  # block offset of the forward's window
    window_size: int  # B (full block) or S (a sub-block, under the sub-block cache)
    rows: list[int]
    tokens: torch.Tensor  # [r, B] the block after this forward (the mask id where undecided)
    committed: torch.Tensor  # [r, B] bool: committed by this forward
    pending: torch.Tensor  # [r, B] bool: still masked, to be decoded
    generated: torch.Tensor  # [r, B] bool: positions after the prompt, within the budget
    # [layers, r, B] int8: what each layer did with each unit, as the engine executed it
    # (COMPUTE / REUSE / PASS; REUSE without a reference computed), NOT_RUN outside the window
    # or the forward's scope
    plan: torch.Tensor
    forward: Stats  # this forward alone: units executed / reused / in scope per layer, FLOPs
    total: Stats  # the generation so far (wall_seconds: since it started)


class Observer:
    """Watches denoise forwards; every method does nothing unless overridden."""

    def on_hidden(self, depth: int, x: torch.Tensor, ctx: ForwardContext) -> None:
        """The hidden states after `depth` layers (module docstring)."""

    def on_forward(self, step: DenoiseStep) -> None:
        """A denoise forward and its commits; an exception raised here stops the generation."""
