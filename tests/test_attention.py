"""The attention backends against each other on one layer's queries over a cache (v2/attention.py):
FlexAttention (its eager reference on the CPU) gives the dense backend's outputs for the window
forwards' layouts (every unit; a compacted list with padded slots), with grouped KV heads, over
keys that end at each row's length (what lies past it, however large, does not count), and made
causal for a verify window whose rows start at their own positions."""

from __future__ import annotations

import pytest
import torch

from v2.attention import Dense, Flex, Geometry, UnitBatch
from v2.forward import Forward, Kind, Units

pytestmark = pytest.mark.usefixtures("one_thread")

R, W, MAX_LEN, H, KV, HD = 3, 8, 384, 4, 2, 16


def window(ends: list[int], starts: list[int] | None = None) -> Forward:
    """A window of W positions in each of R cache rows; row r's keys end at ends[r], its
    positions start at starts[r] (a verify window) or all at ends[0] - W (a denoise window)."""
    N = R * W
    u = torch.arange(N + 1)
    row, t = u // W, u % W
    t[N] = 0
    first = torch.tensor((starts or [ends[0] - W] * R) + [0])
    geo = Geometry(
        rows=R,
        w=W,
        max_len=MAX_LEN,
        end=torch.tensor(max(ends)),
        seqused=torch.tensor(ends, dtype=torch.int32),
        dense_cu_q=torch.arange(R + 1, dtype=torch.int32) * W,
        row_starts=torch.arange(R + 1, dtype=torch.int32) * MAX_LEN,
        key_positions=torch.arange(MAX_LEN),
    )
    units = Units(row, t, first[row] + t, torch.zeros((), dtype=torch.long))
    return Forward(Kind.DENOISE_FULL, R, W, max(ends), None, units=units, geo=geo)


def qkv(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, H, HD, generator=g, dtype=torch.float64)
    k = torch.randn(R * MAX_LEN + 1, KV, HD, generator=g, dtype=torch.float64)
    v = torch.randn(R * MAX_LEN + 1, KV, HD, generator=g, dtype=torch.float64)
    return q, k, v


def layouts(N: int) -> dict[str, UnitBatch]:
    """Every unit; and a compacted list of 12 slots: 9 units of rows 0 and 2, 3 padded slots."""
    picked = torch.tensor([0, 1, 5, 7, 16, 17, 18, 20, 23])
    index = torch.cat((picked, torch.full((3,), N)))
    valid = index < N
    cu_q = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    return {
        "dense": UnitBatch(torch.arange(N), None, None, N),
        "compacted": UnitBatch(index, valid, cu_q, 9),
    }


@pytest.mark.parametrize("layout", ["dense", "compacted"])
def test_flex_equals_dense_over_a_window(layout):
    fwd = window([200, 200, 200])
    batch = layouts(R * W)[layout]
    q, k, v = qkv(0, batch.index.numel())
    want = Dense()(q, k, v, batch, fwd)
    got = Flex()(q, k, v, batch, fwd)
    real = batch.index < R * W
    torch.testing.assert_close(got[real], want[real], rtol=1e-10, atol=1e-10)
    # keys past the rows' length do not count, whatever they hold
    for t in (k, v):
        t[: R * MAX_LEN].view(R, MAX_LEN, KV, HD)[:, 200:] = 1e4
    torch.testing.assert_close(Flex()(q, k, v, batch, fwd)[real], want[real])


def test_flex_made_causal_equals_dense_made_causal():
    """A verify window: rows at positions 40, 150 and 300, keys ending with their windows."""
    starts = [40, 150, 300]
    fwd = window([s + W for s in starts], starts)
    batch = layouts(R * W)["dense"]
    q, k, v = qkv(1, R * W)
    want = Dense(causal=True)(q, k, v, batch, fwd)
    got = Flex(causal=True)(q, k, v, batch, fwd)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # a query does not see the key at its own position + 1
    k[: R * MAX_LEN].view(R, MAX_LEN, KV, HD)[0, 41] += 1.0
    after = Flex(causal=True)(q, k, v, batch, fwd)
    assert torch.equal(after[0], got[0]) and not torch.equal(after[1], got[1])


def test_flex_made_causal_with_folded_heads_split_in_two():
    """7B's grouping (7 query heads per KV head) at w = 32: a KV head's 224 folded query rows run
    as 2 heads of 112; the causal mask maps each folded row back to its slot's position."""
    rows, w, max_len, heads, kv, hd = 2, 32, 256, 14, 2, 8
    starts = [10, 100]
    N = rows * w
    u = torch.arange(N + 1)
    row, t = u // w, u % w
    t[N] = 0
    first = torch.tensor([*starts, 0])
    geo = Geometry(
        rows=rows,
        w=w,
        max_len=max_len,
        end=torch.tensor(max(starts) + w),
        seqused=torch.tensor([s + w for s in starts], dtype=torch.int32),
        dense_cu_q=torch.arange(rows + 1, dtype=torch.int32) * w,
        row_starts=torch.arange(rows + 1, dtype=torch.int32) * max_len,
        key_positions=torch.arange(max_len),
    )
    units = Units(row, t, first[row] + t, torch.zeros((), dtype=torch.long))
    fwd = Forward(Kind.VERIFY, rows, w, max(starts) + w, None, units=units, geo=geo)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(N, heads, hd, generator=g, dtype=torch.float64)
    k = torch.randn(rows * max_len + 1, kv, hd, generator=g, dtype=torch.float64)
    v = torch.randn(k.shape, generator=g, dtype=torch.float64)
    batch = UnitBatch(torch.arange(N), None, None, N)
    want = Dense(causal=True)(q, k, v, batch, fwd)
    got = Flex(causal=True)(q, k, v, batch, fwd)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
