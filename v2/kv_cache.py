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
"""

from __future__ import annotations

import torch

from v2.model import ModelConfig


class KVCache:
    def __init__(
        self, cfg: ModelConfig, rows: int, max_len: int, dtype: torch.dtype, device: torch.device
    ):
        self.rows, self.max_len = rows, max_len
        self.trash = rows * max_len
        shape = (cfg.num_hidden_layers, self.trash + 1, cfg.num_key_value_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        # Where each row's keys start, for varlen kernels: [rows + 1] int32.
        self.row_starts = torch.arange(rows + 1, device=device, dtype=torch.int32) * max_len
        self.prefix_len = 0

    def slots(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat slots of (row, absolute position) pairs (broadcasting)."""
        return rows * self.max_len + positions

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """The one write path: k, v [n, kv_heads, head_dim] into `slots` [n] of `layer`."""
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, trash slot included: what a layer step writes into."""
        return self.k[layer], self.v[layer]

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
