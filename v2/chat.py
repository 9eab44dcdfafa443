"""A chat session over a loaded checkpoint, watched step by step: what the web app (v2/app.py)
and the terminal chatbot (v2/chatbot.py) share, so that neither reimplements the decoding loop.

A turn renders the conversation with the chat template, decodes it with `generate` watched by an
observer, and keeps one StepRecord per denoise forward: the block's tokens (masked, newly
committed, already committed), the forward's per-layer plan (layer x block position: computed,
reused, passed) and the statistics so far.

The per-position plan is the engine's own: what each layer executed for each unit, read back for
the observer (v2/observer.py), the policy left as it is: every registered policy works. Watching
makes the engine plan eagerly (no CUDA-graph capture of plans): a viewer pays that cost, an
evaluation does not.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from v2 import policies
from v2.generate import (
    SETTING_TYPES,
    FastDLLM,
    GenerationConfig,
    GenerationError,
    generate,
    settings,
)
from v2.observer import DenoiseStep, Observer
from v2.options import OptionError, parse_value
from v2.policies import baseline_note, make_policy
from v2.policy import Policy
from v2.stats import Stats

# GenerationConfig settings a user may set (name -> type), e.g. `/set threshold 0.9`; not
# `decode`: the app and the chatbot show block-diffusion steps.
SETTINGS: dict[str, type] = {
    f.name: SETTING_TYPES[str(f.type)] for f in settings() if f.name != "decode"
}


class ChatError(ValueError):
    """Bad input to a chat session; the message is one line meant for the user."""


class Stopped(Exception):
    """Raised by a turn's observer when the user asked to stop."""


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

    def policy(self) -> Policy | None:
        """A new policy object of the session's choice (the model's engine is kept across turns
        with the same settings: Engine.for_model)."""
        return make_policy(self.policy_name, **self.policy_options)

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
        policy, described = self.policy(), self.describe()
        view = _Viewer(self, len(ids), on_step, stop)
        with self.lock:
            try:
                result = generate(
                    self.lm.model, [ids], self.lm.ids, self.config, policy, observer=view
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


class _Viewer(Observer):
    """The observer of one turn: DenoiseStep -> StepRecord."""

    def __init__(self, session: ChatSession, prompt_len: int, on_step, stop):
        self.lm, self.prompt_len = session.lm, prompt_len
        self.on_step, self.stop = on_step, stop
        self.steps: list[StepRecord] = []
        self.blocks: dict[int, torch.Tensor] = {}  # block start -> its generated ids so far
        self._last: DenoiseStep | None = None

    def on_forward(self, s: DenoiseStep) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Stopped
        ids = self.lm.ids
        tokens, B = s.tokens[0], s.tokens.shape[1]
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
        tok = self.lm.tokenizer
        record = StepRecord(
            index=len(self.steps),
            block_start=s.block_start,
            step=s.step,
            window=(s.window_start, s.window_size),
            tokens=[tok.decode([int(t)]) for t in tokens],
            states=states,
            plan=s.plan[:, 0].tolist(),
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
