"""Attention of a denoise or commit forward's computed queries over the K/V cache.

During decoding every query of a row sees every key of its row up to `end` (the committed prefix
plus the current block: fast-dllm-v2.md section 2), so no mask is needed beyond a length. The
queries come as a flat list of units (`UnitBatch`: row-major, padded to a static capacity), each
attending to its own row of the cache (kv_cache.py). Three backends compute it:

- `flash` (CUDA, fp16/bf16): FlashAttention's varlen kernel. Row r's queries are
  q[cu_q[r]:cu_q[r+1]], its keys the cache slots [r * max_len, r * max_len + seqused[r]). Only the
  computed queries and the used keys are touched, nothing is padded, nothing needs the host, and
  the key length is a device tensor, so one CUDA graph serves every block.
- `dense` (any device, capturable): the queries are scattered back to their [rows, window]
  places and standard attention runs over every slot and the cache's whole length with a length
  mask. Static, but it computes every query slot and key: used where flash is unavailable (CUDA
  float32, for tests).
- `flex` (any device, capturable; asked for by name: `choose(..., name="flex")`): PyTorch's
  FlexAttention, for a window of few queries over a long cached prefix. Like flash it folds each
  KV head's g query heads into its query rows (split into 2, 4, ... heads of fewer than 128 rows
  each); the keys are the cache's by-row view (no copy) under a block mask built on the device
  from the key lengths, so blocks past a row's length are never read and one CUDA graph serves
  every block. On CUDA it runs under torch.compile, which lowers it to FlexAttention's decoding
  kernel: each row's keys are split over many thread blocks and the partial softmaxes merged, where
  flash runs rows x KV heads x query tiles work items (8 at batch 1, on 132 multiprocessors:
  21 us a layer for 544 keys whose bytes take about 1 us to read; issue 27). Not the default
  until it is measured faster. On the CPU it runs eagerly (FlexAttention's reference: every key
  read, masked), for tests.
- `packed` (reference; synchronises with the host): only the rows that compute something, each
  padded to the widest of them, over keys [0, end). What runs on the CPU, and with the model's
  `eager_attention` (attention spelled out in matmuls so FlopCounterMode counts it).

A backend is called as `backend(q, k, v, batch, fwd)`: the queries (as its `prepare` laid them
out), the layer's K and V (kv_cache.py), the units computed and the forward (forward.py's
`Forward`: its key geometry `geo` and key length `end`). Each backend also says how many (query,
key) pairs it computed, for the FLOP count.

A backend made `causal` serves a causal engine's verify forwards (engine.py, `Engine.verify`):
row r's window holds positions start_r + [0, w), and the query at absolute position p sees the
keys [0, p] of its row. The same three backends compute it: `flash` with the kernel's causal
mask, which it aligns to the end of the row's keys, so it runs whole windows (the engine never
compacts a verify forward) over keys that end with the window (`seqused`), and does not fold the
GQA heads (folding would make query rows of heads); the others with a mask from each unit's
position (`Units.pos`).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch

from v2.compiled import compiled
from v2.kv_cache import by_row, trash_slot
from v2.model import sdpa


@dataclass
class UnitBatch:
    """The units one layer step computes. index [C]: flat unit ids row * w + t, row-major; padded
    slots hold N = rows * w. valid [C] bool (None: every slot is a unit). cu_q [rows + 1] int32:
    row r's units are slots cu_q[r] .. cu_q[r+1] (None: the identity layout, w per row). count:
    the number of valid slots when the host knows it."""

    index: torch.Tensor
    valid: torch.Tensor | None
    cu_q: torch.Tensor | None
    count: int | None


@dataclass
class Geometry:
    """Shapes and device scalars of one forward window: `rows` cache rows of `w` positions each,
    N = rows * w units. `end` [] long: keys visible to every query (prefix + current block);
    `seqused` [rows] int32 the same per row (flash). `dense_cu_q` the identity layout's offsets."""

    rows: int
    w: int
    max_len: int
    end: torch.Tensor
    seqused: torch.Tensor
    dense_cu_q: torch.Tensor
    row_starts: torch.Tensor  # [rows + 1] int32: where each row's keys start (kv_cache.py)
    key_positions: torch.Tensor  # arange(max_len), for the dense backend's mask

    @property
    def N(self) -> int:
        return self.rows * self.w


class Flash:
    """FlashAttention varlen over the cache rows (module docstring), with the GQA heads folded:
    the g query heads that share a KV head become g query rows of that KV head, so a row's 32
    queries x 28 heads are 224 rows x 4 KV heads. The kernel's 128-row tiles are then full (not a
    quarter used) and each KV head's keys are read once, not g times (7B, batch 32: attention
    3.5 -> 1.1 ms per forward on an H200). Splitting the keys into chunks merged by log-sum-exp
    (for batch 1, where 8 tiles cannot fill the GPU) was tried: the kernel's time fell from 0.58
    to 0.24 ms per forward, but the merge's glue kernels cost more than that."""

    name = "flash"
    capturable = True

    def __init__(self, op=None, causal: bool = False):
        # aten's FlashAttention forward (a stand-in with its signature in tests)
        self.op = op or torch.ops.aten._flash_attention_forward
        self.causal = causal

    def prepare(self, q: torch.Tensor, kv_heads: int) -> torch.Tensor:
        """[C, H, hd] -> [C * g, kv, hd]: unit j's head kh * g + i becomes row j * g + i of KV
        head kh. Done where q is made (the compiled half before attention), so that the copy is
        part of the RoPE kernel rather than a kernel of its own. Causal: unfolded."""
        if self.causal:
            return q
        C, H, hd = q.shape
        g = H // kv_heads
        return q.view(C, kv_heads, g, hd).transpose(1, 2).reshape(C * g, kv_heads, hd)

    def __call__(self, qf, k, v, batch: UnitBatch, fwd) -> torch.Tensor:
        """qf: the queries as `prepare` laid them out; fwd: the forward (forward.py)."""
        geo = fwd.geo
        kv, hd = k.shape[1], k.shape[2]
        g = 1 if self.causal else qf.shape[0] // batch.index.shape[0]
        C = qf.shape[0] // g
        cu_q = (batch.cu_q if batch.cu_q is not None else geo.dense_cu_q) * g
        if self.causal and batch.cu_q is not None:
            raise NotImplementedError("a causal forward runs whole windows (never compacted)")
        trash = trash_slot(geo.rows, geo.max_len)
        out = self.op(
            qf,
            k[:trash],
            v[:trash],
            cu_q,
            geo.row_starts,
            geo.w * g,
            geo.max_len,
            0.0,
            self.causal,
            False,
            seqused_k=geo.seqused,
        )[0]
        if self.causal:
            return out
        return out.view(C, g, kv, hd).transpose(1, 2)  # [C, kv, g, hd]: heads in order

    def pairs(self, batch: UnitBatch, geo: Geometry, end: int) -> int:
        """(query, key) pairs computed: every query of the layout over `end` keys."""
        return (geo.N if batch.cu_q is None else batch.count) * end


def window_layout(q, k, v, batch: UnitBatch, rows: int, w: int, max_len: int):
    """The batch's queries [C, H, hd] in their [rows, heads, w, hd] places (zeros elsewhere), and
    the layer's K and V as rows [rows, kv_heads, max_len, hd] (views of the cache)."""
    N, H, hd = rows * w, q.shape[1], q.shape[2]
    to = batch.index if batch.valid is None else torch.where(batch.valid, batch.index, N)
    Q = q.new_zeros(N + 1, H, hd).index_copy_(0, to, q)
    Q = Q[:N].view(rows, w, H, hd).transpose(1, 2)
    K = by_row(k, rows, max_len).transpose(1, 2)
    V = by_row(v, rows, max_len).transpose(1, 2)
    return Q, K, V


def window_units(o: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Outputs [rows, heads, w, hd] back to the units `index` [C, heads, hd] (the trash id:
    zeros)."""
    R, H, w, hd = o.shape
    o = o.transpose(1, 2).reshape(R * w, H, hd)
    return torch.cat((o, o.new_zeros(1, H, hd)))[index]


class Dense:
    name = "dense"
    capturable = True

    @staticmethod
    def prepare(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
        return q

    def __init__(self, eager: bool = False, causal: bool = False):
        self.eager, self.causal = eager, causal

    def __call__(self, q, k, v, batch: UnitBatch, fwd) -> torch.Tensor:
        geo = fwd.geo
        Q, K, V = window_layout(q, k, v, batch, geo.rows, geo.w, geo.max_len)
        if self.causal:
            pos = fwd.units.pos[: geo.N].view(geo.rows, 1, geo.w, 1)
            mask = geo.key_positions.view(1, 1, 1, -1) <= pos
        else:
            mask = (geo.key_positions < geo.end).view(1, 1, 1, -1)
        return window_units(sdpa(Q, K, V, mask, self.eager), batch.index)

    def pairs(self, batch: UnitBatch, geo: Geometry, end: int) -> int:
        return geo.N * geo.max_len


class Packed:
    name = "packed"
    capturable = False

    @staticmethod
    def prepare(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
        return q

    def __init__(self, eager: bool = False, causal: bool = False):
        self.eager, self.causal = eager, causal
        self._last_pairs = 0

    def __call__(self, q, k, v, batch: UnitBatch, fwd) -> torch.Tensor:
        geo, end = fwd.geo, fwd.end
        index = batch.index if batch.valid is None else batch.index[batch.valid]
        rows = index // geo.w
        counts = torch.bincount(rows, minlength=geo.rows)
        first = counts.cumsum(0) - counts
        rank = torch.arange(index.numel(), device=q.device) - first[rows]
        running = counts.nonzero().squeeze(1)
        slot = (torch.cumsum(counts > 0, 0) - 1)[rows]
        a, width = running.numel(), int(counts.max())
        self._last_pairs = a * width * end
        K, V = by_row(k, geo.rows, geo.max_len), by_row(v, geo.rows, geo.max_len)
        if a < geo.rows:
            K, V = K[running], V[running]
        K, V = K[:, :end].transpose(1, 2), V[:, :end].transpose(1, 2)
        H, hd = q.shape[1], q.shape[2]
        padded = q.new_zeros(a, width, H, hd)
        padded[slot, rank] = q[batch.valid] if batch.valid is not None else q
        mask = None
        if self.causal:  # a padded query sees every key (its output is dropped)
            last = torch.full((a, width), end - 1, device=q.device)
            last[slot, rank] = fwd.units.pos[index]
            mask = torch.arange(end, device=q.device).view(1, 1, 1, -1) <= last[:, None, :, None]
        o = sdpa(padded.transpose(1, 2), K, V, mask, self.eager).transpose(1, 2)[slot, rank]
        if batch.valid is None:
            return o
        out = q.new_zeros(q.shape)
        out[batch.valid] = o
        return out

    def pairs(self, batch: UnitBatch, geo: Geometry, end: int) -> int:
        return self._last_pairs


class Flex:
    """FlexAttention over the cache rows (module docstring). The computed queries are scattered to
    their [rows, w] places (as dense does; a compacted layout's padded slots go to the trash row)
    and each KV head's g query heads folded into w * g query rows, split into `split` heads
    (`heads_split`) so that each is shorter than `max_q` rows: FlexAttention's decoding kernel takes
    fewer than 128 query rows and a power-of-two number of query heads per KV head (7B: g = 7).
    Keys: the cache's by-row view [rows, kv, max_len, hd] (strided, not copied); the block mask
    counts ceil(length / 128) key blocks per row (on the device: no host synchronisation) and hides
    keys past the row's length in the last one, or, causal, past each query's position.

    On CUDA the whole call (scatter, block mask, attention, gather) is one torch.compile graph
    with static sizes (compiled.py, never fatal); its kernel options: `backend` (TRITON_DECODE:
    the split-KV kernel, or a compile error that says why not, which runs the call eagerly),
    `block_m` query rows per thread block, `splits` key splits per row (None: about one thread
    block per multiprocessor, from rows x KV heads x query tiles). `compile`: None compiles on
    CUDA only. The defaults are a first guess, not yet measured (issue 27)."""

    name = "flex"
    capturable = True
    KV_BLOCK = 128  # the block mask's key block (FlexAttention's default sparse block size)

    def __init__(
        self,
        causal: bool = False,
        compile: bool | None = None,
        max_q: int = 128,
        block_m: int = 32,
        splits: int | None = None,
        backend: str = "TRITON_DECODE",
    ):
        self.causal, self.compile, self.max_q, self.block_m = causal, compile, max_q, block_m
        self.splits, self.backend = splits, backend

    @staticmethod
    def prepare(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
        return q

    def __call__(self, q, k, v, batch: UnitBatch, fwd) -> torch.Tensor:
        geo = fwd.geo
        H, kv = q.shape[1], k.shape[1]
        rows_per_kv = geo.w * (H // kv)
        split = heads_split(rows_per_kv, self.max_q)
        options = None
        if q.is_cuda:
            options = self.kernel_options(q.device, geo.rows * kv, rows_per_kv, split)
        pos = fwd.units.pos[: geo.N].view(geo.rows, geo.w) if self.causal else None
        args = (q, k, v, batch.index, batch.valid, geo.seqused, pos, geo.rows, geo.w, geo.max_len)
        if self.compile if self.compile is not None else q.is_cuda:
            return compiled(flex_window, dynamic=False)(*args, split, options)
        with warnings.catch_warnings():  # "called without torch.compile": meant, off CUDA
            warnings.simplefilter("ignore", UserWarning)
            return flex_window(*args, split, options)

    def kernel_options(self, device, heads: int, rows_per_kv: int, split: int) -> dict | None:
        """The decoding kernel's options (CUDA) for `heads` (rows x KV heads) of `rows_per_kv`
        folded query rows in `split` heads: its query tile, and key splits for about one thread
        block per multiprocessor. None (FlexAttention's own choice: its general kernel) where the
        rows could not be split into heads short enough for the decoding kernel."""
        if rows_per_kv // split >= min(self.max_q, 128):
            return None
        block_m = min(self.block_m, max(16, 1 << (rows_per_kv - 1).bit_length()))
        splits = self.splits
        if splits is None:
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            tiles = heads * -(-rows_per_kv // block_m)
            splits = max(1, -(-sms // tiles))
        return {"BACKEND": self.backend, "BLOCK_M": block_m, "SPLIT_KV": splits}

    def pairs(self, batch: UnitBatch, geo: Geometry, end: int) -> int:
        """Every query slot of the [rows, w] layout over `end` keys."""
        return geo.N * end


def heads_split(rows: int, max_q: int) -> int:
    """The fewest query heads (a power of two dividing `rows`) that a KV head's `rows` folded query
    rows split into so that each has fewer than `max_q` rows; 1 where none does (FlexAttention
    then picks its general kernel)."""
    split = 1
    while rows // split >= max_q and rows % (2 * split) == 0:
        split *= 2
    return split if rows // split < max_q else 1


def flex_block_mask(
    length: torch.Tensor, q_len: int, max_len: int, pos=None, split: int = 1, g: int = 1
):
    """The block mask of rows whose keys are [0, length[r]) (length [rows] int32, on the device)
    for q_len queries over a key buffer of max_len: ceil(length / 128) key blocks per row (their
    indices static), a mask function for the tail of the last one. Causal (`pos` [rows, w]: each
    window slot's position): query row q_idx of head h (split s = h % split of a KV head's w * g
    folded rows, unit-major) is slot (s * q_len + q_idx) // g and sees the keys up to its
    position. No host synchronisation."""
    from torch.nn.attention.flex_attention import BlockMask

    rows, block = length.shape[0], Flex.KV_BLOCK
    q_blocks, blocks = -(-q_len // block), -(-max_len // block)
    count = ((length + block - 1) // block).to(torch.int32).view(rows, 1, 1)
    count = count.expand(rows, 1, q_blocks)
    indices = torch.arange(blocks, dtype=torch.int32, device=length.device)
    indices = indices.expand(rows, 1, q_blocks, blocks)

    if pos is None:

        def visible(b, h, q_idx, kv_idx):
            return kv_idx < length[b]

    else:

        def visible(b, h, q_idx, kv_idx):
            return kv_idx <= pos[b, ((h % split) * q_len + q_idx) // g]

    return BlockMask.from_kv_blocks(
        count,
        indices,
        BLOCK_SIZE=block,
        mask_mod=visible,
        seq_lengths=(q_len, max_len),
        compute_q_blocks=False,
    )


def flex_window(
    q, k, v, index, valid, length, pos, rows: int, w: int, max_len: int, split: int, options
):
    """Flex's attention (one graph under torch.compile): q [C, H, hd] of the units `index` (`valid`:
    which slots are units, None: all); k, v a layer's cache [slots + 1, kv, hd]; length [rows]
    int32 each row's keys; pos [rows, w] each slot's position (causal; None: not). Returns
    [C, H, hd] (zeros for padded slots)."""
    from torch.nn.attention.flex_attention import flex_attention

    H, hd, kv = q.shape[1], q.shape[2], k.shape[1]
    g = H // kv
    Q, K, V = window_layout(q, k, v, UnitBatch(index, valid, None, None), rows, w, max_len)
    # [rows, kv, g, w, hd] -> KV head kh's rows t * g + i, as `split` heads of w * g / split rows
    Q = Q.view(rows, kv, g, w, hd).transpose(2, 3).reshape(rows, kv * split, -1, hd)
    mask = flex_block_mask(length, Q.shape[2], max_len, pos, split, g)
    o = flex_attention(Q, K, V, block_mask=mask, enable_gqa=True, kernel_options=options)
    o = o.reshape(rows, kv, w, g, hd).transpose(2, 3).reshape(rows, H, w, hd)
    return window_units(o, index)


BACKENDS = {"flash": Flash, "dense": Dense, "packed": Packed, "flex": Flex}


def choose(
    device: torch.device,
    dtype: torch.dtype,
    eager_attention: bool,
    causal: bool = False,
    name: str | None = None,
):
    """The backend for a model on `device` in `dtype` (module docstring); `causal`: for a
    causal engine's verify forwards; `name`: one of BACKENDS instead of the default."""
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}: one of {', '.join(BACKENDS)}")
        if name == "flash" and (device.type != "cuda" or dtype not in HALF):
            raise ValueError("attention 'flash' needs a CUDA device and float16 / bfloat16")
        if name in ("dense", "packed"):
            return BACKENDS[name](eager_attention, causal)
        return BACKENDS[name](causal=causal)
    if eager_attention or device.type != "cuda":
        return Packed(eager_attention, causal)
    if dtype in HALF:
        return Flash(causal=causal)
    return Dense(causal=causal)


HALF = (torch.float16, torch.bfloat16)


def causal_copy(backend):
    """The same backend, made causal (module docstring): a causal engine's, next to the one
    its block-diffusion engine was given."""
    made = copy.copy(backend)
    made.causal = True
    return made
