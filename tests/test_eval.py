"""lm_eval integration: v2/eval.py (CLI, summary.json, data parallel), v2/lm_adapter.py (the
`fast_dllm_v2` model) and the boxed GSM8K tasks. CPU only, offline, on the random checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lm_eval.api.instance import Instance

from v2 import lm_adapter
from v2.eval import find_results_file, prepare_argv
from v2.lm_adapter import (
    EvalError,
    FastDLLMEvalLM,
    cut_at_stop,
    split_stats,
    sum_stats,
)
from v2.stats import Stats

REPO = Path(__file__).resolve().parent.parent
EVAL = REPO / "v2" / "eval.py"
TASKS = REPO / "v2" / "tasks"
SUMMARY_KEYS = {
    "schema",
    "runner",
    "model",
    "pretrained",
    "config",
    "limit",
    "smoke_test",
    "tasks",
    "stats",
    "speed",
    "env",
    "results_file",
    "command",
    "date",
}
# the record's one dialect (v2.runs.spec.record_config), the direct runner's too: every
# GenerationConfig field (ignore_eos and cuda_graphs included, which lm_eval's records lacked)
CONFIG_KEYS = {
    "policy",
    "seed",
    "decode",
    "ignore_eos",
    "commit_per_forward",
    "cuda_graphs",
    "threshold",
    "block_size",
    "small_block_size",
    "use_block_cache",
    "max_new_tokens",
    "temperature",
    "top_p",
    "batch_size",
    "release_recipe",
    "dtype",
    "num_processes",
}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {
        **env,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def _eval_args(checkpoint: Path, out: Path, model_args: str = "", *more: str) -> list[str]:
    return [
        "--model",
        "fast_dllm_v2",
        "--model_args",
        f"pretrained={checkpoint},threshold=1,max_new_tokens=32{model_args}",
        "--tasks",
        "tiny_gsm",
        "--apply_chat_template",
        "--limit",
        "5",
        "--output_path",
        str(out),
        *more,
    ]


def _run(cmd: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=300
    )


def _outputs(out: Path) -> tuple[dict, dict, list[dict]]:
    """(results, summary, request lines) of the one model folder under `out`."""
    (run_dir,) = [d for d in out.iterdir() if (d / "summary.json").is_file()]
    results_file = find_results_file(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["results_file"] == results_file.name
    lines = (run_dir / "request_stats.jsonl").read_text().splitlines()
    return json.loads(results_file.read_text()), summary, [json.loads(x) for x in lines]


@pytest.fixture(scope="module")
def single_run(checkpoint, tmp_path_factory):
    """One process, --limit 5 (shared by the summary test and the data-parallel comparison)."""
    out = tmp_path_factory.mktemp("single")
    r = _run([sys.executable, str(EVAL), *_eval_args(checkpoint, out)], cwd=out)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def test_single_process_results_and_summary(single_run, checkpoint):
    from lm_eval.utils import sanitize_model_name

    # lm_eval files results under a folder named after pretrained=
    assert (single_run / sanitize_model_name(str(checkpoint))).is_dir()
    results, summary, requests = _outputs(single_run)
    assert set(summary) == SUMMARY_KEYS and summary["schema"] == 1
    assert set(summary["config"]) == CONFIG_KEYS
    assert summary["config"]["policy"] == {"policy": "none"}
    assert summary["config"]["max_new_tokens"] == 32 and summary["config"]["threshold"] == 1.0
    assert summary["config"]["num_processes"] == 1 and summary["config"]["dtype"] == "float32"
    assert summary["model"] == checkpoint.name and summary["pretrained"] == str(checkpoint)
    assert summary["limit"] == 5 and summary["smoke_test"] is True
    assert summary["date"].startswith("20") and "eval.py" in summary["command"]
    assert set(summary["env"]) == {
        "git_commit",
        "gpu",
        "torch",
        "transformers",
        "lm_eval",
        "python",
    }
    task = summary["tasks"]["tiny_gsm"]
    assert task["n"] == results["n-samples"]["tiny_gsm"]["effective"] == 5
    # no cache: the statistics cover every problem the metrics do
    assert task["stats_problems"] == 5 and task["cached_problems"] == 0
    for key in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert task["metrics"][key]["value"] == results["results"]["tiny_gsm"][key]

    # totals are sums over the requests, each scored once and within its budget
    assert sorted(r["doc_id"] for r in requests) == list(range(5))
    tokens = [r["stats"]["generated_tokens"] for r in requests]
    assert all(1 <= t <= 32 for t in tokens)
    assert summary["stats"]["generated_tokens"] == task["stats"]["generated_tokens"] == sum(tokens)
    for field in ("forwards", "row_forwards"):
        assert summary["stats"][field] == task["stats"][field]
        for kind, n in summary["stats"][field].items():
            assert n == sum(r["stats"][field][kind] for r in requests)
    for field in ("executed_flops", "baseline_flops", "executed_units"):
        assert summary["stats"][field] == sum(r["stats"][field] for r in requests)
    assert summary["stats"]["wall_seconds"] == pytest.approx(
        sum(r["stats"]["wall_seconds"] for r in requests)
    )
    assert summary["stats"]["wall_seconds"] > 0
    # one process: the run's decoding wall is that process's, and per GPU = aggregate
    speed = summary["speed"]
    assert speed["processes"] == 1 and speed["timed_passes"] == 1
    assert speed["wall_seconds"] == pytest.approx(summary["stats"]["wall_seconds"], rel=1e-6)
    assert speed["tokens_per_second"] == speed["tokens_per_second_per_gpu"] > 0


def _runner_job(checkpoint: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The sweep runner's lm_eval job of the command line's setting (_eval_args, batch 1): its
    task file and run folder (v2/runs/harness.py make_task)."""
    import yaml

    from v2.runs.harness import make_task
    from v2.runs.sweep import load_sweep

    sweep_file = tmp_path / "same.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "pretrained": str(checkpoint),
                "tasks": ["tiny_gsm"],
                "threshold": 1.0,
                "model_args": {"max_new_tokens": 32},
                "lm_eval": {"batch_size": 1},  # lm_eval's command line default
                "grid": [{"policy": "none"}],
            }
        )
    )
    sweep = load_sweep(sweep_file, tmp_path / "results")
    task = make_task(sweep, sweep.configs[0], 5, 1)
    job = Path(task["run_dir"]) / "job.json"
    job.parent.mkdir(parents=True)
    job.write_text(json.dumps(task))
    return job, Path(task["run_dir"])


def _same_evaluation(out: Path, ref: Path) -> tuple[dict, dict]:
    """The records under `out` and `ref` evaluated the same: results, metrics, statistics and
    config (num_processes aside), request by request; returns (summary, ref summary)."""
    results, summary, requests = _outputs(out)
    ref_results, ref_summary, ref_requests = _outputs(ref)
    assert results["results"] == ref_results["results"]
    assert results["n-samples"] == ref_results["n-samples"]
    config = {k: v for k, v in summary["config"].items() if k != "num_processes"}
    assert config == {k: v for k, v in ref_summary["config"].items() if k != "num_processes"}
    assert summary["tasks"]["tiny_gsm"]["metrics"] == ref_summary["tasks"]["tiny_gsm"]["metrics"]
    assert summary["tasks"]["tiny_gsm"]["n"] == summary["tasks"]["tiny_gsm"]["stats_problems"]
    for key in ("generated_tokens", "forwards", "executed_flops", "executed_units"):
        assert summary["stats"][key] == ref_summary["stats"][key], key  # none counted twice

    def per_doc(reqs):
        return {r["doc_id"]: r["stats"]["generated_tokens"] for r in reqs}

    assert len(requests) == len(ref_requests) and per_doc(requests) == per_doc(ref_requests)
    return summary, ref_summary


def test_the_runner_job_through_the_api_equals_the_command_line(single_run, checkpoint, tmp_path):
    """The sweep runner's lm_eval job (v2/runs/harness.py: simple_evaluate, results as objects)
    and lm_eval's command line (v2/eval.py) on the same settings: the same results, metrics,
    statistics and config; the job's record names the command that reruns it."""
    job, run_dir = _runner_job(checkpoint, tmp_path)
    r = _run([sys.executable, "-m", "v2.runs.harness", str(job)], cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "exact_match" in r.stdout  # lm_eval's table, as its command line prints it
    summary, ref_summary = _same_evaluation(run_dir, single_run)
    assert summary["config"] == ref_summary["config"]
    sweep_file = tmp_path / "same.yaml"
    assert summary["command"] == f"python -m v2.experiments {sweep_file} --only baseline --limit 5"
    assert (
        ref_summary["command"].startswith("python ")
        and "--model fast_dllm_v2" in (ref_summary["command"])
    )


def test_the_runner_job_data_parallel_counts_once(single_run, checkpoint, tmp_path):
    """The runner's job on two processes (gloo; `-m v2.runs.harness` as accelerate launches it
    with several GPUs): rank 0 writes one record with both ranks' statistics, none twice."""
    job, run_dir = _runner_job(checkpoint, tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = _run([*cmd, "-m", "v2.runs.harness", str(job)], REPO, ACCELERATE_USE_CPU="1")
    assert r.returncode == 0, r.stderr[-4000:]
    assert len(list(run_dir.rglob("results_*.json"))) == 1
    summary, _ = _same_evaluation(run_dir, single_run)
    assert summary["config"]["num_processes"] == 2
    assert summary["speed"]["processes"] == 2 and len(summary["speed"]["rank_decode_seconds"]) == 2


def test_data_parallel_matches_single_process(single_run, checkpoint, tmp_path):
    # --limit 5 over 2 ranks: lm_eval pads rank 1 with a copy of its last request.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = _run([*cmd, str(EVAL), *_eval_args(checkpoint, tmp_path)], tmp_path, ACCELERATE_USE_CPU="1")
    assert r.returncode == 0, r.stderr[-4000:]
    assert len(list(tmp_path.rglob("results_*.json"))) == 1
    results, summary, requests = _outputs(tmp_path)
    ref_results, ref_summary, ref_requests = _outputs(single_run)
    assert summary["config"]["num_processes"] == 2
    assert summary["tasks"]["tiny_gsm"]["n"] == summary["tasks"]["tiny_gsm"]["stats_problems"] == 5
    assert summary["tasks"]["tiny_gsm"]["metrics"] == ref_summary["tasks"]["tiny_gsm"]["metrics"]
    assert results["results"] == ref_results["results"]
    # no request counted twice: the same work as one process, request by request
    assert summary["stats"]["generated_tokens"] == ref_summary["stats"]["generated_tokens"]
    assert summary["stats"]["forwards"] == ref_summary["stats"]["forwards"]

    def per_doc(reqs):
        return {r["doc_id"]: r["stats"]["generated_tokens"] for r in reqs}

    assert len(requests) == 5 and per_doc(requests) == per_doc(ref_requests)
    # tokens/s over the run's wall (the slowest rank's, as the ranks decode at the same time),
    # not over the ranks' summed walls as stats.wall_seconds is; per GPU = aggregate / 2
    speed = summary["speed"]
    assert speed["processes"] == 2 and len(speed["rank_decode_seconds"]) == 2
    assert speed["wall_seconds"] == max(speed["rank_decode_seconds"]) > 0
    tokens = summary["stats"]["generated_tokens"]
    assert speed["tokens_per_second"] == pytest.approx(tokens / speed["wall_seconds"])
    assert speed["tokens_per_second_per_gpu"] == pytest.approx(speed["tokens_per_second"] / 2)
    assert speed["wall_seconds"] < summary["stats"]["wall_seconds"]  # summed over ranks


def test_answers_from_the_request_cache_are_counted_apart(checkpoint, tmp_path):
    """A rerun that lm_eval's request cache answers in part (an interrupted run resumed): the
    metrics cover all problems, the statistics only those decoded, and the record says so."""
    cache = tmp_path / "lm_cache" / "requests"

    def run(limit: int, out: Path) -> tuple[dict, dict, list[dict]]:
        args = _eval_args(checkpoint, out, "", "--use_cache", str(cache))
        args[args.index("--limit") + 1] = str(limit)
        r = _run([sys.executable, str(EVAL), *args], cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-4000:]
        return _outputs(out)

    _, first, _ = run(2, tmp_path / "first")
    assert first["tasks"]["tiny_gsm"]["stats_problems"] == 2
    assert first["tasks"]["tiny_gsm"]["cached_problems"] == 0
    _, second, requests = run(4, tmp_path / "second")
    task = second["tasks"]["tiny_gsm"]
    assert task["n"] == 4 and task["stats_problems"] == 2 and task["cached_problems"] == 2
    assert sorted(r["doc_id"] for r in requests) == [2, 3]  # only the problems decoded
    decoded = sum(r["stats"]["generated_tokens"] for r in requests)
    assert task["stats"]["generated_tokens"] == decoded
    from v2.record import Record

    assert Record.from_dict(second).tasks["tiny_gsm"].partial_stats is True
    assert Record.from_dict(first).tasks["tiny_gsm"].partial_stats is False


def test_stats_coverage_counts_generating_tasks_only():
    from v2.eval import stats_coverage

    results = {
        "n-samples": {"gen": {"effective": 4}, "mc": {"effective": 3}, "old": {"effective": 2}},
        "configs": {
            "gen": {"output_type": "generate_until"},
            "mc": {"output_type": "multiple_choice"},  # loglikelihood: no statistics
        },
    }
    # doc 1 of "gen" decoded twice (repeats, or data-parallel padding): one problem
    records = {("gen", 0, 0): [], ("gen", 1, 0): [], ("old", 0, 0): []}
    assert stats_coverage(results, records) == {"gen": (2, 2), "old": (1, 1)}
    assert stats_coverage(results, {**records, ("gen", 1, 1): []})["gen"] == (2, 2)


@pytest.mark.parametrize(
    ("model_args", "extra", "message"),
    [
        (",bogus=3", [], "unknown model_args bogus"),
        (",threshold=high", [], "threshold"),
        ("", ["--batch_size", "0"], "batch_size"),
        ("", ["--batch_size", "auto"], "batch_size"),
    ],
)
def test_bad_input_is_one_clear_line(checkpoint, tmp_path, model_args, extra, message):
    r = _run(
        [sys.executable, str(EVAL), *_eval_args(checkpoint, tmp_path, model_args, *extra)], tmp_path
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last


ACCELERATE = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--cpu"]
ACCELERATE += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no"]
# all given (the threads too: without OMP_NUM_THREADS accelerate sets and announces them), so
# that accelerate warns about none
ACCELERATE += ["--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]


@pytest.mark.parametrize(
    ("script", "model_args", "message"),
    [
        ("token_skip_eval.py", ",bogus=3", "unknown model_args bogus"),
        # the token policy with its defaults: a note comes first, and it is no error
        ("token_skip_eval.py", ",threshold=-1", "threshold must be > 0"),
        ("layer_skip_eval.py", ",top_p=2", "top_p must be in (0, 1]"),
    ],
)
def test_bad_input_under_accelerate_launch_is_one_line(
    checkpoint, tmp_path, script, model_args, message
):
    """Under the documented launcher: the one line, no launcher traceback (accelerate answered a
    failed process with `RuntimeError: <its whole stderr>` and a CalledProcessError), status
    143: the launcher stopped by SIGTERM, as v2/eval.py's user_error does."""
    args = _eval_args(checkpoint, tmp_path)
    args[args.index("--model_args") + 1] = f"pretrained={checkpoint}{model_args}"
    r = _run([*ACCELERATE, str(REPO / script), *args], tmp_path)
    assert r.returncode == 143, r.stderr[-4000:]
    assert "Traceback" not in r.stderr and "RuntimeError" not in r.stderr, r.stderr[-4000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], lines
    assert all(line.startswith("[fast_dllm_v2] note: ") for line in lines[:-1]), lines


@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        (",threshold=-1", "error: threshold must be > 0 (>= 1: one token per forward), got -1.0"),
        (",temperature=-1", "error: temperature must be >= 0, got -1.0"),
        (",small_block_size=5", "error: small_block_size 5 must be >= 1 and divide the block"),
    ],
)
def test_bad_generation_settings_are_the_only_line(checkpoint, tmp_path, model_args, message):
    """Checked before lm_eval starts (and logs): the error is all that is printed."""
    args = _eval_args(checkpoint, tmp_path)
    args[args.index("--model_args") + 1] = f"pretrained={checkpoint}{model_args}"
    r = _run([sys.executable, str(EVAL), *args], tmp_path)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(message), r.stderr


def test_missing_checkpoint_is_one_clear_line(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    r = _run([sys.executable, str(EVAL), *_eval_args(missing, tmp_path)], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint not found: {missing} is not a directory"
    )


def test_unknown_task_is_one_clear_line(checkpoint, tmp_path):
    args = _eval_args(checkpoint, tmp_path)
    args[args.index("--tasks") + 1] = "tiny_gsmm"
    r = _run([sys.executable, str(EVAL), *args], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert (
        r.stderr.strip().splitlines()[-1].startswith("error: unknown task tiny_gsmm: not lm_eval")
    )


@pytest.mark.parametrize(
    ("script", "policy", "options"),
    [
        ("token_skip_eval.py", "token", "cosine_threshold (float), min_layer (int)"),
        ("layer_skip_eval.py", "layer", "max_consecutive_skips (int)"),
        ("v2/eval.py", "none (no skipping)", "reuse_k (int)"),
    ],
)
def test_help_names_our_model_and_default_policy_first(tmp_path, script, policy, options):
    r = _run([sys.executable, str(REPO / script), "--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    ours, _, theirs = r.stdout.partition("lm_eval's own options follow.")
    assert (
        "--model fast_dllm_v2" in ours
        and f"policy with no policy= in --model_args: {policy}" in ours
    )
    assert options in ours and "threshold=1.0" in ours
    assert "--model_args" in theirs  # then lm_eval's help


# ---- in-process tests of the model ----------------------------------------------------------


def _instance(kind: str, args: tuple, doc_id: int, task: str = "t", idx: int = 0) -> Instance:
    return Instance(kind, doc={}, arguments=args, idx=idx, metadata=(task, doc_id, 1))


@pytest.fixture(scope="module")
def lm(checkpoint):
    lm_adapter.reset_run()
    return FastDLLMEvalLM(pretrained=str(checkpoint), batch_size="3", device="cpu")


def test_model_args_errors(checkpoint):
    with pytest.raises(EvalError, match="unknown model_args nope; valid model_args: pretrained"):
        FastDLLMEvalLM(pretrained=str(checkpoint), nope=1)
    with pytest.raises(EvalError, match="batch_size"):
        FastDLLMEvalLM(pretrained=str(checkpoint), batch_size="auto")
    with pytest.raises(EvalError, match="pretrained"):
        FastDLLMEvalLM(threshold=1)


def test_a_policy_past_the_models_depth_is_named_the_baseline(checkpoint, capsys):
    """The lm_eval path says so once the model's depth is known, as v2.generate does."""
    lm_adapter.reset_run()
    lm = FastDLLMEvalLM(
        pretrained=str(checkpoint), device="cpu", policy="token", cosine_threshold=0.5, min_layer=9
    )
    err = capsys.readouterr().err
    layers = lm.model.cfg.num_hidden_layers
    assert f"can skip nothing on a model of {layers} layers: this run is the baseline" in err
    lm_adapter.reset_run()
    FastDLLMEvalLM(pretrained=str(checkpoint), device="cpu", policy="token", cosine_threshold=0.5)
    assert "note" not in capsys.readouterr().err
    lm_adapter.reset_run()


def test_generate_until_budgets_stops_and_padding(lm):
    run = lm_adapter.reset_run()
    prompt = lm.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}])
    assert prompt.endswith("<|im_start|>assistant\n")
    short = {"until": ["<|im_end|>"], "max_gen_toks": 5}
    long = {"until": ["e", "a"], "max_gen_toks": 40}
    reqs = [
        _instance("generate_until", (prompt, short), 0),
        _instance("generate_until", ("Question: 1 + 1?\nAnswer:", short), 1),
        _instance("generate_until", (prompt, long), 2),
        _instance("generate_until", ("Question: 9 * 9?\nAnswer:", long), 3, task="u"),
    ]
    reqs.append(reqs[-1])  # lm_eval's data-parallel padding repeats the last request
    out = lm.generate_until(reqs)
    assert len(out) == 5 and out[3] == out[4]
    assert set(run.requests) == {("t", 0, 0), ("t", 1, 0), ("t", 2, 0), ("u", 3, 0)}
    tokens = {k: v[0].generated_tokens for k, v in run.requests.items()}
    assert all(len(v) == 1 for v in run.requests.values())
    assert tokens[("t", 0, 0)] <= 5 and tokens[("t", 1, 0)] <= 5
    assert tokens[("t", 2, 0)] <= 40 and tokens[("u", 3, 0)] <= 40
    assert not any(s in out[i] for i in (2, 3) for s in ("e", "a"))


def test_release_recipe_rewrites_prompt_and_ignores_stops(checkpoint):
    lm_adapter.reset_run()
    lm = FastDLLMEvalLM(pretrained=str(checkpoint), release_recipe=True, max_new_tokens=8)
    assert lm._until_and_budget({"until": ["x"], "max_gen_toks": 3}) == ([], 8)
    prompt = lm.tokenizer.decode(lm._prompt("Question: 2+2?\nAnswer:"))
    assert prompt.endswith(lm_adapter.BOXED_INSTRUCTION)
    assert lm_adapter.RUN.config["max_new_tokens"] == 8 and lm_adapter.RUN.config["release_recipe"]


def test_default_policy_selection(monkeypatch):
    chosen = []
    monkeypatch.setattr(lm_adapter, "make_policy", lambda name, **o: chosen.append((name, o)))
    base = {**lm_adapter.MODEL_ARGS}
    lm_adapter.select_policy(base, "token")
    lm_adapter.select_policy({**base, "reuse_k": 2, "layer_subset": [1, 2]}, "layer")
    lm_adapter.select_policy({**base, "cosine_threshold": 0.9}, "layer")
    lm_adapter.select_policy({**base, "policy": "none"}, "layer")
    lm_adapter.select_policy(base, None)
    assert chosen == [
        ("token", {}),
        ("reuse", {"reuse_k": 2, "layer_subset": "1,2"}),
        ("layer", {"cosine_threshold": 0.9}),
        ("none", {}),
        (None, {}),
    ]


def test_split_stats_sums_exactly():
    total = Stats(
        num_layers=2,
        executed_units_per_layer=[7, 5],
        baseline_units_per_layer=[9, 9],
        padding_units_per_layer=[5, 1],
    )
    total.forwards.update(denoise_full=10, commit=3)
    total.row_forwards.update(denoise_full=23, commit=7)
    total.generated_tokens, total.executed_flops, total.baseline_flops = 11, 1001, 2002
    total.wall_seconds = 1.5
    parts = split_stats(total, [4, 0, 7])
    assert [p.generated_tokens for p in parts] == [4, 0, 7]
    back = sum_stats(parts, 2)
    back_d, total_d = back.to_dict(), total.to_dict()
    assert back_d.pop("wall_seconds") == pytest.approx(total_d.pop("wall_seconds"))
    assert back_d.pop("tokens_per_second") == pytest.approx(total_d.pop("tokens_per_second"))
    assert back_d == total_d
    assert back.padding_units_per_layer == [5, 1]  # padding shared out, not lost
    assert all(p.padding_units <= p.executed_units for p in parts)
    assert cut_at_stop("abc\n\nQuestion: x", ["Question:", "\n\n"]) == "abc"
    assert cut_at_stop("abc", []) == "abc"


def test_prepare_argv():
    argv = prepare_argv(["--model_args", "model_path=/m,threshold=1", "--tasks", "x"])
    assert argv[:4] == ["--model_args", "pretrained=/m,threshold=1", "--tasks", "x"]
    assert argv[4:] == ["--include_path", str(TASKS)]
    kept = prepare_argv(["--model_args=pretrained=/a,model_path=/b", "--include_path", "y"])
    assert kept == ["--model_args=pretrained=/a,model_path=/b", "--include_path", "y"]
    as_json = prepare_argv(["-a", '{"model_path": "/m"}', "--include_path=z"])
    assert json.loads(as_json[1]) == {"pretrained": "/m"}


# ---- the boxed GSM8K tasks ------------------------------------------------------------------


@pytest.fixture
def boxed_tasks(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    fixture = tmp_path / "gsm8k_test.jsonl"
    rows = [
        {"question": "Ann has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"},
        {"question": "What is 1000 + 234?", "answer": "1000+234=1234\n#### 1,234"},
    ]
    fixture.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("FAST_DLLM_GSM8K_JSONL", str(fixture))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    return manager.load(["gsm8k_boxed", "tiny_gsm_boxed"])["tasks"]


def test_boxed_tasks_score_the_last_boxed_answer(boxed_tasks):
    gsm = boxed_tasks["gsm8k_boxed"]
    assert len(list(gsm.test_docs())) == 2  # the local fixture, not the hub
    for task in boxed_tasks.values():
        gk = task.config.generation_kwargs
        assert gk["until"] == ["<|im_end|>"] and gk["max_gen_toks"] == 1024
        assert not any(s.strip() == "" for s in gk["until"])
        assert task.config.num_fewshot == 0
    doc = gsm.test_docs()[0]
    assert gsm.doc_to_text(doc) == (
        "Question: Ann has 3 apples and buys 4. How many?\n"
        "Please reason step by step, and put your final answer within \\boxed{}."
    )

    gsm.build_all_requests(limit=2, rank=0, world_size=1)
    right, wrong = gsm.instances
    right.resps = ["3 + 4 = 7.\n\nFirst \\boxed{6}, no: the answer is \\boxed{7}."]
    wrong.resps = ["1000 + 234 = 1234, so \\boxed{1,243}.\n#### 1,234"]
    gsm.apply_filters()
    assert right.filtered_resps["boxed"] == "7"
    assert wrong.filtered_resps["boxed"] == "1,243"

    def score(inst, name):
        return gsm.process_results(inst.doc, [inst.filtered_resps[name]])["exact_match"]

    assert score(right, "boxed") == 1.0 and score(wrong, "boxed") == 0.0
    assert score(right, "strict-match") == 0.0 and score(wrong, "strict-match") == 1.0
    assert score(right, "flexible-extract") == 1.0


def test_boxed_answer_extraction():
    from v2.tasks.gsm_answers import INVALID, boxed_answer

    assert boxed_answer("so \\boxed{\\$18 \\text{ dollars}}") == "18"
    assert boxed_answer("\\boxed{\\frac{1}{2}} then \\boxed{-3}") == "-3"
    assert boxed_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert boxed_answer("no box, 42") == INVALID
    assert boxed_answer("unclosed \\boxed{12") == INVALID
