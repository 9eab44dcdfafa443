"""Search a policy's options for the cheapest setting within an accuracy budget (Optuna).

    python -m v2.tune configs/sweeps/tiny_exit.yaml --max-drop 1.0 --trials 30 --out tune/tiny_exit

The sweep file is the runner's (v2/runs/sweep.py): `pretrained`, `tasks` (the first is tuned),
`threshold` (where none is named, the runner's default), `model_args`, the chat template as its
runner decodes (`runner: direct`: always; else `lm_eval.apply_chat_template`, on by default),
and a `grid` whose first entry with a policy is the search space (the rest of the file is
checked by the runner's loader, v2.runs.sweep.sweep_of, on one point of that space): a list of
values is a categorical choice, `{low: a, high: b}` a range (float or int by the option's type,
`log: true` for a log scale), a single value is fixed.

Each trial is a RunSpec built by the runner's rule (v2.runs.spec.build_specs on the file with the
trial's options as its one grid entry, runner direct, --max-new-tokens and --batch-size as the
direct backend's) and decodes a dev split (problems generated like the task's, none of them in its
test split; `--dev-n` of them) through the direct backend's decode and score
(v2.runs.direct.decode), as a direct sweep run of the same setting does; it measures accuracy
(strict-match, the first `#### N` answer, by the task's own scorer, v2/tasks/gsm_answers.py) and
the objective: executed
FLOPs relative to the baseline's on the same problems, end to end (`flops`, the default on a
CPU), or tokens/s (`tokens_per_second`, the default on a GPU: CPU timings are not results; each
decode is a pass over the dev problems on an engine of its own, repeated until a pass sets
nothing up, and that pass is the one measured: the warm-up rule, v2.bench.timing.settle, so that
no compilation, forward record or graph capture is timed). A trial is feasible
when its accuracy is at least the baseline's minus `--max-drop` (accuracy points, in %). The
baseline is decoded once and kept in the study. A baseline at 0 % (answers cut off by a small
`--max-new-tokens`, say) is warned about: every trial is then within the budget and the search
only finds the cheapest setting.

The study lives in an SQLite file (`--storage`, default OUT/study.db): a killed search resumes
where it stopped (a trial that was running when it died is marked failed and does not count;
`--trials` is the number of completed trials wanted in all; run one search per study at a
time). A resumed search goes on to new points: the sampler is seeded anew before each trial from
`--seed` and the number of completed trials, so it draws what one uninterrupted search with the
same `--seed` would have drawn, not a replay of its first trials.
The file holds one search: the settings that change what a trial measures (the model,
task, threshold, chat, policy and search space; --max-new-tokens, --dev-n, --batch-size,
--device, --objective, --max-drop) are kept with the study, and a resume with other settings is
refused with an error naming them (give another --out or --storage for a new search; --trials,
--seed, --out and --confirm may change). Bad numbers are refused before any work. `--confirm` then
decodes the task's full test split (or its first `--confirm-n` problems) with the baseline and the
best setting. Out: `best.yaml`, a sweep file with the baseline and the best feasible setting, ready
for the full run (`bash sbatch/run_experiments.sh OUT/best.yaml`), written even when that setting
is no better than the baseline on the objective (then said in its header, in a note and in
trials.json's `best_beats_baseline`); `trials.png` (every trial: accuracy against the objective,
the budget line); `trials.json` (with the study's settings and any warnings).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import yaml

from v2.bench.timing import settle
from v2.checkpoint import device_arg, parse_device
from v2.options import OptionError
from v2.policies import options_of, policy_names
from v2.record import accuracy
from v2.runs.spec import RunSpec, SpecError, SweepError, build_specs, read_sweep_file
from v2.runs.sweep import sweep_of

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ("flops", "tokens_per_second")


# An objective as the study records it: what changed how one is measured changes the string (a
# resume of a study measured the old way is refused). flops: end to end (before, per forward);
# tokens/s: the pass measured after the warm-up rule (before, after one pass of its first batch).
OBJECTIVE_SETTINGS = {
    "flops": "flops vs the baseline run",
    "tokens_per_second": "tokens_per_second, the pass after the warm-up rule",
}


class TuneError(ValueError):
    """A bad sweep file or request; the message is one line meant for the user."""


# ---- the sweep file -------------------------------------------------------------------------


def read_space(path: Path) -> dict:
    """The tuning setup of a sweep file: model, task, decoding threshold, chat, policy, space."""
    try:
        data = read_sweep_file(path)  # the runner's reader: one line, with the YAML position
    except SpecError as e:
        raise TuneError(str(e)) from None
    for key in ("pretrained", "tasks", "grid"):
        if key not in data:
            raise TuneError(f"{path}: missing {key!r}")
    entries = [
        e for e in data["grid"] if isinstance(e, dict) and e.get("policy") not in (None, "none")
    ]
    if not entries:
        raise TuneError(f"{path}: no grid entry with a policy to tune")
    entry = dict(entries[0])
    policy = entry.pop("policy")
    if policy not in policy_names():
        raise TuneError(f"{path}: unknown policy {policy!r}")
    declared = {d.name: d for d in options_of(policy)}
    unknown = sorted(set(entry) - set(declared))
    if unknown:
        raise TuneError(f"{path}: policy {policy!r} has no option {', '.join(unknown)}")
    space = {}
    for k, v in entry.items():
        bad_range = isinstance(v, dict) and not ({"low", "high"} <= set(v) and v["low"] < v["high"])
        if bad_range:
            raise TuneError(f"{path}: range of {k} needs low < high, got {v}")
        # every value the search may try is one the option accepts (its declared type and range)
        values = [v["low"], v["high"]] if isinstance(v, dict) else v if isinstance(v, list) else [v]
        try:
            for x in values:
                declared[k].parse(x, policy)
        except OptionError as e:
            raise TuneError(f"{path}: {e}") from None
        space[k] = v
    # the rest of the file is checked by the runner's loader, on one point of the space (each
    # range at its low end): the keys, the runner and its settings, pretrained, the grid's ids
    point = {k: v["low"] if isinstance(v, dict) else v for k, v in space.items()}
    try:
        sweep = sweep_of({**data, "grid": [{"policy": policy, **point}]}, Path(path), notes=False)
    except SweepError as e:
        raise TuneError(str(e)) from None
    return {
        "name": sweep.name,
        "pretrained": sweep.pretrained,
        "task": sweep.tasks[0],
        "threshold": data.get("threshold"),  # as written; run() takes the RunSpec's
        # as the file's own runner decodes: direct always with the chat template (score), lm_eval
        # as its apply_chat_template says (the runner's default: on)
        "chat": sweep.runner == "direct" or bool(sweep.lm_eval["apply_chat_template"]),
        "policy": policy,
        "space": space,
        "raw": data,
    }


def suggest(trial, space: dict, types: dict[str, type]) -> dict:
    """The trial's options from the search space."""
    options = {}
    for k, v in space.items():
        if isinstance(v, dict):
            fn = trial.suggest_int if types[k] is int else trial.suggest_float
            options[k] = fn(k, v["low"], v["high"], log=bool(v.get("log", False)))
        elif isinstance(v, list):
            options[k] = trial.suggest_categorical(k, v)
        else:
            options[k] = v
    return options


# ---- the dev split and one evaluation -------------------------------------------------------


def test_split(task: str) -> list[dict]:
    """The task's full committed test split (for --confirm)."""
    if task != "tiny_gsm":
        raise TuneError(f"no test split for task {task!r}; tunable: tiny_gsm")
    from v2.tiny.data import read_jsonl

    return read_jsonl(ROOT / "v2/tiny/data/test.jsonl")


def dev_split(task: str, n: int) -> list[dict]:
    """n problems like the task's, none in its committed test split (deterministic)."""
    if task != "tiny_gsm":
        raise TuneError(f"no dev split for task {task!r}; tunable: tiny_gsm")
    from v2.tiny.data import make_split, read_jsonl

    test = read_jsonl(ROOT / "v2/tiny/data/test.jsonl")
    return make_split(n, seed=1000, exclude={p["question"] for p in test})


def trial_spec(setup: dict, options: dict | None, args, pretrained=None) -> RunSpec:
    """The RunSpec of a trial (`options`: its policy options) or of the baseline (None), built by
    the runner's rule (v2.runs.spec.build_specs, runner direct) from the sweep file's mapping with
    that setting as its one grid entry: the tuned task, the model (`pretrained`: --model where
    given), --batch-size, and --max-new-tokens as the direct backend's max_new_tokens (the
    tuner's counterpart of `direct.max_new_tokens`). A trial decodes as a direct sweep run of the
    same setting does."""
    data = {k: v for k, v in setup["raw"].items() if k != "split_tasks"}
    data["tasks"] = [setup["task"]]
    if pretrained is not None:
        data["pretrained"] = str(pretrained)
    data["grid"] = [
        {"policy": "none"} if options is None else {"policy": setup["policy"], **options}
    ]
    try:
        specs = build_specs(
            data, runner="direct", batch_size=args.batch_size, max_new_tokens=args.max_new_tokens
        )
    except SpecError as e:
        raise TuneError(f"{args.sweep}: {e}") from None
    if len(specs) != 1:
        raise TuneError(f"{args.sweep}: the tuned setting is {len(specs)} configurations; give one")
    (spec,) = specs
    if spec.generation["max_new_tokens"] != args.max_new_tokens:
        raise TuneError(
            f"{args.sweep}: the sweep names max_new_tokens "
            f"{spec.generation['max_new_tokens']}; the tuner's is --max-new-tokens"
        )
    return spec


def evaluate(lm, problems: list[dict], spec: RunSpec, chat: bool, warm: bool = False) -> dict:
    """Accuracy (%, strict-match by the task's scorer, with its standard error) and the
    generation's statistics over the problems, decoded and scored by the direct backend
    (v2.runs.direct.decode: v2/tiny/train.py's `score`, `spec.batch_size` problems at a time) as a
    sweep run of the same RunSpec is. `warm` (what a tokens/s objective needs): decode on an
    engine of the trial's own (v2.runs.direct.timing_engine) and repeat the whole pass until one
    sets nothing up (the warm-up rule, v2.bench.timing.settle); the accuracy and the statistics are
    that pass's, which paid for no compilation, forward record or graph capture."""
    from v2.runs import direct
    from v2.tiny.train import user_message

    texts = [user_message(p["question"]) for p in problems]
    references = [p["answer"] for p in problems]
    engine = direct.timing_engine(lm, spec) if warm else None

    def one_pass():
        return direct.decode(lm, spec, texts, references, spec.batch_size, engine=engine, chat=chat)

    passes = settle(one_pass, [engine]) if warm else None
    correct, _, stats = passes.result if passes else one_pass()
    acc = accuracy(correct)
    m = {
        "accuracy": 100.0 * acc["value"],
        "accuracy_stderr": None if acc["stderr"] is None else 100.0 * acc["stderr"],
        # per forward: executed / the same forwards unskipped
        "flops_ratio": stats.executed_flops / max(stats.baseline_flops, 1),
        "executed_flops": stats.executed_flops,
        "tokens_per_second": stats.tokens_per_second,
    }
    if passes:  # unmeasured passes before the measured one; settled: it set nothing up
        m.update(warm_up_passes=passes.calls - 1, settled=passes.settled)
    return m


# ---- the search -----------------------------------------------------------------------------


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad numbers before any work (one-line TuneErrors)."""
    if not args.max_drop >= 0:
        raise TuneError(f"--max-drop must be >= 0, got {args.max_drop}")
    for key in ("trials", "dev_n", "max_new_tokens", "batch_size"):
        if getattr(args, key) < 1:
            raise TuneError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.confirm_n is not None:
        if not args.confirm:
            raise TuneError("--confirm-n is the size of --confirm's test prefix: add --confirm")
        if args.confirm_n < 1:
            raise TuneError(f"--confirm-n must be >= 1, got {args.confirm_n}")


# What a setting is called in the refusal to resume: a command-line option or a sweep-file key.
SETTING_NAMES = {
    "pretrained": "model (--model or the sweep's pretrained)",
    "task": "task (the sweep's first)",
    "threshold": "threshold (the sweep's)",
    "chat": "chat template (the sweep's lm_eval.apply_chat_template; runner direct: always)",
    "max_new_tokens": "--max-new-tokens",
    "dev_n": "--dev-n",
    "batch_size": "--batch-size",
    "device": "device (--device)",
    "objective": "objective (--objective)",
    "scorer": "scorer (an older v2.tune's, null: the last `#### N`, no decimals)",
    "max_drop": "--max-drop",
    "policy": "policy (the sweep's)",
    "space": "search space (the sweep's)",
    "generation": "generation settings (the sweep's model_args)",
}


def named_generation(spec: RunSpec) -> dict:
    """The generation settings a sweep's model_args change from their defaults (the threshold
    and max_new_tokens are settings of their own)."""
    from v2.runs.spec import generation_defaults

    base = generation_defaults(spec.generation["max_new_tokens"])
    return {
        k: v
        for k, v in spec.generation.items()
        if k not in ("threshold", "max_new_tokens") and v != base[k]
    }


def study_settings(setup: dict, args, model_path: Path, device: str, objective: str) -> dict:
    """Everything that changes what a trial measures (or which trials count as feasible), as
    JSON: kept with the study so that a resume with other settings is refused. The sampler seed,
    --trials, --out and --confirm are not among them."""
    settings = {
        "pretrained": str(Path(model_path).resolve()),
        "task": setup["task"],
        "threshold": setup["threshold"],
        "chat": setup["chat"],
        "max_new_tokens": args.max_new_tokens,
        "dev_n": args.dev_n,
        "batch_size": args.batch_size,  # tokens/s, and rows leave a batch at block ends
        "device": device,
        "objective": OBJECTIVE_SETTINGS[objective],
        "scorer": "strict-match, v2/tasks/gsm_answers.py (the task's)",
        "max_drop": args.max_drop,  # each trial's stored constraint is against its floor
        "policy": setup["policy"],
        "space": setup["space"],
    }
    if setup.get("generation"):  # only where the sweep changes one (older studies have none)
        settings["generation"] = setup["generation"]
    return json.loads(json.dumps(settings))  # as the study's user attrs give them back


def resumable_study(storage, storage_path, settings: dict) -> str | None:
    """The name of the study in the storage to resume (None: the file holds none yet). A file
    holds one search: a study that measured something with other settings, or whose settings
    were not recorded (an older v2.tune), is refused with a TuneError naming what differs."""
    studies = storage.get_all_studies()
    how = "resume with the same settings, or give another --out (or --storage) for a new search"
    if len(studies) > 1:
        names = ", ".join(s.study_name for s in studies)
        raise TuneError(f"{storage_path} holds {len(studies)} studies ({names}); {how}")
    if not studies:
        return None
    study = studies[0]
    study_id = storage.get_study_id_from_name(study.study_name)
    if "baseline" not in study.user_attrs and not storage.get_all_trials(study_id, deepcopy=False):
        return study.study_name  # stopped before it measured anything (a bad model?): no mixing
    old = study.user_attrs.get("settings")
    if old is None:
        raise TuneError(
            f"{storage_path}: study {study.study_name!r} has no recorded settings (an older "
            "v2.tune), so resuming it cannot be checked; give another --out (or --storage)"
        )
    differ = [k for k in settings if old.get(k) != settings[k]]
    differ += [k for k in old if k not in settings]
    if differ:
        said = "; ".join(
            f"{SETTING_NAMES.get(k, k)} {json.dumps(old.get(k))} there, "
            f"{json.dumps(settings.get(k))} now"
            for k in differ
        )
        raise TuneError(f"{storage_path} holds a search with other settings: {said}; {how}")
    return study.study_name


def baseline_warnings(baseline: dict, args) -> list[str]:
    """What makes the search's answer meaningless, for the user (printed, and in trials.json)."""
    if baseline["accuracy"] > 0:
        return []
    return [
        f"the baseline scores 0 % on the {args.dev_n} dev problems, so the accuracy budget means "
        "nothing (every trial is within it) and best.yaml is only the cheapest setting; if its "
        f"answers are cut off, search again with a larger --max-new-tokens (now "
        f"{args.max_new_tokens}) or --dev-n (now {args.dev_n}) and another --out"
    ]


def run(args: argparse.Namespace) -> dict:
    check_args(args)  # before any import or work
    import warnings

    import optuna

    from v2.generate import FastDLLM

    # constrained TPE is marked experimental
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    setup = read_space(args.sweep)
    model_path = Path(args.model or setup["pretrained"])
    if not model_path.is_absolute() and not model_path.exists():
        model_path = ROOT / model_path
    device = str(args.device or parse_device(None))  # a string: kept with the study as JSON
    gpu = device.startswith("cuda")
    objective_name = args.objective or ("tokens_per_second" if gpu else "flops")
    warm = objective_name == "tokens_per_second"  # time no compile or capture
    types = {d.name: d.kind for d in options_of(setup["policy"])}
    problems = dev_split(setup["task"], args.dev_n)  # a task without one: refused here
    # the baseline's RunSpec, by the runner's rule (a file it refuses is refused here); the
    # threshold decoded is the spec's (the runner's default where the file names none)
    base_spec = trial_spec(setup, None, args, model_path)
    setup["threshold"] = base_spec.threshold
    setup["generation"] = named_generation(base_spec)
    settings = study_settings(setup, args, model_path, device, objective_name)

    args.out.mkdir(parents=True, exist_ok=True)
    storage_path = args.storage or args.out / "study.db"
    storage = optuna.storages.RDBStorage(f"sqlite:///{Path(storage_path).resolve()}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = resumable_study(storage, storage_path, settings)
    study = optuna.create_study(
        study_name=name or f"{setup['name']}:{setup['policy']}:{objective_name}:{args.dev_n}",
        storage=storage,
        load_if_exists=True,
        direction="maximize" if objective_name == "tokens_per_second" else "minimize",
    )
    study.set_user_attr("settings", settings)  # the same, or the study's first
    lm = FastDLLM.load(model_path, device=device)

    def spec(options: dict | None) -> RunSpec:
        return trial_spec(setup, options, args, model_path)

    # One search per study at a time: a trial still RUNNING here died with its process.
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    if "baseline" not in study.user_attrs:
        study.set_user_attr("baseline", evaluate(lm, problems, base_spec, setup["chat"], warm))
    baseline = study.user_attrs["baseline"]
    floor = baseline["accuracy"] - args.max_drop
    cautions = baseline_warnings(baseline, args)

    def objective(trial) -> float:
        options = suggest(trial, setup["space"], types)
        m = evaluate(lm, problems, spec(options), setup["chat"], warm)
        for k, v in m.items():
            trial.set_user_attr(k, v)
        trial.set_user_attr("options", options)
        trial.set_user_attr("constraint", floor - m["accuracy"])  # <= 0: within the budget
        trial.set_constraint("accuracy", floor - m["accuracy"])
        return objective_value(m, baseline, objective_name)

    def completed() -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def next_sampler(study, trial=None) -> None:  # also an optimize callback, after each trial
        study.sampler = trial_sampler(args.seed, completed())

    done = completed()
    if done < args.trials:
        for w in cautions:  # now, not only after the search: it may be worth stopping
            print(f"warning: {w}", file=sys.stderr)
        next_sampler(study)
        study.optimize(
            objective,
            n_trials=args.trials - done,
            show_progress_bar=True,
            callbacks=[next_sampler],
        )
    summary = write_outputs(study, setup, args, baseline, floor, objective_name, cautions)
    if args.confirm and summary["best"] is not None:
        full = test_split(setup["task"])
        test = full[: args.confirm_n]
        best = spec(summary["best"]["options"])
        summary["confirm"] = {
            "split": f"{setup['task']} test ({len(test)} problems"
            + (", a prefix: not the full split)" if len(test) < len(full) else ")"),
            "baseline": evaluate(lm, test, base_spec, setup["chat"], warm),
            "best": evaluate(lm, test, best, setup["chat"], warm),
        }
        (args.out / "trials.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def trial_sampler(seed: int, completed: int):
    """The sampler for the next trial: TPE (it reads set_constraint) seeded by the search's
    --seed and the number of trials completed so far. TPE keeps no state but its random
    generator (it reads the history from the study), so a sampler per trial, seeded this way,
    makes a resumed search draw the points one uninterrupted search of the same --seed would
    have drawn (a trial killed mid-way is redrawn from the same seed), where one sampler seeded
    with --seed at every start replayed the first trials."""
    import numpy as np
    import optuna

    state = np.random.SeedSequence([seed, completed]).generate_state(1)[0]
    return optuna.samplers.TPESampler(seed=int(state))


def objective_value(m: dict, baseline: dict, objective_name: str) -> float:
    """A decode's objective: its executed FLOPs over the baseline's on the same problems (end to
    end: a setting that saves per forward but needs more forwards costs more), or tokens/s."""
    if objective_name == "flops":
        return m["executed_flops"] / max(baseline["executed_flops"], 1)
    return m[objective_name]


def write_outputs(study, setup, args, baseline, floor, objective_name, warnings=()) -> dict:
    from optuna.trial import TrialState

    trials = [
        {"number": t.number, "value": t.value, **t.user_attrs}
        for t in study.get_trials(states=(TrialState.COMPLETE,))
    ]
    feasible = [t for t in trials if t["constraint"] <= 0]
    sign = -1 if objective_name == "tokens_per_second" else 1
    best = min(feasible, key=lambda t: sign * t["value"]) if feasible else None
    x0 = objective_value(baseline, baseline, objective_name)
    summary = {
        "sweep": str(args.sweep),
        "policy": setup["policy"],
        "objective": objective_name,
        "max_drop": args.max_drop,
        "dev_n": args.dev_n,
        "settings": study.user_attrs.get("settings"),
        "baseline": baseline,
        "baseline_value": x0,
        "accuracy_floor": floor,
        "warnings": list(warnings),
        "best": best,
        # False: best.yaml's setting is within the budget but no cheaper (faster) than no policy
        "best_beats_baseline": None if best is None else sign * best["value"] < sign * x0,
        "trials": trials,
    }
    (args.out / "trials.json").write_text(json.dumps(summary, indent=1) + "\n")
    if best is not None:
        raw = dict(setup["raw"])
        raw["name"] = f"{setup['name']}_tuned"
        raw["grid"] = [{"policy": "none"}, {"policy": setup["policy"], **best["options"]}]
        header = (
            f"# Best setting of `python -m v2.tune {args.sweep} --max-drop {args.max_drop}` "
            f"(trial {best['number']}: dev accuracy {best['accuracy']:.1f} % vs baseline "
            f"{baseline['accuracy']:.1f} %, {objective_name} {best['value']:.4g}).\n"
        )
        if not summary["best_beats_baseline"]:
            header += f"# NOT BETTER than the baseline: {not_better(summary)}\n"
        header += "".join(f"# warning: {w}\n" for w in warnings)
        header += f"#   bash sbatch/run_experiments.sh {args.out / 'best.yaml'}\n"
        (args.out / "best.yaml").write_text(header + yaml.safe_dump(raw, sort_keys=False))
    plot(summary, args.out / "trials.png")
    return summary


def not_better(summary: dict) -> str:
    """Why best.yaml's setting is no improvement (when no trial beats the baseline)."""
    name, best = summary["objective"], summary["best"]
    return (
        f"no trial beats the baseline's {name} ({summary['baseline_value']:.4g}); "
        f"best.yaml's setting (trial {best['number']}, {name} {best['value']:.4g}) is only "
        "the best within the budget, no better than running without the policy"
    )


def trials_figure(summary: dict):
    """The trials plot: each trial's objective and dev accuracy (within the accuracy budget or
    over it; the best ringed in green), the baseline's hollow star and the accuracy floor.
    Markers on one spot (feasible trials on the baseline's) are drawn around it, joined to it,
    and named under the axes (v2/plotting.py). Returns (figure, notes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from v2.plotting import Marker, separate, spots_text

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    best = summary["best"]
    base, x0 = summary["baseline"], summary["baseline_value"]
    (star,) = ax.plot(
        [x0], [base["accuracy"]], "*", ms=15, color="k", mfc="none", mew=1.3, zorder=4
    )
    markers = [Marker("baseline", x0, base["accuracy"], star, 15, anchor=True)]
    star.set_label("baseline")
    seen = set()
    for t in summary["trials"]:
        ok = t["constraint"] <= 0
        is_best = best is not None and t["number"] == best["number"]
        label = "best" if is_best else "within budget" if ok else "over the accuracy budget"
        style = dict(ms=6, color="tab:blue" if ok else "tab:red", zorder=3)
        if is_best:
            style.update(ms=8, mec="tab:green", mew=2)
        (line,) = ax.plot([t["value"]], [t["accuracy"]], "o", **style)
        line.set_label(label if label not in seen else "_nolegend_")
        seen.add(label)
        markers.append(Marker(f"trial {t['number']}", t["value"], t["accuracy"], line, style["ms"]))
    ax.axhline(summary["accuracy_floor"], ls="--", c="gray", label="accuracy floor", zorder=1)
    ax.margins(x=0.08, y=0.1)
    flops = summary["objective"] == "flops"
    ax.set_xlabel("executed FLOPs / the baseline run's" if flops else "tokens/s")
    ax.set_ylabel(f"dev accuracy (%), n = {summary['dev_n']}")
    ax.set_title(f"{summary['policy']}: {len(summary['trials'])} trials", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    notes = []
    if spots := separate(ax, markers):
        notes.append(spots_text(spots))
        # a name is never split ("trial" and its number on one line)
        text = "\n".join(
            textwrap.fill(n.replace("trial ", "trial\u00a0"), 110, subsequent_indent="    ")
            for n in notes
        )
        fig.text(0.01, -0.01, text, fontsize=7.5, color="tab:red", ha="left", va="top")
    return fig, notes


def plot(summary: dict, path: Path) -> None:
    """`trials_figure`, saved to `path`."""
    import matplotlib.pyplot as plt

    fig, _ = trials_figure(summary)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m v2.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", type=Path, help="sweep YAML (configs/sweeps/...)")
    p.add_argument("--max-drop", type=float, required=True, help="accuracy points (%%) to give")
    p.add_argument("--trials", type=int, default=30, help="completed trials wanted in all")
    p.add_argument("--dev-n", type=int, default=64, help="dev problems per trial")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--objective", choices=OBJECTIVES, default=None)
    p.add_argument("--model", default=None, help="checkpoint (default: the sweep's pretrained)")
    p.add_argument(
        "--device", type=device_arg, default=None, help="default: cuda when available, else cpu"
    )
    p.add_argument("--storage", type=Path, default=None, help="SQLite file (default OUT/study.db)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="sampler seed (with the number of completed trials: a resume goes on)",
    )
    p.add_argument(
        "--confirm", action="store_true", help="then decode the full test split: baseline, best"
    )
    p.add_argument("--confirm-n", type=int, default=None, help="first n test problems only")
    p.add_argument("--out", type=Path, default=Path("tune"))
    return p


def main(argv: list[str] | None = None) -> int:
    from v2.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except (TuneError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    best = summary["best"]
    base = summary["baseline"]
    print(f"baseline: dev accuracy {base['accuracy']:.1f} %")
    for w in summary["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    if best is None:
        print(f"no trial within {args.max_drop} points of the baseline")
    else:
        if not summary["best_beats_baseline"]:
            print(f"note: {not_better(summary)}")
        print(
            f"best: {best['options']} dev accuracy {best['accuracy']:.1f} %, "
            f"{summary['objective']} {best['value']:.4g}; wrote {args.out / 'best.yaml'}"
        )
    if "confirm" in summary:
        c = summary["confirm"]
        print(
            f"{c['split']}: baseline {c['baseline']['accuracy']:.1f} %, best "
            f"{c['best']['accuracy']:.1f} % at "
            f"{objective_value(c['best'], c['baseline'], 'flops'):.3f} of its FLOPs"
        )
    print(f"wrote {args.out / 'trials.json'} and {args.out / 'trials.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
