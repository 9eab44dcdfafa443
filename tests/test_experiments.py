"""v2.experiments: sweep files, state markers, local runs that survive crashes, SLURM arrays.

SLURM is faked here: `sbatch`, `squeue` and `sacct` are small scripts on PATH that record their
arguments and answer as the real ones do (tests/test_slurm.py runs the same runner against a real
one-node cluster): `squeue -t all -r` prints one `id|state|reason` line per array task, finished
ones only with `-t all`; sacct knows jobs squeue has forgotten. The evaluation is a fake script
(FAST_DLLM_EVAL_CMD) that writes a summary.json in the adapter's schema and can crash, or kill
the runner, once. The last test runs the real adapter
(v2/eval.py) on the committed tiny model when it exists.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_report import summary_dict, write_summary

from v2 import report
from v2.runs import cli as runs_cli
from v2.runs import harness as runs_harness
from v2.runs import slurm as runs_slurm
from v2.runs import spec as runs_spec
from v2.runs import state as runs_state
from v2.runs import sweep as runs_sweep

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TEXT = {"capture_output": True, "text": True}
IDS5 = ["baseline", "token_ct0.95", "layer_ct0.99", "reuse_k2_middle", "reuse_k3_middle"]

FAKE_EVAL = """
import json, os, signal, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_report import summary_dict

task = json.loads(Path(sys.argv[1]).read_text())  # the job's task file (v2/runs/harness.py)
args = task["evaluate"]
out = Path(task["run_dir"])
model_args = args["model_args"]
log = Path(os.environ["FAKE_EVAL_LOG"])
with log.open("a") as f:
    seen = {{k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_CACHE")}}
    f.write(json.dumps({{"config": out.name, "argv": sys.argv[1:], "evaluate": args,
                        "env": seen}}) + "\\n")
cached = 0
if args["use_cache"]:
    db = Path(args["use_cache"] + "_rank0.db")
    # like lm_eval: an earlier attempt's answers come from the cache, not the model
    cached = 30 if db.exists() else 0
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_text("cached answers")
flag = Path(str(log) + ".crashed")
if os.environ.get("FAKE_EVAL_CRASH_ON") == out.name and not flag.exists():
    flag.write_text("once")
    if os.environ.get("FAKE_EVAL_CRASH_MODE") != "kill-runner":
        sys.exit(3)
    # kill the runner, then carry on as an orphan until the test releases us
    os.kill(os.getppid(), signal.SIGKILL)
    release = Path(os.environ["FAKE_EVAL_RELEASE"])
    for _ in range(600):
        if release.exists():
            break
        time.sleep(0.1)
if os.environ.get("FAKE_EVAL_SLEEP_ON", out.name) == out.name:
    time.sleep(float(os.environ.get("FAKE_EVAL_SLEEP", "0")))
policy = model_args["policy"]
numbers = {{"none": (0.99, 1000, 50.0), "token": (0.97, 800, 60.0)}}.get(policy, (0.95, 900, 55.0))
s = summary_dict({{"policy": policy}}, accuracy=numbers[0], executed_flops=numbers[1],
                 tokens_per_second=numbers[2], limit=args["limit"], task=args["tasks"][0],
                 n=args["limit"] or 100)
for t in s["tasks"].values():
    c = min(cached, t["n"] // 2)
    t["stats_problems"], t["cached_problems"] = t["n"] - c, c
(out / "fake_model").mkdir(parents=True, exist_ok=True)
(out / "fake_model" / "results_1.json").write_text("{{}}")
(out / "fake_model" / "summary.json").write_text(json.dumps(s))
"""

FAKE_SLURM = """#!{python}
import json, os, sys
from pathlib import Path
d = Path(os.environ["FAKE_SLURM_DIR"])
name = Path(sys.argv[0]).name
with (d / "calls.jsonl").open("a") as f:
    f.write(json.dumps([name, *sys.argv[1:]]) + "\\n")
if name == "sbatch":
    print(os.environ.get("FAKE_SBATCH_JOB", "777") + ";cluster")
else:
    job = sys.argv[sys.argv.index("-j") + 1]
    out = d / (name + ".out")
    ended = {{"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}}
    everything = name == "sacct" or sys.argv[sys.argv.index("-t") + 1] == "all"
    for line in out.read_text().splitlines() if out.exists() else []:
        fields = line.split("|")
        if fields[0].split("_")[0] == job and (everything or fields[1] not in ended):
            print(line)
"""


def write_sweep(tmp_path: Path, n: int = 3, **extra) -> Path:
    grid = [
        {"policy": "none"},
        {"policy": "token", "cosine_threshold": 0.95},
        {"policy": "layer", "cosine_threshold": 0.99},
        {"policy": "reuse", "reuse_k": [2, 3], "layer_subset": "middle"},
    ]
    data = {
        "name": "fake",
        "pretrained": "v2/tiny/checkpoint",
        "tasks": ["tiny_gsm"],
        "threshold": 0.9,
        "lm_eval": {"batch_size": 32, "apply_chat_template": True},
        "grid": grid[:n] if n < 4 else grid,
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def fake_eval(tmp_path, monkeypatch) -> Path:
    """FAST_DLLM_EVAL_CMD runs the fake; returns its invocation log."""
    script = tmp_path / "fake_eval.py"
    script.write_text(FAKE_EVAL.format(tests=str(TESTS)))
    log = tmp_path / "fake_eval.jsonl"
    monkeypatch.setenv(runs_harness.EVAL_CMD_ENV, f"{sys.executable} {script}")
    monkeypatch.setenv("FAKE_EVAL_LOG", str(log))
    monkeypatch.setenv(runs_slurm.NUM_GPUS_ENV, "0")
    for k in (
        "FAKE_EVAL_CRASH_ON",
        "FAKE_EVAL_CRASH_MODE",
        "FAKE_EVAL_SLEEP",
        "FAKE_EVAL_SLEEP_ON",
    ):
        monkeypatch.delenv(k, raising=False)
    return log


@pytest.fixture
def slurm(tmp_path, monkeypatch) -> Path:
    """Fake sbatch/squeue/sacct on PATH; returns their folder (calls.jsonl, squeue.out, ...)."""
    d = tmp_path / "slurm"
    d.mkdir()
    for name in ("sbatch", "squeue", "sacct"):
        (d / name).write_text(FAKE_SLURM.format(python=sys.executable))
        (d / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{d}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(d))
    (d / "slurm.conf").write_text("# read by no one: the runner submits when SLURM_CONF is set\n")
    monkeypatch.setenv("SLURM_CONF", str(d / "slurm.conf"))
    monkeypatch.setenv("FDLLM_ACCOUNT", "gts-test")
    monkeypatch.delenv("FDLLM_ARRAY_CAP", raising=False)
    return d


def invoked(log: Path) -> list[str]:
    return (
        [json.loads(line)["config"] for line in log.read_text().splitlines()]
        if log.exists()
        else []
    )


def calls(slurm: Path, name: str) -> list[list[str]]:
    f = slurm / "calls.jsonl"
    rows = [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []
    return [r[1:] for r in rows if r[0] == name]


def flag(args: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(name + "="))


def state_map(sweep: runs_spec.Sweep, limit: int | None = None) -> dict[str, str]:
    return {k: v.state for k, v in runs_state.states(sweep, sweep.configs, limit).items()}


def mark_done(sweep: runs_spec.Sweep, cid: str, policy: str = "none") -> None:
    run_dir = sweep.run_dir(cid, None)
    write_summary(run_dir, summary_dict({"policy": policy}), model="fake_model")
    runs_state.write_marker(run_dir, runs_state.DONE, {"config_id": cid})


# --------------------------------------------------------------------------- definitions


def test_tiny_default_ids_and_shipped_sweeps():
    s = runs_sweep.load_sweep(REPO / "configs/sweeps/tiny_default.yaml")
    assert [c.id for c in s.configs] == [
        "baseline",
        "token_ct0.99",
        "token_ct0.95",
        "token_rr0.5",
        "layer_ct0.99",
        "layer_ct0.95",
        "reuse_k2_middle",
        "reuse_k3_middle",
    ]
    assert s.pretrained == "v2/tiny/checkpoint" and s.tasks == ["tiny_gsm"] and s.limit_cpu
    assert s.run_dir("token_ct0.95", None) == REPO / "results/tiny_default/token_ct0.95"
    assert s.run_dir("token_ct0.95", 4) == REPO / "results/tiny_default/_limit4/token_ct0.95"
    sizes = {"tiny_token": 11, "tiny_layer": 22, "fast_dllm_v2_7b_gsm8k": 7}
    for f in sorted((REPO / "configs/sweeps").glob("*.yaml")):
        sw = runs_sweep.load_sweep(f)
        assert sw.name == f.stem and sw.configs[0].id.startswith("baseline")
        assert len(sw.configs) == sizes.get(sw.name, len(sw.configs))
    big = runs_sweep.load_sweep(REPO / "configs/sweeps/fast_dllm_v2_7b_gsm8k.yaml")
    assert big.pretrained == "Efficient-Large-Model/Fast_dLLM_v2_7B"
    assert big.tasks == ["gsm8k_boxed"] and big.lm_eval["batch_size"] == 32
    layer = runs_sweep.load_sweep(REPO / "configs/sweeps/tiny_layer.yaml")
    assert "layer_ct0.99_pf2_pl2" in [c.id for c in layer.configs]


def test_grid_ids_threshold_split_and_errors(tmp_path):
    path = write_sweep(tmp_path, 1, threshold=[0.9, 1.0])
    assert [c.id for c in runs_sweep.load_sweep(path).configs] == [
        "thr0.9_baseline",
        "thr1.0_baseline",
    ]
    path = write_sweep(tmp_path, 1, tasks=["a", "b"], split_tasks=True)
    cfgs = runs_sweep.load_sweep(path).configs
    assert [(c.id, c.tasks) for c in cfgs] == [("baseline@a", ("a",)), ("baseline@b", ("b",))]
    grid = [{"policy": "reuse", "reuse_k": 2, "layer_subset": ["3;4;5", "last"], "subset_size": 2}]
    cfgs = runs_sweep.load_sweep(write_sweep(tmp_path, grid=grid)).configs
    assert [c.id for c in cfgs] == ["reuse_k2_L3-4-5_n2", "reuse_k2_last_n2"]
    bad = [
        ({"grid": [{"policy": "token", "reuse_k": 2}]}, "takes"),
        ({"grid": [{"policy": "none"}, {"policy": "none"}]}, "two configurations"),
        ({"grid": [{"policy": "warp"}]}, "unknown policy"),
        ({"gird": []}, "unknown keys"),
        ({"grid": [{"policy": "reuse", "layer_subset": "1,2"}]}, "','"),
    ]
    for extra, message in bad:
        with pytest.raises(runs_spec.SweepError, match=message):
            runs_sweep.load_sweep(write_sweep(tmp_path, **extra))


def test_command_of_one_configuration(tmp_path):
    sweep = runs_sweep.load_sweep(write_sweep(tmp_path, 2), results=tmp_path / "r")
    token = sweep.config("token_ct0.95")
    run_dir = tmp_path / "r/fake/_limit4/token_ct0.95"
    task = runs_harness.make_task(sweep, token, 4, 1)
    assert task["run_dir"] == str(run_dir) and task["expect"]["limit"] == 4
    # simple_evaluate's arguments: the spec's model_args as values, one cache per configuration
    assert task["evaluate"] == {
        "model_args": {
            "pretrained": "v2/tiny/checkpoint",
            "threshold": 0.9,
            "policy": "token",
            "cosine_threshold": 0.95,
        },
        "tasks": ["tiny_gsm"],
        "batch_size": 32,
        "apply_chat_template": True,
        "fewshot_as_multiturn": True,  # as lm_eval's command line sets it with the chat template
        "num_fewshot": None,
        "gen_kwargs": None,
        "log_samples": False,
        "limit": 4,
        "use_cache": f"{run_dir}/lm_cache/requests",
    }
    assert task["include_path"] == [str(REPO / "v2/tasks")]
    assert task["command"] == f"python -m v2.experiments {sweep.file} --only token_ct0.95 --limit 4"
    json.dumps(task)  # a manifest line
    task = runs_harness.make_task(sweep, token, None, 2)
    argv = runs_harness.job_argv(task, port=29511)
    job = str(tmp_path / "r/fake/token_ct0.95/job.json")
    assert argv == [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                    "--num_processes", "2", "--main_process_port", "29511",
                    "-m", "v2.runs.harness", job]  # fmt: skip
    assert runs_harness.job_argv({**task, "num_processes": 1}) == [
        sys.executable,
        "-m",
        "v2.runs.harness",
        job,
    ]


def test_ports_distinct_per_array_task(monkeypatch):
    monkeypatch.delenv("MAIN_PROCESS_PORT", raising=False)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "123456")
    ports = set()
    for i in range(40):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(i))
        ports.add(runs_slurm.main_process_port())
    assert len(ports) == 40 and all(29500 <= p < 30500 for p in ports)
    monkeypatch.setenv("MAIN_PROCESS_PORT", "31000")
    assert runs_slurm.main_process_port() == 31000


def test_array_spec():
    assert runs_slurm.array_spec([0, 2, 3, 4, 7]) == "0,2-4,7"
    assert runs_slurm.array_spec([5]) == "5"
    assert runs_slurm.array_spec([1, 0]) == "0-1"


# --------------------------------------------------------------------------- state


def test_state_from_markers(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue / sacct here
    slurm = runs_state.SlurmView()
    run_dir = tmp_path / "cfg"
    assert runs_state.config_state(run_dir, slurm).state == "missing"
    runs_state.write_marker(
        run_dir, runs_state.RUNNING, {"host": runs_state.HOST, "pid": os.getpid()}
    )
    assert runs_state.config_state(run_dir, slurm).state == "running"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    runs_state.write_marker(run_dir, runs_state.RUNNING, {"host": runs_state.HOST, "pid": dead.pid})
    assert runs_state.config_state(run_dir, slurm).state == "missing"
    runs_state.write_marker(run_dir, runs_state.RUNNING, {"host": "elsewhere", "pid": 1})
    assert runs_state.config_state(run_dir, slurm).state == "running"  # fresh heartbeat
    old = time.time() - runs_state.STALE_S - 10
    os.utime(run_dir / runs_state.RUNNING, (old, old))
    assert runs_state.config_state(run_dir, slurm).state == "missing"
    runs_state.write_marker(run_dir, runs_state.FAILED, {"rc": 3, "reason": "exit 3"})
    assert runs_state.config_state(run_dir, slurm) == runs_state.State("failed", "exit 3")
    runs_state.write_marker(run_dir, runs_state.DONE, {})
    assert runs_state.config_state(run_dir, slurm).state == "done"
    assert not list(run_dir.glob(".*.tmp"))  # markers are written through a temp file


def test_state_of_a_local_run_inside_an_allocation(tmp_path, slurm):
    """A local runner killed inside `salloc`: its job is still RUNNING, its processes are gone."""
    run_dir = tmp_path / "cfg"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (slurm / "squeue.out").write_text("4242|RUNNING\n")
    marker = {"host": runs_state.HOST, "pid": dead.pid, "slurm_job": "4242"}
    runs_state.write_marker(run_dir, runs_state.RUNNING, marker)
    assert runs_state.config_state(run_dir, runs_state.SlurmView()).state == "missing"
    runs_state.write_marker(run_dir, runs_state.RUNNING, {**marker, "pid": os.getpid()})
    assert runs_state.config_state(run_dir, runs_state.SlurmView()).state == "running"
    runs_state.write_marker(
        run_dir, runs_state.RUNNING, {**marker, "host": "node-7", "pid": dead.pid}
    )
    assert runs_state.config_state(run_dir, runs_state.SlurmView()) == runs_state.State(
        "running", "slurm 4242 RUNNING"
    )
    (slurm / "squeue.out").write_text("")
    assert (
        runs_state.config_state(run_dir, runs_state.SlurmView()).state == "missing"
    )  # squeue: it has ended
    (slurm / "squeue.out").write_text("4242|TIMEOUT|None\n")  # -t all: ended, for MinJobAge
    assert runs_state.config_state(run_dir, runs_state.SlurmView()) == runs_state.State(
        "failed", "slurm 4242 TIMEOUT"
    )


def test_sbatch_without_a_cluster_runs_here(tmp_path, monkeypatch):
    """The SLURM client alone (as the tests install it) is no cluster: no SLURM_CONF, no
    slurm.conf and an sinfo that fails mean running here; a configless cluster's sinfo works."""
    for name, rc in (("sbatch", 0), ("sinfo", 1)):
        (tmp_path / name).write_text(f"#!/bin/sh\nexit {rc}\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("SLURM_CONF", raising=False)
    monkeypatch.setattr(runs_slurm, "SLURM_CONF_PATHS", (str(tmp_path / "slurm.conf"),))
    assert not runs_slurm.slurm_available() and not runs_slurm.use_slurm(local=False)
    (tmp_path / "sinfo").write_text("#!/bin/sh\nexit 0\n")
    assert runs_slurm.slurm_available()
    (tmp_path / "sinfo").unlink()
    (tmp_path / "slurm.conf").write_text("")
    assert runs_slurm.use_slurm(local=False) and not runs_slurm.use_slurm(local=True)


def test_limit_results_never_count(tmp_path, fake_eval, slurm):
    path = write_sweep(tmp_path, 5)
    results = tmp_path / "results"
    assert runs_cli.main([str(path), "--local", "--limit", "4", "--results", str(results)]) == 0
    sweep = runs_sweep.load_sweep(path, results)
    assert set(state_map(sweep, 4).values()) == {"done"}
    assert set(state_map(sweep).values()) == {"missing"}
    assert all(json.loads(x)["evaluate"]["limit"] == 4 for x in fake_eval.read_text().splitlines())
    assert runs_cli.main([str(path), "--results", str(results)]) == 0
    assert flag(calls(slurm, "sbatch")[0], "--array") == "0-4%4"
    # a smoke-test summary in a full-run folder is not a result either
    limited = sweep.run_dir("baseline", 4) / "fake_model" / "summary.json"
    expect = {"tasks": ["tiny_gsm"], "limit": None, "policy": "none"}
    assert runs_state.check_summary(limited, expect) == ["limit 4, expected None"]
    assert runs_state.check_summary(limited, {**expect, "limit": 4}) == []
    assert "no metrics for task gsm8k" in runs_state.check_summary(
        limited, {**expect, "tasks": ["gsm8k"]}
    )


# --------------------------------------------------------------------------- SLURM


def test_array_covers_exactly_what_is_not_done(tmp_path, slurm, capsys):
    path = write_sweep(tmp_path, 5)
    results = tmp_path / "results"
    sweep = runs_sweep.load_sweep(path, results)
    mark_done(sweep, "baseline")
    runs_state.write_marker(
        sweep.run_dir("token_ct0.95", None), runs_state.SUBMITTED, {"slurm_job": "500_1"}
    )
    runs_state.write_marker(
        sweep.run_dir("layer_ct0.99", None), runs_state.SUBMITTED, {"slurm_job": "500_2"}
    )
    (slurm / "squeue.out").write_text("500_1|RUNNING\n")
    (slurm / "sacct.out").write_text("500_1|RUNNING\n500_2|CANCELLED by 4242\n")
    assert state_map(sweep) == dict(
        zip(IDS5, ["done", "running", "failed", "missing", "missing"], strict=True)
    )

    assert runs_cli.main([str(path), "--results", str(results)]) == 0
    (args,) = calls(slurm, "sbatch")
    assert flag(args, "--array") == "2-4%4"  # failed + missing; not done, not running
    assert "--parsable" in args and f"--chdir={REPO}" in args
    assert {"--account=gts-test", "--qos=inferno", "--gres=gpu:H100:1"} <= set(args)
    assert args[-2] == str(REPO / "sbatch/array_job.sh")
    manifest = json.loads(Path(args[-1]).read_text())
    assert Path(args[-1]).parent == results / "fake/_manifests"
    assert [t["config_id"] for t in manifest["tasks"]] == IDS5  # frozen: the whole sweep
    assert [t["index"] for t in manifest["tasks"]] == list(range(5))
    assert flag(args, "--output").endswith("fake/_manifests/slurm-%A_%a.log")
    for i in (2, 3, 4):
        m = runs_state.read_marker(sweep.run_dir(IDS5[i], None), runs_state.SUBMITTED)
        assert m["slurm_job"] == f"777_{i}" and m["manifest"] == args[-1]
    assert not (sweep.run_dir("layer_ct0.99", None) / runs_state.FAILED).exists()

    (slurm / "squeue.out").write_text(
        "500_1|RUNNING|None\n777_2|PENDING|Priority\n777_3|RUNNING|None\n777_4|PENDING|Priority\n"
    )
    capsys.readouterr()
    assert runs_cli.main([str(path), "--status", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "1 done, 2 pending, 2 running, 0 failed, 0 missing of 5" in out
    assert "slurm 777_3 RUNNING" in out and "slurm 777_2 PENDING (Priority)" in out
    assert runs_cli.main([str(path), "--results", str(results)]) == 0  # nothing left to submit
    assert len(calls(slurm, "sbatch")) == 1


def test_force_resubmits_what_it_should(tmp_path, slurm, monkeypatch):
    path = write_sweep(tmp_path, 5)
    results = tmp_path / "results"
    sweep = runs_sweep.load_sweep(path, results)
    for cid in IDS5:
        mark_done(sweep, cid)
    monkeypatch.setattr(
        runs_state.time, "strftime", lambda fmt, *t: "20260101-000000"
    )  # one second
    assert runs_cli.main([str(path), "--results", str(results)]) == 0
    assert calls(slurm, "sbatch") == []

    assert runs_cli.main([str(path), "--results", str(results), "--force", "token_ct0.95"]) == 0
    assert flag(calls(slurm, "sbatch")[-1], "--array") == "1%4"
    replaced = list((results / "fake/_replaced").iterdir())
    assert [p.name.rsplit("-", 2)[0] for p in replaced] == ["token_ct0.95"]
    assert (replaced[0] / runs_state.DONE).exists()  # moved aside, not deleted
    assert state_map(sweep)["baseline"] == "done"

    (slurm / "squeue.out").write_text("777_1|PENDING\n")
    monkeypatch.setenv("FDLLM_ARRAY_CAP", "2")  # cluster.env values yield to the environment
    assert runs_cli.main([str(path), "--results", str(results), "--force"]) == 0
    assert flag(calls(slurm, "sbatch")[-1], "--array") == "0,2-4%2"  # the running one is spared
    assert runs_cli.main([str(path), "--results", str(results), "--force", "nope"]) == 2
    # each submission froze its own manifest, though both came within the same second
    manifests = [c[-1] for c in calls(slurm, "sbatch")]
    assert len(set(manifests)) == 2 and all(Path(m).exists() for m in manifests)


def test_dry_run_changes_nothing(tmp_path, slurm, fake_eval, capsys, monkeypatch):
    path = write_sweep(tmp_path, 3)
    results = tmp_path / "results"
    monkeypatch.setenv("FDLLM_ACCOUNT", "gts-<pi>")  # a placeholder is fine for a dry run
    assert runs_cli.main([str(path), "--dry-run", "--results", str(results)]) == 0
    assert "would submit: sbatch --parsable --array=0-2%4" in capsys.readouterr().out
    assert (
        runs_cli.main([str(path), "--results", str(results)]) == 2
    )  # ... but not for a submission
    assert runs_cli.main([str(path), "--dry-run", "--local", "--results", str(results)]) == 0
    out = capsys.readouterr().out  # the job that would run here, and what it asks lm_eval
    assert "token_ct0.95/job.json" in out and "lm_eval: tasks tiny_gsm; model_args" in out
    assert calls(slurm, "sbatch") == [] and not results.exists() and invoked(fake_eval) == []


def test_array_job_script_runs_its_task_offline_and_requeue_safe(tmp_path, slurm, fake_eval):
    path = write_sweep(tmp_path, 3)
    results = tmp_path / "results"
    assert runs_cli.main([str(path), "--results", str(results)]) == 0
    manifest = calls(slurm, "sbatch")[0][-1]
    seed = tmp_path / "seed"
    (seed / "gsm8k").mkdir(parents=True)
    (seed / "gsm8k" / "data.arrow").write_text("rows")
    env = {
        **os.environ,
        "SLURM_ARRAY_JOB_ID": "777",
        "SLURM_ARRAY_TASK_ID": "2",
        "SLURM_JOB_ID": "780",
        "TMPDIR": str(tmp_path / "node"),
        "FDLLM_DATASETS_SEED": str(seed),
    }
    env.pop("HF_HUB_OFFLINE", None)
    (tmp_path / "node").mkdir()
    for _ in range(2):  # the second time is a requeue of a finished task
        r = subprocess.run(["bash", "sbatch/array_job.sh", manifest], cwd=REPO, env=env)
        assert r.returncode == 0
    assert invoked(fake_eval) == ["layer_ct0.99"]
    run_dir = results / "fake/layer_ct0.99"
    assert (run_dir / runs_state.DONE).exists() and not (run_dir / runs_state.SUBMITTED).exists()
    log = (run_dir / "slurm-777_2.log").read_text()
    assert "layer_ct0.99 on" in log and "already done" in log
    seen = json.loads(fake_eval.read_text())["env"]
    assert seen["HF_HUB_OFFLINE"] == "1"
    cache = Path(seen["HF_DATASETS_CACHE"])
    assert cache.parent == tmp_path / "node" and (cache / "gsm8k" / "data.arrow").exists()


def test_run_single_submits_itself_then_runs_in_the_job(tmp_path, slurm, fake_eval, monkeypatch):
    path = write_sweep(tmp_path, 2, results=str(tmp_path / "results"))
    single = ["bash", "sbatch/run_single.sh", str(path)]
    assert subprocess.run([*single, "token_ct0.95"], cwd=REPO).returncode == 0
    (args,) = calls(slurm, "sbatch")
    assert "--account=gts-test" in args and args[-3:] == [
        str(REPO / "sbatch/run_single.sh"),
        str(path),
        "token_ct0.95",
    ]
    assert flag(args, "--output") == f"{tmp_path}/results/fake/_manifests/single-%j.log"
    # nothing is queued for an unknown configuration or with the placeholder account
    assert subprocess.run([*single, "token_ct0.9"], cwd=REPO).returncode == 2
    monkeypatch.setenv("FDLLM_ACCOUNT", "gts-<pi>")
    assert subprocess.run([*single, "token_ct0.95"], cwd=REPO).returncode == 2
    assert len(calls(slurm, "sbatch")) == 1
    monkeypatch.setenv("FDLLM_ACCOUNT", "gts-test")
    env = {**os.environ, "SLURM_JOB_ID": "900", "SLURM_SUBMIT_DIR": str(REPO)}
    env["FDLLM_DATASETS_SEED"] = ""
    r = subprocess.run(
        ["bash", "sbatch/run_single.sh", str(path), "token_ct0.95"], cwd=REPO, env=env
    )
    assert r.returncode == 0
    run_dir = tmp_path / "results/fake/token_ct0.95"
    assert (run_dir / runs_state.DONE).exists() and (run_dir / "slurm-900.log").exists()


FAKE_PYTHON = """#!/bin/bash
# `python3 -m venv DIR` makes DIR/bin/python, a fake that logs its arguments (and PIP_CACHE_DIR)
if [[ "$1 $2" == "-m venv" ]]; then
    mkdir -p "$3/bin"
    cp "$0" "$3/bin/python"
    touch "$3/bin/activate"
    exit 0
fi
echo "$PIP_CACHE_DIR $*" >> "$FAKE_PY_LOG"
[[ -z "${FAKE_PIP_FAIL:-}" ]]
"""


def test_tmpdir_venv_and_job_env(tmp_path):
    """setup_tmpdir_venv.sh builds the venv in $TMPDIR and prints only its activate line; a failed
    build stops the job instead of running with the wrong Python."""
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {**os.environ, "FDLLM_PYTHON": str(fake), "TMPDIR": str(tmp_path), "SLURM_JOB_ID": "55"}
    env |= {"FAKE_PY_LOG": str(tmp_path / "py.log"), "FDLLM_PIP_CACHE": str(tmp_path / "pip")}
    r = subprocess.run(["bash", "sbatch/setup_tmpdir_venv.sh"], cwd=REPO, env=env, **TEXT)
    assert r.returncode == 0, r.stderr
    venv = tmp_path / "fdllm-venv-55"
    assert r.stdout == f"source {venv}/bin/activate\n" and "[setup_tmpdir_venv]" in r.stderr
    pip_calls = (tmp_path / "py.log").read_text().splitlines()
    assert f"{tmp_path / 'pip'} -m pip install -q -e {REPO}" in pip_calls
    for sabotage in ({}, {"FAKE_PIP_FAIL": "1"}):
        job = {**env, "FDLLM_TMPDIR_VENV": "1", "FDLLM_DATASETS_SEED": "", **sabotage}
        script = "set -euo pipefail; source sbatch/job_env.sh; echo reached"
        r = subprocess.run(["bash", "-c", script], cwd=REPO, env=job, **TEXT)
        assert ("reached" in r.stdout) == (not sabotage) and (r.returncode == 0) == (not sabotage)


def test_scripts_parse():
    for script in sorted((REPO / "sbatch").glob("*.sh")):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script


# --------------------------------------------------------------------------- local runs


def test_local_crash_then_rerun_repeats_only_the_unfinished(
    tmp_path, fake_eval, monkeypatch, capsys
):
    path = write_sweep(tmp_path, 3)
    results = tmp_path / "results"
    sweep = runs_sweep.load_sweep(path, results)
    monkeypatch.setenv("FAKE_EVAL_CRASH_ON", "token_ct0.95")  # the 2nd configuration, once
    assert runs_cli.main([str(path), "--local", "--results", str(results)]) == 1
    assert invoked(fake_eval) == ["baseline", "token_ct0.95", "layer_ct0.99"]
    assert state_map(sweep) == {
        "baseline": "done",
        "token_ct0.95": "failed",
        "layer_ct0.99": "done",
    }
    kept = {
        c: (sweep.run_dir(c, None) / runs_state.DONE).read_text()
        for c in ("baseline", "layer_ct0.99")
    }

    assert runs_cli.main([str(path), "--local", "--results", str(results)]) == 0
    assert invoked(fake_eval)[3:] == ["token_ct0.95"]
    assert set(state_map(sweep).values()) == {"done"}
    for c, text in kept.items():
        assert (sweep.run_dir(c, None) / runs_state.DONE).read_text() == text
    done = runs_state.read_marker(sweep.run_dir("token_ct0.95", None), runs_state.DONE)
    assert done["resumed_from_cache"] is True  # its lm_cache survived the crash
    assert done["summary"] == "fake_model/summary.json"
    rows = report.collect(results / "fake")
    assert [r.config_id for r in rows] == ["baseline", "token_ct0.95", "layer_ct0.99"]
    assert (results / "fake/_report/results.md").exists()
    # the resumed configuration's statistics cover the problems decoded in its last attempt
    summary = json.loads((sweep.run_dir("token_ct0.95", None) / done["summary"]).read_text())
    task = summary["tasks"]["tiny_gsm"]
    assert task["stats_problems"] == 70 < task["n"] == 100 and task["cached_problems"] == 30
    assert [r.config_id for r in rows if r.partial_stats] == ["token_ct0.95"]
    md = (results / "fake/_report/results.md").read_text()
    assert "| token_ct0.95 † |" in md and "70 of 100 (30 cached)" in md and "--force ID" in md
    capsys.readouterr()
    assert runs_cli.main([str(path), "--status", "--local", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("base", "tok"))}
    assert "stats partial: 70 of 100 (30 cached) †" in lines["token_ct0.95"]
    assert "stats partial" not in lines["baseline"] and "--force ID redoes it" in out

    # --force ID: the old folder (cache included) moved aside, every problem decoded again
    assert (
        runs_cli.main([str(path), "--local", "--results", str(results), "--force", "token_ct0.95"])
        == 0
    )
    assert invoked(fake_eval)[4:] == ["token_ct0.95"]
    assert list((results / "fake" / "_replaced").iterdir())
    rows = report.collect(results / "fake")
    assert not any(r.partial_stats for r in rows)
    assert "†" not in (results / "fake/_report/results.md").read_text()


def test_local_runner_killed_while_its_evaluation_goes_on(tmp_path, fake_eval, monkeypatch):
    """The runner dies (SIGKILL) and its evaluation goes on as an orphan: a rerun does not start
    that configuration twice, and once the orphan has finished, its result is kept, not redone."""
    path = write_sweep(tmp_path, 3)
    results = tmp_path / "results"
    sweep = runs_sweep.load_sweep(path, results)
    monkeypatch.setenv("FAKE_EVAL_CRASH_ON", "token_ct0.95")
    monkeypatch.setenv("FAKE_EVAL_CRASH_MODE", "kill-runner")
    release = tmp_path / "release"
    monkeypatch.setenv("FAKE_EVAL_RELEASE", str(release))
    cmd = [sys.executable, "-m", "v2.experiments", str(path), "--local", "--results", str(results)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == -9, r.stdout + r.stderr
    orphan = runs_state.read_marker(sweep.run_dir("token_ct0.95", None), runs_state.RUNNING)[
        "child_pid"
    ]
    assert runs_state.pid_alive(orphan)
    assert state_map(sweep) == {
        "baseline": "done",
        "token_ct0.95": "running",
        "layer_ct0.99": "missing",
    }
    first = (sweep.run_dir("baseline", None) / runs_state.DONE).read_text()

    assert runs_cli.main([str(path), "--local", "--results", str(results)]) == 0
    assert invoked(fake_eval) == ["baseline", "token_ct0.95", "layer_ct0.99"]  # not twice

    release.write_text("go")
    deadline = time.time() + 60
    while runs_state.pid_alive(orphan):
        assert time.time() < deadline, "the orphaned evaluation did not finish"
        time.sleep(0.1)
    # a checked summary without DONE: reading the state adopts it (not "missing")
    assert state_map(sweep)["token_ct0.95"] == "done"
    assert (
        runs_state.read_marker(sweep.run_dir("token_ct0.95", None), runs_state.DONE)["adopted"]
        is True
    )
    assert runs_cli.main([str(path), "--local", "--results", str(results)]) == 0
    assert invoked(fake_eval) == ["baseline", "token_ct0.95", "layer_ct0.99"]  # adopted, not rerun
    assert (sweep.run_dir("baseline", None) / runs_state.DONE).read_text() == first
    assert set(state_map(sweep).values()) == {"done"}


def test_sigterm_stops_the_evaluation_and_leaves_a_failed_marker(tmp_path, fake_eval, monkeypatch):
    """SIGTERM (how SLURM ends a task on scancel, time limit or requeue) to a runner: its
    evaluation is stopped, FAILED says why, and the runner ends there, not with the next one."""
    path = write_sweep(tmp_path, 2)
    results = tmp_path / "results"
    sweep = runs_sweep.load_sweep(path, results)
    monkeypatch.setenv("FAKE_EVAL_SLEEP", "60")
    cmd = [sys.executable, "-m", "v2.experiments", str(path), "--local", "--results", str(results)]
    runner = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
    first = sweep.run_dir("baseline", None)
    deadline = time.time() + 60
    while "child_pid" not in (runs_state.read_marker(first, runs_state.RUNNING) or {}):
        assert runner.poll() is None and time.time() < deadline
        time.sleep(0.05)
    child = runs_state.read_marker(first, runs_state.RUNNING)["child_pid"]
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=60) == -signal.SIGTERM
    assert not runs_state.pid_alive(child)
    failed = runs_state.read_marker(first, runs_state.FAILED)
    assert failed["rc"] == 143 and failed["reason"].startswith("stopped by SIGTERM")
    assert state_map(sweep) == {"baseline": "failed", "token_ct0.95": "missing"}
    assert not sweep.run_dir("token_ct0.95", None).exists()  # never started


def _start_runner(argv: list[str], config_dir: Path) -> tuple[subprocess.Popen, int]:
    """The runner as a process of its own; returns it once the evaluation of `config_dir` runs,
    with that evaluation's pid."""
    cmd = [sys.executable, "-m", "v2.experiments", *argv]
    runner = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while "child_pid" not in (runs_state.read_marker(config_dir, runs_state.RUNNING) or {}):
        assert runner.poll() is None and time.time() < deadline, runner.stderr.read()
        time.sleep(0.05)
    return runner, runs_state.read_marker(config_dir, runs_state.RUNNING)["child_pid"]


def test_sigint_stops_the_evaluation_and_one_rerun_finishes(tmp_path, fake_eval, monkeypatch):
    """SIGINT to the runner alone (not its process group): the evaluation stops with it, FAILED
    says so, and one plain rerun finishes the sweep with nothing missing or repeated."""
    path = write_sweep(tmp_path, 3)
    results = tmp_path / "results"
    sweep = runs_sweep.load_sweep(path, results)
    monkeypatch.setenv("FAKE_EVAL_SLEEP", "60")
    monkeypatch.setenv("FAKE_EVAL_SLEEP_ON", "token_ct0.95")
    argv = [str(path), "--local", "--results", str(results)]
    runner, child = _start_runner(argv, sweep.run_dir("token_ct0.95", None))
    runner.send_signal(signal.SIGINT)
    assert runner.wait(timeout=60) == 130
    assert "Traceback" not in runner.stderr.read().decode()
    assert not runs_state.pid_alive(child)
    failed = runs_state.read_marker(sweep.run_dir("token_ct0.95", None), runs_state.FAILED)
    assert failed["rc"] == 130 and failed["reason"].startswith("interrupted (SIGINT)")
    assert state_map(sweep) == {
        "baseline": "done",
        "token_ct0.95": "failed",
        "layer_ct0.99": "missing",
    }
    first = (sweep.run_dir("baseline", None) / runs_state.DONE).read_text()

    monkeypatch.setenv("FAKE_EVAL_SLEEP", "0")
    assert runs_cli.main(argv) == 0
    assert invoked(fake_eval) == ["baseline", "token_ct0.95", "token_ct0.95", "layer_ct0.99"]
    assert set(state_map(sweep).values()) == {"done"}
    assert (sweep.run_dir("baseline", None) / runs_state.DONE).read_text() == first


def test_interrupted_force_moves_aside_only_what_it_reran(tmp_path, fake_eval, monkeypatch):
    """--force moves each configuration's old results aside just before rerunning it; after a
    Ctrl-C the printed command finishes the forced run without repeating what it finished."""
    path = write_sweep(tmp_path, 3)
    results = tmp_path / "results"
    sweep = runs_sweep.load_sweep(path, results)
    argv = [str(path), "--local", "--results", str(results)]
    assert runs_cli.main(argv) == 0
    old_last = (sweep.run_dir("layer_ct0.99", None) / runs_state.DONE).read_text()
    monkeypatch.setenv("FAKE_EVAL_SLEEP", "60")
    monkeypatch.setenv("FAKE_EVAL_SLEEP_ON", "token_ct0.95")
    runner, _ = _start_runner([*argv, "--force"], sweep.run_dir("token_ct0.95", None))
    runner.send_signal(signal.SIGINT)
    assert runner.wait(timeout=60) == 130
    err = runner.stderr.read().decode()
    replaced = sorted(p.name.rsplit("-", 2)[0] for p in (results / "fake/_replaced").iterdir())
    assert replaced == ["baseline", "token_ct0.95"]  # not layer_ct0.99: never reached
    assert (sweep.run_dir("layer_ct0.99", None) / runs_state.DONE).read_text() == old_last
    again = next(line for line in err.splitlines() if "v2.experiments" in line).split()
    assert again[again.index("--force") + 1 :] == ["layer_ct0.99"]

    monkeypatch.setenv("FAKE_EVAL_SLEEP", "0")
    assert runs_cli.main(again[3:]) == 0
    ran = invoked(fake_eval)[3:]  # after the first full run
    assert ran == ["baseline", "token_ct0.95", "token_ct0.95", "layer_ct0.99"]
    assert set(state_map(sweep).values()) == {"done"}
    assert (sweep.run_dir("layer_ct0.99", None) / runs_state.DONE).read_text() != old_last


@pytest.mark.parametrize(
    "change, message",
    [
        ({"threshold": 0}, "threshold must be > 0"),
        ({"grid": [{"policy": "token", "reuse_ratio": 1.5}]}, "reuse_ratio must be in [0, 1)"),
        ({"pretrained": "v2/tiny/no_such_checkpoint"}, "no_such_checkpoint does not exist"),
        ({"tasks": ["tiny_gsmm"]}, "unknown tasks tiny_gsmm"),
    ],
)
def test_bad_sweeps_stop_before_anything_runs(tmp_path, fake_eval, capsys, change, message):
    path = write_sweep(tmp_path, 2, **change)
    results = tmp_path / "results"
    for extra in (["--dry-run"], []):
        assert runs_cli.main([str(path), "--local", "--results", str(results), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert invoked(fake_eval) == [] and not results.exists()


def test_status_without_a_sweep_lists_the_sweeps(tmp_path, fake_eval, capsys):
    folder = tmp_path / "sweeps"
    folder.mkdir()
    write_sweep(tmp_path, 2).rename(folder / "a.yaml")
    (folder / "b.yaml").write_text("pretrained: v2/tiny/checkpoint\ntasks: [tiny_gsm]\n")
    results = tmp_path / "results"
    assert (
        runs_cli.main(
            [str(folder / "a.yaml"), "--local", "--results", str(results), "--only", "baseline"]
        )
        == 0
    )
    capsys.readouterr()
    assert runs_cli.list_sweeps(results, local=True, folder=folder) == 0
    out = capsys.readouterr().out
    assert re.search(r"a\.yaml\s+2\s+1 done, 1 missing", out), out
    assert re.search(r"b\.yaml .*error: .*`grid` is required", out), out
    # the shell wrapper with no sweep: the shipped sweeps, not a usage error
    r = subprocess.run(
        ["bash", "sbatch/run_experiments.sh", "--status", "--local"], cwd=REPO, **TEXT
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:4] == ["sweep", "configs", "state", "results"], r.stdout
    assert "configs/sweeps/tiny_default.yaml" in r.stdout


def test_readme_main_job_for_a_newcomer():
    """The CPU-torch line comes before the first command a newcomer copies, and the README, the
    sweep file and docs/operations.md give the same time for the main job on a CPU."""
    readme = (REPO / "README.md").read_text()
    commands = [line.strip() for line in readme.splitlines() if line.startswith("    ")]
    assert commands[0].startswith("pip install torch") and "whl/cpu" in commands[0]
    assert commands[1].startswith('pip install -e ".[dev]"')
    sweep = (REPO / "configs/sweeps/tiny_default.yaml").read_text()
    minutes = re.compile(r"(\d+)-(\d+)\s+minutes")
    (shown,) = set(minutes.findall(readme.replace("\n", " ")))
    assert set(minutes.findall(sweep.replace("\n#", " "))) == {shown}
    # docs/operations.md: the timed walls of the unloaded runs fall inside that range
    ops = (REPO / "docs/operations.md").read_text()
    walls = [int(m) for m in re.findall(r"tiny_default\.yaml --local` \| (\d+) min", ops)]
    assert walls and all(int(shown[0]) <= w <= int(shown[1]) for w in walls)


def test_dry_run_into_a_closed_pipe_ends_quietly():
    """`--dry-run | head`: the reader is gone before the runner writes."""
    cmd = [sys.executable, "-m", "v2.experiments", "configs/sweeps/tiny_token.yaml", "--dry-run"]
    proc = subprocess.Popen(
        [*cmd, "--local"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_cpu_limit_and_status_table(tmp_path, fake_eval, capsys):
    path = write_sweep(tmp_path, 3, limit_cpu=2)
    results = tmp_path / "results"
    assert runs_cli.main([str(path), "--local", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "limit 2 per task: smoke test (limit_cpu" in out and "plot: " in out
    assert all(json.loads(x)["argv"][-2:] != [] for x in fake_eval.read_text().splitlines())
    assert (results / "fake/_limit2/baseline/DONE").exists()
    assert runs_cli.main([str(path), "--status", "--local", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("base", "tok"))}
    # the numbers are those of the summary.json the (fake) evaluation wrote
    summary = json.loads((results / "fake/_limit2/baseline/fake_model/summary.json").read_text())
    m = summary["tasks"]["tiny_gsm"]["metrics"]["exact_match,flexible-extract"]
    shown = f"{100 * m['value']:.2f} ± {100 * m['stderr']:.2f}"
    assert shown == "99.00 ± 9.95" and "done" in lines["baseline"] and shown in lines["baseline"]
    assert "60.0" in lines["token_ct0.95"] and "20.0% / 20.0%" in lines["token_ct0.95"]
    assert "3 done, 0 pending, 0 running, 0 failed, 0 missing of 3" in out
    assert "60.0 ‡" in lines["token_ct0.95"] and "‡ tokens/s of one timed pass" in out
    assert "tokens/s measured on a CPU are not results" in out  # the fake's env says cpu
    # without --local and no sbatch a plain command runs here, so --status shows the same runs
    assert (
        runs_cli.main([str(path), "--status", "--results", str(results), "--only", "baseline"]) == 0
    )
    assert "1 done, 0 pending, 0 running, 0 failed, 0 missing of 1" in capsys.readouterr().out


def test_cpu_smoke_results_do_not_count_on_the_cluster(tmp_path, fake_eval, slurm, capsys):
    path = write_sweep(tmp_path, 3, limit_cpu=2)
    results = tmp_path / "results"
    assert runs_cli.main([str(path), "--local", "--results", str(results)]) == 0
    assert (results / "fake/_limit2/baseline/DONE").exists()
    capsys.readouterr()
    assert (
        runs_cli.main([str(path), "--status", "--results", str(results)]) == 0
    )  # sbatch: full runs
    assert "0 done, 0 pending, 0 running, 0 failed, 3 missing of 3" in capsys.readouterr().out
    assert runs_cli.main([str(path), "--results", str(results)]) == 0
    assert flag(calls(slurm, "sbatch")[0], "--array") == "0-2%4"
    manifest = json.loads(Path(calls(slurm, "sbatch")[0][-1]).read_text())
    assert all(t["evaluate"]["limit"] is None for t in manifest["tasks"])


def test_tiny_model_sweep_killed_midway_then_rerun(tmp_path, monkeypatch, capsys):
    """End to end on the committed tiny model through v2/eval.py, CPU, --limit 4: baseline, token
    skip and layer reuse. The runner and its evaluation are killed together (SIGKILL to the
    process group, as when a terminal or a job goes away) during the second configuration; the
    same command again runs only the second and third, keeps the first, and ends with the
    table and the plots."""
    monkeypatch.delenv(runs_harness.EVAL_CMD_ENV, raising=False)
    monkeypatch.setenv(runs_slurm.NUM_GPUS_ENV, "0")
    grid = [
        {"policy": "none"},
        {"policy": "token", "cosine_threshold": 0.95},
        {"policy": "reuse", "reuse_k": 2, "layer_subset": "middle"},
    ]
    path = write_sweep(tmp_path, grid=grid, model_args={"max_new_tokens": 16})
    results = tmp_path / "results"
    argv = [str(path), "--local", "--limit", "4", "--results", str(results)]
    sweep = runs_sweep.load_sweep(path, results)
    ids = [c.id for c in sweep.configs]
    assert ids == ["baseline", "token_ct0.95", "reuse_k2_middle"]

    runner = subprocess.Popen(
        [sys.executable, "-m", "v2.experiments", *argv],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    second = sweep.run_dir("token_ct0.95", 4)
    deadline = time.time() + 300
    while "child_pid" not in (runs_state.read_marker(second, runs_state.RUNNING) or {}):
        assert runner.poll() is None and time.time() < deadline, "never reached the 2nd config"
        time.sleep(0.1)
    evaluation = runs_state.read_marker(second, runs_state.RUNNING)["child_pid"]
    os.killpg(runner.pid, signal.SIGKILL)
    assert runner.wait() == -signal.SIGKILL
    while runs_state.pid_alive(evaluation):
        assert time.time() < deadline
        time.sleep(0.1)
    assert state_map(sweep, 4) == dict(zip(ids, ["done", "missing", "missing"], strict=True))
    first = (sweep.run_dir("baseline", 4) / runs_state.DONE).read_text()

    capsys.readouterr()
    assert runs_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert set(state_map(sweep, 4).values()) == {"done"}
    assert (sweep.run_dir("baseline", 4) / runs_state.DONE).read_text() == first  # kept as it was
    starts = {
        c: sum(
            len(re.findall(r"^=== ", log.read_text(), re.M))
            for log in sweep.run_dir(c, 4).glob("local-*.log")
        )
        for c in ids
    }
    assert starts == {"baseline": 1, "token_ct0.95": 2, "reuse_k2_middle": 1}
    assert set(state_map(sweep).values()) == {"missing"}  # --limit results are no full results

    # the run ends with the table and the plots of the smoke test
    assert "| **baseline** | 4 (limit 4) |" in out and "Smoke test" in out
    plots = [Path(line.split("plot: ", 1)[1]) for line in out.splitlines() if "plot: " in line]
    assert [p.name for p in plots] == ["pareto_flops_tiny_gsm.png", "pareto_speed_tiny_gsm.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    assert out.rstrip().splitlines()[-1] == f"plot: {plots[-1]}"
    rows = report.collect(results / "fake/_limit4")
    assert [r.config_id for r in rows] == ids
    assert all(r.n == 4 and r.smoke and r.value is not None for r in rows)
    assert rows[0].flops_ratio == 1.0 and rows[0].end_to_end_ratio == 1.0
    assert rows[2].flops_ratio < 1.0  # reuse skips work on every other denoise step

    # --status reads the summary files the adapter wrote
    assert runs_cli.main([*argv, "--status"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("reuse_k2_middle "))
    assert "done" in line and report.accuracy_text(rows[2]) in line
    assert f"{rows[2].tokens_per_second:.1f}" in line


def test_every_policy_option_has_a_short_id():
    """Config ids are derived from the registry: an option added without a short name there would
    fail here, not in someone's sweep."""
    from v2.policies import POLICIES, options_of
    from v2.runs.spec import config_id

    for name in POLICIES:
        for d in options_of(name):
            assert d.name == "layer_subset" or d.id, d.name
            value = "middle" if d.name == "layer_subset" else 2
            assert config_id(name, {d.name: value}, 0.9, False).startswith(name + "_")


@pytest.mark.parametrize("limit", ["0", "-3", "x"])
def test_a_limit_below_one_is_refused(limit, capsys):
    """--limit 0 read as "no limit" (the whole split) and -3 made a _limit-3 folder."""
    with pytest.raises(SystemExit) as e:
        runs_cli.main(["configs/sweeps/tiny_default.yaml", "--limit", limit, "--dry-run"])
    assert e.value.code == 2 and "must be an integer >= 1" in capsys.readouterr().err


def test_status_and_dry_run_do_not_say_running_here(tmp_path, monkeypatch, capsys):
    """sbatch on PATH and no cluster: a run goes here and says so; --status and --dry-run run
    nothing and said "running here" all the same (issue 25)."""
    (tmp_path / "bin").mkdir()
    for name, rc in (("sbatch", 0), ("sinfo", 1)):
        (tmp_path / "bin" / name).write_text(f"#!/bin/sh\nexit {rc}\n")
        (tmp_path / "bin" / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_CONF", raising=False)
    monkeypatch.setattr(runs_slurm, "SLURM_CONF_PATHS", (str(tmp_path / "slurm.conf"),))
    monkeypatch.setenv(runs_slurm.NUM_GPUS_ENV, "0")
    path = write_sweep(tmp_path, 2)
    results = tmp_path / "results"
    for flags in (["--status"], ["--dry-run"]):
        assert runs_cli.main([str(path), "--results", str(results), *flags]) == 0
        out, err = capsys.readouterr()
        assert "running here" not in out + err and "not to SLURM" in err, err
    assert "2 of 2 would run here" in out
    assert runs_cli.list_sweeps(results, local=False, folder=path.parent) == 0
    assert "running here" not in "".join(capsys.readouterr())
    assert not results.exists()


def test_a_malformed_sweep_is_one_line_with_its_position(tmp_path, capsys):
    """PyYAML's error was 8 lines naming "<unicode string>"."""
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\ngrid:\n  - policy: none\n    threshold: [0.9\n")
    assert runs_cli.main([str(path), "--dry-run", "--local"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "<unicode string>" not in err, err
    assert err.startswith(f"error: {path}: not valid YAML: line 5, column 1"), err
