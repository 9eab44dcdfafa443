"""Train the tiny Fast-dLLM v2 model from scratch on synthetic GSM8K-style problems, save it in the
release layout and evaluate it with our block-diffusion decoder.

    python -m v2.tiny.train --out v2/tiny/checkpoint --minutes 8      # CUDA when available
    python -m v2.tiny.train --out /tmp/tiny --smoke --eval-limit 4    # seconds on CPU
    python -m v2.tiny.train --task hard --arch deep --out OUT/checkpoint --minutes 7.5 --compile

Tasks: `basic` (the committed checkpoint's problems, `v2/tiny/data/test.jsonl`) and `hard` (the
graded family, `hard_test.jsonl`, with `hard_dev.jsonl` evaluated during training every
`--dev-every-s` seconds). Architectures: `base` (8 layers, 6.48M parameters) and `deep` (24
layers, GQA, 10.7M parameters, 21.4 MB in bf16; batch 256 and lr 1.4e-3 unless given).

`--state FILE` keeps the run's state (saved every `--save-every-s` seconds, at the end and on
SIGTERM); `--resume` continues it after a kill, a preemption or a `--pause-after MIN` stop
(TrainState: with `--steps`, to the model an uninterrupted run makes). A training budget longer
than one job or call:

    python -m v2.tiny.train ... --minutes 15 --state S --pause-after 7.5   # then, again:
    python -m v2.tiny.train ... --minutes 15 --state S --resume

`--compile` pads each batch to one of a few fixed lengths (`--fixed-lengths`, 6) and compiles
each decoder layer once per length before the first step, inside the budget; other shapes and
any compile failure run eager (`CompiledLoss`). A length whose whole batch does not fit in
memory (found in that warm-up, or when a step runs out of memory) is split into micro-batches
(per length, doubling), whose shape is compiled too: on an 80 GB H100 the deep preset's longest
length needs two.

Objective (fast-dllm-v2.md section 10): every sample is a chat (system prompt, user
"Question: ...\\nAnswer:", assistant answer + <|im_end|>), padded with the mask token to a multiple
of the block size B. Response tokens are masked per block with p = eps + (1 - eps) t, t ~ U(0, 1),
except each block's first slot (at inference it always comes from the previous block's commit
forward). Each sample appears twice, with mask m and with its complement, so every maskable token
is supervised once. The input is [noisy ; clean] under one attention mask; the loss is the
token-shifted cross-entropy on masked noisy positions plus, for block-first response slots, on
the clean half's previous position (what the commit forward predicts at inference).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from v2.checkpoint import device_arg, parse_device, save_release_checkpoint, token_ids
from v2.model import ModelConfig, Network
from v2.record import accuracy
from v2.tasks.gsm_answers import hits, target
from v2.tiny.data import HARD_LEVELS, HARD_SEED, make_split, read_jsonl
from v2.tiny.tokenizer import IM_END, build_tokenizer

DATA = Path(__file__).resolve().parent / "data"
TEST_JSONL = DATA / "test.jsonl"
# task -> (test split, dev split or None)
TASK_SPLITS = {
    "basic": (TEST_JSONL, None),
    "hard": (DATA / "hard_test.jsonl", DATA / "hard_dev.jsonl"),
}
MASK_EPS = 1e-3  # minimum masking probability per block
IGNORE = -100  # cross-entropy label of unsupervised positions
SMOKE_EVAL_LIMIT = 8


@dataclass(frozen=True)
class TrainConfig:
    minutes: float = 8.0  # wall-clock budget of the training loop
    steps: int | None = None  # maximum optimizer steps (None: only the time budget)
    batch_size: int = 128  # problems per step; each appears twice (mask and complement)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 200
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    n_train: int = 200_000
    max_len: int = 256  # longer samples are dropped
    seed: int = 0
    compile: bool = False
    compile_mode: str | None = None  # torch.compile mode (None: its default)
    compile_backend: str | Callable = "inductor"  # tests use "eager" / "aot_eager"
    compile_scope: str = "layers"  # "layers" (each decoder layer) or "loss" (the whole loss)
    compile_budget: float = 0.35  # stop compiling new lengths past this share of the budget
    fixed_lengths: int = 0  # pad each batch up to one of this many lengths (0: no padding)
    task: str = "basic"  # a key of TASK_SPLITS
    bucket: bool = False  # batches of similar lengths (less padding); each epoch still shuffled
    dev_every_s: float | None = None  # dev accuracy at threshold 1 this often (None: never)
    dev_limit: int | None = None  # first N dev problems (None: all)
    stop_at_dev_acc: float | None = None  # stop once dev accuracy reaches this (None: never)


# TrainConfig values each task changes unless given on the command line. Hard problems are
# up to 385 tokens with the chat prompt (mean 234): a budget of 416 and length buckets.
TASK_RUN = {
    "basic": {},
    "hard": {"max_len": 416, "bucket": True, "dev_every_s": 60.0, "n_train": 250_000},
}


# TrainConfig values each architecture changes unless given on the command line. The deep
# model's step is launch/latency bound (about 15 TFLOP/s of an H200's bf16 peak at 128 problems
# a step, docs/results/deep-tiny-first-run.md), so twice the rows should cost much less than
# twice the time: batch 256. Twice the batch halves the gradient noise variance; the peak
# learning rate grows by sqrt(2) (the usual rule for Adam), 1e-3 -> 1.4e-3, rather than 2x
# (linear scaling), since a 24-layer model is the more fragile one. Not tuned: no run has
# measured either value. The base preset keeps 128 and 1e-3 (the committed checkpoint's card).
ARCH_RUN = {
    "base": {},
    "deep": {"batch_size": 256, "lr": 1.4e-3},
}


ARCHS = {
    # the committed checkpoint: 6.48M parameters
    "base": dict(
        hidden_size=256,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=768,
    ),
    # deep and narrow, like the real model's layer count: 10.68M parameters, 21.4 MB in bf16
    "deep": dict(
        hidden_size=192,
        num_hidden_layers=24,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=576,
    ),
    # a very small model for CPU checks
    "smoke": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    ),
}


def default_model_config(vocab_size: int, smoke: bool = False, arch: str = "base") -> ModelConfig:
    """The model of `arch` (ARCHS); `smoke` picks the very small smoke model."""
    sizes = ARCHS["smoke" if smoke else arch]
    return ModelConfig(
        vocab_size=vocab_size,
        rope_theta=10_000.0,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        block_size=32,
        **sizes,
    )


# ---- data ----------------------------------------------------------------------------------


def user_message(question: str) -> str:
    """What the evaluation sends as the user turn: lm_eval's gsm8k prompt."""
    return f"Question: {question}\nAnswer:"


def prompt_text(tokenizer, question: str) -> str:
    """The chat prompt up to and including `<|im_start|>assistant\\n` (default system prompt)."""
    messages = [{"role": "user", "content": user_message(question)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class Samples:
    """Tokenised samples, each padded with the mask token to `max_len`."""

    tokens: torch.Tensor  # [n, max_len] long: prompt + answer + <|im_end|>, then mask tokens
    prompt_len: torch.Tensor  # [n]
    length: torch.Tensor  # [n] prompt + response
    dropped: int = 0  # samples longer than max_len

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device) -> Samples:
        return Samples(
            self.tokens.to(device), self.prompt_len.to(device), self.length.to(device), self.dropped
        )


def encode_problems(
    tokenizer, problems: Sequence[dict[str, str]], max_len: int, mask_id: int
) -> Samples:
    """Prompt and response tokenised separately (add_special_tokens=False), as at inference."""
    # The template inserts the user message verbatim: render it once around a placeholder.
    head, tail = prompt_text(tokenizer, "\x00").split("\x00")
    prompts = [head + p["question"] + tail for p in problems]
    answers = [p["answer"] for p in problems]
    backend = tokenizer.backend_tokenizer  # the Rust tokenizer: no per-text Python overhead
    encoded = backend.encode_batch(prompts + answers, add_special_tokens=False)
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    tokens = np.full((len(problems), max_len), mask_id, dtype=np.int64)
    prompt_len = np.zeros(len(problems), dtype=np.int64)
    length = np.zeros(len(problems), dtype=np.int64)
    n = 0
    for prompt, answer in zip(encoded[: len(problems)], encoded[len(problems) :], strict=True):
        ids = prompt.ids + answer.ids + [eos]
        if len(ids) > max_len:
            continue
        tokens[n, : len(ids)] = ids
        prompt_len[n], length[n] = len(prompt.ids), len(ids)
        n += 1
    return Samples(
        torch.from_numpy(tokens[:n]),
        torch.from_numpy(prompt_len[:n]),
        torch.from_numpy(length[:n]),
        dropped=len(problems) - n,
    )


@dataclass
class Batch:
    ids: torch.Tensor  # [b, T] clean tokens, mask-token padded, T a multiple of the block size
    prompt_len: torch.Tensor  # [b]
    length: torch.Tensor  # [b]

    def response(self) -> torch.Tensor:
        """[b, T] bool: the answer tokens and <|im_end|>."""
        pos = torch.arange(self.ids.shape[1], device=self.ids.device)
        return (pos >= self.prompt_len[:, None]) & (pos < self.length[:, None])


def make_batch(samples: Samples, index: torch.Tensor, block_size: int) -> Batch:
    """Rows `index`, cut to the shortest multiple of the block size that holds them all."""
    length = samples.length[index]
    T = -(-int(length.max()) // block_size) * block_size
    return Batch(samples.tokens[index, :T], samples.prompt_len[index], length)


BUCKET_BATCHES = 64  # with bucketing, batches are formed by length within 64 batches' samples


def batches(
    samples: Samples,
    batch_size: int,
    block_size: int,
    generator: torch.Generator,
    bucket: bool = False,
    skip: int = 0,
) -> Iterator[Batch]:
    """Endless shuffled epochs (the last incomplete batch of an epoch is skipped). `bucket`:
    each run of BUCKET_BATCHES batches of the shuffled order is sorted by length before it is
    cut into batches, and those batches are shuffled, so a batch pads to its own longest sample
    rather than to nearly the longest of all. `skip`: the first `skip` batches of that order are
    passed over unbuilt (a resumed run continues where it stopped)."""
    n = len(samples)
    if n < batch_size:
        raise ValueError(f"{n} training samples are fewer than one batch of {batch_size}")
    device = samples.tokens.device
    length = samples.length.cpu()
    while True:
        order = torch.randperm(n, generator=generator)[: n - n % batch_size]
        if bucket:
            chunks = []
            for start in range(0, len(order), batch_size * BUCKET_BATCHES):
                chunk = order[start : start + batch_size * BUCKET_BATCHES]
                chunk = chunk[torch.argsort(length[chunk], stable=True)]
                chunks += list(chunk.split(batch_size))
            perm = torch.randperm(len(chunks), generator=generator).tolist()
            groups = [chunks[i] for i in perm]
        else:
            groups = list(order.split(batch_size))
        if skip >= len(groups):
            skip -= len(groups)
            continue
        for index in groups[skip:]:
            yield make_batch(samples, index.to(device), block_size)
        skip = 0


def fixed_lengths(
    lengths: torch.Tensor | Sequence[int], block_size: int, n: int
) -> tuple[int, ...]:
    """At most `n` lengths, multiples of `block_size`, the largest holding the longest of
    `lengths`, chosen to minimise the tokens when each of `lengths` is padded to the smallest
    chosen length that holds it (a dynamic programme over the distinct block-rounded lengths).
    Training passes one epoch's batch lengths (`epoch_lengths`)."""
    rounded = [-(-int(x) // block_size) * block_size for x in lengths]
    values = sorted(set(rounded))
    counts = [rounded.count(v) for v in values]
    k = len(values)
    n = max(1, min(n, k))
    # cost[j][i]: samples of values[j..i] padded to values[i]
    prefix = [0]
    for c in counts:
        prefix.append(prefix[-1] + c)

    def cost(j: int, i: int) -> int:
        return (prefix[i + 1] - prefix[j]) * values[i]

    inf = float("inf")
    # best[m][i]: least tokens for values[0..i] with m lengths, the last one values[i]
    best = [[inf] * k for _ in range(n + 1)]
    choice = [[-1] * k for _ in range(n + 1)]
    for i in range(k):
        best[1][i] = cost(0, i)
    for m in range(2, n + 1):
        for i in range(k):
            for j in range(i):  # the previous chosen length is values[j]
                c = best[m - 1][j] + cost(j + 1, i)
                if c < best[m][i]:
                    best[m][i], choice[m][i] = c, j
    m = min(range(1, n + 1), key=lambda m: (best[m][k - 1], m))
    chosen, i = [], k - 1
    while i >= 0 and m >= 1:
        chosen.append(values[i])
        i, m = choice[m][i], m - 1
    return tuple(sorted(chosen))


def pad_batch(
    batch: Batch, masked: torch.Tensor, length: int, mask_id: int
) -> tuple[Batch, torch.Tensor]:
    """`batch` and its noise mask padded to `length` columns the way samples are padded: mask
    tokens, never masked, never supervised (they lie past every sample's `length`). The added
    blocks come after every real block, and a block never sees a later one (`attention_mask`),
    so the loss on the real tokens is unchanged."""
    extra = length - batch.ids.shape[1]
    if extra <= 0:
        return batch, masked
    ids = F.pad(batch.ids, (0, extra), value=mask_id)
    return Batch(ids, batch.prompt_len, batch.length), F.pad(masked, (0, extra), value=False)


def epoch_lengths(
    samples: Samples, batch_size: int, block_size: int, bucket: bool, seed: int
) -> list[int]:
    """The lengths of one epoch of `batches` (its own generator: training's is not touched)."""
    data = batches(samples, batch_size, block_size, torch.Generator().manual_seed(seed), bucket)
    return [next(data).ids.shape[1] for _ in range(len(samples) // batch_size)]


def cover_length(T: int, lengths: Sequence[int]) -> int:
    """The smallest of `lengths` that holds T (T itself when none does)."""
    return min((L for L in lengths if L >= T), default=T)


# ---- objective -----------------------------------------------------------------------------


def maskable(batch: Batch, block_size: int) -> torch.Tensor:
    """[b, T] bool: response tokens that may be masked (never a block's first slot)."""
    pos = torch.arange(batch.ids.shape[1], device=batch.ids.device)
    return batch.response() & (pos % block_size != 0)[None]


def noise_mask(batch: Batch, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """[b, T] bool: the first view's masked positions; its complement (within `maskable`) is the
    second view. One t ~ U(0, 1) per (sample, block), each token masked with eps + (1 - eps) t."""
    b, T = batch.ids.shape
    device = batch.ids.device
    t = torch.rand(b, T // block_size, generator=generator, device=device)
    p = (MASK_EPS + (1 - MASK_EPS) * t).repeat_interleave(block_size, dim=1)
    return (torch.rand(b, T, generator=generator, device=device) < p) & maskable(batch, block_size)


def attention_mask(T: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[2T, 2T] bool (True = visible) over [noisy ; clean], both at positions 0..T-1: noisy sees
    noisy of its own block and clean of earlier blocks; clean sees clean of its own and earlier
    blocks; clean never sees noisy."""
    block = torch.arange(T, device=device) // block_size
    same = block[:, None] == block[None, :]
    earlier = block[:, None] > block[None, :]
    top = torch.cat([same, earlier], dim=1)
    bottom = torch.cat([torch.zeros_like(same), same | earlier], dim=1)
    return torch.cat([top, bottom], dim=0)


def diffusion_inputs(
    batch: Batch, masked: torch.Tensor, mask_id: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [view m ; complementary view], each [noisy | clean] -> ids and labels [2b, 2T].

    labels[r, i] is the token that output i must predict (token shift: output j-1 predicts j):
    a masked noisy token, or (first view only, so each is counted once) a block-first response
    token predicted from the clean half."""
    b, T = batch.ids.shape
    clean = batch.ids.repeat(2, 1)
    views = torch.cat([masked, maskable(batch, block_size) & ~masked])
    noisy = torch.where(views, mask_id, clean)
    labels = torch.full((2 * b, 2 * T), IGNORE, dtype=torch.long, device=clean.device)
    labels[:, : T - 1] = torch.where(views[:, 1:], clean[:, 1:], IGNORE)
    pos = torch.arange(T, device=clean.device)
    first = batch.response() & (pos % block_size == 0)[None]
    labels[:b, T : 2 * T - 1] = torch.where(first[:, 1:], batch.ids[:, 1:], IGNORE)
    return torch.cat([noisy, clean], dim=1), labels


def diffusion_loss(model: Network, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all supervised tokens of `diffusion_inputs`."""
    T = ids.shape[1] // 2
    positions = torch.arange(T, device=ids.device).repeat(2)
    mask = attention_mask(T, model.cfg.block_size, ids.device)
    logits = model(ids, positions, mask)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


# ---- training ------------------------------------------------------------------------------

MAX_MICRO_BATCHES = 16  # out of memory with a step split this many ways: give up


def accumulate_gradients(
    loss_fn, model: Network, ids: torch.Tensor, labels: torch.Tensor, micro_batches: int, autocast
) -> torch.Tensor:
    """Backward of the step's loss (mean over all its supervised tokens), in `micro_batches`
    row chunks each weighted by its share of the supervised tokens; returns the loss."""
    if micro_batches == 1:
        with autocast:
            loss = loss_fn(model, ids, labels)
        loss.backward()
        return loss.detach()
    counts = [int((c != IGNORE).sum()) for c in labels.chunk(micro_batches)]
    total = sum(counts)
    loss = torch.zeros((), device=ids.device)
    for i, c, n in zip(ids.chunk(micro_batches), labels.chunk(micro_batches), counts, strict=True):
        if n == 0:
            continue
        with autocast:
            part = loss_fn(model, i, c) * (n / total)
        part.backward()
        loss += part.detach()
    return loss


class CompiledLoss:
    """`diffusion_loss` under torch.compile with static shapes (one graph per input shape),
    used only for the shapes that `fit` compiled; every other shape (lengths left out, a last
    micro-batch of another size) and everything after a compile failure runs eager. So the
    number of graphs is bounded by the warmed-up shapes, compile time is spent before training
    (or once, right after a step ran out of memory) rather than whenever a new length turns up,
    and a failure costs a warning, not the run.

    scope "layers" (default) compiles each decoder layer in place (`nn.Module.compile`): the 24
    layers share one graph per shape, so a shape compiles in about a layer's time (on CPU, deep
    model, one shape: 13 s against 69 s for the whole loss); embedding, final norm, lm_head and
    the cross-entropy stay eager. scope "loss" compiles the whole loss function."""

    def __init__(self, cfg: TrainConfig, model: Network, scope: str = "layers"):
        options = {"mode": cfg.compile_mode} if cfg.compile_mode else {}
        options |= {"dynamic": False, "backend": cfg.compile_backend}
        if scope not in ("layers", "loss"):
            raise ValueError(f"unknown compile scope {scope!r}")
        self.scope = scope
        self.model = model
        self.shapes: set[tuple[int, ...]] = set()
        self.failure: str | None = None  # why it fell back to eager for good
        self.seconds: dict[int, float] = {}  # length -> warm-up (compile) seconds
        self.calls = {"compiled": 0, "eager": 0}  # loss calls (micro-batches count each)
        self.compiled = lambda *a: diffusion_loss(*a)  # noqa: E731 - looked up at call time
        try:
            if scope == "layers":
                for layer in model.layers:
                    layer.compile(**options)
            else:
                self.compiled = torch.compile(diffusion_loss, **options)
        except Exception as error:  # noqa: BLE001 - e.g. torch.compile unsupported here
            self.restore()
            self.fail(error)

    def __call__(self, model: Network, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.failure is None and tuple(ids.shape) in self.shapes:
            self.calls["compiled"] += 1
            with torch.compiler.set_stance("eager_on_recompile"):  # never compile mid-training
                return self.compiled(model, ids, labels)
        self.calls["eager"] += 1
        with torch.compiler.set_stance("force_eager"):  # no compiling of other shapes
            return diffusion_loss(model, ids, labels)  # looked up at call time (tests patch it)

    def restore(self) -> None:
        """Take the compiled layers off the model (they stay in dynamo's cache)."""
        if self.scope == "layers":
            for layer in self.model.layers:
                if hasattr(layer, "_compiled_call_impl"):
                    layer._compiled_call_impl = None

    def fail(self, error: BaseException) -> None:
        self.failure = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        print(
            f"WARNING: torch.compile failed, training continues eager: {self.failure}",
            file=sys.stderr,
            flush=True,
        )

    def fit(
        self, model: Network, rows: int, length: int, vocab: int, autocast, device, micro: int = 1
    ) -> int:
        """Compile the step's micro-batch shape for batches of `rows` x `length`: the fewest
        micro-batches from `micro` on (doubling) whose forward and backward fit in memory; that
        number, or 0 where none up to MAX_MICRO_BATCHES fits or the compile failed (eager)."""
        while micro <= MAX_MICRO_BATCHES:
            try:
                if not self.warm_up(model, -(-rows // micro), length, vocab, autocast, device):
                    return 0
                return micro
            except torch.OutOfMemoryError:
                micro *= 2
        return 0

    def warm_up(self, model: Network, rows: int, length: int, vocab: int, autocast, device) -> bool:
        """Compile the forward and backward for ids [rows, 2 * length] with a dummy batch (no
        random numbers drawn, gradients discarded); False (and eager from then on) on a compile
        failure; torch.OutOfMemoryError where the shape does not fit (nothing kept)."""
        if self.failure is not None:
            return False
        ids = torch.zeros(rows, 2 * length, dtype=torch.long, device=device)
        labels = torch.arange(rows * 2 * length, device=device).view(rows, -1) % vocab
        t = time.perf_counter()
        try:
            with autocast:
                loss = self.compiled(model, ids, labels)
            loss.backward()
        except torch.OutOfMemoryError:
            oom = True
        except Exception as error:  # noqa: BLE001 - any compile failure: eager, not a crash
            model.zero_grad(set_to_none=True)
            self.fail(error)
            return False
        else:
            oom = False
        model.zero_grad(set_to_none=True)
        if oom:  # outside the handler, so that the failed attempt's tensors are released
            torch.cuda.empty_cache()
            raise torch.OutOfMemoryError(f"ids [{rows}, {2 * length}] do not fit")
        if ids.is_cuda:
            torch.cuda.synchronize(ids.device)
        self.seconds[length] = self.seconds.get(length, 0.0) + time.perf_counter() - t
        self.shapes.add(tuple(ids.shape))
        return True


def set_recompile_limit(graphs: int) -> None:
    """Let dynamo keep `graphs` graphs of one function (its default is 8)."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), graphs))


def init_weights(model: Network, std: float = 0.02) -> None:
    """GPT-2 style: normal(0, std) matrices, residual outputs scaled by 1/sqrt(2 * layers)."""
    out_std = std / math.sqrt(2 * model.cfg.num_hidden_layers)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            residual = name.endswith(("o_proj.weight", "down_proj.weight"))
            torch.nn.init.normal_(p, std=out_std if residual else std)
        elif name.endswith(".bias"):
            torch.nn.init.zeros_(p)  # norm weights keep their ones


def learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over steps, then cosine decay over `progress` (0..1 of the budget)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


# TrainConfig fields a resumed run may change: how a step is executed and how often the dev
# split is scored, not what a step computes (padding to fixed lengths gives the same loss).
RESUME_MAY_CHANGE = frozenset(
    {
        "compile",
        "compile_mode",
        "compile_backend",
        "compile_scope",
        "compile_budget",
        "fixed_lengths",
        "dev_every_s",
        "dev_limit",
        "stop_at_dev_acc",
    }
)
STATE_FORMAT = 2  # 2: micro-batches per batch length
FINISHED = ("steps", "budget", "dev accuracy")  # a run stopped for one of these is done
CURVE_EVERY = 20  # steps per loss-curve point


class TrainStateError(ValueError):
    """A training state that cannot be resumed (another configuration, another format)."""


@dataclass(frozen=True)
class TrainState:
    """Where a run keeps what it needs to go on (weights, optimizer moments, step, loop seconds
    spent, the noise generator, curves), so that a killed, preempted or paused run resumes where
    it stopped. Written atomically every `every_s` seconds of the loop, when the loop ends, and on
    SIGTERM (what SLURM sends on preemption, requeue or time limit: the process saves at the end
    of its step and stops). `pause_after_s`: this process stops after that many seconds of its own
    loop (at least one step), state saved; `resume`: continue from `path` if it exists (a fresh
    start if not; a run that had finished stays finished). The data order needs no state: it is
    the seed's, and a resumed run skips the batches already used.

    A run bounded by `steps` ends, resumed any number of times, with the weights and losses an
    uninterrupted run has. A run bounded by time (`minutes`) counts every process's loop seconds,
    including a resumed process's own compile warm-up: it trains the steps its budget allows,
    fewer than one uninterrupted process when each process compiles again."""

    path: Path
    every_s: float = 300.0
    pause_after_s: float | None = None
    resume: bool = False


def _resumable_config(cfg: TrainConfig) -> dict:
    return {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name not in RESUME_MAY_CHANGE
    }


def save_train_state(path: Path, state: dict) -> None:
    """torch.save to a temporary file, flushed to disk, then rename: a kill (or a node crash)
    mid-write leaves the last state whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def load_train_state(path: Path, cfg: TrainConfig, device_type: str) -> dict:
    """The state at `path`, checked against `cfg` and the device type it resumes on
    (TrainStateError with what differs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainStateError(f"{path}: not a readable training state ({first[:120]})") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainStateError(f"{path}: not a training state of format {STATE_FORMAT}")
    saved, now = state["config"], _resumable_config(cfg)
    differ = [k for k in now if saved.get(k) != now[k]]
    if differ:
        what = ", ".join(f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in differ)
        raise TrainStateError(
            f"{path} was saved by a run with other settings ({what}); resume with the same "
            "settings, or start afresh without --resume (or with another --state)"
        )
    if state["device_type"] != device_type:
        raise TrainStateError(
            f"{path} was saved by a run on {state['device_type']}; resume it on "
            f"{state['device_type']} (this run is on {device_type})"
        )
    return state


@dataclass
class TrainResult:
    model: Network
    losses: list[float]
    steps: int
    wall_seconds: float  # the whole loop (of every process, when resumed), dev evaluations included
    loss_curve: list[dict] = dataclasses.field(default_factory=list)  # step, seconds, loss
    dev_curve: list[dict] = dataclasses.field(default_factory=list)  # step, seconds, accuracy
    stopped: str = "budget"  # why the loop ended: "budget", "steps" or "dev accuracy"
    oom_events: list[dict] = dataclasses.field(default_factory=list)  # step, length, micro
    lengths: tuple[int, ...] = ()  # the fixed batch lengths (empty: each batch its own)
    compile: dict | None = None  # with cfg.compile: lengths compiled, seconds, failure
    # one entry per process that trained this model (more than one when resumed): its first
    # and last step, loop seconds and why it stopped
    processes: list[dict] = dataclasses.field(default_factory=list)

    @property
    def final_loss(self) -> float:
        tail = self.losses[-50:]
        return sum(tail) / max(len(tail), 1)


def train(
    model: Network,
    samples: Samples,
    mask_id: int,
    cfg: TrainConfig,
    device: torch.device,
    progress_bar: bool = True,
    dev: Callable[[Network], float] | None = None,
    state: TrainState | None = None,
) -> TrainResult:
    """Train `model` in place until `cfg.steps` or `cfg.minutes` runs out (or, with
    `cfg.stop_at_dev_acc`, dev accuracy reaches it). `dev(model)` returns the dev accuracy; it
    runs every `cfg.dev_every_s` seconds and once at the end, inside the time budget. `state`:
    save the run's state there and, with `state.resume`, continue the run saved there
    (TrainState); the budget and the learning-rate schedule count the loop seconds of every
    process the run took."""
    B = model.cfg.block_size
    model.to(device).train()
    cpu_gen = torch.Generator().manual_seed(cfg.seed)
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=cfg.betas,
        fused=device.type == "cuda",
    )
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    )  # float32 on CPU
    lengths: tuple[int, ...] = ()
    if cfg.fixed_lengths or cfg.compile:  # the lengths one epoch's batches have, and how often
        seen = epoch_lengths(samples, cfg.batch_size, B, cfg.bucket, cfg.seed + 2)
        if cfg.fixed_lengths:
            lengths = fixed_lengths(seen, B, cfg.fixed_lengths)
    samples = samples.to(device)
    budget = cfg.minutes * 60
    pending: list[torch.Tensor] = []  # losses not yet copied to the host (avoids a sync a step)
    losses: list[float] = []
    loss_curve: list[dict] = []
    dev_curve: list[dict] = []
    # micro-batches a step of each batch length is split into (1 where absent): set by the
    # compile warm-up where a whole batch does not fit, doubled where a step runs out of memory
    micro_batches: dict[int, int] = {}
    oom_events: list[dict] = []  # the same step again in twice as many micro-batches
    processes: list[dict] = []
    step, spent = 0, 0.0  # steps done and loop seconds spent by earlier processes
    finished = None  # why a resumed run had already ended
    if state is not None and state.resume and state.path.exists():
        saved = load_train_state(state.path, cfg, device.type)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        noise_gen.set_state(saved["noise_gen"])
        step, spent, micro_batches = saved["step"], saved["spent_s"], saved["micro_batches"]
        losses, loss_curve, dev_curve = saved["losses"], saved["loss_curve"], saved["dev_curve"]
        oom_events, processes = saved["oom_events"], saved["processes"]
        if processes and processes[-1]["stopped"] in FINISHED:
            finished = processes[-1]["stopped"]
        print(
            f"resuming {state.path}: step {step}, {spent:.0f} s of the {budget:.0f} s budget spent"
            + (f" (finished: {finished}; nothing left to train)" if finished else ""),
            flush=True,
        )
    elif state is not None and state.resume:
        print(f"no training state at {state.path}: starting afresh", flush=True)
    first_step = step
    compiled = CompiledLoss(cfg, model, cfg.compile_scope) if cfg.compile else None
    loss_fn = compiled or diffusion_loss
    bar = tqdm(
        initial=step,
        total=cfg.steps,
        desc="train",
        disable=not progress_bar,
        mininterval=1.0 if sys.stderr.isatty() else 15.0,
    )
    data = batches(samples, cfg.batch_size, B, cpu_gen, bucket=cfg.bucket, skip=step)

    def run_dev(step: int) -> float:
        t = time.perf_counter()
        model.eval()
        with torch.no_grad():
            acc = dev(model)
        model.train()
        point = {"step": step, "seconds": t - t0, "dev_accuracy": acc}
        dev_curve.append({**point, "eval_seconds": time.perf_counter() - t})
        tqdm.write(
            f"dev accuracy {acc:.1%} at step {step}, {t - t0:.0f} s "
            f"(evaluated in {time.perf_counter() - t:.1f} s)"
        )
        return acc

    def sync_losses() -> None:
        """Copy the pending losses to the host (one sync)."""
        nonlocal losses
        if pending:
            losses += torch.stack(pending).tolist()
            pending.clear()

    def curve_point(k: int) -> None:
        """A loss-curve point: the mean loss of the last k steps. Points fall every CURVE_EVERY
        steps (and at the end of a finished run), whatever the processes and saves in between."""
        point = {"step": step, "seconds": time.perf_counter() - t0}
        loss_curve.append({**point, "loss": sum(losses[-k:]) / k})

    def this_process(stopped: str | None) -> dict:
        seconds = time.perf_counter() - t_process
        warm_up = sum(compiled.seconds.values()) if compiled is not None else 0.0
        return {
            "steps": [first_step, step],
            "seconds": seconds,
            "compile_warm_up_s": warm_up,
            "stopped": stopped,
        }

    def save_state(stopped: str | None) -> None:
        sync_losses()
        save_train_state(
            state.path,
            {
                "format": STATE_FORMAT,
                "config": _resumable_config(cfg),
                "device_type": device.type,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "noise_gen": noise_gen.get_state(),
                "step": step,
                "spent_s": time.perf_counter() - t0,
                "micro_batches": micro_batches,
                "losses": losses,
                "loss_curve": loss_curve,
                "dev_curve": dev_curve,
                "oom_events": oom_events,
                "processes": [*processes, this_process(stopped)],
            },
        )

    def fit(length: int, micro: int) -> None:
        """Compile length's step in the fewest micro-batches from `micro` on that fit in memory
        (its eager steps keep `micro` where none does or the compile failed)."""
        m = compiled.fit(
            model, 2 * cfg.batch_size, length, model.cfg.vocab_size, autocast, device, micro
        )
        if m:
            micro_batches[length] = m
            split = f" in {m} micro-batches" if m > 1 else ""
            tqdm.write(f"compiled length {length}{split} in {compiled.seconds[length]:.1f} s")
        elif compiled.failure is None:
            tqdm.write(f"length {length}: no micro-batch fits in memory to compile; eager")

    t_process = time.perf_counter()
    t0 = t_process - spent  # the loop's clock counts the earlier processes' seconds
    last_save = t_process
    to_train = finished is None and (cfg.steps is None or step < cfg.steps) and spent < budget
    if compiled is not None and to_train:
        # Compile each fixed length (most frequent first) before the first step, inside the
        # budget, until cfg.compile_budget of what is left of it is spent; without fixed
        # lengths, only the longest batch length. Lengths not compiled run eager.
        targets = lengths or (max(seen),)  # without fixed lengths only the longest compiles
        use = {L: sum(cover_length(r, targets) == L for r in seen) for L in targets}
        set_recompile_limit(64)  # the shapes routed to the compiled loss bound the graphs
        model.rope(torch.zeros(1, dtype=torch.long, device=device))  # its cache, before tracing
        compile_until = spent + cfg.compile_budget * (budget - spent)
        for L in sorted(targets, key=lambda L: -use[L]):
            if time.perf_counter() - t0 > compile_until:
                tqdm.write(f"compile budget spent: length {L} stays eager")
                continue
            fit(L, micro_batches.get(L, 1))
    last_dev = t0 + (dev_curve[-1]["seconds"] if dev_curve else 0.0)
    stopped = finished or "steps"
    terminate: list[int] = []  # SIGTERM received: save at the end of this step and stop
    catch = state is not None and threading.current_thread() is threading.main_thread()
    previous_handler = (
        signal.signal(signal.SIGTERM, lambda *_: terminate.append(1)) if catch else None
    )
    while finished is None and (cfg.steps is None or step < cfg.steps):
        if terminate:
            stopped = "terminated"
            break
        now = time.perf_counter()
        if dev is not None and cfg.dev_every_s is not None and now - last_dev >= cfg.dev_every_s:
            last_dev = now
            acc = run_dev(step)
            if cfg.stop_at_dev_acc is not None and acc >= cfg.stop_at_dev_acc:
                stopped = "dev accuracy"
                break
        elapsed = time.perf_counter() - t0
        if elapsed > budget:
            stopped = "budget"
            break
        if (
            state is not None
            and state.pause_after_s is not None
            and step > first_step
            and time.perf_counter() - t_process >= state.pause_after_s
        ):
            stopped = "paused"
            break
        progress = max(step / cfg.steps if cfg.steps else 0.0, elapsed / budget)
        lr = learning_rate(cfg, step, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(data)
        masked = noise_mask(batch, B, noise_gen)  # drawn before padding: the same noise
        if lengths:
            batch, masked = pad_batch(
                batch, masked, cover_length(batch.ids.shape[1], lengths), mask_id
            )
        ids, labels = diffusion_inputs(batch, masked, mask_id, B)
        length = ids.shape[1] // 2
        while True:
            optimizer.zero_grad(set_to_none=True)
            micro = micro_batches.get(length, 1)
            try:
                loss = accumulate_gradients(loss_fn, model, ids, labels, micro, autocast)
                break
            except torch.OutOfMemoryError:
                if micro >= MAX_MICRO_BATCHES:
                    raise
            except Exception as error:
                if compiled is None or compiled.failure is not None:
                    raise
                compiled.fail(error)  # the same step again, eager
                continue
            # outside the handler, so that the failed attempt's tensors are already released
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            micro_batches[length] = 2 * micro
            oom_events.append({"step": step, "length": length, "micro_batches": 2 * micro})
            tqdm.write(
                f"out of memory at step {step}: length {length} now in {2 * micro} micro-batches"
            )
            if compiled is not None and compiled.failure is None:
                fit(length, 2 * micro)  # its micro-batch shape compiled, not eager from now on
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        pending.append(loss.detach())
        step += 1
        if step % CURVE_EVERY == 0:
            sync_losses()
            curve_point(CURVE_EVERY)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.2e}", min=f"{elapsed / 60:.1f}")
        if state is not None and time.perf_counter() - last_save >= state.every_s:
            save_state(None)
            last_save = time.perf_counter()
        bar.update(1)
    sync_losses()
    if finished is None and stopped in FINISHED and step % CURVE_EVERY:
        curve_point(min(step % CURVE_EVERY, len(losses)))  # the last, partial window
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    bar.close()
    ended = stopped in ("steps", "budget")
    evaluated = bool(dev_curve) and dev_curve[-1]["step"] == step  # a resumed, finished run
    if dev is not None and ended and step and not evaluated and not terminate:
        run_dev(step)  # the accuracy of the weights that are saved
    if finished is None:  # a finished run resumed: nothing happened, nothing to record
        if state is not None:
            save_state(stopped)
        processes.append(this_process(stopped))
    if catch:
        signal.signal(signal.SIGTERM, previous_handler)
    wall = time.perf_counter() - t0
    compile_info = None
    if compiled is not None:
        compiled.restore()
        compile_info = {
            "lengths_compiled": sorted({s[1] // 2 for s in compiled.shapes}),
            "micro_batches": {L: m for L, m in sorted(micro_batches.items()) if m > 1},
            "warm_up_seconds": compiled.seconds,
            "failure": compiled.failure,
            "mode": cfg.compile_mode,
            "scope": cfg.compile_scope,
            "calls": compiled.calls,
            "calls_note": "loss calls routed to the compiled graphs or eager; a guard failure "
            "on a compiled shape also runs eager (eager_on_recompile) and is not counted here",
        }
    return TrainResult(
        model.eval(),
        losses,
        step,
        wall,
        loss_curve,
        dev_curve,
        stopped,
        oom_events,
        lengths,
        compile_info,
        processes,
    )


class DevEvaluator:
    """Dev accuracy at threshold 1 of the weights being trained: copies them into a separate
    inference model (bf16 on a GPU, as the saved checkpoint) that keeps its engine and CUDA
    graphs between calls, and decodes all dev problems in one batch."""

    def __init__(self, cfg: ModelConfig, tokenizer, problems: Sequence[dict], device):
        from v2.generate import FastDLLM, GenerationConfig

        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        model = Network(cfg).to(device=device, dtype=dtype).eval()
        self.lm = FastDLLM(model, tokenizer, token_ids(tokenizer))
        self.texts = [user_message(p["question"]) for p in problems]
        self.references = [p["answer"] for p in problems]
        self.config = GenerationConfig(max_new_tokens=256, threshold=1.0)

    def __call__(self, model: Network) -> float:
        self.lm.model.load_state_dict(model.state_dict())  # in place: the graphs stay valid
        strict, _, _ = score(self.lm, self.texts, self.references, self.config, len(self.texts))
        return accuracy(strict)["value"]


# ---- evaluation ----------------------------------------------------------------------------


def gold_answer(problem: dict) -> str:
    """The reference `#### N` of a problem, as the scorer compares it (v2/tasks/gsm_answers.py)."""
    return target(problem["answer"])


def _accuracy(correct: list[bool]) -> dict:
    """The record's accuracy and standard error (v2.record.accuracy) under this log's keys."""
    m = accuracy(correct)
    return {"accuracy": m["value"], "stderr": m["stderr"]}


def score(
    lm,
    texts,
    references,
    config,
    batch_size: int,
    make_policy=None,
    desc: str | None = None,
    engine=None,
    chat: bool = True,
):
    """Decode `texts` (chat template; `chat` False: none) in batches and score them against
    `references` (a problem's `answer`, "... #### N") with the one scorer
    (v2/tasks/gsm_answers.py, the lm_eval task's): per problem, whether the strict (first
    `#### N`) and the flexible (last number) answer are right, and the batches' summed
    statistics. `make_policy` builds the policy (None: no policy), once: policies reset their
    state at every block, and the model's engine keeps its CUDA graphs only for the policy object
    it was built with (a fresh policy per batch re-captured every batch: on the GPU, token
    skipping measured at 0.43x the baseline's tokens/s that way). `engine`: decode on this one
    (its policy; FastDLLM.engine) rather than the model's. `desc` shows a progress bar."""
    strict, flexible, stats = [], [], None
    starts = range(0, len(texts), batch_size)
    policy = make_policy() if make_policy else None
    for start in tqdm(starts, desc=desc) if desc else starts:
        batch = texts[start : start + batch_size]
        result = lm.generate(batch, config, policy, chat=chat, engine=engine)
        for out, ref in zip(result.outputs, references[start : start + batch_size], strict=True):
            ok = hits(out.text, ref)
            strict.append(ok["strict-match"])
            flexible.append(ok["flexible-extract"])
        if stats is None:
            stats = result.stats
        else:
            stats.add(result.stats)
    return strict, flexible, stats


def evaluate(
    checkpoint: str | Path,
    problems: Sequence[dict[str, str]],
    thresholds: Sequence[float] = (1.0, 0.9),
    batch_size: int = 250,
    max_new_tokens: int = 256,
) -> dict[str, dict]:
    """Greedy block-diffusion decoding of every problem at each threshold; accuracy of the strict
    and flexible answers against the reference `#### N`, and decoding statistics."""
    from v2.generate import FastDLLM, GenerationConfig

    lm = FastDLLM.load(checkpoint)
    references = [p["answer"] for p in problems]
    texts = [user_message(p["question"]) for p in problems]
    results = {}
    for threshold in thresholds:
        config = GenerationConfig(max_new_tokens=max_new_tokens, threshold=threshold)
        t = time.perf_counter()
        strict, flexible, stats = score(
            lm, texts, references, config, batch_size, desc=f"eval threshold {threshold}"
        )
        results[f"threshold_{threshold}"] = {
            "threshold": threshold,
            "n": len(texts),
            "strict_match": _accuracy(strict),
            "flexible_extract": _accuracy(flexible),
            "tokens_per_forward": stats.tokens_per_forward,
            "eval_seconds": time.perf_counter() - t,
            "stats": stats.to_dict(),
        }
        if problems and "level" in problems[0]:  # the hard family: strict accuracy by level
            by_level: dict[str, list[bool]] = {}
            for ok, p in zip(strict, problems, strict=True):
                by_level.setdefault(str(p["level"]), []).append(ok)
            results[f"threshold_{threshold}"]["strict_by_level"] = {
                level: {"n": len(ok), **_accuracy(ok)} for level, ok in sorted(by_level.items())
            }
    return results


def answer_problems(
    checkpoint: str | Path, problems: Sequence[dict], threshold: float = 1.0
) -> list[dict]:
    """Decode `problems` with a saved checkpoint (one batch, greedy, chat template) and return,
    per problem, the question, the reference `#### N`, the model's text and whether its strict
    answer is right. For spot checks of a trained checkpoint, e.g. in a test:
    `sum(r["correct"] for r in answer_problems(ckpt, read_jsonl(path)[:8])) >= 6`."""
    from v2.generate import FastDLLM, GenerationConfig

    lm = FastDLLM.load(checkpoint)
    texts = [user_message(p["question"]) for p in problems]
    config = GenerationConfig(max_new_tokens=256, threshold=threshold)
    outputs = lm.generate(texts, config, chat=True).outputs
    rows = []
    for p, out in zip(problems, outputs, strict=True):
        right = hits(out.text, p["answer"], ("strict-match",))["strict-match"]
        rows.append(
            {"question": p["question"], "gold": gold_answer(p), "text": out.text, "correct": right}
        )
    return rows


# ---- command -------------------------------------------------------------------------------


# TrainConfig values that --smoke changes unless they are given on the command line.
SMOKE_RUN = {"steps": 40, "batch_size": 16, "n_train": 2000, "warmup_steps": 5, "dev_limit": 8}
# TrainConfig values that --compile changes unless given: pad batches to at most 6 lengths.
COMPILE_RUN = {"fixed_lengths": 6}
# The command-line options that are TrainConfig fields (None: the preset or the default).
CONFIG_OPTIONS = (
    *SMOKE_RUN,
    "max_len",
    "bucket",
    "dev_every_s",
    "n_train",
    "lr",
    "fixed_lengths",
    "compile_mode",
    "compile_scope",
    "compile_budget",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m v2.tiny.train",
        description=" ".join(__doc__.split("\n\n")[0].split()),
    )
    p.add_argument("--out", type=Path, default=Path("v2/tiny/checkpoint"))
    p.add_argument("--task", choices=sorted(TASK_SPLITS), default="basic", help="problem family")
    p.add_argument("--arch", choices=["base", "deep"], default="base", help="model size (ARCHS)")
    p.add_argument("--minutes", type=float, default=8.0, help="training-loop wall-clock budget")
    p.add_argument("--steps", type=int, help="maximum steps (default: none; --smoke: 40)")
    p.add_argument(
        "--batch-size", type=int, help="problems per step (default 128; deep: 256; --smoke: 16)"
    )
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3; deep: 1.4e-3)")
    p.add_argument("--warmup-steps", type=int, help="default 200; --smoke: 5")
    p.add_argument("--n-train", type=int, help="training problems (default 200000; --smoke: 2000)")
    p.add_argument("--max-len", type=int, help="longest sample in tokens (256; hard: 416)")
    p.add_argument(
        "--bucket",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="length-bucketed batches (default: on for hard)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile each decoder layer, one graph per fixed batch length (default off)",
    )
    p.add_argument(
        "--compile-mode",
        help="torch.compile mode, e.g. max-autotune-no-cudagraphs (default: torch's default)",
    )
    p.add_argument(
        "--compile-scope",
        choices=["layers", "loss"],
        help="compile each decoder layer (default; faster to compile) or the whole loss",
    )
    p.add_argument(
        "--compile-budget",
        type=float,
        help="share of --minutes the compile warm-up may start lengths in (default 0.35)",
    )
    p.add_argument(
        "--fixed-lengths",
        type=int,
        help="pad each batch to one of at most N lengths (default: 6 with --compile, else off)",
    )
    p.add_argument(
        "--device", type=device_arg, default=None, help="default: cuda when available, else cpu"
    )
    p.add_argument("--smoke", action="store_true", help="a very small model for a CPU check")
    p.add_argument(
        "--dev-every-s",
        type=float,
        help="dev accuracy (threshold 1) every this many seconds of the budget (hard: 60)",
    )
    p.add_argument("--dev-limit", type=int, help="first N dev problems (default all; --smoke: 8)")
    p.add_argument(
        "--stop-at-dev-acc",
        type=float,
        help="stop training once dev accuracy reaches this fraction (default: off)",
    )
    p.add_argument(
        "--state",
        type=Path,
        help="keep the training state (weights, optimizer, step, curves) in this file, saved "
        "every --save-every-s seconds and when training ends; with --resume, continue from it",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run saved in --state (a fresh start when the file does not exist), "
        "with the same settings; its budget counts the seconds already spent",
    )
    p.add_argument(
        "--save-every-s", type=float, default=300.0, help="seconds between state saves (300)"
    )
    p.add_argument(
        "--pause-after",
        type=float,
        metavar="MIN",
        help="stop this process after MIN minutes of training, state saved, without saving the "
        "checkpoint or evaluating; the same command with --resume goes on",
    )
    p.add_argument("--no-eval", action="store_true")
    p.add_argument(
        "--eval-limit",
        type=int,
        help=f"evaluate the first N problems (--smoke: {SMOKE_EVAL_LIMIT})",
    )
    p.add_argument("--eval-batch-size", type=int, default=250)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    preset = {
        **TASK_RUN[args.task],
        **ARCH_RUN[args.arch],
        **(COMPILE_RUN if args.compile else {}),
        **(SMOKE_RUN if args.smoke else {}),
    }
    given = {k: getattr(args, k) for k in CONFIG_OPTIONS if getattr(args, k) is not None}
    return TrainConfig(
        minutes=args.minutes,
        seed=args.seed,
        compile=args.compile,
        task=args.task,
        stop_at_dev_acc=args.stop_at_dev_acc,
        **{**preset, **given},
    )


def training_problems(cfg: TrainConfig) -> list[dict]:
    """`cfg.n_train` problems of the task that exclude its committed test and dev questions."""
    held_out = [p for path in TASK_SPLITS[cfg.task] if path for p in read_jsonl(path)]
    exclude = {p["question"] for p in held_out}
    if cfg.task == "basic":
        return make_split(cfg.n_train, seed=2 * cfg.seed, exclude=exclude)
    return make_split(cfg.n_train, seed=HARD_SEED + 3 * cfg.seed, exclude=exclude, family=cfg.task)


def describe_model(cfg: ModelConfig, n_params: int) -> str:
    return (
        f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} "
        f"query / {cfg.num_key_value_heads} KV heads, intermediate {cfg.intermediate_size}: "
        f"{n_params / 1e6:.2f}M parameters = {2 * n_params / 1e6:.1f} MB in bf16"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.resume or args.pause_after is not None) and args.state is None:
        parser.error("--resume and --pause-after need --state FILE (where the run is kept)")
    if args.pause_after is not None and args.pause_after <= 0:
        parser.error(f"--pause-after must be positive minutes, not {args.pause_after}")
    if args.save_every_s < 0:
        parser.error(f"--save-every-s must be >= 0, not {args.save_every_s}")
    cfg = config_from_args(args)
    device = args.device or parse_device(None)
    state = None
    if args.state is not None:
        state = TrainState(
            args.state,
            every_s=args.save_every_s,
            pause_after_s=None if args.pause_after is None else args.pause_after * 60,
            resume=args.resume,
        )
        if args.state.exists() and not args.resume:
            parser.error(
                f"{args.state} holds a saved run: --resume continues it; to start afresh, "
                "remove it or give another --state"
            )
        if args.resume and args.state.exists():
            try:
                load_train_state(args.state, cfg, device.type)  # fails before any setup
            except TrainStateError as e:
                parser.exit(2, f"{parser.prog}: error: {e}\n")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out = args.out
    t_setup = time.perf_counter()
    test_path, dev_path = TASK_SPLITS[cfg.task]

    tokenizer = build_tokenizer(out)  # deterministic; saved again with the checkpoint
    mask_id = token_ids(tokenizer).mask
    test = read_jsonl(test_path)
    samples = encode_problems(tokenizer, training_problems(cfg), cfg.max_len, mask_id)
    torch.manual_seed(cfg.seed)
    model_cfg = default_model_config(len(tokenizer), smoke=args.smoke, arch=args.arch)
    model = Network(model_cfg)
    init_weights(model)
    n_params = sum(p.numel() for p in model.parameters())
    dev = None
    if dev_path is not None and cfg.dev_every_s is not None:
        dev_problems = read_jsonl(dev_path)[: cfg.dev_limit]
        dev = DevEvaluator(model_cfg, tokenizer, dev_problems, device)
    setup_seconds = time.perf_counter() - t_setup
    print(
        f"device {device}; task {cfg.task}; model {describe_model(model_cfg, n_params)}; "
        f"{len(samples)} training samples ({samples.dropped} longer than {cfg.max_len} "
        f"dropped); setup {setup_seconds:.1f} s",
        flush=True,
    )

    result = train(model, samples, mask_id, cfg, device, dev=dev, state=state)
    if result.stopped == "paused":
        print(
            f"paused at step {result.steps} after {result.wall_seconds:.0f} s of the "
            f"{cfg.minutes * 60:.0f} s budget; state saved to {args.state}. Go on with the same "
            "command plus --resume (without --pause-after to finish).",
            flush=True,
        )
        return 0
    if result.stopped == "terminated":
        print(
            f"stopped by SIGTERM at step {result.steps}; state saved to {args.state}. The same "
            "command with --resume goes on.",
            flush=True,
        )
        return 143  # 128 + SIGTERM, as if the signal had ended the process
    save_release_checkpoint(result.model, out, tokenizer, dtype=torch.bfloat16)
    weights_mb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6
    log = {
        "command": " ".join(["python -m v2.tiny.train", *(sys.argv[1:] if argv is None else argv)]),
        "seed": cfg.seed,
        "task": cfg.task,
        "task_levels": [dataclasses.asdict(lv) for lv in HARD_LEVELS]
        if cfg.task == "hard"
        else None,
        "arch": "smoke" if args.smoke else args.arch,
        "test_file": str(test_path.relative_to(DATA.parents[2])),
        "dev_file": str(dev_path.relative_to(DATA.parents[2])) if dev_path else None,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "steps": result.steps,
        "wall_seconds": result.wall_seconds,
        "setup_seconds": setup_seconds,
        "stopped": result.stopped,
        "final_loss": result.final_loss,
        "final_loss_note": "mean of the last 50 steps",
        "problems_per_second": result.steps * cfg.batch_size / max(result.wall_seconds, 1e-9),
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
        "parameters": n_params,
        "weights_mb_bf16": weights_mb,
        "train_samples": len(samples),
        "train_samples_dropped": samples.dropped,
        "train_config": dataclasses.asdict(cfg),
        "model_config": dataclasses.asdict(model_cfg),
        "loss_curve": result.loss_curve,
        "loss_curve_note": "mean loss of the 20 steps up to `step` (the last point: of the steps "
        "since the point before); seconds since the loop began, over every process",
        "dev_curve": result.dev_curve,
        "dev_problems": len(dev.texts) if dev is not None else 0,
        "dev_curve_note": "strict accuracy at threshold 1 on the dev split, greedy, one batch",
        "oom_events": result.oom_events,
        "processes": result.processes,
        "processes_note": "the processes that trained this model (more than one when resumed): "
        "first and last step, loop seconds, why each stopped",
        "fixed_lengths": list(result.lengths),
        "compile": result.compile,
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")

    lines = [
        f"checkpoint: {out} ({n_params / 1e6:.2f}M parameters, {weights_mb:.1f} MB bf16)",
        f"trained {result.steps} steps x {cfg.batch_size} problems in {result.wall_seconds:.0f} s "
        f"on {log['device_name']} (stopped: {result.stopped}"
        + (f"; {len(result.processes)} processes" if len(result.processes) > 1 else "")
        + f"); final loss (mean of the last {min(50, len(result.losses))} steps) "
        f"{result.final_loss:.4f}",
    ]
    if result.dev_curve:
        last = result.dev_curve[-1]
        lines.append(f"dev accuracy {last['dev_accuracy']:.1%} at step {last['step']}")
    if not args.no_eval:
        limit = args.eval_limit or (SMOKE_EVAL_LIMIT if args.smoke else None)
        eval_problems = test[:limit] if limit else test
        del result, model, dev
        print(f"evaluating {len(eval_problems)} problems of {test_path.name}", flush=True)
        log["eval"] = evaluate(out, eval_problems, batch_size=args.eval_batch_size)
        (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
        for r in log["eval"].values():
            s, f = r["strict_match"], r["flexible_extract"]
            lines.append(
                f"threshold {r['threshold']}: strict {s['accuracy']:.1%} +- {s['stderr']:.1%}, "
                f"flexible {f['accuracy']:.1%} +- {f['stderr']:.1%} (n={r['n']}), "
                f"{r['tokens_per_forward']:.2f} tokens/forward"
            )
    print("\n== tiny Fast-dLLM v2 training summary ==\n" + "\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
