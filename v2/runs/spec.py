"""One configuration of a sweep, resolved: `RunSpec`, built once from the sweep file by one rule,
and read by both backends (v2/runs/harness.py, v2/runs/direct.py) and by the record (v2/record.py).

The rule (docs/experiments/README.md, "Where a setting is given"): a sweep file may name a
setting in several places - the sweep's `threshold:` and `model_args:`, `direct.max_new_tokens`,
a grid entry's `policy:`, its policy options, its `threshold:` and its `model_args:` - and no
place overrides another. Named twice with the same value, it is named once; named twice with
different values, the file is refused with one line naming the setting and both places. A
setting named nowhere takes its default: the policy's (its `config()`), the generation setting's
(GenerationConfig, with the evaluation's threshold 1.0), and for max_new_tokens the backend's
(lm_eval: each request's max_gen_toks, None; direct: 256).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from v2.generate import EVAL_DEFAULTS, SETTING_TYPES, GenerationConfig, settings
from v2.options import OptionError, parse_value
from v2.policies import make_policy, option_id, options_of, policy_names

# model_args only the lm_eval model reads (v2/lm_adapter.py); passed through as given
LM_EVAL_ONLY = ("dtype", "mask_token", "release_recipe", "show_speed")
# generation settings the lm_eval model does not take: lm_eval's stop strings end an answer, and
# CUDA graphs follow the device
LM_EVAL_NO = ("ignore_eos", "cuda_graphs")


# the repository: a sweep's relative paths (pretrained, results, lm_eval.include) start here
REPO = Path(__file__).resolve().parents[2]


class SpecError(ValueError):
    """A setting that cannot be resolved; one line meant for the user."""


class SweepError(ValueError):
    """A bad sweep file or request; the message is meant for the user."""


@dataclass(frozen=True)
class RunSpec:
    """One configuration's resolved settings. `generation` holds every GenerationConfig field and
    `policy_options` every option of the policy (its `config()`), defaults included; `options`
    are the policy options the sweep names, as written (what the id shows)."""

    id: str
    pretrained: str
    tasks: tuple[str, ...]
    runner: str  # lm_eval | direct
    policy: str  # "none": no skipping
    options: dict  # the policy options the file names, as written
    policy_options: dict  # every option of the policy, resolved (policy.config())
    generation: dict  # every GenerationConfig field, resolved
    batch_size: int  # lm_eval.batch_size or direct.batch_size
    model_args: dict  # lm_eval-only model_args (LM_EVAL_ONLY), as given

    @property
    def threshold(self) -> float:
        return self.generation["threshold"]

    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(**self.generation)

    def make_policy(self):
        """A new policy object of this configuration (None for policy none)."""
        return make_policy(self.policy, **self.policy_options)

    def lm_eval_model_args(self) -> dict:
        """The model_args that make lm_eval's model decode exactly this spec: pretrained,
        threshold and policy always, the policy options the file names, and every other
        setting whose value is not the model's default (GenerationConfig's, threshold 1.0,
        max_new_tokens None: each request's max_gen_toks)."""
        args: dict = {"pretrained": self.pretrained, "threshold": self.threshold}
        args["policy"] = self.policy
        defaults = make_policy(self.policy).config() if self.policy != "none" else {}
        for k, v in self.policy_options.items():
            if v is not None and (k in self.options or v != defaults.get(k)):
                args[k] = v
        base = generation_defaults(max_new_tokens=None)
        for k, v in self.generation.items():
            if k != "threshold" and v != base[k]:
                args[k] = v
        return args | self.model_args


def generation_defaults(max_new_tokens: int | None) -> dict:
    """Every generation setting's value where a sweep names none."""
    out = {f.name: f.default for f in fields(GenerationConfig)}
    return out | EVAL_DEFAULTS | {"max_new_tokens": max_new_tokens}


def typed_setting(name: str, value):
    """A generation setting's value as its field's type, read as every entry point reads a
    setting (v2.options.parse_value: a YAML 1 for a float setting is 1.0, so both backends
    record the same value); None where the field allows it."""
    f = next(f for f in fields(GenerationConfig) if f.name == name)
    optional = "None" in str(f.type)
    try:
        return parse_value(value, SETTING_TYPES[str(f.type)], name, optional=optional)
    except OptionError as e:
        raise SpecError(str(e)) from None


def generation_names(runner: str) -> tuple[str, ...]:
    """The generation settings a sweep of this runner may name."""
    if runner == "direct":
        return tuple(f.name for f in fields(GenerationConfig))
    return tuple(f.name for f in settings() if f.name not in LM_EVAL_NO)


def record_config(
    gen: GenerationConfig,
    policy,
    *,
    batch_size: int,
    dtype: str,
    num_processes: int,
    release_recipe: bool = False,
) -> dict:
    """The record's `config` (summary.json), one dialect for both backends: the policy with every
    option (`config()`), every generation setting as run (`gen` with block_size resolved and
    max_new_tokens None where each request's budget applied), then how it ran."""
    return {
        "policy": policy.config() if policy is not None else {"policy": "none"},
        **asdict(gen),
        "batch_size": batch_size,
        "release_recipe": release_recipe,
        "dtype": dtype,
        "num_processes": num_processes,
    }


def as_run(gen: GenerationConfig, block_size: int, max_new_tokens: int | None) -> GenerationConfig:
    """`gen` with the block size resolved (the checkpoint's where None) and max_new_tokens as
    the record shows it (None: each request's max_gen_toks)."""
    return replace(gen, block_size=gen.block_size or block_size, max_new_tokens=max_new_tokens)


@dataclass
class Sweep:
    """A sweep file, read (v2.runs.sweep.load_sweep): its configurations and where their
    results go."""

    name: str
    file: Path
    pretrained: str
    tasks: list[str]
    configs: list[RunSpec]
    lm_eval: dict
    limit: int | None
    limit_cpu: int | None
    main_metric: str | None
    results: Path
    runner: str = "lm_eval"
    direct: dict = field(default_factory=dict)

    def config(self, config_id: str) -> RunSpec:
        for c in self.configs:
            if c.id == config_id:
                return c
        raise SweepError(f"{self.file}: no configuration {config_id!r}; it has {self.ids()}")

    def ids(self) -> str:
        return ", ".join(c.id for c in self.configs)

    def run_dir(self, config_id: str, limit: int | None) -> Path:
        return self.results / (f"_limit{limit}" if limit else "") / config_id

    def runs_root(self, limit: int | None) -> Path:
        return self.results / f"_limit{limit}" if limit else self.results


# --------------------------------------------------------------------------- reading the file


def read_sweep_file(path: Path) -> dict:
    """A sweep file's mapping (the runner's and the tuner's one reader); SpecError with one line
    naming the file: unreadable, not valid YAML (with its line and column: PyYAML's own message
    is several lines naming "<unicode string>"), or not a mapping."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise SpecError(f"cannot read sweep {path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        parts = (getattr(e, "context", None), getattr(e, "problem", None))
        what = ": ".join(str(x) for x in parts if x) or type(e).__name__
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(f"{path}: not valid YAML: {where}{what}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a sweep file is a mapping")
    return data


# --------------------------------------------------------------------------- building specs


def policy_options() -> dict[str, tuple[str, ...]]:
    """Each policy's options in the order ids name them ("none": no options)."""
    return {name: tuple(d.name for d in options_of(name)) for name in policy_names()}


def _fmt(v) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def _subset_label(v) -> str:
    s = str(v)
    if s in ("first", "middle", "last"):
        return s
    return "L" + "-".join(s.replace(";", " ").replace("+", " ").split())


def config_id(policy: str, options: dict, threshold, show_threshold: bool) -> str:
    """`baseline`, `token_ct0.95`, `layer_ct0.99_pf2_pl2`, `reuse_k2_middle`; `thr0.9_...` first
    when the sweep varies the decoding threshold. Values as the sweep file writes them."""
    parts = [f"thr{_fmt(threshold)}"] if show_threshold else []
    if policy == "none":
        parts.append("baseline")
    else:
        parts.append(policy)
        for k, v in options.items():
            short = option_id(policy, k)  # declared with the option; None: the value is its id
            parts.append(_subset_label(v) if short is None else short + _fmt(v))
    return "_".join(parts)


def alternatives(v) -> list:
    """A sweep value as its alternatives: a list is several, anything else one."""
    return list(v) if isinstance(v, list) else [v]


def _same(a, b) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)


@dataclass
class _Row:
    """One configuration before its id: what the file names for it, resolved."""

    entry: int
    explicit: str | None
    threshold_written: object
    options: dict
    spec: dict


def build_specs(
    data: dict,
    *,
    runner: str,
    batch_size: int,
    max_new_tokens: int | None = None,
    direct_max_new_tokens: int | None = None,
) -> list[RunSpec]:
    """Every configuration of a sweep file's mapping `data`, by the one rule (module docstring).
    `max_new_tokens`: the backend's default; `direct_max_new_tokens`: `direct.max_new_tokens`
    where the file gives it. Raises SpecError with one line (the caller adds the file)."""
    known = policy_options()
    every_option = {o for opts in known.values() for o in opts}
    gen_names = generation_names(runner)
    margs_ok = {*gen_names, *every_option, "policy", "pretrained", "model_path"}
    if runner == "lm_eval":
        margs_ok |= set(LM_EVAL_ONLY)
    tasks = [str(t) for t in alternatives(data["tasks"])]
    split = bool(data.get("split_tasks"))

    def model_args(given, place: str) -> list[tuple[str, str, object]]:
        if given is None:
            return []
        if not isinstance(given, dict):
            raise SpecError(f"{place} must be a mapping, got {given!r}")
        foreign = sorted(set(given) - margs_ok)
        if foreign:
            allowed = ", ".join(sorted(margs_ok))
            raise SpecError(f"runner {runner} takes as {place} {allowed}; not {', '.join(foreign)}")
        return [(place, k, v) for k, v in given.items()]

    top = [("pretrained:", "pretrained", data["pretrained"])]
    if data.get("threshold") is not None:
        top.append(("threshold:", "threshold", data["threshold"]))
    top += model_args(data.get("model_args"), "model_args")
    if direct_max_new_tokens is not None:
        top.append(("direct.max_new_tokens", "max_new_tokens", direct_max_new_tokens))
    grid = data["grid"]
    if not isinstance(grid, list):
        raise SpecError(f"grid must be a list of mappings, got {grid!r}")
    rows: list[_Row] = []
    for n, entry in enumerate(grid):
        here = f"grid entry {n}"
        if not isinstance(entry, dict):
            raise SpecError(f"{here} must be a mapping, got {entry!r}")
        entry = dict(entry)
        explicit = entry.pop("id", None)
        named = list(top)
        given_margs = entry.pop("model_args", None)
        named += [(here, k, v) for k, v in entry.items()]
        named += model_args(given_margs, f"{here} model_args")
        where: dict[str, tuple[object, str]] = {}  # setting -> (value, the place naming it)
        for place, key, value in named:
            key = "pretrained" if key == "model_path" else key
            if key in where and not _same(where[key][0], value):
                first, at = where[key]
                raise SpecError(
                    f"{here}: {key} is set twice, to {first!r} by {at} and to {value!r} by "
                    f"{place}: give it in one place"
                )
            where.setdefault(key, (value, place))
        values = {k: v for k, (v, _) in where.items()}
        policy = values.pop("policy", "none")
        if policy not in known:
            raise SpecError(f"unknown policy {policy!r}; choose {', '.join(known)}")
        entry_keys = set(entry) - {"policy", "threshold"}
        foreign = sorted((entry_keys | (set(values) & every_option)) - set(known[policy]))
        if foreign:
            takes = ", ".join(known[policy]) or "no options"
            raise SpecError(f"policy {policy!r} takes {takes}; not {', '.join(foreign)}")
        order = [k for k in known[policy] if k in values]
        thr = values.get("threshold")
        combos = list(
            itertools.product(alternatives(thr), *(alternatives(values[k]) for k in order))
        )
        if explicit and len(combos) > 1:
            raise SpecError(f"entry {n} has an id but expands to {len(combos)} configs")
        for combo in combos:
            options = dict(zip(order, combo[1:], strict=True))
            gen = generation_defaults(max_new_tokens)
            chosen = {**{k: values[k] for k in gen_names if k in values}, "threshold": combo[0]}
            extra = {k: values[k] for k in LM_EVAL_ONLY if k in values}
            for k, v in {**chosen, **options, **extra}.items():
                if any(ch in str(v) for ch in ",="):
                    raise SpecError(f"{here}: model_args value {k}={v!r} has ',' or '='")
            for k, v in chosen.items():
                if v is not None or k != "threshold":
                    try:
                        gen[k] = typed_setting(k, v)
                    except SpecError as e:
                        raise SpecError(f"{here}: {e}") from None
            if not gen["threshold"] > 0:
                raise SpecError(
                    f"{here}: threshold must be > 0 (>= 1: one token per forward), got {combo[0]}"
                )
            try:
                p = make_policy(policy, **options)
            except (ValueError, TypeError) as e:
                raise SpecError(f"{here}: {e}") from None
            resolved = {k: v for k, v in p.config().items() if k != "policy"} if p else {}
            spec = dict(
                pretrained=str(values["pretrained"]),
                runner=runner,
                policy=policy,
                options=options,
                policy_options=resolved,
                generation=gen,
                batch_size=batch_size,
                model_args=extra,
            )
            rows.append(_Row(n, explicit, combo[0], options, spec))
    show_thr = len({r.threshold_written for r in rows}) > 1
    specs = []
    for r in rows:
        cid = r.explicit or config_id(r.spec["policy"], r.options, r.threshold_written, show_thr)
        for t in tasks if split else [None]:
            specs.append(
                RunSpec(
                    id=f"{cid}@{t}" if t else cid,
                    tasks=(t,) if t else tuple(tasks),
                    **r.spec,
                )
            )
    seen = set()
    for s in specs:
        if s.id in seen:
            raise SpecError(f"two configurations have the id {s.id!r}")
        seen.add(s.id)
    return specs
