"""What one forward over the K/V cache is (`Forward`), and the one eager cached forward.

Like SGLang's `ForwardBatch`: a forward is described once, by its kind, its rows, its window, the
keys its queries see and the buffers it works in, and that description is what the code that
runs it takes, instead of a list of loose parameters. Two families of forwards use it:

- a window of static buffers (denoise, full or sub-block, commit, and a causal engine's verify):
  the engine's layer steps (layer_step.py) run over `x`, the window's hidden states, with the
  units' position maps (`units`) and the key geometry (`geo`); one description per window size,
  its buffers reused by every forward over that window (layer_plans.Window owns it), `kind` and
  `end` set by each.
- an eager cached forward (prefill): `cached_forward` below runs the network's layers over token
  ids at `positions`, writing their K/V into `slots` and attending, under `mask`, to keys
  [0, end) of the cache's first `rows` rows. It serves every engine's prefill, a causal
  engine's (the verifier's and the autoregressive reference's, speculative.py) too.

Every K/V write goes through the cache (kv_cache.py), which owns the slot formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import torch

from v2.model import sdpa

if TYPE_CHECKING:
    from v2.attention import Geometry
    from v2.kv_cache import KVCache
    from v2.model import Network


@dataclass
class Units:
    """Per-window static maps from a flat unit id to its row and window offset ([N + 1]; the
    trash id N maps to row `rows`, offset 0), and what each forward sets: `pos` [N + 1], each
    unit's absolute position (a denoise or commit window starts at one position in every row, a
    verify window at each row's own), and `block_offset` [], the window's offset in the block."""

    row: torch.Tensor
    t: torch.Tensor
    pos: torch.Tensor
    block_offset: torch.Tensor


class Kind(str, Enum):
    """A forward's kind (the values: the names stats.py gives them)."""

    PREFILL = "prefill"
    DENOISE_FULL = "denoise_full"
    DENOISE_SUB = "denoise_sub"
    COMMIT = "commit"
    VERIFY = "verify"


@dataclass(eq=False)
class Forward:
    """One forward over `cache` (module docstring). `rows` sequences (cache rows) of `w`
    positions each; each query sees keys [0, `end`) of its row (`mask` may hide some of them).

    A window (denoise, commit): `x` [rows * w + 1, hidden] (the last row: trash), `units`, `geo`;
    `kind` and `end` are set by each forward over it, the rest stays (the compiled halves of a
    layer step read only the rest, so one object serves every forward and guards nothing new).
    An eager forward (prefill): `positions` (RoPE positions, [w] or [rows, w]), `slots`
    ([rows * w]: where each unit's K/V go, the trash slot for padding), `mask` (boolean,
    broadcast to [rows, heads, w, end]; None: every key visible); its rows are the cache's
    first `rows`."""

    kind: Kind
    rows: int
    w: int
    end: int
    cache: KVCache
    # a window of static buffers (layer_step.py)
    x: torch.Tensor | None = None
    units: Units | None = None
    geo: Geometry | None = None
    # an eager cached forward (cached_forward)
    positions: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    mask: torch.Tensor | None = None


def cached_forward(model: Network, ids: torch.Tensor, fwd: Forward) -> torch.Tensor:
    """The network over ids [rows, w] as `fwd` describes it (an eager forward): each layer's K/V
    written into the cache at `fwd.slots`, its queries attending to the cache's keys [0, end) of
    its rows under `fwd.mask`. Returns the hidden states [rows, w, hidden]. Exact, eager;
    the caller counts the work (flops.py)."""
    cache, cfg = fwd.cache, model.cfg
    kv = cfg.num_key_value_heads, cfg.head_dim
    eager = model.eager_attention
    x = model.embed_tokens(ids)
    cos, sin = model.rope(fwd.positions)
    for i, layer in enumerate(model.layers):

        def attend(q, k, v, i=i):
            cache.write(i, fwd.slots, k.reshape(-1, *kv), v.reshape(-1, *kv))
            K, V = cache.read(i, fwd.rows, fwd.end)
            o = sdpa(q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2), fwd.mask, eager)
            return o.transpose(1, 2)

        x = layer(x, cos, sin, attend)
    return x
