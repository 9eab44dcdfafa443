"""The policy registry: one place that turns a name and options (command-line flags or lm_eval
model_args) into a policy object. The policies themselves live in the top-level modules
`token_skip_generation_functions`, `layer_skip_generation_functions` and
`early_exit_generation_functions`."""

from __future__ import annotations

import argparse
import importlib

from v2.policy import Policy

# name -> (module, class, {option: type})
POLICIES: dict[str, tuple[str, str, dict[str, type]]] = {
    "token": (
        "token_skip_generation_functions",
        "TokenSkipPolicy",
        {
            "cosine_threshold": float,
            "min_layer": int,
            "max_layer": int,
            "reuse_ratio": float,
            "refresh_every": int,
        },
    ),
    "layer": (
        "layer_skip_generation_functions",
        "LayerSkipPolicy",
        {
            "cosine_threshold": float,
            "max_consecutive_skips": int,
            "protect_first": int,
            "protect_last": int,
        },
    ),
    "reuse": (
        "layer_skip_generation_functions",
        "LayerReusePolicy",
        {"reuse_k": int, "layer_subset": str, "subset_size": int},
    ),
    "exit": (
        "early_exit_generation_functions",
        "EarlyExitPolicy",
        {"exit_threshold": float, "check_every": int, "min_layer": int},
    ),
}
# option -> its short name in sweep config ids (v2/experiments.py), e.g. token_ct0.99;
# layer_subset is written as its value.
OPTION_IDS: dict[str, str] = {
    "cosine_threshold": "ct",
    "reuse_ratio": "rr",
    "min_layer": "ml",
    "max_layer": "xl",
    "refresh_every": "re",
    "max_consecutive_skips": "mcs",
    "protect_first": "pf",
    "protect_last": "pl",
    "reuse_k": "k",
    "subset_size": "n",
    "exit_threshold": "et",
    "check_every": "ce",
}
# option -> what it does, for --help (the policies that take it are added from POLICIES)
OPTION_HELP: dict[str, str] = {
    "cosine_threshold": "token: reuse a position whose layer input's cosine with the previous "
    "denoise forward's is above this; layer: pass a layer whose input barely changed across the "
    "last layer run (>= 1: the policy is off)",
    "min_layer": "token: first layer token skipping applies to (default 1); exit: first layer "
    "whose logit lens is checked (default 1)",
    "max_layer": "last layer token skipping applies to (default: the last)",
    "reuse_ratio": "reuse this fraction of each row's positions per layer (the most similar) "
    "instead of a threshold; in [0, 1)",
    "refresh_every": "every N-th denoise forward of a block computes everything (default: never)",
    "max_consecutive_skips": "most layers passed in a row (default 1)",
    "protect_first": "first N layers always run (default 1)",
    "protect_last": "last N layers always run (default 1)",
    "reuse_k": "on denoise steps s with s %% k != 0, the subset's layers reuse their last "
    "update (1: the baseline)",
    "layer_subset": "first, middle, last, or layer indices like '3;5;7' (default middle)",
    "subset_size": "layers in first / middle / last (default 12 of 28, scaled with depth)",
    "exit_threshold": "a masked position whose logit-lens probability is above this stops "
    "computing (>= 1: off)",
    "check_every": "check the lens every N layers from min_layer (default 1)",
}
POLICY_NAMES = ("none", *POLICIES)
POLICY_OPTIONS: dict[str, type] = {
    k: t for _, _, opts in POLICIES.values() for k, t in opts.items()
}


def make_policy(name: str | None, **options) -> Policy | None:
    """A policy from its name and options; options that another policy owns are an error."""
    name = name or "none"
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    given = {k: v for k, v in options.items() if v is not None}
    if name == "none":
        if given:
            raise ValueError(
                f"options {', '.join(sorted(given))} need a policy (policy={'|'.join(POLICIES)})"
            )
        return None
    module, cls, allowed = POLICIES[name]
    foreign = sorted(set(given) - set(allowed))
    if foreign:
        raise ValueError(f"policy {name!r} takes {', '.join(allowed)}; not {', '.join(foreign)}")
    return getattr(importlib.import_module(module), cls)(
        **{k: allowed[k](v) for k, v in given.items()}
    )


def baseline_note(
    policy: Policy | None, name: str | None, options: dict, num_layers: int | None = None
) -> str | None:
    """The warning every entry point prints when a policy was asked for but can skip nothing
    (e.g. `--policy token` with no threshold, or layer options past a model of `num_layers`
    layers when that is known): the run is the baseline."""
    if policy is None:
        return None
    if policy.acts_on(num_layers) if num_layers is not None else policy.enabled:
        return None
    given = {k: v for k, v in options.items() if v is not None}
    depth = num_layers is not None and policy.enabled  # enabled, but not on this model
    where = f" on a model of {num_layers} layers" if depth else ""
    return (
        f"policy {name!r} with {given or 'its defaults'} can skip nothing{where}: "
        "this run is the baseline"
    )


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("compute skipping")
    g.add_argument("--policy", choices=POLICY_NAMES, default="none", help="(default none)")
    for option, typ in POLICY_OPTIONS.items():
        owners = ", ".join(n for n, (_, _, opts) in POLICIES.items() if option in opts)
        g.add_argument(
            "--" + option.replace("_", "-"),
            type=typ,
            default=None,
            help=f"[{owners}] {OPTION_HELP[option]}",
        )


def policy_from_args(args: argparse.Namespace) -> Policy | None:
    return make_policy(args.policy, **{k: getattr(args, k) for k in POLICY_OPTIONS})
