"""The lm_eval model `fast_dllm_v2`: Fast-dLLM v2 block-diffusion decoding behind lm_eval's `LM`
interface (docs/evaluation.md). The entry point is `v2/eval.py`; this module holds the class so
that it is registered once per process, whatever runs as `__main__`.

- `generate_until`: requests grouped by (task, gen_kwargs) so each request gets its own `until`
  and `max_gen_toks`, sorted by prompt length, decoded in batches by `v2.generate.generate`.
- `loglikelihood`: the release's scoring rule (fast-dllm-v2.md section 8, `release_loglikelihood`)
  on the release's split of each request into context and continuation tokens (`encode_pair`:
  no whitespace moved; where the context's tokens are not a prefix of the whole's, the merged
  token is scored). is_greedy is the real value (the release always returns 0.0).
- Statistics: each batch's `Stats` is split among its requests (generated tokens exactly per
  row; forwards, units, FLOPs and wall-clock in equal shares, integers by largest remainder so
  sums are exact) and recorded in `RUN` by (task, doc_id, idx), at most `repeats` times per key,
  so lm_eval's data-parallel padding (copies of a rank's last request) is never counted twice.
  Batches never mix tasks, so per-task sums are exact batch sums.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import lm_eval.models  # noqa: F401 - registers lm_eval's own models (lazily) so they stay usable
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry, register_model
from tqdm import tqdm

from v2.bench.timing import settle
from v2.checkpoint import TokenIds
from v2.generate import (
    EVAL_DEFAULTS,
    SETTING_TYPES,
    FastDLLM,
    GenerationConfig,
    GenerationError,
    check_decode,
    engine_for,
    generate,
    settings,
)
from v2.model import Network, block_causal_mask
from v2.options import OptionError, parse_value
from v2.policies import all_options, baseline_note, make_policy, options_of
from v2.runs.spec import as_run, record_config
from v2.stats import FORWARD_KINDS, PER_LAYER, SPECULATIVE_COUNTS, Stats

log = logging.getLogger(__name__)

MODEL_NAME = "fast_dllm_v2"
# The release's prompt rewrite (fast-dllm-v2.md section 9).
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
RELEASE_MAX_NEW_TOKENS = 2048
DEFAULT_MAX_GEN_TOKS = 256  # lm_eval's default when a task sets no max_gen_toks
DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# The generation settings as model_args: GenerationConfig's (v2/generate.py), with the
# evaluation defaults (EVAL_DEFAULTS: threshold 1.0) where they differ; max_new_tokens None: each
# request's max_gen_toks (2048 with release_recipe). decode: diffusion, autoregressive or
# speculative (v2/speculative.py; threshold and small_block_size then set the draft, and a policy
# applies to the draft only). ignore_eos is not one: lm_eval's stop strings end an answer.
GENERATION_ARGS: dict[str, object] = {
    f.name: {**EVAL_DEFAULTS, "max_new_tokens": None}.get(f.name, f.default)
    for f in settings()
    if f.name != "ignore_eos"
}
# Every model_arg and its default but the policy options (added from their declarations when
# asked for: model_arg_defaults()).
MODEL_ARGS: dict[str, object] = {
    "pretrained": None,
    "model_path": None,  # alias of pretrained (eval.py rewrites it so results get a named folder)
    **GENERATION_ARGS,
    "dtype": "auto",
    "show_speed": False,
    "mask_token": None,
    "release_recipe": False,
    "policy": None,
}
# Passed by lm_eval itself (trust_remote_code is accepted and ignored: we never run remote code).
LM_EVAL_ARGS = ("batch_size", "max_batch_size", "device", "trust_remote_code")


def model_arg_defaults() -> dict[str, object]:
    """Every model_arg and its default: MODEL_ARGS and each registered policy's options (None:
    the policy's own default)."""
    return {**MODEL_ARGS, **dict.fromkeys(all_options())}


class EvalError(ValueError):
    """Bad evaluation input; the message is one line meant for the user."""


@dataclass
class RunRecord:
    """What one process's model saw, read by `v2.eval` after lm_eval returns."""

    default_policy: str | None = None
    config: dict = field(default_factory=dict)  # summary.json "config"
    pretrained: str | None = None
    num_layers: int = 0
    rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False
    # this process's generate() wall time, summed (ranks decode at the same time: the run's
    # decoding wall is the largest over ranks, not their sum)
    decode_seconds: float = 0.0
    # (task, doc_id, idx) -> one Stats per generated occurrence (at most `repeats`)
    requests: dict[tuple, list[Stats]] = field(default_factory=dict)

    def record(self, key: tuple, repeats: int | None, stats: Stats) -> None:
        kept = self.requests.setdefault(key, [])
        if len(kept) < max(repeats or 1, 1):
            kept.append(stats)


RUN = RunRecord()


def reset_run(default_policy: str | None = None) -> RunRecord:
    global RUN
    RUN = RunRecord(default_policy=default_policy)
    return RUN


def close_process_group(finished: bool = False) -> None:
    """Tear down the process group if this module created it. `finished`: every rank got here
    normally, so wait for the others first (a rank that tore down its gloo group while a peer
    was still in its last collective was seen to abort: "terminate called without an active
    exception"); after an error, no barrier: a dead peer would hang it."""
    if RUN.owns_process_group:
        import torch.distributed as dist

        if dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()
        RUN.owns_process_group = False


# ---------------------------------------------------------------------------------------------
# Argument parsing


def _value(v, kind: type, name: str, optional: bool = False):
    """A model_arg's value, read as every entry point reads a setting (v2.options.parse_value)."""
    try:
        return parse_value(v, kind, name, optional=optional)
    except OptionError as e:
        raise EvalError(str(e)) from None


def generation_args(a: dict) -> dict:
    """The GenerationConfig settings of model_args `a` but max_new_tokens, checked by type."""
    out = {}
    for f in settings():
        if f.name not in GENERATION_ARGS or f.name == "max_new_tokens":
            continue
        optional = f.default is None
        out[f.name] = _value(a[f.name], SETTING_TYPES[str(f.type)], f.name, optional)
    return out


def parse_batch_size(value) -> int:
    """lm_eval passes --batch_size as a string; only a positive integer is supported."""
    try:
        n = int(str(value))
    except ValueError:
        raise EvalError(
            f"--batch_size {value!r} is not supported; give a positive integer "
            "(automatic batch sizes are not implemented)"
        ) from None
    if n < 1:
        raise EvalError(f"--batch_size must be a positive integer, got {value!r}")
    return n


def select_policy(args: dict, default_policy: str | None):
    """The policy from `policy=` and its options. With no `policy=`, a script's default policy
    (token_skip_eval / layer_skip_eval) applies; reuse_k / layer_subset / subset_size turn the
    default 'layer' into 'reuse'. `policy=none` always means no skipping."""
    options = {k: args[k] for k in all_options() if args.get(k) is not None}
    if isinstance(options.get("layer_subset"), list | tuple):
        options["layer_subset"] = ",".join(str(x) for x in options["layer_subset"])
    name = args["policy"]
    if name is None and default_policy is not None:
        name = default_policy
        reuse = {d.name for d in options_of("reuse")}
        if default_policy == "layer" and set(options) & reuse:
            name = "reuse"
    try:
        policy = make_policy(name, **options)
    except (ValueError, TypeError) as e:
        raise EvalError(str(e)) from None
    if note := baseline_note(policy, options):
        print(f"[fast_dllm_v2] note: {note}", file=sys.stderr)
    return policy


def resolve_device(requested) -> torch.device:
    """cuda:LOCAL_RANK under a data-parallel launcher; lm_eval's default cuda:0 falls back to the
    CPU where there is no GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    req = str(requested) if requested else ""
    if not torch.cuda.is_available():
        return torch.device("cpu") if not req or req.startswith("cuda") else torch.device(req)
    if world > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(req or "cuda:0")


def setup_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group that accelerate launch / torchrun describe in the environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        RUN.owns_process_group = True
    return dist.get_rank(), dist.get_world_size()


# ---------------------------------------------------------------------------------------------
# Statistics


def split_stats(total: Stats, tokens: list[int]) -> list[Stats]:
    """One batch's Stats as one Stats per row: generated tokens exactly per row; every other
    quantity in equal shares (integers by largest remainder), so the parts sum to the total."""
    n = len(tokens)
    if sum(tokens) != total.generated_tokens:
        raise AssertionError("per-row tokens do not add up to the batch's generated tokens")

    def shares(v: int) -> list[int]:
        q, r = divmod(v, n)
        return [q + (i < r) for i in range(n)]

    parts = [Stats(num_layers=total.num_layers) for _ in range(n)]
    for kind in FORWARD_KINDS:
        for p, f, rf in zip(
            parts, shares(total.forwards[kind]), shares(total.row_forwards[kind]), strict=True
        ):
            p.forwards[kind], p.row_forwards[kind] = f, rf
    for p, e, b in zip(
        parts, shares(total.executed_flops), shares(total.baseline_flops), strict=True
    ):
        p.executed_flops, p.baseline_flops = e, b
    for name in PER_LAYER:  # executed, baseline, reused, padding units
        for layer, v in enumerate(getattr(total, f"{name}_units_per_layer")):
            for p, share in zip(parts, shares(v), strict=True):
                getattr(p, f"{name}_units_per_layer")[layer] = share
    for name in SPECULATIVE_COUNTS:
        for p, v in zip(parts, shares(getattr(total, name)), strict=True):
            setattr(p, name, v)
    for p, t in zip(parts, tokens, strict=True):
        p.generated_tokens = t
        p.wall_seconds = total.wall_seconds / n
        # The engine's graph sets so far: a running count, not a share (Stats.add keeps the max).
        p.graph_sets, p.graph_failures = total.graph_sets, total.graph_failures
    return parts


def sum_stats(items, num_layers: int) -> Stats:
    total = Stats(num_layers=num_layers)
    for s in items:
        total.add(s)
    return total


def cut_at_stop(text: str, until: list[str]) -> str:
    """The text up to the first occurrence of any stop string."""
    end = len(text)
    for stop in until:
        if stop:
            i = text.find(stop)
            if 0 <= i < end:
                end = i
    return text[:end]


# ---------------------------------------------------------------------------------------------
# Scoring


def encode_pair(
    encode: Callable[[str], list[int]], context: str, continuation: str, empty_context: int
) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) of a loglikelihood request, the tokens of
    context + continuation split in two. The one rule, documented in docs/evaluation.md:

    - the release's split: the continuation is the tokens of the whole after the context's own
      tokens, whenever the context's tokens are a prefix of the whole's. Nothing is moved: a
      context ending in whitespace ("<|im_start|>assistant\\n", "Answer: " before "7") keeps
      it, and the first continuation token (the one scored) is the continuation's own.
    - where they are not a prefix (the context's last token merges with the continuation's
      first: "Answer: " + "A" is "Answer", ":", " A"), the split is at the first token where
      the two differ: the context is the common leading tokens, the merged token " A" is the
      first continuation token. (The release crashes there, or scores a sequence that is not
      the text's tokenisation when the continuation has more tokens.)
    - an empty context (or one whose every token merges) is the single token `empty_context`
      (EOS), so the first continuation token has a position to be predicted from.

    `encode` tokenises without special tokens added. A continuation with no tokens of its own
    is an error."""
    whole, ctx = encode(context + continuation), encode(context)
    n = 0
    while n < min(len(ctx), len(whole)) and ctx[n] == whole[n]:
        n += 1
    if n == len(whole):
        raise GenerationError(
            f"loglikelihood continuation {continuation!r} adds no tokens to its context"
        )
    return (whole[:n] or [empty_context]), whole[n:]


@torch.inference_mode()
def release_loglikelihood(
    model: Network,
    ids: TokenIds,
    pairs: list[tuple[list[int], list[int]]],
    block_size: int,
    batch_size: int = 1,
) -> list[tuple[float, bool]]:
    """The release's score of each (context tokens, continuation tokens): the first continuation
    token is masked, the sequence right-padded with masks to the next multiple of B (a whole
    extra block when already aligned) with EOS in the first pad slot, and one block-causal
    forward gives log p(first continuation token) from the previous position's logits. Later
    continuation tokens stay visible and unscored.

    Rows of a batch are right-padded with masks to a common length; those masks lie in blocks
    after each row's own last block, which the block-causal rule hides, so a row scores the same
    alone or in a batch."""
    B = block_size
    max_pos = model.cfg.max_position_embeddings
    device = model.embed_tokens.weight.device
    rows: list[tuple[list[int], int, int]] = []  # (padded ids, first continuation slot, target)
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise GenerationError("loglikelihood needs a non-empty context and continuation")
        seq = list(ctx) + list(cont)
        first, target = len(ctx), seq[len(ctx)]
        seq[first] = ids.mask
        total = (len(seq) // B + 1) * B
        if total > max_pos:
            raise GenerationError(
                f"a loglikelihood request of {len(seq)} tokens does not fit the model's "
                f"{max_pos} positions"
            )
        rows.append((seq + [ids.eos] + [ids.mask] * (total - len(seq) - 1), first, target))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    for s in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[s : s + batch_size]]
        T = max(len(r[0]) for r in batch)
        tokens = torch.tensor(
            [r[0] + [ids.mask] * (T - len(r[0])) for r in batch], dtype=torch.long, device=device
        )
        positions = torch.arange(T, device=device)
        logits = model(tokens, positions, block_causal_mask(positions, positions, B))
        at = torch.tensor([r[1] - 1 for r in batch], device=device)  # token shift
        logp = logits[torch.arange(len(batch), device=device), at].log_softmax(-1)
        target = torch.tensor([r[2] for r in batch], device=device)
        score = logp.gather(-1, target[:, None]).squeeze(-1).tolist()
        greedy = (logp.argmax(-1) == target).tolist()
        for i, sc, g in zip(order[s : s + batch_size], score, greedy, strict=True):
            out[i] = (float(sc), bool(g))
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class Settings:
    """Validated model_args (nothing loaded yet)."""

    path: str
    batch_size: int
    dtype_name: str
    mask_token: str | None
    release_recipe: bool
    show_speed: bool
    max_new_tokens: int | None  # None: each request's max_gen_toks
    gen_config: GenerationConfig
    policy: object


def parse_model_args(model_args: dict, batch_size=1, default_policy: str | None = None) -> Settings:
    """Check every model_arg (unknown names, types, the policy) before anything is loaded."""
    known = model_arg_defaults()
    unknown = sorted(set(model_args) - set(known) - set(LM_EVAL_ARGS))
    if unknown:
        raise EvalError(
            f"unknown model_args {', '.join(unknown)}; valid model_args: {', '.join(known)}"
        )
    a = {**known, **{k: v for k, v in model_args.items() if k in known}}
    if a["pretrained"] is not None and a["model_path"] is not None:
        raise EvalError("give pretrained= or model_path=, not both")
    path = a["pretrained"] if a["pretrained"] is not None else a["model_path"]
    if path is None:
        raise EvalError("model_args need pretrained=<checkpoint directory or hub id>")
    dtype_name = str(a["dtype"]).lower()
    if dtype_name not in DTYPES:
        raise EvalError(f"dtype={a['dtype']!r}: choose one of {', '.join(DTYPES)}")
    release = _value(a["release_recipe"], bool, "release_recipe")
    max_new = _value(a["max_new_tokens"], int, "max_new_tokens", optional=True)
    if max_new is None and release:
        max_new = RELEASE_MAX_NEW_TOKENS
    config = GenerationConfig(max_new_tokens=max_new or 1, **generation_args(a))
    if config.block_size is not None:
        config.validate(config.block_size)
    policy = select_policy(a, default_policy)
    try:
        check_decode(config, policy)
    except GenerationError as e:
        raise EvalError(str(e)) from None
    return Settings(
        path=str(path),
        batch_size=parse_batch_size(1 if batch_size is None else batch_size),
        dtype_name=dtype_name,
        mask_token=a["mask_token"],
        release_recipe=release,
        show_speed=_value(a["show_speed"], bool, "show_speed"),
        max_new_tokens=max_new,
        gen_config=config,
        policy=policy,
    )


class FastDLLMEvalLM(LM):
    """lm_eval model `fast_dllm_v2`; model_args are listed by model_arg_defaults()."""

    def __init__(self, batch_size=1, max_batch_size=None, device=None, **model_args):
        super().__init__()
        st = parse_model_args(model_args, batch_size, RUN.default_policy)
        self.batch_size, self.policy = st.batch_size, st.policy
        self._warm = False  # the warm-up rule has run (CUDA: compilation, graph capture)
        self.release_recipe, self.show_speed = st.release_recipe, st.show_speed
        self.max_new_tokens, self.gen_config = st.max_new_tokens, st.gen_config

        self._device = resolve_device(device)
        self._rank, self._world_size = setup_distributed(self._device)
        RUN.rank, RUN.world_size = self._rank, self._world_size

        self.lm = FastDLLM.load(
            st.path, dtype=DTYPES[st.dtype_name], device=str(self._device), mask_token=st.mask_token
        )
        self.model, self.tokenizer, self.ids = self.lm.model, self.lm.tokenizer, self.lm.ids
        self.block_size = self.gen_config.block_size or self.model.cfg.block_size
        self.gen_config.validate(self.block_size)  # fail now, not after the data is loaded
        self._warned: set[str] = set()

        RUN.pretrained = st.path
        RUN.num_layers = self.model.cfg.num_hidden_layers
        p = self.policy
        if p is not None and p.enabled and not p.layers(RUN.num_layers):  # else said already
            given = {k: v for k, v in model_args.items() if k in all_options() and v is not None}
            note = baseline_note(p, given, RUN.num_layers)
            print(f"[fast_dllm_v2] note: {note}", file=sys.stderr)
        RUN.config = record_config(  # every generation setting as run, and the policy
            as_run(self.gen_config, self.block_size, self.max_new_tokens),
            self.policy,
            batch_size=self.batch_size,
            dtype=str(self.model.embed_tokens.weight.dtype).removeprefix("torch."),
            num_processes=self._world_size,
            release_recipe=self.release_recipe,
        )

    # -- lm_eval hooks -------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template or ""

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def get_model_info(self) -> dict:
        """Recorded under results["config"] in lm_eval's results file."""
        return {MODEL_NAME: dict(RUN.config)}

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size == 1:
            return tensor
        import torch.distributed as dist

        t = (tensor if tensor.dim() else tensor[None]).contiguous()
        parts = [torch.empty_like(t) for _ in range(self._world_size)]
        dist.all_gather(parts, t)
        return torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self._world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self._world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    # -- requests ------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _prompt(self, context: str) -> list[int]:
        if self.release_recipe:
            for word in ("Answer:", "Solution:"):
                context = context.replace(word, BOXED_INSTRUCTION)
        return self._encode(context)

    def _until_and_budget(self, gen_kwargs: dict) -> tuple[list[str], int]:
        ignored = sorted(set(gen_kwargs) - {"until", "max_gen_toks", "do_sample", "temperature"})
        if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0:
            ignored.append("do_sample/temperature")
        if ignored and "gen_kwargs" not in self._warned:
            self._warned.add("gen_kwargs")
            log.warning(
                "%s ignores gen_kwargs %s (sampling is set by the temperature/top_p model_args)",
                MODEL_NAME,
                ", ".join(ignored),
            )
        if self.release_recipe:
            return [], self.max_new_tokens or RELEASE_MAX_NEW_TOKENS
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        budget = self.max_new_tokens or int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        return until, budget

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            key = (req.task_name, json.dumps(req.args[1], sort_keys=True, default=str))
            groups.setdefault(key, []).append(i)
        bar = tqdm(total=len(requests), desc=MODEL_NAME, disable=disable_tqdm or self._rank != 0)
        tokens_done, seconds = 0, 0.0
        greedy = self.gen_config.temperature == 0
        for idxs in groups.values():
            until, budget = self._until_and_budget(requests[idxs[0]].args[1])
            config = replace(self.gen_config, max_new_tokens=budget)
            # Greedy decoding is deterministic: identical requests (lm_eval pads data-parallel
            # shards with copies of the last request) are decoded once and the text copied.
            first: dict[tuple, int] = {}
            todo = []
            for i in idxs:
                r = requests[i]
                k = (r.task_name, r.doc_id, r.idx, r.args[0])
                if greedy and k in first:
                    continue
                first.setdefault(k, i)
                todo.append(i)
            prompts = {i: self._prompt(requests[i].args[0]) for i in todo}
            todo.sort(key=lambda i: -len(prompts[i]))
            for s in range(0, len(todo), self.batch_size):
                batch = todo[s : s + self.batch_size]
                run = partial(
                    generate, self.model, [prompts[i] for i in batch], self.ids, config, self.policy
                )
                if not self._warm and self.model.embed_tokens.weight.is_cuda:
                    # The warm-up rule (v2.bench.timing.settle): the first batch again until a
                    # decode sets nothing up in the engine (compilation, forward records,
                    # CUDA-graph warm-up and capture are not in the measured wall-clock:
                    # compute-skipping.md section 5); the decode that set nothing up is the
                    # batch's result, the others are neither timed nor counted.
                    engine = engine_for(self.model, config, self.policy)  # the one run uses
                    result = settle(run, [engine]).result
                    self._warm = True
                else:
                    result = run()
                tokens = [len(o.token_ids) for o in result.outputs]
                parts = split_stats(result.stats, tokens)
                for i, o, st in zip(batch, result.outputs, parts, strict=True):
                    r = requests[i]
                    text = self.tokenizer.decode(o.token_ids, skip_special_tokens=True)
                    out[i] = cut_at_stop(text, until)
                    RUN.record((r.task_name, r.doc_id, r.idx), r.repeats, st)
                    self.cache_hook.add_partial("generate_until", r.args, out[i])
                tokens_done += result.stats.generated_tokens
                seconds += result.stats.wall_seconds
                RUN.decode_seconds += result.stats.wall_seconds
                bar.update(len(batch))
                bar.set_postfix_str(f"{tokens_done / max(seconds, 1e-9):.1f} tok/s")
                if self.show_speed:
                    s_ = result.stats
                    print(
                        f"[{MODEL_NAME}] batch of {len(batch)}: {s_.generated_tokens} tokens in "
                        f"{s_.wall_seconds:.2f} s, {s_.tokens_per_second:.1f} tokens/s, "
                        f"{s_.tokens_per_forward:.2f} tokens/forward",
                        file=sys.stderr,
                    )
            for i in idxs:
                if out[i] is None:
                    r = requests[i]
                    out[i] = out[first[(r.task_name, r.doc_id, r.idx, r.args[0])]]
                    bar.update(1)
        bar.close()
        return out  # type: ignore[return-value]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return encode_pair(self._encode, context, continuation, self.ids.eos)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if not requests:
            return []
        pairs = [self._encode_pair(*r.args) for r in requests]
        results = []
        chunk = max(self.batch_size, 1) * 16
        bar = tqdm(
            total=len(requests),
            desc=f"{MODEL_NAME} loglikelihood",
            disable=disable_tqdm or self._rank != 0,
        )
        for s in range(0, len(pairs), chunk):
            part = release_loglikelihood(
                self.model, self.ids, pairs[s : s + chunk], self.block_size, self.batch_size
            )
            for r, res in zip(requests[s : s + chunk], part, strict=True):
                self.cache_hook.add_partial("loglikelihood", r.args, res)
            results.extend(part)
            bar.update(len(part))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            f"{MODEL_NAME} does not support loglikelihood_rolling (perplexity tasks): the release "
            "scores only the first continuation token (docs/evaluation.md)"
        )


if MODEL_NAME not in model_registry.keys():  # noqa: SIM118 - registered once per process
    register_model(MODEL_NAME)(FastDLLMEvalLM)
