"""Fast-dLLM v2 block-diffusion decoding (design: fast-dllm-v2.md sections 4-6), and its command:

    python -m v2.generate --model DIR --prompt "What is 2+3?" --chat --threshold 0.9 --json

Blocks of B tokens are counted from absolute position 0. Each block is filled with mask tokens
and decoded sub-block by sub-block: a denoise forward proposes a token and a confidence for every
masked slot of the current sub-block; every slot above the threshold is committed, and always the
single most confident one. A full block is committed into the prefix cache by one clean forward,
whose last position gives the next block's first token.

The block loop (layout, prefill, rows leaving at block ends, commit forward, outputs) and the
commit rule are v2/block_loop.py's; this module's `Diffusion` is the per-block work.
`--decode autoregressive` and `--decode speculative` decode the same checkpoint as a causal model
instead (a block of one token), the latter with block-diffusion drafts: `Causal`, the other
strategy of the loop (v2/speculative.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from v2.block_loop import Batch, GenerationResult, commit_rule, propose, run, sync
from v2.checkpoint import CheckpointError, TokenIds, device_arg, load_model, load_tokenizer
from v2.engine import Engine
from v2.model import Network
from v2.observer import NOT_RUN, DenoiseStep, Observer
from v2.policy import Policy
from v2.speculative import Causal
from v2.stats import Stats

# diffusion: block diffusion (this module); autoregressive, speculative: v2/speculative.py
DECODES = ("diffusion", "autoregressive", "speculative")


class GenerationError(ValueError):
    """Bad input to generation; the message is one line meant for the user."""


def _setting(default, help: str, flag: bool = True):
    """A generation setting: its default and its help, declared once; the command-line flags
    (add_generation_arguments), lm_eval's model_args (v2/lm_adapter.py) and the recorded config
    are derived from these fields."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass
class GenerationConfig:
    max_new_tokens: int = _setting(256, "tokens to generate at most per prompt")
    threshold: float = _setting(
        0.9, "decoding confidence threshold: commit every slot above it (>= 1: one per forward)"
    )
    block_size: int | None = _setting(None, "block size (default: the checkpoint's bd_size)")
    small_block_size: int = _setting(8, "sub-block size; divides the block size")
    use_block_cache: bool = _setting(False, "sub-block cache mode (window = the sub-block)")
    temperature: float = _setting(0.0, "sampling temperature (0: greedy)")
    top_p: float = _setting(1.0, "nucleus sampling mass")
    seed: int | None = _setting(None, "sampling seed")
    ignore_eos: bool = _setting(False, "decode past EOS up to max_new_tokens")
    commit_per_forward: int | None = _setting(
        None,
        "commit exactly this many slots per denoise forward (the most confident), whatever the "
        "threshold: a forced schedule, for timing (none: the threshold rule)",
    )
    # None: on when the model is on a GPU (v2/engine.py)
    cuda_graphs: bool | None = _setting(None, "CUDA graphs", flag=False)
    decode: str = _setting(
        "diffusion",
        "diffusion; speculative: block-diffusion drafts (at --threshold, runs of "
        "--small-block-size, --policy applies to them) verified by the causal model; "
        "autoregressive: its reference",
    )  # one of DECODES

    def validate(self, block_size: int) -> None:
        if self.decode not in DECODES:
            raise GenerationError(
                f"decode must be one of {', '.join(DECODES)}, got {self.decode!r}"
            )
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.threshold > 0:
            raise GenerationError(
                f"threshold must be > 0 (>= 1: one token per forward), got {self.threshold}"
            )
        if self.block_size is not None and self.block_size < 2:  # 0 is not "the checkpoint's"
            raise GenerationError(f"block size must be >= 2, got {self.block_size}")
        if block_size < 2:
            raise GenerationError(f"block size must be >= 2, got {block_size}")
        s = self.small_block_size
        if s < 1 or block_size % s:
            raise GenerationError(
                f"small_block_size {s} must be >= 1 and divide the block size {block_size}"
            )
        k = self.commit_per_forward
        if k is not None and (k < 1 or self.decode != "diffusion"):
            raise GenerationError(
                f"commit_per_forward must be >= 1 and needs decode=diffusion, got {k} with "
                f"decode={self.decode}"
            )
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")


def engine_for(
    model: Network,
    config: GenerationConfig | None = None,
    policy: Policy | None = None,
    own: bool = False,
) -> Engine | None:
    """The engine a decode with these settings runs on: the model's (Engine.for_model: kept on
    the model between calls with the same settings, the policy's included; what `generate` uses
    when given none), or with `own` a new one that nothing else uses (a caller that interleaves
    configurations keeps one per configuration, so that each keeps its graphs). For
    decode="speculative", the draft's engine (its `verifier` is the causal engine the decode
    verifies on); for decode="autoregressive", a causal engine (engine.py). What a warm-up
    watches (Engine.setups, v2.bench.timing.settle)."""
    cfg = config or GenerationConfig()
    if cfg.decode == "autoregressive":
        if own:
            return Engine(model, cuda_graphs=cfg.cuda_graphs, causal=True)
        return Engine.for_model(model, None, 1, False, cfg.cuda_graphs, causal=True)
    B = cfg.block_size or model.cfg.block_size
    block_cache = cfg.use_block_cache and cfg.decode == "diffusion"  # speculative drafts: none
    if own:
        return Engine(model, policy, B, block_cache, cfg.cuda_graphs)
    return Engine.for_model(model, policy, B, block_cache, cfg.cuda_graphs)


def check_prompts(model: Network, prompts: list[list[int]]) -> int:
    """Prompts a decode can take, as one-line errors; returns the model's position limit."""
    if not prompts:
        raise GenerationError("no prompts given")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise GenerationError("empty prompt (0 tokens)")
    max_pos = model.cfg.max_position_embeddings
    if max(lengths) >= max_pos:
        raise GenerationError(
            f"prompt of {max(lengths)} tokens does not fit the model's {max_pos} positions"
        )
    return max_pos


def check_decode(cfg: GenerationConfig, policy: Policy | None) -> None:
    """Settings the causal decodes (v2/speculative.py) cannot honour, as one-line errors."""
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


@torch.inference_mode()
def generate(
    model: Network,
    prompts: list[list[int]],
    ids: TokenIds,
    config: GenerationConfig | None = None,
    policy: Policy | None = None,
    engine: Engine | None = None,
    observer: Observer | None = None,
) -> GenerationResult:
    """Decode a batch of tokenised prompts of any lengths. Rows finish on their own (EOS or their
    own max_new_tokens) and leave the batch at block ends. `engine`: one built by the caller (its
    policy, not `policy`, is used); by default the model's engine for these settings.
    `observer` (v2/observer.py): shown every denoise forward, its layers as they run and a
    DenoiseStep once its tokens are committed (it reads the engine's plans and statistics:
    synchronisations); an exception it raises stops the generation. None: no cost.
    config.decode picks the strategy of the block loop (v2/block_loop.py): `Diffusion` below, or
    the causal decodes' `Causal` (v2/speculative.py)."""
    cfg = config or GenerationConfig()
    if observer is not None and cfg.decode != "diffusion":
        raise GenerationError(
            f"an observer follows block-diffusion denoise steps; decode={cfg.decode!r} "
            "has none (use decode='diffusion')"
        )
    B = cfg.block_size or model.cfg.block_size
    cfg.validate(B)
    check_decode(cfg, policy)
    max_pos = check_prompts(model, prompts)
    ends = [min(len(p) + cfg.max_new_tokens, max_pos) for p in prompts]  # exclusive, per row
    batch = Batch(prompts, ids, ends, B, model.embed_tokens.weight.device)
    if cfg.decode == "diffusion":
        gen = _generator(cfg, batch.device)
        engine = _ready_engine(model, cfg, policy, engine, batch)
        return run(Diffusion(engine, cfg, ids, gen, observer), batch)
    draft = _ready_engine(model, cfg, policy, engine, batch)
    if cfg.decode == "autoregressive":  # no draft: one token per verify forward
        verifier, draft, S = draft, None, 0
    else:
        verifier, S = draft.verifier, cfg.small_block_size
    causal = Causal(verifier, draft, batch, S, cfg.threshold, not cfg.ignore_eos)
    return run(causal, batch)


def _generator(cfg: GenerationConfig, device: torch.device) -> torch.Generator | None:
    """The sampling generator, seeded (None: greedy)."""
    if not cfg.temperature > 0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    return gen


def _ready_engine(
    model: Network,
    cfg: GenerationConfig,
    policy: Policy | None,
    engine: Engine | None,
    batch: Batch,
) -> Engine | None:
    """The engine of the decode (the model's for these settings unless given), its policy
    attached, statistics reset and buffers sized for `batch`; for the autoregressive decode, a
    causal engine, left to the decode (speculative.Causal) to size."""
    if engine is None:
        engine = engine_for(model, cfg, policy)  # its buffers and graphs serve later calls too
    if cfg.decode == "autoregressive" or engine.causal:
        if not (cfg.decode == "autoregressive" and engine.causal):
            raise GenerationError(
                "decode=autoregressive runs on a causal engine (Engine(causal=True)), and "
                "only it does"
            )
        return engine
    if engine.B != batch.B or engine.block_cache != cfg.use_block_cache:
        what = "the engine's" if cfg.decode == "diffusion" else "the draft engine's"
        tail = " from the config" if cfg.decode == "diffusion" else ""
        raise GenerationError(f"{what} block size / sub-block cache differ{tail}")
    if engine.policy is not None:
        engine.policy.attach(model, batch.ids)
    engine.reset_stats()
    engine.allocate(len(batch.lengths), batch.total)
    return engine


def _eos_stops(tokens, pending, generated, eos: int) -> torch.Tensor:
    """Rows whose block holds a generated EOS with no mask before it."""
    is_eos = (tokens == eos) & generated & ~pending
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), tokens.shape[1])
    cols = torch.arange(tokens.shape[1], device=tokens.device)
    pending_before = (pending & (cols[None] < first[:, None])).any(1)
    return is_eos.any(1) & ~pending_before


@dataclass
class _Block:
    """The block being denoised, in the active rows: its tokens [b, B]; pending: masks still to
    decode; generated: the slots after the prompt within the budget; stopped [b]: rows done at
    an EOS; has_kv [b]: rows whose block K/V the sub-block cache holds; step: forwards so far."""

    start: int
    tokens: torch.Tensor
    pending: torch.Tensor
    generated: torch.Tensor
    stopped: torch.Tensor
    has_kv: torch.Tensor
    step: int = 0


class Diffusion:
    """Block diffusion as a strategy of the block loop (module docstring): each block is
    denoised sub-block by sub-block; a denoise forward proposes a token for every masked slot of
    the sub-block and commits by the commit rule (v2/block_loop.py), until every slot is decided
    or the row stopped at an EOS. Rows finish at the block end, on EOS or budget."""

    def __init__(
        self,
        engine: Engine,
        cfg: GenerationConfig,
        ids: TokenIds,
        gen: torch.Generator | None,
        observer: Observer | None,
    ):
        self.engine, self.cfg, self.ids, self.gen, self.observer = engine, cfg, ids, gen, observer

    def prefill(self, batch: Batch) -> None:
        """Nothing beyond the engine's prefill."""

    def stats(self) -> Stats:
        return self.engine.stats

    def decode_block(self, batch: Batch, start: int, stop: int) -> None:
        B, S, device = stop - start, self.cfg.small_block_size, batch.device
        pos = start + torch.arange(B, device=device)[None]  # absolute positions of the block
        tokens = batch.seq[batch.active, start:stop]
        L, end = batch.known[batch.active, None], batch.end[batch.active, None]
        # Decode every slot after the prompt and the block's known first slot, within budget.
        pending = (pos >= torch.clamp(L, min=start + 1)) & (pos < end)
        generated = (pos >= L) & (pos < end)
        stopped = torch.zeros(len(tokens), dtype=torch.bool, device=device)
        if not self.cfg.ignore_eos:
            stopped = _eos_stops(tokens, pending, generated, self.ids.eos)
        blk = _Block(start, tokens, pending, generated, stopped, torch.zeros_like(stopped))
        for k in range(B // S):
            sub = slice(k * S, (k + 1) * S)
            while True:
                candidates = blk.pending[:, sub] & ~blk.stopped[:, None]
                if not bool(candidates.any()):
                    break
                self._denoise(batch, blk, sub, candidates)
        batch.seq[batch.active, start:stop] = tokens
        # Rows leave at the block end: on EOS (cut after it) or when their budget is spent.
        first_eos = start + ((tokens == self.ids.eos) & generated).int().argmax(1)
        spent = batch.end[batch.active] <= stop
        batch.stop_rows(batch.active, blk.stopped, first_eos, spent)

    def _denoise(self, batch: Batch, blk: _Block, sub: slice, candidates: torch.Tensor) -> None:
        """One denoise forward of the rows with candidates in sub-block `sub`, and its commits."""
        engine, cfg, observer = self.engine, self.cfg, self.observer
        window, width, units = self._window(blk, sub, candidates.any(1))
        out_pos = torch.arange(sub.start, sub.stop, device=batch.device) - 1 - window
        before = copy.deepcopy(engine.stats) if observer is not None else None
        window_ids = blk.tokens[:, window : window + width]
        hidden = engine.denoise(window_ids, window, out_pos.clamp(min=0), units, observer)
        token, conf = propose(engine.logits(hidden), cfg.temperature, cfg.top_p, self.gen)
        take = commit_rule(candidates, conf, cfg.threshold, cfg.commit_per_forward)
        blk.tokens[:, sub] = torch.where(take, token, blk.tokens[:, sub])
        blk.pending[:, sub] &= ~take
        if not cfg.ignore_eos:
            blk.stopped |= _eos_stops(blk.tokens, blk.pending, blk.generated, self.ids.eos)
        if observer is not None:
            committed = torch.zeros_like(blk.pending)
            committed[:, sub] = take
            observer.on_forward(self._step(batch, blk, (window, width), committed, before))
        blk.step += 1

    def _window(self, blk: _Block, sub: slice, busy: torch.Tensor):
        """The forward's window (block offset, width) and units [b, width] (None: all). Only
        rows with candidates (`busy`) run; the others wait for the batch at no cost."""
        B = blk.tokens.shape[1]
        window, width, units = 0, B, busy[:, None].expand(-1, B)
        if self.cfg.use_block_cache:
            # A row runs a full-block forward while it has no block K/V yet or its sub-block's
            # first slot is a mask; otherwise just its sub-block, against the block K/V it last
            # computed.
            full = busy & (~blk.has_kv | blk.pending[:, sub.start])
            cols = torch.arange(B, device=busy.device)
            in_sub = (cols >= sub.start) & (cols < sub.stop)
            if not bool(full.any()):
                window, width = sub.start, sub.stop - sub.start
                units = busy[:, None].expand(-1, width)
            else:
                units = full[:, None] | (busy[:, None] & in_sub[None])
            blk.has_kv |= full
        return window, width, None if bool(units.all()) else units

    def _step(self, batch: Batch, blk: _Block, window, committed, before: Stats) -> DenoiseStep:
        """The DenoiseStep of the forward just run (reads the engine's statistics: a sync)."""
        engine, block = self.engine, blk.tokens
        sync(batch.device)
        total = copy.deepcopy(engine.stats)
        total.wall_seconds = time.perf_counter() - batch.t0
        total.generated_tokens = _decided(batch, blk)
        cpu = [t.to("cpu", copy=True) for t in (block, committed, blk.pending, blk.generated)]
        (window_start, width), rows = window, batch.active.tolist()
        plan = torch.full((engine.last_plan.shape[0], *block.shape), NOT_RUN, dtype=torch.int8)
        plan[:, :, window_start : window_start + width] = engine.last_plan[:, : len(rows)]
        where = (blk.start, blk.step, window_start, width, rows)
        return DenoiseStep(*where, *cpu, plan, total.since(before), total)


def _decided(batch: Batch, blk: _Block) -> int:
    """Generated tokens decided so far: by the rows done, and by the active rows in earlier
    blocks and in this one."""
    done = batch.done.tolist()
    total = sum(f - L for f, L, d in zip(batch.final_len, batch.lengths, done, strict=True) if d)
    active, mask = batch.active, batch.ids.mask
    cols = torch.arange(blk.start, device=batch.device)[None]
    earlier = (batch.seq[active, : blk.start] != mask) & (cols >= batch.known[active, None])
    return total + int(earlier.sum()) + int((blk.tokens != mask)[blk.generated].sum())


class FastDLLM:
    """A loaded checkpoint: network, tokenizer and its special ids, ready to generate text."""

    def __init__(self, model: Network, tokenizer, ids: TokenIds):
        self.model, self.tokenizer, self.ids = model, tokenizer, ids

    @classmethod
    def load(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        device: str | None = None,
        mask_token: str | None = None,
    ) -> FastDLLM:
        tokenizer, ids = load_tokenizer(path, mask_token)
        return cls(load_model(path, dtype=dtype, device=device), tokenizer, ids)

    def encode(self, texts: list[str], chat: bool = False) -> list[list[int]]:
        if chat:
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
                )
                for t in texts
            ]
        return [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def engine(
        self, config: GenerationConfig | None = None, policy: Policy | None = None
    ) -> Engine | None:
        """A new engine of this model for these settings, for `generate(..., engine=)`: one that
        keeps its buffers and graphs whatever else decodes in between (`engine_for`)."""
        return engine_for(self.model, config, policy, own=True)

    def generate(
        self,
        texts: list[str],
        config: GenerationConfig | None = None,
        policy: Policy | None = None,
        chat: bool = False,
        engine: Engine | None = None,
        observer: Observer | None = None,
    ) -> GenerationResult:
        """`engine`: decode on this one (its policy is used; see `engine`), not the model's.
        `observer`: watches the denoise forwards (v2/observer.py)."""
        if not texts:
            raise GenerationError("no prompts given")
        prompts = self.encode(texts, chat)
        result = generate(self.model, prompts, self.ids, config, policy, engine, observer)
        for o in result.outputs:
            o.text = self.tokenizer.decode(o.token_ids, skip_special_tokens=True)
        return result


# Where evaluations (lm_eval's model_args, sweeps of either runner) default otherwise than
# GenerationConfig: threshold 1.0, the paper's accuracy recipe (one token per forward); the
# commands that decode prompts (generate, chatbot, app, analyze) default to 0.9, the speed recipe.
EVAL_DEFAULTS = {"threshold": 1.0}

# a setting's type from its annotation (a string: `from __future__ import annotations`)
SETTING_TYPES = {"int": int, "float": float, "bool": bool, "int | None": int, "str": str}


def settings() -> list:
    """The generation settings a user sets (GenerationConfig's fields with a flag)."""
    return [f for f in fields(GenerationConfig) if f.metadata.get("flag")]


def add_generation_arguments(
    parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None, **defaults
) -> None:
    """--max-new-tokens, --threshold, ... from GenerationConfig (only `names` where given);
    `defaults` replaces a default for this entry point (its help shows the one in force)."""
    g = parser.add_argument_group("generation")
    for f in settings():
        if names is not None and f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        help = f.metadata["help"] + ("" if default is None else " (default: %(default)s)")
        if f.type in ("bool", bool):
            g.add_argument(flag, action="store_true", help=f.metadata["help"])
        elif f.name == "decode":
            g.add_argument(flag, choices=DECODES, default=default, help=help)
        else:
            g.add_argument(flag, type=SETTING_TYPES[str(f.type)], default=default, help=help)


def config_from_args(args: argparse.Namespace) -> GenerationConfig:
    """The GenerationConfig of the parsed flags (settings without a flag keep their default)."""
    return GenerationConfig(
        **{f.name: getattr(args, f.name) for f in settings() if hasattr(args, f.name)}
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (or hub id)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument(
        "--device", type=device_arg, default=None, help="cpu, cuda or cuda:N (default: cuda if any)"
    )
    parser.add_argument(
        "--mask-token", default=None, help="mask token if the tokenizer lacks |<MASK>|"
    )


def load_from_args(args: argparse.Namespace) -> FastDLLM:
    return FastDLLM.load(
        args.model,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        device=args.device,
        mask_token=args.mask_token,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m v2.generate",
        description="\n\n".join(__doc__.split("\n\n")[:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--chat", action="store_true", help="apply the chat template to each prompt")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object (notes: answers cut to fit)"
    )
    add_generation_arguments(p)
    from v2.policies import add_policy_arguments

    add_policy_arguments(p)
    return p


def context_cuts(lm: FastDLLM, texts: list[str], chat: bool, config, result) -> list[str]:
    """One line per answer cut short by the model's positions (generate stops a row at the
    context's end, before max_new_tokens: finish_reason "length" either way)."""
    limit = lm.model.cfg.max_position_embeddings
    notes = []
    for i, (ids, o) in enumerate(zip(lm.encode(texts, chat), result.outputs, strict=True), 1):
        room = limit - len(ids)
        if o.finish_reason == "length" and room < config.max_new_tokens:
            which = f"answer {i}" if len(texts) > 1 else "the answer"
            notes.append(
                f"{which} was cut at {len(o.token_ids)} tokens, not --max-new-tokens "
                f"{config.max_new_tokens}, to fit the model's {limit} positions (its prompt "
                f"is {len(ids)} tokens)"
            )
    return notes


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from v2.policies import baseline_note, given_options, policy_from_args

    # as the chatbot and the app refuse an empty message (the chat template alone would be
    # decoded): an empty or blank prompt is refused, with or without --chat
    blank = [i for i, text in enumerate(args.prompt, 1) if not text.strip()]
    if blank:
        which = f" (--prompt {blank[0]} of {len(args.prompt)})" if len(args.prompt) > 1 else ""
        print(f"error: empty prompt{which}: give --prompt some text", file=sys.stderr)
        return 2
    try:
        policy = policy_from_args(args)
        lm = load_from_args(args)
        layers = lm.model.cfg.num_hidden_layers
        if note := baseline_note(policy, given_options(args), layers):
            print(f"note: {note}", file=sys.stderr)
        config = config_from_args(args)
        result = lm.generate(args.prompt, config, policy, chat=args.chat)
    except (CheckpointError, GenerationError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cut = context_cuts(lm, args.prompt, args.chat, config, result)
    for note in cut:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        outputs = [
            {"text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason}
            for o in result.outputs
        ]
        settings = {**asdict(config), "policy": policy.config() if policy else {"policy": "none"}}
        out = {"outputs": outputs, "config": settings, "stats": result.stats.to_dict()}
        print(json.dumps({**out, "notes": cut} if cut else out))
    else:
        for o in result.outputs:
            print(o.text)
        s = result.stats
        # the autoregressive decode has no threshold, sub-blocks or drafts: none are printed
        causal = args.decode == "autoregressive"
        how = "autoregressive" if causal else f"threshold {config.threshold}"
        print(
            f"[{how}, {policy.name if policy else 'no policy'}: "
            f"{s.generated_tokens} tokens, {s.tokens_per_forward:.2f} tokens/forward, "
            f"{s.tokens_per_second:.1f} tokens/s, executed FLOPs "
            f"{s.executed_flops / max(s.baseline_flops, 1):.1%} of baseline]",
            file=sys.stderr,
        )
        if args.decode != "diffusion":
            drafts = (
                f", {s.accepted_tokens}/{s.drafted_tokens} drafted tokens accepted "
                f"({s.acceptance_rate:.1%})"
                if args.decode == "speculative"
                else ""
            )
            print(
                f"[{s.verify_forwards} verify forwards, {s.tokens_per_verify_forward or 0:.2f} "
                f"tokens/verify forward{drafts}]",
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
