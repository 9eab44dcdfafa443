"""`runner: direct` (v2/direct.py): the engine called directly by the sweep runner writes the
same record (v2/record.py) into the same results/<sweep>/<config>/ layout as the lm_eval runner,
with every configuration timed in interleaved rounds after a warm-up (CPU, a few problems)."""

import json
import statistics

import pytest

from v2 import record, report
from v2.runs import cli as runs_cli
from v2.runs import direct as runs_direct
from v2.runs import slurm as runs_slurm
from v2.runs import spec as runs_spec
from v2.runs import state as runs_state
from v2.runs import sweep as runs_sweep

SWEEP = """
name: direct_try
pretrained: v2/tiny/checkpoint
tasks: [tiny_gsm]
threshold: 0.9
runner: direct
direct: {batch_size: 3, speed: {2: 2, 1: 1}, speed_rounds: 2, max_new_tokens: 64}
grid:
  - policy: none
  - policy: reuse
    reuse_k: 1
    layer_subset: middle
"""


def test_direct_runner_writes_the_record_and_times_in_rounds(tmp_path, monkeypatch, capsys):
    calls, bars = [], []
    real = runs_direct.decode

    def spy(lm, cfg, texts, refs, batch, desc=None, engine=None):
        calls.append((cfg.id, batch, len(texts)))
        bars.append(desc)
        return real(lm, cfg, texts, refs, batch, desc, engine)

    monkeypatch.setattr(runs_direct, "decode", spy)
    path = tmp_path / "direct_try.yaml"
    path.write_text(SWEEP)
    results = tmp_path / "results"
    argv = [str(path), "--local", "--results", str(results), "--limit", "3"]
    assert runs_cli.main(argv) == 0
    root = results / "direct_try" / "_limit3"
    recs = {}
    for cid in ("baseline", "reuse_k1_middle"):
        (summary,) = (root / cid).glob("*/summary.json")
        d = json.loads(summary.read_text())
        # the checker of the runner and the report read the one schema
        cfg = runs_sweep.load_sweep(path, results).config(cid)
        assert runs_state.check_summary(summary, runs_state.expected(cfg, 3)) == []
        assert (root / cid / "DONE").exists()
        recs[cid] = rec = record.read(summary)
        assert rec.runner == "direct" and rec.limit == 3 and rec.smoke_test
        assert rec.config["threshold"] == 0.9 and rec.config["max_new_tokens"] == 64
        assert rec.tasks["tiny_gsm"].n == 3 and set(rec.tasks["tiny_gsm"].metrics) == {
            runs_direct.STRICT,
            runs_direct.FLEXIBLE,
        }
        assert {b: len(v["tokens_per_second_rounds"]) for b, v in rec.timing.batches.items()} == {
            "2": 2,
            "1": 2,
        }
        assert d["timing"]["session"] == rec.timing.session
    base, k1 = recs["baseline"], recs["reuse_k1_middle"]
    assert base.timing.session == k1.timing.session  # timed together
    assert base.stats["executed_flops"] == k1.stats["executed_flops"]  # reuse_k 1 is the baseline
    # accuracy pass, then the warm-up of every timed work, then 2 rounds, reversed in round 2
    timed = [(c, b, n) for c in ("baseline", "reuse_k1_middle") for b, n in ((2, 2), (1, 1))]
    assert calls[:2] == [("baseline", 3, 3), ("reuse_k1_middle", 3, 3)]
    assert calls[2:6] == timed and calls[6:10] == timed
    assert calls[10:] == timed[2:] + timed[:2]
    # the accuracy pass shows a progress bar per configuration; the short timed passes do not
    assert bars[:2] == ["[1/2] baseline", "[2/2] reuse_k1_middle"] and set(bars[2:]) == {None}
    assert "[2/2] reuse_k1_middle: 100%" in capsys.readouterr().err
    # the report compares tokens/s with the baseline of the same timing session only
    rows = {r.config_id: r for r in report.collect(root)}
    assert rows["reuse_k1_middle"].session_baseline is rows["baseline"]
    assert rows["baseline"].timed_ratio("2") == 1.0
    k1_median = statistics.median(k1.timing.batches["2"]["tokens_per_second_rounds"])
    b_median = statistics.median(base.timing.batches["2"]["tokens_per_second_rounds"])
    assert rows["reuse_k1_middle"].timed_ratio("2") == pytest.approx(k1_median / b_median)
    md = (root / "_report" / "results.md").read_text()
    assert "| reuse_k1_middle | 1 |" in md and "batch 2: tokens/s" in md
    # a rerun finds both done
    capsys.readouterr()
    assert runs_cli.main(argv) == 0
    assert "nothing to run" in capsys.readouterr().out


def test_direct_warm_up_repeats_until_no_engine_sets_anything_up(tmp_path, monkeypatch):
    """The warm-up rule (v2.bench.timing.settle) before the interleaved rounds: whole passes of
    every configuration's timed work until one sets nothing up in any configuration's own
    engine. On the CPU an engine records nothing, so the engines here take the GPU's static
    layouts (forward records): the first pass records, the second sets nothing up, and no timed
    round does. Also the n = 1 accuracy: no standard error (null), as lm_eval's "N/A"."""
    from v2.engine import Engine
    from v2.generate import FastDLLM, GenerationConfig

    def static_engine(self, config=None, policy=None):
        cfg = config or GenerationConfig()
        B = cfg.block_size or self.model.cfg.block_size
        return Engine(self.model, policy, B, cfg.use_block_cache, static_shapes=True)

    monkeypatch.setattr(FastDLLM, "engine", static_engine)
    calls, real = [], runs_direct.decode

    def spy(lm, cfg, texts, refs, batch, desc=None, engine=None):
        before = engine.setups if engine is not None else None
        out = real(lm, cfg, texts, refs, batch, desc, engine)
        calls.append((cfg.id, engine, before, engine.setups if engine is not None else None))
        return out

    monkeypatch.setattr(runs_direct, "decode", spy)
    path = tmp_path / "direct_try.yaml"
    path.write_text(SWEEP)
    results = tmp_path / "results"
    assert runs_cli.main([str(path), "--local", "--results", str(results), "--limit", "1"]) == 0
    accuracy_pass, timed = calls[:2], calls[2:]
    assert all(engine is None for _, engine, _, _ in accuracy_pass)  # the model's own engine
    engines = {cid: engine for cid, engine, _, _ in timed}
    assert len(timed) == 4 * 4 and len(set(map(id, engines.values()))) == 2  # one per config
    assert all(engine is engines[cid] for cid, engine, _, _ in timed)
    first, second, rounds = timed[:4], timed[4:8], timed[8:]
    assert any(after > before for _, _, before, after in first)  # recorded its forwards
    assert all(after == before for _, _, before, after in second + rounds)  # then nothing more
    for cid in ("baseline", "reuse_k1_middle"):
        (summary,) = (results / "direct_try" / "_limit1" / cid).glob("*/summary.json")
        rec = record.read(summary)
        assert rec.timing.warmup.startswith("2 untimed passes") and "setting nothing up" in (
            rec.timing.warmup
        )
        assert {m["stderr"] for m in rec.tasks["tiny_gsm"].metrics.values()} == {None}
        assert (
            json.loads(summary.read_text())["tasks"]["tiny_gsm"]["metrics"][runs_direct.STRICT][
                "stderr"
            ]
            is None
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("tasks: [gsm8k]", "runner direct scores one task of tiny_gsm"),
        ("direct: {speed: {32: 0}}", "direct.speed is {batch: problems}"),
        ("direct: {rounds: 3}", "direct takes batch_size"),
        ("runner: vllm", "runner must be lm_eval or direct"),
        ("model_args: {release_recipe: true}", "not release_recipe"),
    ],
)
def test_bad_direct_sweeps_are_rejected_before_anything_runs(tmp_path, capsys, change, message):
    key = change.split(":")[0]
    lines = [x for x in SWEEP.splitlines() if not x.startswith(key + ":")]
    path = tmp_path / "bad.yaml"
    path.write_text("\n".join([*lines, change]) + "\n")
    assert runs_cli.main([str(path), "--local", "--results", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_lm_eval_sweep_with_direct_settings_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(SWEEP.replace("runner: direct", "runner: lm_eval"))
    with pytest.raises(runs_spec.SweepError, match="`direct` settings need `runner: direct`"):
        runs_sweep.load_sweep(path)


def test_a_failing_direct_run_marks_every_configuration_failed(tmp_path, capsys):
    path = tmp_path / "fails.yaml"
    path.write_text(SWEEP + "model_args: {small_block_size: 5}\n")  # 5 does not divide 32
    results = tmp_path / "results"
    argv = [str(path), "--local", "--results", str(results), "--limit", "2"]
    assert runs_cli.main(argv) == 1
    out = capsys.readouterr().out
    assert "failed: baseline, reuse_k1_middle" in out
    for cid in ("baseline", "reuse_k1_middle"):
        failed = json.loads((results / "direct_try" / "_limit2" / cid / "FAILED").read_text())
        assert "small_block_size 5" in failed["reason"]


def test_direct_sweep_is_not_submitted_to_slurm(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runs_slurm, "slurm_available", lambda: True)
    path = tmp_path / "direct_try.yaml"
    path.write_text(SWEEP)
    assert runs_cli.main([str(path), "--results", str(tmp_path / "r")]) == 2
    assert "run it with --local" in capsys.readouterr().err


def test_the_hard_split_is_a_direct_task():
    """The deeper tiny model's split (issue 16) can be swept by the direct runner."""
    import json

    from v2.runs.direct import TASKS, problems

    texts, references = problems("tiny_gsm_hard", 3)
    rows = [json.loads(line) for line in TASKS["tiny_gsm_hard"].read_text().splitlines()[:3]]
    assert texts == [f"Question: {r['question']}\nAnswer:" for r in rows]
    assert references == [r["answer"] for r in rows]  # read by the task's scorer
