"""The engine's forwards: prefill, denoise and commit over a preallocated prefix KV cache, with
compute-skipping plans executed so that skipped units never enter a matmul.

Cache layout: one K and one V buffer per layer, [batch, kv_heads, max_len, head_dim], keys stored
already rotated at their absolute positions. [0, prefix_len) holds the exact K/V of committed
blocks (written only by prefill and commit). The current block's region [prefix_len,
prefix_len + B) holds the K/V of each block position's last computation; a denoise forward writes
the units it computes there and attends to [0, prefix_len + B). That one region serves the full
window, the sub-block cache (positions outside the sub-block keep their last K/V) and REUSE
(a reused unit keeps the K/V of its last computation), with no per-step concatenation.
"""

from __future__ import annotations

import torch

from v2.model import Network, block_causal_mask, sdpa
from v2.policy import COMPUTE, PASS, REUSE, ForwardContext, Policy
from v2.stats import Stats


class PolicyError(RuntimeError):
    """A policy answered with a plan the engine must not execute."""


class Engine:
    def __init__(
        self,
        model: Network,
        policy: Policy | None = None,
        block_size: int | None = None,
        block_cache: bool = False,
    ):
        self.model = model
        self.cfg = model.cfg
        self.B = block_size or model.cfg.block_size
        self.block_cache = block_cache
        self.policy = policy
        self.stats = Stats(self.cfg.num_hidden_layers)
        self.prefix_len = 0
        self._protected: set[int] = (
            policy.protected_layers(self.cfg.num_hidden_layers) if policy else set()
        )

    # ---- cache and per-block state -------------------------------------------------------

    def allocate(self, batch: int, max_len: int) -> None:
        cfg, w = self.cfg, self.model.embed_tokens.weight
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.empty(shape, dtype=w.dtype, device=w.device)
        self.v = torch.empty(shape, dtype=w.dtype, device=w.device)
        self.prefix_len = 0

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished rows from the cache (at block ends)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]

    def begin_block(self) -> None:
        """Reset per-position state; the policy's too."""
        cfg, b = self.cfg, self.k.shape[1]
        L, B = cfg.num_hidden_layers, self.B
        self.step = 0
        if self.policy is not None:
            self.policy.begin_block(b, B, L)
            if self.policy.reuses:
                w = self.model.embed_tokens.weight
                self.delta = torch.zeros(L, b, B, cfg.hidden_size, dtype=w.dtype, device=w.device)
                self.has_ref = torch.zeros(L, b, B, dtype=torch.bool, device=w.device)

    # ---- the three forward kinds --------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Complete prompt blocks [0, P): exact, block-causal. Returns the last hidden state."""
        P = ids.shape[1]
        pos = torch.arange(P, device=ids.device)
        mask = block_causal_mask(pos, pos, self.B) if P > self.B else None
        x = self._dense("prefill", ids, 0, P, mask, keys_per_query=(pos // self.B + 1) * self.B)
        self.prefix_len = P
        return x[:, -1]

    @torch.inference_mode()
    def commit(self, ids: torch.Tensor) -> torch.Tensor:
        """The clean current block: its exact K/V become part of the prefix. Returns the last
        position's hidden (its argmax is the next block's first token)."""
        B, P = self.B, self.prefix_len
        x = self._dense("commit", ids, P, P + B, None)
        self.prefix_len = P + B
        return x[:, -1]

    @torch.inference_mode()
    def denoise(
        self,
        ids: torch.Tensor,
        window_start: int,
        out_positions: torch.Tensor,
        units: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One denoise forward over window [window_start, window_start + w) of the current block
        (ids [b, w]); `units` [b, w] marks the positions each row computes (None = all: the
        sub-block cache gives rows in sub-block mode only their sub-block). Returns the hidden
        states at window positions `out_positions` [b, p, hidden]."""
        b, w = ids.shape
        B, P, L = self.B, self.prefix_len, self.cfg.num_hidden_layers
        kind = "denoise_full" if w == B else "denoise_sub"
        ctx = ForwardContext(self.step, window_start, w, b, L, B, units)
        self.step += 1
        if units is None:
            rows, baseline_units = b, b * w
        else:
            rows, baseline_units = (int(t) for t in (units.any(1).sum(), units.sum()))
        self._count_forward(kind, rows, baseline_units)
        if self.policy is not None:
            self.policy.begin_forward(ctx)
        start, end = P + window_start, P + B
        x = self.model.embed_tokens(ids)
        pos = torch.arange(start, start + w, device=ids.device)
        cos, sin = self.model.rope(pos)
        full_rows = None if units is None or w < B else units.all(1)
        st = self.stats
        for i, layer in enumerate(self.model.layers):
            actions = self.policy.plan(i, x, ctx) if self.policy is not None else None
            if actions is not None and i in self._protected:
                raise PolicyError(f"{self.policy.name}: planned skipping on protected layer {i}")
            compute, reuse = self._resolve(i, actions, units, full_rows, window_start, w)
            if compute is None:
                out = layer(x, cos, sin, self._dense_attend(i, start, end, None))
                n = b * w
                if self._keeps_deltas:
                    self.delta[i, :, window_start : window_start + w] = out - x
                    self.has_ref[i, :, window_start : window_start + w] = True
                x = out
            else:
                x, n = self._planned_layer(i, layer, x, compute, reuse, start, end, window_start)
            st.executed_units_per_layer[i] += n
            st.executed_flops += n * self._unit_flops(end)
        st.baseline_flops += baseline_units * L * self._unit_flops(end)
        st.executed_flops += self._head_flops(b * out_positions.numel())
        st.baseline_flops += self._head_flops(b * out_positions.numel())
        return x[:, out_positions]

    # ---- execution ----------------------------------------------------------------------------

    @property
    def _keeps_deltas(self) -> bool:
        return self.policy is not None and self.policy.reuses

    def _dense(self, kind, ids, start, end, mask, keys_per_query=None) -> torch.Tensor:
        """Every unit computed (prefill, commit): the prefix cache's exact K/V."""
        b, w = ids.shape
        self._count_forward(kind, b, b * w)
        x = self.model.embed_tokens(ids)
        cos, sin = self.model.rope(torch.arange(start, start + w, device=ids.device))
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, self._dense_attend(i, start, end, mask))
            self.stats.executed_units_per_layer[i] += b * w
        keys = end * w if keys_per_query is None else int(keys_per_query.sum())
        attn = 4 * keys * self.cfg.num_attention_heads * self.cfg.head_dim
        flops = self.cfg.num_hidden_layers * b * (w * 2 * self.cfg.layer_weight_count + attn)
        flops += self._head_flops(b)
        self.stats.executed_flops += flops
        self.stats.baseline_flops += flops
        return x

    def _dense_attend(self, i: int, start: int, end: int, mask: torch.Tensor | None):
        eager = self.model.eager_attention

        def attend(q, k, v):
            w = q.shape[1]
            self.k[i, :, :, start : start + w] = k.transpose(1, 2)
            self.v[i, :, :, start : start + w] = v.transpose(1, 2)
            keys, values = self.k[i, :, :, :end], self.v[i, :, :, :end]
            return sdpa(q.transpose(1, 2), keys, values, mask, eager).transpose(1, 2)

        return attend

    def _resolve(self, i, actions, units, full_rows, window_start, w):
        """(compute, reuse) boolean [b, w] masks, or (None, None) when every unit computes."""
        if actions is None:
            return units, None
        if actions.shape != (self.k.shape[1], w):
            raise PolicyError(
                f"{self.policy.name}: plan shape {tuple(actions.shape)} != {(self.k.shape[1], w)}"
            )
        passed = actions == PASS
        scope = units if units is not None else torch.ones_like(passed)
        partial = ((passed & scope).any(1) & ~(passed | ~scope).all(1)).any()
        if bool(partial):
            raise PolicyError(
                f"{self.policy.name}: PASS must cover a row's whole window (layer {i})"
            )
        if full_rows is not None or (units is None and w == self.B and self.block_cache):
            # Under the sub-block cache a full-block forward must leave every layer's block K/V
            # complete for the sub-block forwards after it: a row there is computed, not passed.
            rows = full_rows if full_rows is not None else torch.ones_like(passed[:, 0])
            passed = passed & ~rows[:, None]
        if self._keeps_deltas:  # a unit never computed in this block has nothing to reuse
            reuse = (actions == REUSE) & self.has_ref[i, :, window_start : window_start + w]
            compute = ~passed & ~reuse
        else:
            reuse, compute = None, ~passed
        if units is not None:
            compute = compute & units
            reuse = reuse & units if reuse is not None else None
        elif not bool((actions != COMPUTE).any()):
            return None, None
        return compute, reuse

    def _planned_layer(self, i, layer, x, compute, reuse, start, end, window_start):
        """Run layer i on the computed units only; reused units get their last update back."""
        b, w, d = x.shape
        rows, pos = compute.nonzero(as_tuple=True)
        n = rows.numel()
        out = x
        if reuse is not None:
            delta = self.delta[i, :, window_start : window_start + w]
            out = x + torch.where(
                reuse[..., None], delta, torch.zeros((), dtype=x.dtype, device=x.device)
            )
        if n == 0:
            return out, 0
        rank = (compute.cumsum(1) - 1)[rows, pos]
        width = int(rank.max()) + 1
        cos, sin = self.model.rope(start + pos)
        eager = self.model.eager_attention
        cfg = self.cfg

        def attend(q, k, v):
            self.k[i, rows, :, start + pos] = k
            self.v[i, rows, :, start + pos] = v
            padded = q.new_zeros(b, width, cfg.num_attention_heads, cfg.head_dim)
            padded[rows, rank] = q
            o = sdpa(
                padded.transpose(1, 2), self.k[i, :, :, :end], self.v[i, :, :, :end], None, eager
            )
            return o.transpose(1, 2)[rows, rank]

        x_c = x[rows, pos]
        out_c = layer(x_c, cos, sin, attend)
        if self._keeps_deltas:
            self.delta[i, rows, window_start + pos] = out_c - x_c
            self.has_ref[i, rows, window_start + pos] = True
        out = out.index_put((rows, pos), out_c)
        return out, n

    # ---- accounting ---------------------------------------------------------------------------

    def _count_forward(self, kind: str, rows: int, units_per_layer: int) -> None:
        st = self.stats
        st.forwards[kind] += 1
        st.row_forwards[kind] += rows
        for i in range(self.cfg.num_hidden_layers):
            st.baseline_units_per_layer[i] += units_per_layer

    def _unit_flops(self, keys: int) -> int:
        cfg = self.cfg
        return 2 * cfg.layer_weight_count + 4 * keys * cfg.num_attention_heads * cfg.head_dim

    def _head_flops(self, rows: int) -> int:
        return rows * 2 * self.cfg.hidden_size * self.cfg.vocab_size
