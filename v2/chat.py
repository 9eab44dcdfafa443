"""A chat session over a loaded checkpoint, watched step by step: what the web app (v2/app.py)
and the terminal chatbot (v2/chatbot.py) share, so that neither reimplements the decoding loop.

A turn renders the conversation with the chat template, decodes it with `generate` and its step
observer, and keeps one StepRecord per denoise forward: the block's tokens (masked, newly
committed, already committed), the forward's per-layer plan (layer x block position: computed,
reused, passed) and the statistics so far.

The per-position plan comes from PlanRecorder, a transparent wrapper around the chosen policy: it
hands the policy's plans to the engine unchanged and keeps a copy, resolved the way the engine
resolves them (REUSE without a reference computes; under the sub-block cache a row running the
full block computes it). It asks the engine for eager plans (no CUDA-graph capture of plans): a
viewer pays that cost, an evaluation does not use it. Its per-layer counts agree with the engine's
own statistics of the same forward (tests/test_chat.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from v2 import policies
from v2.generate import (
    SETTING_TYPES,
    DenoiseStep,
    FastDLLM,
    GenerationConfig,
    GenerationError,
    generate,
    settings,
)
from v2.options import OptionError, parse_value
from v2.policies import baseline_note, make_policy
from v2.policy import COMPUTE, PASS, REUSE, ForwardContext, Policy
from v2.stats import Stats

NOT_RUN = -1  # a plan cell outside the forward's window or scope
# GenerationConfig settings a user may set (name -> type), e.g. `/set threshold 0.9`; not
# `decode`: the app and the chatbot show block-diffusion steps.
SETTINGS: dict[str, type] = {
    f.name: SETTING_TYPES[str(f.type)] for f in settings() if f.name != "decode"
}


class ChatError(ValueError):
    """Bad input to a chat session; the message is one line meant for the user."""


class Stopped(Exception):
    """Raised by the step observer when the user asked to stop."""


class PlanRecorder(Policy):
    """`policy`, unchanged for the engine, with a copy of each denoise forward's resolved plan:
    `plan_codes` [layers, batch, B] int8 of COMPUTE / REUSE / PASS, or NOT_RUN."""

    def __init__(self, policy: Policy, block_cache: bool):
        self.inner, self.block_cache = policy, block_cache
        self.name, self.reuses, self.passes = policy.name, policy.reuses, policy.passes
        self.plan_codes: torch.Tensor | None = None
        self.forwards = 0  # denoise forwards recorded so far
        self._has_ref: torch.Tensor | None = None  # [layers, batch, B]: a REUSE reference

    @property
    def enabled(self) -> bool:
        return self.inner.enabled

    def acts_on(self, num_layers: int) -> bool:
        return self.inner.acts_on(num_layers)

    def begin_block(self, batch_size: int, block_size: int, num_layers: int) -> None:
        self._has_ref = torch.zeros(num_layers, batch_size, block_size, dtype=torch.bool)
        self.inner.begin_block(batch_size, block_size, num_layers)

    def begin_forward(self, ctx: ForwardContext) -> None:
        self.forwards += 1
        self.plan_codes = torch.full(self._has_ref.shape, NOT_RUN, dtype=torch.int8)
        self.inner.begin_forward(ctx)

    def plan(self, layer: int, x: torch.Tensor, ctx: ForwardContext):
        plan = self.inner.plan(layer, x, ctx)
        b, w = x.shape[:2]
        scope = torch.ones(b, w, dtype=torch.bool) if ctx.units is None else ctx.units.cpu()
        if plan is None:
            codes = torch.full((b, w), COMPUTE, dtype=torch.int8)
        elif isinstance(plan, int):
            codes = torch.full((b, w), plan, dtype=torch.int8)
        else:
            codes = plan.to("cpu", torch.int8)
        if self.block_cache and w == ctx.block_size:  # a row running the full block computes
            codes = torch.where((codes == PASS) & scope.all(1, keepdim=True), COMPUTE, codes)
        window = slice(ctx.window_start, ctx.window_start + w)
        has_ref = self._has_ref[layer, :b, window]
        if self.reuses:
            codes = torch.where((codes == REUSE) & ~has_ref, COMPUTE, codes)
        else:
            codes = torch.where(codes == REUSE, COMPUTE, codes)
        codes = torch.where(scope, codes, NOT_RUN)
        self.plan_codes[layer, :b, window] = codes
        has_ref |= codes == COMPUTE
        return plan

    def capture_key(self, layer: int, ctx: ForwardContext):
        return None  # eager plans: the recorder must see each one

    def reuse_quota(self, layer: int, ctx: ForwardContext) -> int | None:
        return self.inner.reuse_quota(layer, ctx)

    def protected_layers(self, num_layers: int) -> set[int]:
        return self.inner.protected_layers(num_layers)

    def config(self) -> dict:
        return self.inner.config()


@dataclass
class StepRecord:
    """One denoise forward of a turn, for row 0 (a chat decodes one sequence)."""

    index: int  # denoise forward of the turn (0 = its first)
    block_start: int
    step: int  # denoise forward of its block
    window: tuple[int, int]  # (block offset, width)
    tokens: list[str]  # the block's tokens as text (the mask token where undecided)
    states: list[str]  # per position: "prompt", "masked", "new", "committed" or "outside"
    plan: list[list[int]]  # [layers][B]: COMPUTE / REUSE / PASS, NOT_RUN outside the forward
    text: str  # the answer so far (up to the first undecided position)
    forward: dict  # this forward's statistics (Stats.to_dict of its share)
    total: dict  # the turn so far (Stats.to_dict)


def summary(stats: dict) -> dict[str, float]:
    """The numbers a viewer shows: tokens per forward, executed FLOPs / no skipping, tokens/s."""
    return {
        "tokens_per_forward": stats["tokens_per_forward"],
        "flops_ratio": stats["flops_ratio"],
        "tokens_per_second": stats["tokens_per_second"],
        "generated_tokens": stats["generated_tokens"],
    }


@dataclass
class Turn:
    text: str
    finish_reason: str
    stats: Stats
    steps: list[StepRecord] = field(default_factory=list)
    stopped: bool = False
    policy: str = ""  # the session's describe() when the turn was decoded


def parse_options(name: str, pairs: list[str] | dict) -> dict:
    """`key=value` strings (or a dict of strings) -> typed options of policy `name`
    (v2.policies.parse_options: the vocabulary and messages of every entry point)."""
    items = pairs
    if not isinstance(pairs, dict):
        items = {}
        for p in pairs:
            key, eq, value = p.partition("=")
            if not eq or not key.strip():
                raise ChatError(f"policy options are key=value, got {p!r}")
            items[key.strip()] = value
    try:
        return policies.parse_options(name, items)
    except OptionError as e:
        raise ChatError(str(e)) from None


def parse_setting(name: str, value: str):
    """A GenerationConfig field from its text (`/set threshold 0.9`), read as every entry point
    reads a setting (v2.options.parse_value)."""
    if name not in SETTINGS:
        raise ChatError(f"unknown setting {name!r}; settings: {', '.join(SETTINGS)}")
    optional = GenerationConfig.__dataclass_fields__[name].default is None
    try:
        return parse_value(value, SETTINGS[name], name, optional=optional)
    except OptionError as e:
        raise ChatError(str(e)) from None


class ChatSession:
    """A conversation with one loaded checkpoint: history, settings, a policy, the last turn."""

    # how the user starts over, in the error of a conversation past the model's positions: the
    # chatbot's command (the app names its own button)
    start_over = "/reset to start over"

    def __init__(
        self,
        lm: FastDLLM,
        config: GenerationConfig | None = None,
        lock: threading.Lock | None = None,
    ):
        self.lm = lm
        self.config = config or GenerationConfig()
        self.history: list[dict[str, str]] = []
        self.policy_name, self.policy_options = "none", {}
        self.note: str | None = None  # the policy can skip nothing: the baseline (set_policy)
        self.last: Turn | None = None
        self._policy_key = None
        self._recorder: PlanRecorder | None = None
        self.lock = lock or threading.Lock()  # one generation at a time on the model

    # ---- settings ------------------------------------------------------------------------------

    def set_policy(self, name: str, options: dict | list[str] | None = None) -> str | None:
        """Choose a registered policy; bad names or options raise ChatError (nothing changes).
        Returns (and keeps in `note`) the note when the policy can skip nothing on this model."""
        opts = parse_options(name, options or [])
        try:
            policy = make_policy(name, **opts)
        except (ValueError, TypeError) as e:
            raise ChatError(str(e)) from None
        self.policy_name, self.policy_options = name, opts
        self.note = baseline_note(policy, opts, self.lm.model.cfg.num_hidden_layers)
        return self.note

    def set(self, name: str, value) -> None:
        """One generation setting (validated against the model's block size)."""
        value = parse_setting(name, value) if isinstance(value, str) else value
        cfg = GenerationConfig(**{**self.config.__dict__, name: value})
        self.validate(cfg)
        self.config = cfg

    def validate(self, cfg: GenerationConfig) -> None:
        try:
            cfg.validate(cfg.block_size or self.lm.model.cfg.block_size)
        except GenerationError as e:
            raise ChatError(str(e)) from None

    def reset(self) -> None:
        self.history = []
        self.last = None

    def describe(self) -> str:
        opts = " ".join(f"{k}={v}" for k, v in self.policy_options.items())
        return f"policy {self.policy_name}{' ' + opts if opts else ''}"

    # ---- a turn ---------------------------------------------------------------------------------

    def policy(self) -> PlanRecorder | None:
        """The recorder around the current policy, kept while the policy and its options stay
        (so the model's engine and its buffers are reused across turns)."""
        if self.policy_name == "none":
            return None
        key = (
            self.policy_name,
            tuple(sorted(self.policy_options.items())),
            self.config.use_block_cache,
        )
        if key != self._policy_key:
            inner = make_policy(self.policy_name, **self.policy_options)
            self._recorder = PlanRecorder(inner, self.config.use_block_cache)
            self._policy_key = key
        return self._recorder

    def prompt_ids(self, message: str) -> list[int]:
        messages = [*self.history, {"role": "user", "content": message}]
        tok = self.lm.tokenizer
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok.encode(text, add_special_tokens=False)

    def reply(self, message: str, on_step=None, stop: threading.Event | None = None) -> Turn:
        """Answer `message` in the conversation. `on_step(StepRecord)` after each denoise forward;
        setting `stop` ends the turn at the next forward (the partial answer is kept)."""
        if not message.strip():
            raise ChatError("empty message")
        self.validate(self.config)
        ids = self.prompt_ids(message)
        limit = self.lm.model.cfg.max_position_embeddings
        if len(ids) >= limit:
            raise ChatError(
                f"the conversation is {len(ids)} tokens; the model has {limit} positions "
                f"({self.start_over})"
            )
        recorder, described = self.policy(), self.describe()
        view = _Viewer(self, len(ids), recorder, on_step, stop)
        with self.lock:
            try:
                result = generate(
                    self.lm.model, [ids], self.lm.ids, self.config, recorder, observer=view
                )
            except Stopped:
                turn = Turn(view.text(), "stopped", view.stats(), view.steps, stopped=True)
            except GenerationError as e:
                raise ChatError(str(e)) from None
            else:
                out = result.outputs[0]
                text = self.lm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
                turn = Turn(text, out.finish_reason, result.stats, view.steps)
        self.history += [
            {"role": "user", "content": message},
            {"role": "assistant", "content": turn.text},
        ]
        turn.policy = described
        self.last = turn
        return turn


class _Viewer:
    """The step observer of one turn: DenoiseStep -> StepRecord."""

    def __init__(self, session: ChatSession, prompt_len: int, recorder, on_step, stop):
        self.lm, self.prompt_len, self.recorder = session.lm, prompt_len, recorder
        self.on_step, self.stop = on_step, stop
        self.steps: list[StepRecord] = []
        self.blocks: dict[int, torch.Tensor] = {}  # block start -> its generated ids so far
        self.seen = recorder.forwards if recorder is not None else 0
        self._last: DenoiseStep | None = None

    def __call__(self, s: DenoiseStep) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Stopped
        ids = self.lm.ids
        tokens, B = s.tokens[0], s.tokens.shape[1]
        L = self.lm.model.cfg.num_hidden_layers
        pos = s.block_start + torch.arange(B)
        states = []
        for j in range(B):
            if pos[j] < self.prompt_len:
                states.append("prompt")
            elif not s.generated[0, j]:
                states.append("outside")
            elif s.committed[0, j]:
                states.append("new")
            elif tokens[j] == ids.mask:
                states.append("masked")
            else:
                states.append("committed")
        ok = s.generated[0]
        self.blocks[s.block_start] = tokens[ok]
        if self.recorder is not None and self.recorder.forwards > self.seen:
            self.seen = self.recorder.forwards
            plan = self.recorder.plan_codes[:, 0].tolist()
        else:  # no policy (or a disabled one): every unit of the window computes
            w0, w = s.window_start, s.window_size
            row = [COMPUTE if w0 <= j < w0 + w else NOT_RUN for j in range(B)]
            plan = [list(row) for _ in range(L)]
        tok = self.lm.tokenizer
        record = StepRecord(
            index=len(self.steps),
            block_start=s.block_start,
            step=s.step,
            window=(s.window_start, s.window_size),
            tokens=[tok.decode([int(t)]) for t in tokens],
            states=states,
            plan=plan,
            text=self.text(),
            forward=s.forward.to_dict(),
            total=s.total.to_dict(),
        )
        self._last = s
        self.steps.append(record)
        if self.on_step is not None:
            self.on_step(record)

    def answer_ids(self) -> list[int]:
        """The answer so far: decided tokens up to the first undecided one, cut after EOS."""
        ids, out = self.lm.ids, []
        for start in sorted(self.blocks):
            for t in self.blocks[start].tolist():
                if t == ids.mask:
                    return out
                out.append(t)
                if t == ids.eos:
                    return out
        return out

    def text(self) -> str:
        return self.lm.tokenizer.decode(self.answer_ids(), skip_special_tokens=True)

    def stats(self) -> Stats:
        if self._last is None:
            return Stats(self.lm.model.cfg.num_hidden_layers)
        return self._last.total


if __name__ == "__main__":
    import sys

    sys.exit(
        "v2.chat is the conversation library; talk to a model with `python -m v2.chatbot` "
        "(terminal) or `python -m v2.app` (web)"
    )
