"""The policy registry: one place that turns a name and options (command-line flags, lm_eval
model_args, chat commands, sweep entries) into a policy object. The policies live in the
top-level modules `token_skip_generation_functions`, `layer_skip_generation_functions` and
`early_exit_generation_functions`; each declares its options once, as the fields of a dataclass
(v2/options.py). Everything below is derived from those fields at the time it is asked for, so a
policy registered later (`register`) and an option added to a dataclass appear everywhere."""

from __future__ import annotations

import argparse

from early_exit_generation_functions import EarlyExitPolicy
from layer_skip_generation_functions import LayerReusePolicy, LayerSkipPolicy
from token_skip_generation_functions import TokenSkipPolicy
from v2.options import DEFAULT_WORDS, Declared, OptionError, declared
from v2.policy import Policy

# name -> policy class (its options: `cls.Options`)
POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (TokenSkipPolicy, LayerSkipPolicy, LayerReusePolicy, EarlyExitPolicy)
}


def register(cls: type[Policy]) -> type[Policy]:
    """Add a policy (a Policy subclass with `name` and `Options`) to the registry."""
    POLICIES[cls.name] = cls
    return cls


def policy_names() -> tuple[str, ...]:
    return ("none", *POLICIES)


def options_of(name: str) -> tuple[Declared, ...]:
    """The declared options of policy `name` (none for "none"), in field order."""
    return () if name == "none" else declared(POLICIES[name].Options)


def all_options() -> dict[str, dict[str, Declared]]:
    """option name -> {policy: its declaration}: the flags and model_args (an option name that
    several policies take is one flag; they must agree on its type and id)."""
    out: dict[str, dict[str, Declared]] = {}
    for name in POLICIES:
        for d in options_of(name):
            others = out.setdefault(d.name, {})
            first = next(iter(others.values()), d)
            if (first.kind, first.id) != (d.kind, d.id):
                raise TypeError(f"option {d.name}: policies {name} and others disagree on it")
            others[name] = d
    return out


def option_id(policy: str, option: str) -> str | None:
    """The option's short name in configuration ids (None: the value is its own id)."""
    return next(d.id for d in options_of(policy) if d.name == option)


def _check_name(name: str) -> None:
    if name not in policy_names():
        raise OptionError(f"unknown policy {name!r}; choose one of {', '.join(policy_names())}")


def parse_options(name: str | None, options: dict) -> dict:
    """Options of policy `name` from text or values (v2.options.parse_value), the ones not given
    (None, "", "default") left out; an unknown policy or another policy's option is OptionError."""
    name = name or "none"
    _check_name(name)
    decl = {d.name: d for d in options_of(name)}
    given = {k: v for k, v in options.items() if not _not_given(v)}
    foreign = sorted(set(given) - set(decl))
    if foreign and name == "none":
        raise OptionError(
            f"options {', '.join(foreign)} need a policy (policy={'|'.join(POLICIES)})"
        )
    if foreign:
        raise OptionError(f"policy {name!r} takes {', '.join(decl)}; not {', '.join(foreign)}")
    typed = {k: decl[k].parse(v, name) for k, v in given.items()}
    return {k: v for k, v in typed.items() if v is not None}


def _not_given(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in DEFAULT_WORDS)


def make_policy(name: str | None, **options) -> Policy | None:
    """A policy from its name and options (text or values); options that another policy owns, and
    bad values, are an OptionError (a ValueError) of one line."""
    name = name or "none"
    given = parse_options(name, options)
    return None if name == "none" else POLICIES[name](**given)


def baseline_note(policy: Policy | None, given=(), num_layers: int | None = None) -> str | None:
    """The note every entry point prints when a policy was asked for but can skip nothing
    (`--policy token` with no threshold, `cosine_threshold 2`, or layer options past a model of
    `num_layers` layers when that is known): the run is the baseline. `given`: the names of the
    options the user set (shown with their values)."""
    if policy is None:
        return None
    if policy.layers(num_layers) if num_layers is not None else policy.enabled:
        return None
    config = policy.config()
    shown = {k: config[k] for k in given if k in config}
    depth = num_layers is not None and policy.enabled  # enabled, but not on this model
    where = f" on a model of {num_layers} layers" if depth else ""
    return (
        f"policy {policy.name!r} with {shown or 'its defaults'} can skip nothing{where}: "
        "this run is the baseline"
    )


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """--policy and one flag per option. The flags keep their text: make_policy reads it (one
    parser, one message for a bad value or name, the same as every other entry point's)."""
    g = parser.add_argument_group("compute skipping")
    names = ", ".join(policy_names())
    g.add_argument("--policy", default="none", metavar="NAME", help=f"{names} (default none)")
    for option, owners in all_options().items():
        helps = "; ".join(f"[{name}] {d.described()}" for name, d in owners.items())
        metavar = next(iter(owners.values())).type_name.upper()
        flag = "--" + option.replace("_", "-")
        g.add_argument(flag, default=None, metavar=metavar, help=helps.replace("%", "%%"))


def policy_from_args(args: argparse.Namespace) -> Policy | None:
    return make_policy(args.policy, **given_options(args))


def given_options(args: argparse.Namespace) -> dict:
    """The policy options set on the command line (as text)."""
    return {k: getattr(args, k) for k in all_options() if getattr(args, k, None) is not None}
