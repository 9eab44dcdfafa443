"""One block loop and one commit rule, for every decode (issue 26, item 6).

A batch of prompts of any lengths is laid out in one token matrix (`Batch`): each row's prompt,
then masks up to its budget end (its max_new_tokens, or the model's last position), the whole
rounded up to blocks of B tokens counted from absolute position 0. `run` decodes it:

- prefill: the blocks that every prompt fills enter the engine's prefix cache, and the greedy
  token at their last position opens the next block (a plain autoregressive step);
- per block, the strategy's `decode_block` decides the active rows' tokens of the block and
  finishes rows (EOS or budget spent);
- at the block end the finished rows leave the batch (`Engine.keep_rows`); the others' block
  enters the prefix cache by one clean forward (`Engine.commit`), whose last position opens the
  next block.

The strategies: block diffusion (`Diffusion`, v2/generate.py) and the causal decodes (`Causal`,
v2/speculative.py: block-diffusion drafts checked by a verifier; with no engine, the
autoregressive decode, whose one block is the whole layout).

Every denoise forward, of either, commits by `commit_rule`: every candidate slot whose
confidence is above the threshold, and always the single most confident one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from v2.checkpoint import TokenIds
from v2.engine import Engine
from v2.stats import Stats


@dataclass
class Output:
    token_ids: list[int]
    finish_reason: str  # "eos" or "length"
    text: str = ""


@dataclass
class GenerationResult:
    outputs: list[Output]
    stats: Stats = field(repr=False)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a clock read after it counts it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def propose(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and confidence for each slot: logits [b, s, vocab] -> (tokens, confidence) [b, s];
    greedy at temperature 0 (top_p then plays no part)."""
    if temperature == 0:
        conf, tok = logits.softmax(-1).max(-1)
        return tok, conf
    probs = (logits / temperature).softmax(-1)
    if top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keeps the top token always
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    flat = probs.view(-1, probs.shape[-1])
    tok = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])  # each row its own
    return tok, probs.gather(-1, tok[..., None]).squeeze(-1)


def commit_rule(
    candidates: torch.Tensor, conf: torch.Tensor, threshold: float, per_forward: int | None = None
) -> torch.Tensor:
    """The slots a denoise forward commits, [b, s] bool: every candidate whose confidence is
    above `threshold`, and always the most confident candidate of each row that has one. With
    `per_forward` (a forced schedule, for timing): the `per_forward` most confident candidates of
    each row (all of them if fewer), whatever the threshold."""
    conf = torch.where(candidates, conf, -1.0)
    if per_forward is not None:
        top = conf.topk(min(per_forward, conf.shape[1]), dim=1).indices
        return candidates & torch.zeros_like(candidates).scatter_(1, top, True)
    take = candidates & (conf > threshold)
    best = conf.argmax(1, keepdim=True)
    take.scatter_(1, best, candidates.gather(1, best))
    return take


class Batch:
    """The rows of one decode. Row r: seq[r] (prompt, decided tokens, masks), known[r] (tokens
    decided in order: the prompt, and the verified tokens of a causal decode), end[r] (its budget
    end, exclusive), done[r], and once done final_len[r] and finish[r]. `active`: the rows still
    in the batch (in the engine's cache rows, in order); `t0`: the decode's start (the clock)."""

    def __init__(
        self,
        prompts: list[list[int]],
        ids: TokenIds,
        ends: list[int],
        block_size: int,
        device: torch.device,
    ):
        n = len(prompts)
        self.ids, self.B, self.device = ids, block_size, device
        self.lengths, self.ends = [len(p) for p in prompts], ends
        self.total = -(-max(ends) // block_size) * block_size
        self.seq = torch.full((n, self.total), ids.mask, dtype=torch.long, device=device)
        for r, p in enumerate(prompts):
            self.seq[r, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
        self.known = torch.tensor(self.lengths, device=device)
        self.end = torch.tensor(ends, device=device)
        self.done = torch.zeros(n, dtype=torch.bool, device=device)
        self.final_len, self.finish = list(ends), ["length"] * n
        self.active = torch.arange(n, device=device)
        self.t0 = 0.0

    def open_block(self, position: int, token: torch.Tensor) -> None:
        """The greedy token `token` [active] of the last clean position opens the block at
        `position`, in the active rows that do not know that slot yet."""
        active = self.active
        unknown = self.known[active] <= position
        self.seq[active, position] = torch.where(unknown, token, self.seq[active, position])

    def stop_rows(
        self, rows: torch.Tensor, eos: torch.Tensor, eos_at: torch.Tensor, spent: torch.Tensor
    ) -> None:
        """Rows `rows` (batch indices) are done where they stopped at an EOS (at absolute
        position eos_at: the output is cut after it) or spent their budget."""
        for r, e, at in zip(rows.tolist(), eos.tolist(), eos_at.tolist(), strict=True):
            if e:
                self.final_len[r], self.finish[r] = at + 1, "eos"
        self.done[rows] |= eos | spent

    def leave(self, engine: Engine) -> bool:
        """The done rows leave the batch and the engine's cache rows; False when none is left."""
        keep = (~self.done[self.active]).nonzero().squeeze(1)
        if keep.numel() < self.active.numel():
            engine.keep_rows(keep)
            self.active = self.active[keep]
        return bool(self.active.numel())

    def outputs(self) -> list[Output]:
        return [
            Output(self.seq[r, L : self.final_len[r]].tolist(), self.finish[r])
            for r, L in enumerate(self.lengths)
        ]


class Strategy(Protocol):
    """A decode's work inside the block loop."""

    # the block-diffusion engine (its prefix cache); None: no blocks, the layout is one block
    engine: Engine | None

    def prefill(self, batch: Batch) -> None:
        """Work on the prompts of its own (the engine's prefill is the loop's)."""

    def decode_block(self, batch: Batch, start: int, stop: int) -> None:
        """Decide the active rows' tokens of positions [start, stop) in batch.seq, and mark the
        rows that finish (Batch.stop_rows); every active row not finished must know the block."""

    def stats(self) -> Stats:
        """The decode's statistics (read once, after the last forward)."""


def run(strategy: Strategy, batch: Batch) -> GenerationResult:
    """Decode `batch` block by block with `strategy` (module docstring): outputs, statistics
    (the strategy's, with the wall time since the prefill and the generated tokens)."""
    sync(batch.device)
    batch.t0 = time.perf_counter()
    strategy.prefill(batch)
    if strategy.engine is None:
        strategy.decode_block(batch, 0, batch.total)
    else:
        _blocks(strategy, strategy.engine, batch)
    sync(batch.device)
    stats = strategy.stats()
    stats.wall_seconds = time.perf_counter() - batch.t0
    outputs = batch.outputs()
    stats.generated_tokens = sum(len(o.token_ids) for o in outputs)
    return GenerationResult(outputs, stats)


def _blocks(strategy: Strategy, engine: Engine, batch: Batch) -> None:
    """The block loop proper: prefill, then per block the strategy's work, rows leaving, commit."""
    B = batch.B
    start = (min(batch.lengths) // B) * B
    if start > 0:
        hidden = engine.prefill(batch.seq[:, :start])
        batch.open_block(start, engine.logits(hidden).argmax(-1))
    while True:
        engine.begin_block()
        strategy.decode_block(batch, start, start + B)
        if not batch.leave(engine):
            break
        hidden = engine.commit(batch.seq[batch.active, start : start + B])
        start += B
        batch.open_block(start, engine.logits(hidden).argmax(-1))
