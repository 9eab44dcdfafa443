"""The flex attention backend (v2/attention.py's `Flex`, PyTorch's FlexAttention) on the CPU:
against a per-row reference and the dense backend, in every layout the engine feeds it (identity,
masked, compacted with padded slots), with GQA groups that are and are not a power of two; keys
past a row's length do not matter; its block mask covers a row's keys in as few blocks as they
take; and the whole call traces as one graph (what torch.compile runs on CUDA). On the GPU, see
tests/test_cuda_graphs.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from v2.attention import (
    BACKENDS,
    Dense,
    Flash,
    Flex,
    Geometry,
    Packed,
    UnitBatch,
    choose,
    flex_block_mask,
    flex_window,
    heads_split,
)
from v2.layer_step import compact

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def window(rows: int, w: int, max_len: int, lengths: list[int]):
    """A forward's geometry (attention.py) whose rows see keys [0, lengths[r])."""
    seqused = torch.tensor(lengths, dtype=torch.int32)
    end = max(lengths)
    geo = Geometry(
        rows=rows,
        w=w,
        max_len=max_len,
        end=torch.tensor(end),
        seqused=seqused,
        dense_cu_q=torch.arange(rows + 1, dtype=torch.int32) * w,
        row_starts=torch.arange(rows + 1, dtype=torch.int32) * max_len,
        key_positions=torch.arange(max_len),
    )
    return SimpleNamespace(geo=geo, end=end)


def cache(rows: int, max_len: int, kv: int, hd: int, seed: int = 0):
    """A layer's K and V as the cache holds them: [rows * max_len + 1, kv, hd] (last: trash)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(rows * max_len + 1, kv, hd, generator=g, dtype=torch.float64)
    return k, torch.randn(k.shape, generator=g, dtype=torch.float64)


def reference(q, k, v, units: torch.Tensor, fwd) -> torch.Tensor:
    """Each unit's query (unit id row * w + t) over its row's keys [0, seqused[row])."""
    geo = fwd.geo
    out = torch.zeros_like(q)
    for j, u in enumerate(units.tolist()):
        r = u // geo.w
        n = int(geo.seqused[r])
        keys = k[r * geo.max_len : r * geo.max_len + n].transpose(0, 1)  # [kv, n, hd]
        values = v[r * geo.max_len : r * geo.max_len + n].transpose(0, 1)
        o = F.scaled_dot_product_attention(
            q[j].unsqueeze(1), keys, values, enable_gqa=True
        )  # [H, 1, hd]
        out[j] = o.squeeze(1)
    return out


def layouts(rows: int, w: int, seed: int = 0):
    """(name, batch) of every layout the engine feeds an attention backend: identity, masked (the
    plan's units valid), compacted into a bucket with padded slots (trash id N), and exact shapes
    (the computed units, no padding)."""
    N = rows * w
    chosen = torch.rand(N, generator=torch.Generator().manual_seed(seed)) < 0.4
    compacted = compact(chosen, 8 * math.ceil(int(chosen.sum()) / 8) + 8, rows)
    assert not compacted.valid.all()  # padded slots
    index = chosen.nonzero().squeeze(1)
    return [
        ("identity", UnitBatch(torch.arange(N), None, None, N), torch.ones(N, dtype=torch.bool)),
        ("masked", UnitBatch(torch.arange(N), chosen, None, None), chosen),
        ("compacted", compacted, compacted.valid),
        ("exact", UnitBatch(index, None, None, index.numel()), torch.ones(len(index), dtype=bool)),
    ]


@pytest.mark.parametrize(
    ("heads", "kv_heads", "w", "max_q"),
    [(14, 2, 32, 128), (14, 2, 8, 128), (4, 4, 32, 128), (8, 2, 32, 16)],
)
def test_flex_equals_a_per_row_reference_in_every_layout(heads, kv_heads, w, max_q):
    """Rows of different lengths (one a whole number of key blocks, one not, one short), GQA
    groups of 7 (folded rows split into 2 heads at w = 32), 1 and 4 (split into 8 heads)."""
    rows, max_len, hd = 3, 300, 16
    fwd = window(rows, w, max_len, [128, 261, 40])
    k, v = cache(rows, max_len, kv_heads, hd)
    g = torch.Generator().manual_seed(1)
    q_all = torch.randn(rows * w, heads, hd, generator=g, dtype=torch.float64)
    flex = Flex(max_q=max_q)
    for name, batch, valid in layouts(rows, w):
        units = batch.index.clamp(max=rows * w - 1)
        q = q_all[units]
        got = flex(q, k, v, batch, fwd)
        assert got.shape == q.shape, name
        want = reference(q, k, v, units, fwd)
        assert torch.allclose(got[valid], want[valid], atol=1e-12), name
        if name == "compacted":
            assert (got[~valid] == 0).all()  # padded slots: the trash row's zeros


def test_flex_equals_dense_where_every_row_sees_the_same_keys():
    """The engine's case: every row's length is the forward's `end`."""
    rows, w, max_len, heads, kv, hd = 4, 32, 200, 14, 2, 16
    fwd = window(rows, w, max_len, [150] * rows)
    k, v = cache(rows, max_len, kv, hd, seed=2)
    q_all = torch.randn(rows * w, heads, hd, dtype=torch.float64)
    for name, batch, valid in layouts(rows, w, seed=3):
        q = q_all[batch.index.clamp(max=rows * w - 1)]
        got, want = Flex()(q, k, v, batch, fwd), Dense()(q, k, v, batch, fwd)
        assert torch.allclose(got[valid], want[valid], atol=1e-12), name


def test_keys_past_a_rows_length_do_not_matter():
    """Whatever the cache holds past a row's keys (other blocks' stale K/V, the trash slot) leaves
    the output as it is. NaN keys, huge values: the CPU runs FlexAttention's reference, which reads
    every key and masks it (a NaN value times a zero weight would still be NaN); on CUDA the blocks
    past the length are not read at all (tests/test_cuda_graphs.py fills them with NaN)."""
    rows, w, max_len, heads, kv, hd = 3, 8, 300, 14, 2, 16
    lengths = [128, 261, 40]
    fwd = window(rows, w, max_len, lengths)
    k, v = cache(rows, max_len, kv, hd, seed=4)
    q = torch.randn(rows * w, heads, hd, dtype=torch.float64)
    batch = UnitBatch(torch.arange(rows * w), None, None, rows * w)
    clean = Flex()(q, k, v, batch, fwd)
    dirty_k, dirty_v = k.clone(), v.clone()
    for r, n in enumerate(lengths):
        dirty_k[r * max_len + n : (r + 1) * max_len] = float("nan")
        dirty_v[r * max_len + n : (r + 1) * max_len] = 1e30
    dirty_k[-1], dirty_v[-1] = float("nan"), 1e30  # the trash slot
    assert torch.equal(Flex()(q, dirty_k, dirty_v, batch, fwd), clean)
    # and the keys before the length do matter (the test can see a change)
    changed = k.clone()
    changed[lengths[0] - 1] += 1.0
    assert not torch.equal(Flex()(q, changed, v, batch, fwd)[:w], clean[:w])


def test_block_mask_takes_the_fewest_key_blocks():
    """A row of length n reads ceil(n / 128) key blocks, 0, 1, 2, ... in order (what the CUDA
    kernel reads, so its cost follows the keys used, not the cache's max_len), and of them sees
    exactly the keys [0, n)."""
    lengths = [0, 1, 127, 128, 129, 300, 511]
    max_len, q_len, B = 520, 112, Flex.KV_BLOCK
    mask = flex_block_mask(torch.tensor(lengths, dtype=torch.int32), q_len, max_len)
    assert mask.seq_lengths == (q_len, max_len) and mask.BLOCK_SIZE == (B, B)
    assert mask.full_kv_num_blocks is None  # every block goes through the mask function
    counts = mask.kv_num_blocks[:, 0, 0].tolist()
    assert counts == [-(-n // B) for n in lengths]
    kv_idx = torch.arange(max_len)
    for r, n in enumerate(lengths):
        blocks = mask.kv_indices[r, 0, 0, : counts[r]].tolist()
        assert blocks == list(range(counts[r]))
        in_blocks = torch.zeros(max_len, dtype=torch.bool)
        for b in blocks:
            in_blocks[b * B : (b + 1) * B] = True
        seen = in_blocks & mask.mask_mod(r, 0, 0, kv_idx)
        assert torch.equal(seen, kv_idx < n), r


def test_flex_window_traces_as_one_graph():
    """What runs under torch.compile on CUDA (the scatter, the block mask built from the device
    lengths, FlexAttention with the decoding kernel's options, the gather) traces as one graph:
    no graph break, no host synchronisation. aot_eager: traced, then run as PyTorch ops."""
    rows, w, max_len, heads, kv, hd = 2, 32, 300, 14, 2, 16
    fwd = window(rows, w, max_len, [200, 77])
    k, v = cache(rows, max_len, kv, hd, seed=5)
    _, batch, valid = layouts(rows, w, seed=6)[2]  # compacted
    q = torch.randn(batch.index.numel(), heads, hd, dtype=torch.float64)
    geo = fwd.geo
    options = {"BACKEND": "TRITON_DECODE", "BLOCK_M": 32, "SPLIT_KV": 4}
    split = heads_split(w * heads // kv, 128)
    args = (q, k, v, batch.index, batch.valid, geo.seqused, None, rows, w, max_len, split, options)
    torch._dynamo.reset()
    traced = torch.compile(flex_window, fullgraph=True, dynamic=False, backend="aot_eager")
    got = traced(*args)
    assert torch.allclose(got, flex_window(*args), atol=1e-12)
    want = reference(q, k, v, batch.index.clamp(max=rows * w - 1), fwd)
    assert torch.allclose(got[valid], want[valid], atol=1e-12)


def test_heads_split():
    assert heads_split(224, 128) == 2  # 7B at w = 32: 32 queries x 7 heads -> 2 heads of 112
    assert heads_split(56, 128) == 1  # w = 8
    assert heads_split(256, 128) == 4  # 128 rows is one too many
    assert heads_split(64, 16) == 8
    assert heads_split(129, 128) == 1  # none divides: one head (FlexAttention's general kernel)


def test_choose_by_name():
    """Flash stays the default on CUDA in fp16/bf16 and packed on the CPU; a name asks for a
    backend; an unknown name, or flash where it cannot run, is a ValueError."""
    cuda = torch.device("cuda")
    assert isinstance(choose(cuda, torch.bfloat16, False), Flash)
    assert isinstance(choose(CPU, torch.float32, False), Packed)
    assert isinstance(choose(CPU, torch.float32, False, name="flex"), Flex)
    assert isinstance(choose(cuda, torch.bfloat16, False, name="flex"), Flex)
    assert isinstance(choose(cuda, torch.bfloat16, False, name="flash"), Flash)
    assert choose(CPU, torch.float32, True, name="dense").eager
    assert set(BACKENDS) == {"flash", "dense", "packed", "flex"}
    assert all(BACKENDS[n].name == n for n in BACKENDS)
    with pytest.raises(ValueError, match="unknown attention backend 'flexx'.*flash, dense"):
        choose(CPU, torch.float32, False, name="flexx")
    with pytest.raises(ValueError, match="flash"):
        choose(CPU, torch.float32, False, name="flash")


def test_kernel_options(monkeypatch):
    """The decoding kernel's options: a query tile of 32 rows (16 at least), key splits for about
    one thread block per multiprocessor, none where the rows could not be split short enough."""
    sms = SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: sms)
    flex = Flex()
    # 7B at batch 1, w = 32: 4 KV heads x 224 rows in 2 heads -> 4 x 7 tiles, 5 splits
    assert flex.kernel_options(CPU, 4, 224, 2) == {
        "BACKEND": "TRITON_DECODE",
        "BLOCK_M": 32,
        "SPLIT_KV": 5,
    }
    assert flex.kernel_options(CPU, 32, 224, 2)["SPLIT_KV"] == 1  # batch 8: 224 tiles
    assert flex.kernel_options(CPU, 4, 8, 1)["BLOCK_M"] == 16
    assert Flex(splits=3, block_m=64).kernel_options(CPU, 4, 56, 1)["SPLIT_KV"] == 3
    assert Flex(block_m=64).kernel_options(CPU, 4, 56, 1)["BLOCK_M"] == 64
    assert flex.kernel_options(CPU, 4, 129, heads_split(129, 128)) is None
