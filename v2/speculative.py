"""Greedy autoregressive decoding and self-speculative decoding (issue 18), both exactly the
greedy decode of the checkpoint run as a causal model (a block of one token).

    python -m v2.generate --model DIR --prompt "2+3?" --decode speculative --threshold 0.5

A Fast-dLLM v2 checkpoint with a block of one token is a causal language model: every position
sees itself and the positions before it. `Verifier` runs the full model that way over its own K/V
cache (kv_cache.py; one write path, a valid length per row).

- `decode="autoregressive"`: one causal forward per token (the reference).
- `decode="speculative"`: a draft proposes a run of tokens after each row's verified prefix, and
  one causal forward of the full model over [last verified token, draft...] gives the greedy
  token after every position of the run. The longest prefix of the draft that agrees with those
  tokens is kept, plus the verifier's own token after it (so every verify forward yields at least
  one token). Only verified tokens enter the output: it is the autoregressive decode, token for
  token, whatever the draft. The verifier's K/V of the kept positions stay in its cache (they
  were computed from exactly those tokens); those of rejected positions lie past the row's valid
  length and are overwritten by the next verify forward before any query can see them.

The draft is the checkpoint's own block diffusion (fast-dllm-v2.md section 4) through the engine
(engine.py), with any registered skipping policy (policies.py) on its denoise forwards: in the
current block, the `small_block_size` slots after a row's verified prefix are masked and
denoised at the confidence `threshold` (every slot above it, and always the most confident one,
per forward) until filled. The draft keeps its own exact block-causal prefix cache: when every
row has verified its whole block, the engine's commit forward appends the block (all verified
tokens), and the argmax at its last position drafts the next block's first slot. Rows work on the
same block (blocks are absolute, as in block diffusion); a row that has verified its block waits
for the others at no cost, and rows leave at block ends. Each row's draft depends only on its own
tokens (with no policy; a policy's state may follow the batch's forwards), so a batch gives each
row the same tokens as alone.

Statistics (stats.py): the draft's forwards are the engine's (prefill, denoise, commit); the
verifier's causal forwards are `verify_forwards` (and its prompt prefill a prefill);
`drafted_tokens`, `accepted_tokens`, executed FLOPs of both, wall-clock. The autoregressive decode
counts each of its steps as a verify forward that checked nothing.
"""

from __future__ import annotations

import time

import torch

from v2 import flops
from v2.checkpoint import TokenIds
from v2.engine import Engine
from v2.generate import (
    DECODES,
    GenerationConfig,
    GenerationError,
    GenerationResult,
    Output,
    check_prompts,
    engine_for,
    sync,
)
from v2.kv_cache import KVCache
from v2.model import Network, sdpa
from v2.policy import Policy
from v2.stats import Stats


class Verifier:
    """The full model as a causal LM over its own K/V cache; counts its work into `stats`."""

    def __init__(self, model: Network, rows: int, max_len: int, stats: Stats):
        w = model.embed_tokens.weight
        self.model, self.cfg, self.stats = model, model.cfg, stats
        self.cache = KVCache(model.cfg, rows, max_len, w.dtype, w.device)

    @torch.inference_mode()
    def forward(
        self, ids: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor, widths: torch.Tensor
    ) -> torch.Tensor:
        """Causal forward of windows ids [b, W] of cache rows `rows` [b]: row j's window starts
        at absolute position starts[j], whose cache holds exact K/V of [0, starts[j]); its first
        widths[j] slots are tokens, the rest padding (K/V to the trash slot, outputs garbage).
        Writes the window's K/V; returns the hidden states [b, W, hidden]."""
        b, W = ids.shape
        cfg, cache = self.cfg, self.cache
        t = torch.arange(W, device=ids.device)
        pos = starts[:, None] + t[None]  # [b, W] absolute positions
        real = t[None] < widths[:, None]
        slots = torch.where(real, cache.slots(rows[:, None], pos), cache.trash).view(-1)
        keys = int((starts + widths).max())
        visible = torch.arange(keys, device=ids.device)[None, None] <= pos[:, :, None]
        mask = visible[:, None]  # [b, 1, W, keys]: key position <= query position
        all_rows = b == cache.rows and bool((rows == torch.arange(b, device=rows.device)).all())
        x = self.model.embed_tokens(ids)
        cos, sin = self.model.rope(pos.clamp(max=cfg.max_position_embeddings - 1))
        eager = self.model.eager_attention
        kv = cfg.num_key_value_heads, cfg.head_dim
        for i, layer in enumerate(self.model.layers):

            def attend(q, k, v, i=i):
                cache.write(i, slots, k.reshape(-1, *kv), v.reshape(-1, *kv))
                K, V = cache.by_row("k")[i, :, :keys], cache.by_row("v")[i, :, :keys]
                if not all_rows:
                    K, V = K[rows], V[rows]
                o = sdpa(q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2), mask, eager)
                return o.transpose(1, 2)

            x = layer(x, cos, sin, attend)
        st, L = self.stats, cfg.num_hidden_layers
        for i in range(L):
            st.executed_units_per_layer[i] += b * W
            st.baseline_units_per_layer[i] += b * W
        # every query's scores over `keys` keys, masked (causal, other rows' lengths) or not
        work = flops.work(cfg, rows=L * b * W, pairs=L * b * W * keys)
        st.executed_flops += work
        st.baseline_flops += work
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        b, W = hidden.shape[:2]
        work = flops.work(self.cfg, logit_rows=b * W)
        self.stats.executed_flops += work
        self.stats.baseline_flops += work
        return self.model.logits(hidden)


def check(cfg: GenerationConfig, policy: Policy | None) -> None:
    """The decode's name, and settings the causal decodes cannot honour, as one-line errors."""
    if cfg.decode not in DECODES:
        raise GenerationError(f"decode must be one of {', '.join(DECODES)}, got {cfg.decode!r}")
    if cfg.decode == "diffusion":
        return
    if cfg.temperature != 0:
        raise GenerationError(f"decode={cfg.decode} is greedy: temperature must be 0")
    if cfg.use_block_cache:
        raise GenerationError(f"decode={cfg.decode} does not support use_block_cache")
    if cfg.decode == "autoregressive" and policy is not None:
        raise GenerationError(
            "decode=autoregressive runs the full model: a policy applies only to the draft of "
            "decode=speculative"
        )


class _Rows:
    """Per-row decoding state: tokens (verified, then drafts, then masks), verified length,
    budget end, finish."""

    def __init__(
        self,
        prompts: list[list[int]],
        ids: TokenIds,
        cfg: GenerationConfig,
        B: int,
        max_pos: int,
        device: torch.device,
    ):
        self.ids, self.cfg = ids, cfg
        self.lengths = lengths = [len(p) for p in prompts]
        self.ends = [min(L + cfg.max_new_tokens, max_pos) for L in lengths]  # exclusive
        self.total = -(-max(self.ends) // B) * B
        n = len(prompts)
        self.seq = torch.full((n, self.total), ids.mask, dtype=torch.long, device=device)
        for r, p in enumerate(prompts):
            self.seq[r, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
        self.known = torch.tensor(lengths, device=device)  # verified tokens per row
        self.end = torch.tensor(self.ends, device=device)
        self.done = torch.zeros(n, dtype=torch.bool, device=device)
        self.final_len = list(self.ends)
        self.finish = ["length"] * n


@torch.inference_mode()
def decode(
    model: Network,
    prompts: list[list[int]],
    ids: TokenIds,
    config: GenerationConfig,
    policy: Policy | None = None,
    engine: Engine | None = None,
) -> GenerationResult:
    """`config.decode` "autoregressive" or "speculative" (module docstring); called by
    v2.generate.generate. `engine`: the draft's engine (default: the model's engine for these
    settings, with `policy` on its denoise forwards)."""
    cfg = config
    B = cfg.block_size or model.cfg.block_size
    cfg.validate(B)
    check(cfg, policy)
    max_pos = check_prompts(model, prompts)
    device = model.embed_tokens.weight.device
    rows = _Rows(prompts, ids, cfg, B, max_pos, device)
    n = len(prompts)
    speculative = cfg.decode == "speculative"
    if speculative:
        if engine is None:
            engine = engine_for(model, cfg, policy)  # no sub-block cache for drafts
        elif engine.B != B or engine.block_cache:
            raise GenerationError("the draft engine's block size / sub-block cache differ")
        if engine.policy is not None:
            engine.policy.attach(model, ids)
        engine.reset_stats()
        engine.allocate(n, rows.total)
    stats = Stats(model.cfg.num_hidden_layers)
    verifier = Verifier(model, n, rows.total, stats)

    sync(device)
    t0 = time.perf_counter()
    # The verifier's prefill: K/V of every prompt token but the last (the first verify window
    # starts with it).
    known = rows.known
    width = known - 1
    if int(width.max()) > 0:
        W = int(width.max())
        stats.forwards["prefill"] += 1
        stats.row_forwards["prefill"] += n
        all_rows = torch.arange(n, device=device)
        verifier.forward(rows.seq[:, :W], all_rows, torch.zeros_like(known), width)
    if speculative:
        _speculate(engine, verifier, rows, B, cfg.small_block_size, cfg.threshold)
    else:
        while not bool(rows.done.all()):
            work = (~rows.done).nonzero().squeeze(1)
            _verify(verifier, rows, work, torch.zeros_like(work))
    sync(device)

    if speculative:
        stats.add(engine.stats)
    stats.wall_seconds = time.perf_counter() - t0
    outputs = [
        Output(rows.seq[r, rows.lengths[r] : rows.final_len[r]].tolist(), rows.finish[r])
        for r in range(n)
    ]
    stats.generated_tokens = sum(len(o.token_ids) for o in outputs)
    return GenerationResult(outputs, stats)


def _verify(verifier: Verifier, rows: _Rows, work: torch.Tensor, k: torch.Tensor) -> None:
    """One verify forward for rows `work` (indices into the batch), whose drafts are the k[j]
    tokens after their verified prefix in rows.seq: keep the agreeing prefix and the verifier's
    next token, reset the rest to masks, finish rows on EOS or budget."""
    seq, ids = rows.seq, rows.ids
    n0 = rows.known[work]
    W = int(k.max()) + 1
    t = torch.arange(W, device=seq.device)
    pos = (n0 - 1)[:, None] + t[None]
    real = t[None] <= k[:, None]
    window = torch.where(real, seq[work].gather(1, pos.clamp(max=rows.total - 1)), ids.pad)
    st = verifier.stats
    st.verify_forwards += 1
    st.verify_row_forwards += work.numel()
    greedy = verifier.logits(verifier.forward(window, work, n0 - 1, k + 1)).argmax(-1)
    # greedy[j, i] is the token after position n0 + i - 1; draft i sits at window slot i + 1.
    agree = (window[:, 1:] == greedy[:, :-1]) & real[:, 1:]
    accepted = agree.int().cumprod(1).sum(1)
    st.drafted_tokens += int(k.sum())
    st.accepted_tokens += int(accepted.sum())
    n1 = n0 + accepted + 1
    cols = torch.arange(rows.total, device=seq.device)[None]
    rejected = (cols >= n1[:, None]) & (cols < (n0 + k)[:, None])
    row_seq = seq[work].masked_fill(rejected, ids.mask)
    row_seq.scatter_(1, (n1 - 1)[:, None], greedy.gather(1, accepted[:, None]))
    seq[work] = row_seq
    rows.known[work] = n1
    new = (cols >= n0[:, None]) & (cols < n1[:, None])
    eos = (row_seq == ids.eos) & new
    has_eos = eos.any(1) & (not rows.cfg.ignore_eos)
    first = eos.int().argmax(1)
    out = n1 >= rows.end[work]
    for r, e, f, o in zip(
        work.tolist(), has_eos.tolist(), first.tolist(), out.tolist(), strict=True
    ):
        if e:
            rows.final_len[r], rows.finish[r] = f + 1, "eos"
        if e or o:
            rows.done[r] = True


def _speculate(engine: Engine, verifier: Verifier, rows: _Rows, B: int, S: int, tau: float):
    """Block-diffusion drafts (module docstring) checked by `verifier`, block by block."""
    seq, ids, device = rows.seq, rows.ids, rows.seq.device
    n = seq.shape[0]
    active = torch.arange(n, device=device)  # batch rows in the engine's cache rows, in order
    start = (min(rows.lengths) // B) * B
    if start > 0:
        hidden = engine.prefill(seq[:, :start])
        _draft_first_slot(rows, active, start, engine.logits(hidden).argmax(-1))
    run = torch.arange(S, device=device)
    while True:
        engine.begin_block()
        while True:
            # Rows still working on this block: not finished, block not fully verified.
            known = rows.known[active]
            working = ~rows.done[active] & (known < start + B)
            if not bool(working.any()):
                break
            off = known - start  # block offset of the first draft slot, [b]
            room = torch.minimum(B - off, rows.end[active] - known - 1)
            k = torch.where(working, room.clamp(min=0, max=S), 0)
            # The block and S spare columns, so that a run's slots never need clamping.
            ext = torch.full((active.numel(), B + S), ids.mask, dtype=torch.long, device=device)
            ext[:, :B] = seq[active, start : start + B]
            slot = off.clamp(max=B)[:, None] + run[None]  # [b, S] the run's block slots
            pending = (run[None] < k[:, None]) & (ext.gather(1, slot) == ids.mask)
            while bool(pending.any()):
                busy = pending.any(1)
                units = None if bool(busy.all()) else busy[:, None].expand(-1, B)
                # Hidden states at the positions before the run's slots (token shift).
                lo = max(int(off[working].min()) - 1, 0)
                hi = min(int((off[working] + S).max()) - 1, B)
                hidden = engine.denoise(ext[:, :B], 0, torch.arange(lo, hi, device=device), units)
                at = (slot - 1 - lo).clamp(min=0, max=hi - lo - 1)
                h = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))
                conf, tok = engine.logits(h).softmax(-1).max(-1)
                conf = torch.where(pending, conf, -1.0)
                take = pending & (conf > tau)
                best = conf.argmax(1, keepdim=True)
                take.scatter_(1, best, pending.gather(1, best))
                ext.scatter_(1, slot, torch.where(take, tok, ext.gather(1, slot)))
                pending &= ~take
            block = ext[:, :B]
            seq[active, start : start + B] = block
            work = working.nonzero().squeeze(1)
            _verify(verifier, rows, active[work], k[work])

        # Block end: finished rows leave; the others' verified block enters the draft's cache.
        keep = (~rows.done[active]).nonzero().squeeze(1)
        if keep.numel() < active.numel():
            engine.keep_rows(keep)
            active = active[keep]
        if not active.numel():
            break
        hidden = engine.commit(seq[active, start : start + B])
        start += B
        _draft_first_slot(rows, active, start, engine.logits(hidden).argmax(-1))


def _draft_first_slot(rows: _Rows, active: torch.Tensor, position: int, token) -> None:
    """The draft's greedy token after a committed block drafts the next block's first slot, in
    rows that have not verified that slot yet."""
    unknown = rows.known[active] == position
    rows.seq[active, position] = torch.where(unknown, token, rows.seq[active, position])
