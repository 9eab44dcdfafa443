"""The engine's K/V cache: allocated once, token-major, one write path.

Layout: per layer one K and one V buffer of shape [rows * max_len + 1, kv_heads, head_dim]. Row r's
absolute position p lives in slot r * max_len + p (what a varlen attention kernel reads: row r's
keys are slots [r * max_len, r * max_len + length)). Keys are stored already rotated.

- [0, prefix_len) of every row holds the exact K/V of committed blocks (prefill and commit write
  it); the current block's region holds each block position's last computation, which serves the
  full window, the sub-block cache and REUSE with no per-step concatenation.
- The last slot is the trash slot: the padded units of a static-shape forward write there, and
  nothing ever reads it.
- Unwritten slots are zeros, never garbage: a masked key still takes part in some kernels'
  arithmetic, and 0 x NaN is NaN.

This module owns the layout: every slot computation (`slot_of`, also inside the compiled half of
a layer step, layer_step.py), every K/V write (`KVCache.write`: prefill, verify, denoise and
commit alike) and every view of a layer's buffer by row (`by_row`, what attention reads).
"""

from __future__ import annotations

import torch

from v2.model import ModelConfig


def slot_of(row, pos, max_len: int, valid=None, trash: int = 0):
    """The one slot formula: row `row`'s absolute position `pos` lives in slot row * max_len +
    pos (ints or tensors, broadcasting); where `valid` (bool tensor) is False, the `trash` slot.
    Plain arithmetic, so that it fuses into the compiled code that calls it."""
    slot = row * max_len + pos
    if valid is not None:
        slot = torch.where(valid, slot, trash)
    return slot


def trash_slot(rows: int, max_len: int) -> int:
    """The trash slot of a cache of `rows` rows: the first slot past them."""
    return slot_of(rows, 0, max_len)


def by_row(t: torch.Tensor, rows: int, max_len: int) -> torch.Tensor:
    """One layer's K or V buffer [slots + 1, kv_heads, head_dim] as [rows, max_len, kv_heads,
    head_dim] (a view, no trash slot)."""
    return t[: trash_slot(rows, max_len)].view(rows, max_len, *t.shape[1:])


class KVCache:
    def __init__(
        self, cfg: ModelConfig, rows: int, max_len: int, dtype: torch.dtype, device: torch.device
    ):
        self.rows, self.max_len = rows, max_len
        self.trash = trash_slot(rows, max_len)
        shape = (cfg.num_hidden_layers, self.trash + 1, cfg.num_key_value_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        # Each layer's K and V (views), so that a layer's write and read index no tensor.
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))
        # Where each row's keys start, for varlen kernels: [rows + 1] int32.
        starts = torch.arange(rows + 1, device=device, dtype=torch.int32)
        self.row_starts = slot_of(starts, 0, max_len)
        self.prefix_len = 0

    def slots(
        self, rows: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Slots of (row, absolute position) pairs (broadcasting); the trash slot where `valid`
        is False."""
        return slot_of(rows, positions, self.max_len, valid, self.trash)

    def write(
        self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The one write path: k, v [n, kv_heads, head_dim] into `slots` [n] of `layer`. Returns
        the layer's K and V, trash slot included (what a layer step's attention reads)."""
        K, V = self._layers[layer]
        K.index_copy_(0, slots, k)
        V.index_copy_(0, slots, v)
        return K, V

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, trash slot included."""
        return self._layers[layer]

    def read(self, layer: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [rows, length, kv_heads, head_dim] of one layer's first `rows` rows, positions
        [0, length) (views)."""
        K, V = self._layers[layer]
        R, M = self.rows, self.max_len
        return by_row(K, R, M)[:rows, :length], by_row(V, R, M)[:rows, :length]

    def by_row(self, which: str = "k") -> torch.Tensor:
        """[layers, rows, max_len, kv_heads, head_dim] view (no trash slot), for reading."""
        t = self.k if which == "k" else self.v
        return t[:, : self.trash].view(t.shape[0], self.rows, self.max_len, *t.shape[2:])

    def keep_rows(self, rows: list[int]) -> None:
        """Move the prefix K/V of `rows` (in order) to rows 0 .. len(rows) - 1; the block region
        is rewritten by the next block, so only [0, prefix_len) is copied."""
        if rows == list(range(len(rows))):
            return
        P = self.prefix_len
        index = torch.tensor(rows, device=self.k.device)
        for which in ("k", "v"):
            view = self.by_row(which)
            view[:, : len(rows), :P] = view[:, index, :P]
