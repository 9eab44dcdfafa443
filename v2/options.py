"""Settings declared once, and the one way text becomes a setting's value.

A policy's options are the fields of a frozen dataclass derived from `Options`, each made with
`option(default, help, id=..., range=...)`: the field's annotation is its type, `default` its
default, `range` the values it accepts, `id` its short name in sweep configuration ids, `help`
what it does. The registry (v2/policies.py) derives from these fields the command-line flags,
lm_eval's model_args, the chat `/policy` parser, sweep keys and ids, `--help` text and each
policy's `config()`: adding an option is adding a field.

`parse_value` turns text (or a value already typed: a YAML number, a Python list) into a typed
value for every entry point: command-line flags, model_args strings, chat commands, sweep values
and Python callers. Its vocabulary, the same everywhere:

- booleans: true/false, yes/no, on/off, 1/0 (any case), or a bool;
- integers: "3", 3 or an integral number ("3.0", 3.0); never a bool;
- numbers (float): anything float() reads but nan ("0.9", "1e-3", "inf"), or an int; never a bool;
- layer subsets: first, middle, last, or layer indices >= 0 separated by ';', '+', ',' or spaces
  ("3;5;7", "3 5 7"), or a list of ints;
- "", "none" and "default" (any case), and None: not given, the default applies (only where the
  setting may be left out: every policy option, generation settings whose default is None).

A bad value is one line naming the option (and the policy), the value and what is accepted.
"""

from __future__ import annotations

import math
import operator
import typing
from dataclasses import Field, dataclass, field, fields
from functools import cache, reduce

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
DEFAULT_WORDS = ("", "none", "default")
LAYER_SUBSETS = ("first", "middle", "last")
LayerSubset = str | list[int]  # a field annotated so takes layer-subset text


class OptionError(ValueError):
    """A bad setting value; the message is one line meant for the user."""


@dataclass(frozen=True)
class Range:
    """Accepted values: low <= v (low < v when low_open), v <= high (v < high when high_open)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, v) -> bool:
        if self.low is not None and not (v > self.low if self.low_open else v >= self.low):
            return False
        return self.high is None or (v < self.high if self.high_open else v <= self.high)

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        return (
            f"{'<' if self.high_open else '<='} {_num(self.high)}" if self.high is not None else ""
        )


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def at_least(low: float) -> Range:
    return Range(low=low)


def above(low: float) -> Range:
    return Range(low=low, low_open=True)


def option(default, help: str, *, id: str | None = None, range: Range | None = None) -> Field:
    """A policy option: a dataclass field with its help text, id abbreviation and range. `id`
    None: the option's value is its id (layer_subset: `middle`, `L3-5-7`)."""
    return field(default=default, metadata={"help": help, "id": id, "range": range})


@dataclass(frozen=True)
class Declared:
    """One declared setting, as the entry points read it."""

    name: str
    kind: object  # bool, int, float, str or LayerSubset
    default: object
    help: str
    id: str | None = None
    range: Range | None = None
    optional: bool = True  # "", none, default and None mean: not given

    def what(self) -> str:
        return {
            bool: "true or false (yes/no, on/off, 1/0)",
            int: "an integer",
            float: "a number",
            str: "text",
            LayerSubset: "first, middle, last or layer indices >= 0 like '3;5;7'",
        }[self.kind]

    def accepts(self) -> str:
        """What the setting accepts, as errors say it: `>= 1 (an integer)`."""
        return f"{self.range} ({self.what()})" if self.range else self.what()

    @property
    def type_name(self) -> str:
        return {bool: "bool", int: "int", float: "float", str: "str", LayerSubset: "layers"}[
            self.kind
        ]

    def parse(self, value, policy: str | None = None):
        return parse_value(value, self.kind, self.name, self.range, self.optional, policy)

    def described(self) -> str:
        """The help text with the default, from the field (not restated by hand)."""
        default = self.default if self.default is not None else "none"
        if isinstance(self.default, float):
            default = _num(self.default)
        accepted = f"{self.what()} {self.range}" if self.range else self.what()
        return f"{self.help} ({accepted}; default {default})"


def parse_value(
    value,
    kind,
    name: str,
    range: Range | None = None,
    optional: bool = False,
    policy: str | None = None,
):
    """`value` (text, or a value already typed) as a `kind` (module docstring); OptionError names
    the setting, the policy (where given), the value and what is accepted."""

    def bad() -> OptionError:
        d = Declared(name, kind, None, "", range=range)
        owner = f"policy {policy!r}: " if policy else ""
        return OptionError(f"{owner}{name} must be {d.accepts()}, got {value!r}")

    text = value.strip() if isinstance(value, str) else value
    if value is None or (isinstance(text, str) and text.lower() in DEFAULT_WORDS):
        if optional:
            return None
        raise bad()
    if kind is bool:
        if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
            return bool(value)
        if isinstance(text, str) and text.lower() in TRUE_WORDS + FALSE_WORDS:
            return text.lower() in TRUE_WORDS
        raise bad()
    if kind is str:
        return str(text)
    if kind == LayerSubset:
        out = _layer_subset(text)
        if out is None:
            raise bad()
        return out
    if isinstance(value, bool) or kind not in (int, float):
        raise bad()
    try:
        x = float(text)
    except (TypeError, ValueError):
        raise bad() from None
    if math.isnan(x) or (kind is int and not x.is_integer()):
        raise bad()
    x = int(x) if kind is int else x
    if range is not None and x not in range:
        raise bad()
    return x


def _layer_subset(value) -> str | list[int] | None:
    """first / middle / last (lower case), the indices text as given, a list of ints; None: bad."""
    if isinstance(value, list | tuple):
        ok = value and all(type(i) is int and i >= 0 for i in value)
        return list(value) if ok else None
    if not isinstance(value, str):
        return None
    if value.lower() in LAYER_SUBSETS:
        return value.lower()
    tokens = value.replace(";", " ").replace("+", " ").replace(",", " ").split()
    return value if tokens and all(t.isdigit() for t in tokens) else None


@dataclass(frozen=True)
class Options:
    """Base of a policy's options: fields declared with `option`; construction turns each value
    into its type and checks its range (OptionError), then the cross-field rules (`check`)."""

    def __post_init__(self) -> None:
        for d in declared(type(self)):
            # frozen: the one place a value is replaced, by its typed form
            object.__setattr__(self, d.name, d.parse(getattr(self, d.name)))
            if getattr(self, d.name) is None:
                object.__setattr__(self, d.name, d.default)
        self.check()

    def check(self) -> None:
        """Rules between fields; raise OptionError."""


@cache
def declared(options_type: type) -> tuple[Declared, ...]:
    """The declared settings of an Options dataclass, in field order (the order of ids)."""
    hints = typing.get_type_hints(options_type)
    out = []
    for f in fields(options_type):
        hint = hints[f.name]  # `float | None` is a float that may be left out
        kind = reduce(
            operator.or_, [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
        )
        if kind not in (bool, int, float, str, LayerSubset):
            raise TypeError(f"{options_type.__name__}.{f.name}: type {kind} has no parser")
        m = f.metadata
        if "help" not in m:
            raise TypeError(f"{options_type.__name__}.{f.name}: declare it with option(...)")
        out.append(Declared(f.name, kind, f.default, m["help"], m["id"], m["range"]))
    return tuple(out)
