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
- `flex` (any device, capturable; CUDA: compiled): PyTorch's FlexAttention over the same
  [rows, window] places as `dense`, with a block mask built on the device from each row's key
  length, so that only the key blocks in use are read. Compiled, FlexAttention runs few queries
  over a long prefix as flash decoding (the keys split over the multiprocessors, the parts merged
  in the same kernel), which FlashAttention's varlen kernel does not (at batch 1 it runs 8 work
  items per layer on 132 multiprocessors). Chosen by name (`choose(..., name="flex")`, the
  bench's attention rows), not by default until it is measured faster. On the CPU it runs
  FlexAttention's eager reference (tests).
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


def window_layout(q, k, v, batch: UnitBatch, geo: Geometry):
    """The batch's queries [C, H, hd] in their [rows, heads, w, hd] places (zeros elsewhere), and
    the layer's K and V as rows [rows, kv_heads, max_len, hd] (views of the cache)."""
    R, w, N, H, hd = geo.rows, geo.w, geo.N, q.shape[1], q.shape[2]
    to = batch.index if batch.valid is None else torch.where(batch.valid, batch.index, N)
    Q = q.new_zeros(N + 1, H, hd).index_copy_(0, to, q)
    Q = Q[:N].view(R, w, H, hd).transpose(1, 2)
    K = by_row(k, R, geo.max_len).transpose(1, 2)
    V = by_row(v, R, geo.max_len).transpose(1, 2)
    return Q, K, V


def window_units(o: torch.Tensor, batch: UnitBatch) -> torch.Tensor:
    """Outputs [rows, heads, w, hd] back to the batch's units [C, heads, hd] (padded: zeros)."""
    R, H, w, hd = o.shape
    o = o.transpose(1, 2).reshape(R * w, H, hd)
    return torch.cat((o, o.new_zeros(1, H, hd)))[batch.index]


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
        Q, K, V = window_layout(q, k, v, batch, geo)
        if self.causal:
            pos = fwd.units.pos[: geo.N].view(geo.rows, 1, geo.w, 1)
            mask = geo.key_positions.view(1, 1, 1, -1) <= pos
        else:
            mask = (geo.key_positions < geo.end).view(1, 1, 1, -1)
        return window_units(sdpa(Q, K, V, mask, self.eager), batch)

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
    """FlexAttention over the cache rows (module docstring). The block mask is made once per
    window geometry (attention.Geometry: its buffers live as long as the window) over static
    buffers (the key blocks each row uses, refreshed on the device by every
    call; the mask function reads the rows' key lengths, or each query's position when causal),
    so the compiled call sees the same mask object every time and a CUDA graph replays it."""

    name = "flex"
    capturable = True
    KV_BLOCK = 128  # FlexAttention's key block (its default sparse block size)

    def __init__(self, causal: bool = False):
        self.causal = causal
        self._masks: dict[int, tuple] = {}  # id(geometry) -> (geometry, mask, blocks used)

    @staticmethod
    def prepare(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
        return q

    def _block_mask(self, geo: Geometry, pos: torch.Tensor):
        from torch.nn.attention.flex_attention import BlockMask

        made = self._masks.get(id(geo))
        if made is None or made[0] is not geo:
            R, n = geo.rows, -(-geo.max_len // self.KV_BLOCK)
            used = torch.zeros(R, 1, 1, dtype=torch.int32, device=geo.seqused.device)
            order = torch.arange(n, dtype=torch.int32, device=used.device)
            indices = order.view(1, 1, 1, n).expand(R, 1, 1, n).contiguous()
            seqused, w = geo.seqused, geo.w
            if self.causal:
                positions = pos[: R * w].view(R, w)

                def visible(b, h, q_idx, kv_idx):
                    return kv_idx <= positions[b, q_idx]
            else:

                def visible(b, h, q_idx, kv_idx):
                    return kv_idx < seqused[b]

            mask = BlockMask.from_kv_blocks(
                used,
                indices,
                BLOCK_SIZE=self.KV_BLOCK,  # a window (w <= 128) is one query block
                mask_mod=visible,
                seq_lengths=(w, geo.max_len),
                compute_q_blocks=False,
            )
            self._masks[id(geo)] = made = (geo, mask, used)
        _, mask, used = made
        # the key blocks each row reads: those below its key length (in place: graphs replay it)
        used.copy_(((geo.seqused + self.KV_BLOCK - 1) // self.KV_BLOCK).view_as(used))
        return mask

    def __call__(self, q, k, v, batch: UnitBatch, fwd) -> torch.Tensor:
        Q, K, V = window_layout(q, k, v, batch, fwd.geo)
        mask = self._block_mask(fwd.geo, fwd.units.pos)
        attend = compiled(flex) if q.is_cuda else flex
        return window_units(attend(Q, K, V, mask), batch)

    def pairs(self, batch: UnitBatch, geo: Geometry, end: int) -> int:
        """Every query slot of every row over the key blocks in use (up to `end`, rounded up to
        whole blocks; the longest row's, counted for every row)."""
        return geo.N * min(-(-end // self.KV_BLOCK) * self.KV_BLOCK, geo.max_len)


def flex(q, k, v, block_mask) -> torch.Tensor:
    """FlexAttention with grouped KV heads (what `Flex` compiles on CUDA)."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)


BACKENDS = {"flash": Flash, "flex": Flex, "dense": Dense, "packed": Packed}


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
            raise ValueError(f"attention must be one of {', '.join(BACKENDS)}, got {name!r}")
        if name == "flash" and (device.type != "cuda" or dtype not in HALF):
            raise ValueError("attention 'flash' needs a CUDA device and float16 / bfloat16")
        if name == "packed":
            return Packed(eager_attention, causal)
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
