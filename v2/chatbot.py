"""A multi-turn chat with a checkpoint in the terminal, the answer streamed as it is decoded:

    python -m v2.chatbot --model v2/tiny/checkpoint [--policy token --cosine-threshold 0.99]

Commands (anything else is a message):
  /policy NAME [key=value ...]   a registered policy and its options (/policy none: no skipping)
  /set NAME VALUE                a decoding setting, e.g. /set threshold 0.9
  /stats                         statistics of the last answer
  /reset                         forget the conversation
  /help                          this list
Ctrl-D (or /quit) exits. Bad input gets a one-line message and the session goes on.
"""

from __future__ import annotations

import argparse
import sys

from v2.chat import SETTINGS, ChatError, ChatSession, StepRecord
from v2.checkpoint import CheckpointError
from v2.generate import (
    add_generation_arguments,
    add_model_arguments,
    config_from_args,
    load_from_args,
)
from v2.policies import add_policy_arguments, given_options, policy_names

HELP = __doc__.split("\n\n", 2)[2].strip()


class Printer:
    """Streams an answer: prints what was decided since the last forward, once it is final."""

    def __init__(self, out):
        self.out, self.shown = out, ""

    def __call__(self, record: StepRecord) -> None:
        if record.text.startswith(self.shown) and len(record.text) > len(self.shown):
            self.out.write(record.text[len(self.shown) :])
            self.out.flush()
            self.shown = record.text

    def finish(self, text: str) -> None:
        rest = text[len(self.shown) :] if text.startswith(self.shown) else "\n" + text
        self.out.write(rest + "\n")
        self.out.flush()


def format_stats(session: ChatSession) -> str:
    if session.last is None:
        return "no answer yet"
    s = session.last.stats.to_dict()
    skip = [f"{r:.2f}" for r in s["skip_rate_per_layer"]]
    return "\n".join(
        [
            f"{session.last.policy or session.describe()}; finish: {session.last.finish_reason}",
            f"generated tokens {s['generated_tokens']}, denoise+commit forwards "
            f"{s['row_forwards']['denoise_full'] + s['row_forwards']['denoise_sub']}"
            f"+{s['row_forwards']['commit']}, tokens per forward {s['tokens_per_forward']:.2f}",
            f"executed FLOPs {s['flops_ratio']:.1%} of no skipping "
            f"({s['executed_flops']:.3g} of {s['baseline_flops']:.3g})",
            f"skip rate per layer: {' '.join(skip)}",
            f"tokens/s {s['tokens_per_second']:.1f} ({s['wall_seconds']:.2f} s)",
        ]
    )


def command(session: ChatSession, line: str, out) -> bool:
    """Run one /command; False when the session should end."""
    name, *args = line[1:].split()
    if name in ("quit", "exit"):
        return False
    if name == "help":
        print(HELP, file=out)
    elif name == "reset":
        session.reset()
        print("conversation cleared", file=out)
    elif name == "stats":
        print(format_stats(session), file=out)
    elif name == "policy":
        if not args:
            print(f"{session.describe()}; policies: {', '.join(policy_names())}", file=out)
        else:
            note = session.set_policy(args[0], args[1:])
            print(session.describe(), file=out)
            if note:
                print(f"note: {note}", file=out)
    elif name == "set":
        if len(args) != 2:
            raise ChatError(f"usage: /set NAME VALUE; settings: {', '.join(SETTINGS)}")
        session.set(*args)
        print(f"{args[0]} = {getattr(session.config, args[0])}", file=out)
    else:
        raise ChatError(f"unknown command /{name} (/help lists them)")
    return True


def repl(session: ChatSession, stdin=None, out=None) -> int:
    stdin, out = stdin or sys.stdin, out or sys.stdout
    c = session.config
    settings = f"threshold {c.threshold}, max_new_tokens {c.max_new_tokens}"
    print(f"chat with {session.describe()}, {settings}; /help, Ctrl-D to quit", file=out)
    while True:
        out.write("you> ")
        out.flush()
        line = stdin.readline()
        if not line:  # Ctrl-D
            out.write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not command(session, line, out):
                    return 0
                continue
            out.write("bot> ")
            printer = Printer(out)
            turn = session.reply(line, on_step=printer)
            printer.finish(turn.text)
        except ChatError as e:
            print(f"error: {e}", file=out)
        except KeyboardInterrupt:
            print("\n(interrupted)", file=out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m v2.chatbot",
        description="\n\n".join(__doc__.split("\n\n")[:2]),
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    add_generation_arguments(p, ("threshold", "max_new_tokens", "use_block_cache"))
    add_policy_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        lm = load_from_args(args)
        config = config_from_args(args)
        session = ChatSession(lm, config)
        session.validate(config)
        if note := session.set_policy(args.policy, given_options(args)):
            print(f"note: {note}", file=sys.stderr)
    except (CheckpointError, ChatError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return repl(session)


if __name__ == "__main__":
    sys.exit(main())
