"""Greedy autoregressive decoding and self-speculative decoding (issue 18), both exactly the
greedy decode of the checkpoint run as a causal model (a block of one token).

    python -m v2.generate --model DIR --prompt "2+3?" --decode speculative --threshold 0.5

A Fast-dLLM v2 checkpoint with a block of one token is a causal language model: every position
sees itself and the positions before it. The verifier is a causal engine (engine.py, "Causal
engines"): the full model run that way over its own K/V cache, its prompt through the engine's
prefill, each verify window through the same static window forward as denoising (CUDA graphs on
a GPU), with a valid length per row.

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
current block, the `small_block_size` slots after a row's verified prefix are masked and denoised
by block diffusion's commit rule at the confidence `threshold` (every slot above it, and always the
most confident one, per forward) until filled. Both decodes are `Causal`, a strategy of block
diffusion's block loop (block_loop.py): the draft keeps the engine's exact block-causal prefix
cache; when every row has verified its whole block, the engine's commit forward appends the block
(all verified tokens), and the argmax at its last position drafts the next block's first slot. Rows
work on the same block (blocks are absolute, as in block diffusion); a row that has verified its
block waits for the others at no cost, and rows leave at block ends. The autoregressive decode has
no engine: its one block is the whole layout. Each row's draft depends only on its own tokens (with
no policy; a policy's state may follow the batch's forwards), so a batch gives each row the same
tokens as alone.

Statistics (stats.py): the draft's forwards are the engine's (prefill, denoise, commit); the
verifier's causal forwards are `verify_forwards` (and its prompt prefill a prefill);
`drafted_tokens`, `accepted_tokens`, executed FLOPs of both, wall-clock. The autoregressive decode
counts each of its steps as a verify forward that checked nothing. A verify window has a fixed
size (the draft's run + 1) so that one forward graph serves every round: its slots past a row's
draft, and the rows not verifying, are padding (executed, not in the baseline).
"""

from __future__ import annotations

import torch

from v2.block_loop import Batch, commit_rule, propose
from v2.engine import Engine
from v2.stats import Stats


class Causal:
    """The causal decodes as a strategy of the block loop (v2/block_loop.py): with a draft
    engine, the self-speculative decode (module docstring); with none (`engine` None), the
    autoregressive decode, one verify forward per token over its one block, the whole layout.
    `run`: the draft's run length (small_block_size); `threshold`: its commit rule's."""

    def __init__(
        self,
        verifier: Engine,
        engine: Engine | None,
        batch: Batch,
        run: int,
        threshold: float,
        stop_at_eos: bool,
    ):
        """verifier: a causal engine; its statistics are reset and its cache sized for `batch`,
        with room for a verify window (run + 1 slots) past a row's last position."""
        self.verifier, self.engine = verifier, engine
        self.run, self.threshold, self.stop_at_eos = run, threshold, stop_at_eos
        self.counts = Stats(verifier.cfg.num_hidden_layers)  # drafted and accepted tokens
        verifier.reset_stats()
        verifier.allocate(len(batch.lengths), batch.total + run + 1)

    def prefill(self, batch: Batch) -> None:
        """The verifier's prefill: K/V of every prompt token but the last (the first verify
        window starts with it). A shorter prompt's slots past its length are padding: their
        K/V lie past the row's valid length, overwritten before any query sees them."""
        W = int(batch.known.max()) - 1
        if W > 0:
            self.verifier.prefill(batch.seq[:, :W], last=False)

    def decode_block(self, batch: Batch, start: int, stop: int) -> None:
        """Draft and verify until every active row has verified [start, stop) or finished; a
        row that has waits for the others at no cost."""
        while True:
            active = batch.active
            working = ~batch.done[active] & (batch.known[active] < stop)
            if not bool(working.any()):
                break
            if self.engine is None:
                k = torch.zeros_like(batch.known[active])
            else:
                k = self._draft(batch, start, working)
            work = working.nonzero().squeeze(1)
            self._verify(batch, active[work], k[work])

    def stats(self) -> Stats:
        """The verifier's work, the draft's (the engine's forwards) and the tokens drafted and
        accepted."""
        stats = Stats(self.verifier.cfg.num_hidden_layers)
        stats.add(self.counts)
        stats.add(self.verifier.stats)
        if self.engine is not None:
            stats.add(self.engine.stats)
        return stats

    def _draft(self, batch: Batch, start: int, working: torch.Tensor) -> torch.Tensor:
        """Block-diffusion drafts of the `run` slots after each working row's verified prefix,
        written into batch.seq; returns the drafted run's length per active row (0: none)."""
        B, S, mask = batch.B, self.run, batch.ids.mask
        active, device = batch.active, batch.device
        known = batch.known[active]
        off = known - start  # block offset of the first draft slot, [b]
        room = torch.minimum(B - off, batch.end[active] - known - 1)
        k = torch.where(working, room.clamp(min=0, max=S), 0)
        # The block and S spare columns, so that a run's slots never need clamping.
        ext = torch.full((active.numel(), B + S), mask, dtype=torch.long, device=device)
        ext[:, :B] = batch.seq[active, start : start + B]
        run = torch.arange(S, device=device)
        slot = off.clamp(max=B)[:, None] + run[None]  # [b, S] the run's block slots
        pending = (run[None] < k[:, None]) & (ext.gather(1, slot) == mask)
        # The positions before the run's slots, whose hidden states propose them (token shift).
        lo = max(int(off[working].min()) - 1, 0)
        hi = min(int((off[working] + S).max()) - 1, B)
        while bool(pending.any()):
            self._denoise(ext, slot, pending, lo, hi)
        batch.seq[active, start : start + B] = ext[:, :B]
        return k

    def _denoise(self, ext, slot, pending, lo: int, hi: int) -> None:
        """One denoise forward of the block ext[:, :B] and the commits of the run slots `slot`
        [b, S] still `pending`, proposed by the hidden states at block offsets [lo, hi)."""
        engine, B = self.engine, ext.shape[1] - self.run
        busy = pending.any(1)
        units = None if bool(busy.all()) else busy[:, None].expand(-1, B)
        out_pos = torch.arange(lo, hi, device=ext.device)
        hidden = engine.denoise(ext[:, :B], 0, out_pos, units)
        at = (slot - 1 - lo).clamp(min=0, max=hi - lo - 1)
        h = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))
        tok, conf = propose(engine.logits(h))
        take = commit_rule(pending, conf, self.threshold)
        ext.scatter_(1, slot, torch.where(take, tok, ext.gather(1, slot)))
        pending &= ~take

    def _verify(self, batch: Batch, work: torch.Tensor, k: torch.Tensor) -> None:
        """One verify forward for rows `work` (batch indices), whose drafts are the k[j] tokens
        after their verified prefix in batch.seq: keep the agreeing prefix and the verifier's
        next token, reset the rest to masks, finish rows on EOS or budget."""
        seq, ids, verifier = batch.seq, batch.ids, self.verifier
        n0 = batch.known[work]
        W = self.run + 1  # one window size: one forward graph (module docstring)
        t = torch.arange(W, device=seq.device)
        pos = (n0 - 1)[:, None] + t[None]
        real = t[None] <= k[:, None]
        window = torch.where(real, seq[work].gather(1, pos.clamp(max=batch.total - 1)), ids.pad)
        greedy = verifier.logits(verifier.verify(window, work, n0 - 1, k + 1)).argmax(-1)
        # greedy[j, i] is the token after position n0 + i - 1; draft i sits at window slot i + 1.
        agree = (window[:, 1:] == greedy[:, :-1]) & real[:, 1:]
        accepted = agree.int().cumprod(1).sum(1)
        self.counts.drafted_tokens += int(k.sum())
        self.counts.accepted_tokens += int(accepted.sum())
        n1 = n0 + accepted + 1
        cols = torch.arange(batch.total, device=seq.device)[None]
        rejected = (cols >= n1[:, None]) & (cols < (n0 + k)[:, None])
        row_seq = seq[work].masked_fill(rejected, ids.mask)
        row_seq.scatter_(1, (n1 - 1)[:, None], greedy.gather(1, accepted[:, None]))
        seq[work] = row_seq
        batch.known[work] = n1
        new = (cols >= n0[:, None]) & (cols < n1[:, None])
        eos = (row_seq == ids.eos) & new
        has_eos = eos.any(1) & self.stop_at_eos
        batch.stop_rows(work, has_eos, eos.int().argmax(1), n1 >= batch.end[work])
