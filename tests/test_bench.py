"""v2.bench: the CLI writes its reports on CPU; the forced policies skip exactly what they say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layer_skip_generation_functions import LayerReusePolicy
from v2.bench.cli import slug
from v2.bench.forced import ForcedLayerPass, ForcedTokenReuse, middle_layers, spread_layers
from v2.bench.models import SHAPES, build_random
from v2.bench.report import TARGET_GOALS, targets
from v2.bench.timing import Clock, CompileSetups, ForwardTimer, settle
from v2.engine import Engine
from v2.model import ModelConfig, Network, block_causal_mask

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def small(layers: int, **overrides) -> Network:
    cfg = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return build_random(ModelConfig(**{**cfg, **overrides}), CPU, torch.float32)


def run_block(engine: Engine, batch: int, prefix: int, steps: int) -> list[list[int]]:
    """Prefill, then `steps` full-window denoise forwards; executed units per layer per step."""
    B = engine.B
    engine.allocate(batch, prefix + B)
    g = torch.Generator().manual_seed(0)
    engine.prefill(torch.randint(0, 60, (batch, prefix), generator=g))
    engine.begin_block()
    block = torch.randint(0, 60, (batch, B), generator=g)
    out = torch.arange(7, 15)
    per_step = []
    for _ in range(steps):
        before = list(engine.stats.executed_units_per_layer)
        engine.denoise(block, 0, out)
        block = block.clone()
        block[:, (len(per_step) * 5) % B] = 59  # the inputs change between steps, a little
        after = engine.stats.executed_units_per_layer
        per_step.append([a - b for a, b in zip(after, before, strict=True)])
    return per_step


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "v2.bench", "--models", "test", "--quick", "--device", "cpu"]
    # One thread: CPU timing is a smoke test, and threads contend on a shared machine.
    cmd += ["--out", str(out), "--name", "t", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[bench" in proc.stdout  # progress lines
    return out, json.loads((out / "t.json").read_text())


def test_cli_writes_json_markdown_and_plot(report):
    out, data = report
    assert data["complete"] and data["errors"] == [] and data["skipped"] == []
    assert data["torch"] == torch.__version__ and data["device"] == "cpu"
    assert "--models test" in data["command"]
    assert data["bandwidth"]["bytes_per_s"] > 0 and data["matmul"]["flops_per_s"] > 0
    assert data["models"]["test"]["parameters"] > 0
    md = (out / "t.md").read_text()
    for heading in (
        "## Targets",
        "## Forward latency",
        "## Forced skipping",
        "## End to end",
        "## Autoregressive baseline",
    ):
        assert heading in md
    assert (out / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_rows_have_the_measurements(report):
    _, data = report
    kinds = {(r["kind"], r["batch"]) for r in data["forwards"]}
    assert kinds == {
        (k, b) for k in ("prefill", "denoise32", "denoise8", "commit") for b in (1, 32)
    }
    for r in data["forwards"]:
        for key in ("median_ms", "bw_bound_ms", "compute_bound_ms", "bound_fraction", "flops"):
            assert r[key] > 0, (key, r)
        assert r["prefix"] == 512 and r["tokens"] == r["batch"] * r["window"]
    d32 = next(r for r in data["forwards"] if r["kind"] == "denoise32" and r["batch"] == 1)
    assert d32["window"] == 32 and d32["kv_bytes"] > 0
    # the quick grid's forced schedules: 1 and 3 slots per forward, sub-block cache off and on
    runs = {(r["commit_per_forward"], r["block_cache"]): r for r in data["e2e"]}
    assert set(runs) == {(1, False), (3, False), (1, True), (3, True)}
    for e2e in runs.values():
        assert e2e["generated_tokens"] == e2e["new_tokens"] == 64
        assert e2e["tokens_per_s"] > 0 and e2e["forwards_per_s"] > 0
        assert 0 < e2e["forward_sum_s"] <= e2e["wall_s"] and e2e["loop_overhead"] >= 0
    for cache in (False, True):
        # k = 1: one denoise forward per slot (but the slots a commit or the prefill proposes);
        # k = 3: sub-blocks of 8 take 3 forwards (3 + 3 + 2) instead of 8
        one, three = (sum(runs[k, cache]["forwards"].values()) for k in (1, 3))
        assert one >= 60 and three < one / 2
        assert runs[3, cache]["tokens_per_forward"] > 2 > 1 >= runs[1, cache]["tokens_per_forward"]
    labels = {"none", "disabled", "token_reuse_0", "token_reuse_25", "token_reuse_50"}
    labels |= {"token_reuse_75", "layer_pass_0", "layer_pass_4", "layer_pass_8", "reuse_k2_12"}
    for b in (1, 32):
        rows = {r["policy"]: r for r in data["skip"] if r["batch"] == b}
        assert set(rows) == labels
        assert rows["none"]["wall_ratio"] == 1.0
        # 4 layers: layer 0 always computes, layers 1-3 reuse half.
        assert rows["token_reuse_50"]["units_ratio_per_layer"] == [1.0, 0.5, 0.5, 0.5]
        assert rows["token_reuse_50"]["flops_ratio"] < 0.7
        assert rows["reuse_k2_12"]["cycle_wall_ratio"] > 0
        # quick grid: 2 timed rounds x 2 steps; scheduled reuse keeps its reusing (odd) steps
        assert {r["policy"]: r["samples"] for r in rows.values()} == {
            label: 2 if label.startswith("reuse") else 4 for label in labels
        }
        assert all(r["min_ms"] <= r["median_ms"] <= r["max_ms"] for r in rows.values())
    (ar,) = data["ar"]
    assert ar["tokens_per_s"] > 0 and ar["generated_tokens"] == 64 and ar["dllm_over_ar"] > 0
    assert [t["name"] for t in data["targets"]] == list(TARGET_GOALS)
    for t in data["targets"]:
        assert set(t) >= {"name", "value", "goal", "met"}
        if t["name"] in ("e2e_b32_tokens_per_s", "e2e_b32_block_cache_over_compiled_ar"):
            # the quick grid runs end to end at batch 1
            assert t["value"] is None and t["met"] is None
            continue
        assert t["value"] is not None and isinstance(t["met"], bool) and not t["official"]


def test_forced_token_reuse_removes_its_rate_of_the_units_after_the_first_forward():
    L, b = 5, 3
    steps = run_block(Engine(small(L), ForcedTokenReuse(0.5)), b, 64, 3)
    assert steps[0] == [b * 32] * L  # nothing to reuse yet
    for s in steps[1:]:
        assert s[0] == b * 32 and s[1:] == [b * 16] * (L - 1)
    for rate, expected in ((0.0, 32), (0.25, 24), (0.75, 8)):
        s = run_block(Engine(small(L), ForcedTokenReuse(rate)), b, 32, 2)[1]
        assert s == [b * 32] + [b * expected] * (L - 1), rate


def test_forced_layer_pass_passes_exactly_the_requested_layers():
    L, b = 28, 2
    model = small(L)
    for n in (4, 8):
        layers = spread_layers(n, L)
        assert len(set(layers)) == n and 0 not in layers and L - 1 not in layers
        policy = ForcedLayerPass(n)
        (s,) = run_block(Engine(model, policy), b, 32, 1)
        assert policy.passed == layers
        assert [i for i in range(L) if s[i] == 0] == layers
        assert all(s[i] == b * 32 for i in range(L) if i not in layers)
    assert spread_layers(8, 28) == [2, 5, 9, 12, 15, 18, 22, 25]


def test_scheduled_reuse_of_middle_layers_skips_them_on_odd_steps():
    L, b = 28, 2
    layers = middle_layers(12, L)
    steps = run_block(Engine(small(L), LayerReusePolicy(2, layers)), b, 32, 4)
    assert layers == list(range(8, 20))
    for step, s in enumerate(steps):
        skipped = [i for i in range(L) if s[i] == 0]
        assert skipped == (layers if step % 2 else []), step


def test_hf_baseline_holds_our_weights():
    """The AR baseline is the same network: transformers' Qwen2 built on views of our weights
    gives our causal forward's logits."""
    from v2.bench.hf import hf_generate, hf_model

    for tie in (False, True):
        model = small(3, tie_word_embeddings=tie)
        hf = hf_model(model)
        ids = torch.randint(0, 60, (2, 20), generator=torch.Generator().manual_seed(1))
        pos = torch.arange(20)
        causal = block_causal_mask(pos, pos, 1)  # blocks of one token: plain causal attention
        with torch.no_grad():
            ref = model(ids, pos, causal)
            got = hf(ids).logits
        assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
        out = hf_generate(hf, ids[:, :5], 6)
        assert out.shape == (2, 11)
        for p in range(5, 11):  # greedy: each new token is the argmax of the causal forward
            with torch.no_grad():
                step = model(
                    out[:, :p], torch.arange(p), block_causal_mask(*[torch.arange(p)] * 2, 1)
                )
            assert torch.equal(out[:, p], step[:, -1].argmax(-1))


def test_forward_timer_marks_every_forward():
    model = small(2)
    engine = Engine(model)
    engine.timer = timer = ForwardTimer(Clock(CPU))
    run_block(engine, 1, 32, 2)
    engine.logits(torch.zeros(1, 32))
    assert [k for k, _, _ in timer.spans] == ["prefill", "denoise", "denoise", "logits"]
    assert timer.total_ms() > 0


class _Setups:
    """An engine stand-in whose calls make a new setup (record, warm-up, capture) `n` times."""

    def __init__(self, n: int):
        self.n, self.setups, self.calls = n, 0, 0

    def __call__(self) -> None:
        self.calls += 1
        self.setups += self.calls <= self.n


@pytest.mark.parametrize(("setups", "at_least", "calls"), [(0, 2, 2), (3, 2, 4), (1, 3, 3)])
def test_warm_up_runs_until_a_call_sets_nothing_up(setups, at_least, calls):
    fake = _Setups(setups)
    assert Clock(CPU).warm_up(fake, [fake], at_least) == calls == fake.calls
    capped = _Setups(100)
    assert Clock(CPU).warm_up(capped, [capped], 1, at_most=5) == 5


def test_settle_keeps_the_call_that_set_nothing_up():
    """The warm-up rule's one function: the last call's result, and whether it was quiet."""
    fake = _Setups(2)
    done = settle(lambda: (fake(), fake.calls)[1], [fake, None])  # None: a decode without engine
    assert (done.calls, done.settled, done.result) == (3, True, 3)
    capped = _Setups(100)
    done = settle(lambda: (capped(), capped.calls)[1], [capped], at_most=4)
    assert (done.calls, done.settled, done.result) == (4, False, 4)
    assert settle(lambda: "x", [], at_least=3).calls == 3  # nothing watched: `at_least` calls
    repeated = _Setups(2)
    assert len(Clock(CPU).repeat(repeated, 1, 2, [repeated])) == 2 and repeated.calls == 3 + 2


def test_warm_up_repeats_generate_until_the_engine_sets_nothing_up():
    """A real engine on the CPU with the GPU's static layouts (forward records): the first
    generation records its forwards (Engine.setups grows), the second replays them; the rule
    stops there, and a timed call sets nothing up."""
    from tests.conftest import IDS, prompt, random_network
    from v2.generate import GenerationConfig, generate

    model = random_network()
    config = GenerationConfig(max_new_tokens=40, threshold=0.9, block_size=8, small_block_size=4)
    engine = Engine(model, None, 8, static_shapes=True)
    prompts = [prompt(5), prompt(11, 3)]
    setups = []

    def run():
        generate(model, prompts, IDS, config, engine=engine)
        setups.append(engine.setups)

    assert Clock(CPU).warm_up(run, [engine]) == 2
    assert setups[0] > 0 and setups[1] == setups[0]
    run()
    assert setups[-1] == setups[0]


def test_engine_setups_only_grow_when_a_bigger_batch_clears_the_records():
    """A cache grown for a bigger batch drops the forward records made for the smaller one and
    records anew: what the warm-up rule watches must grow, never fall back to an earlier value
    (a pass that cleared and re-recorded as many would look quiet)."""
    from tests.conftest import IDS, prompt, random_network
    from v2.generate import GenerationConfig, generate

    model = random_network()
    config = GenerationConfig(max_new_tokens=40, threshold=0.9, block_size=8, small_block_size=4)
    engine = Engine(model, None, 8, static_shapes=True)
    generate(model, [prompt(5)], IDS, config, engine=engine)
    small = engine.setups
    engine.allocate(9, 1024)  # more rows and positions: records and graphs are dropped
    assert small > 0 and engine.setups == small
    generate(model, [prompt(5), prompt(11, 3), prompt(7, 2)] * 3, IDS, config, engine=engine)
    assert engine.setups > small


def test_compile_setups_count_torch_compile_work():
    """Work without an Engine (the autoregressive baseline under torch.compile) is warmed up by
    the same rule, watching torch.compile's compilations."""
    compiled = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
    watched = CompileSetups()
    before = watched.setups
    assert Clock(CPU).warm_up(lambda: compiled(torch.ones(3)), [watched]) == 2
    assert watched.setups > before
    assert Clock(CPU).warm_up(lambda: compiled(torch.ones(5)), [watched]) == 2  # a recompile
    assert Clock(CPU).warm_up(lambda: compiled(torch.ones(5)), [watched]) == 1


def test_release_shapes():
    counts = {}
    for name in ("7b", "1.5b"):
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in Network(SHAPES[name]).parameters())
    assert counts == {"7b": 7_615_616_512, "1.5b": 1_543_714_304}
    assert SHAPES["1.5b"].tie_word_embeddings and not SHAPES["7b"].tie_word_embeddings


def test_slug_and_targets_without_data():
    assert slug("NVIDIA H100 80GB HBM3") == "h100"
    assert slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert slug("NVIDIA H200") == "h200"
    assert slug("cpu") == "cpu"
    empty = {"models": {"7b": {}}, "forwards": [], "skip": [], "e2e": [], "ar": []}
    empty.update(gpu=None, grid="full")
    assert all(t["value"] is None and t["met"] is None for t in targets(empty))
    assert [t["model"] for t in targets(empty)] == ["7b"] * len(TARGET_GOALS)


def test_readme_speed_table_is_rewritten_from_the_json(tmp_path):
    from v2.bench.report import README_BEGIN, README_END, update_readme

    data = {
        "command": "python -m v2.bench",
        "gpu": "GPU X",
        "device": "cuda",
        "dtype": "bfloat16",
        "targets": [
            {
                "name": "e2e_b32_tokens_per_s",
                "value": 1087.1,
                "goal": ">= 1300.0",
                "met": False,
                "model": "7b",
            },
            {
                "name": "layer_pass8_b1_wall_ratio",
                "value": 0.709,
                "goal": "<= 0.75",
                "met": True,
                "model": "7b",
            },
            {"name": "layer_pass8_b1_wall_ratio", "value": 9, "goal": "", "met": 1, "model": "x"},
        ],
        "e2e": [
            {"model": "7b", "batch": 1, "tokens_per_s": 87.1},
            {"model": "1.5b", "batch": 1, "tokens_per_s": 999.0},
        ],
        "ar": [{"model": "7b", "batch": 1, "tokens_per_s": 66.6}],
    }
    (tmp_path / "docs").mkdir()
    src = tmp_path / "docs" / "b.json"
    src.write_text(json.dumps(data))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold table\n{README_END}\nafter\n")
    update_readme(src, readme)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("after\n")
    assert "| e2e_b32_tokens_per_s | 1087.100 | >= 1300.0 | no |" in text
    assert "| layer_pass8_b1_wall_ratio | 0.709 | <= 0.75 | yes |" in text
    assert "| this engine, threshold 1 | 87 |" in text and "999" not in text
    assert "| transformers AR, static cache + torch.compile | 67 |" in text
    assert "9.000" not in text  # the first model's targets only
    assert "(docs/b.json)" in text


def test_verify_section_rows(report):
    """Speculative decoding's verify forward timed beside the denoise forward (issue 18)."""
    _, data = report
    kinds = {(r["kind"], r["batch"]) for r in data["verify"]}
    kinds_timed = ("verify9", "verify9_eager", "denoise32", "denoise32_eager")
    assert kinds == {(k, b) for k in kinds_timed for b in (1, 32)}
    for r in data["verify"]:
        assert r["median_ms"] > 0 and r["flops"] > 0 and r["vs_denoise32"] > 0
    v = next(r for r in data["verify"] if r["kind"] == "verify9" and r["batch"] == 1)
    d = next(r for r in data["verify"] if r["kind"] == "denoise32" and r["batch"] == 1)
    assert v["flops"] < d["flops"]  # 9 positions against 32
    eager = next(r for r in data["verify"] if r["kind"] == "verify9_eager" and r["batch"] == 1)
    assert eager["flops"] == v["flops"]  # the same forward, run two ways


def test_no_forward_graphs_reaches_every_engine_the_sections_build(tmp_path, monkeypatch, report):
    from v2.bench import cli

    assert report[1]["engine_options"] == {"forward_graphs": True}
    built = []

    def engine(*args, **kwargs):
        built.append(kwargs.get("forward_graphs"))
        return Engine(*args, **kwargs)

    monkeypatch.setattr(cli, "Engine", engine)
    argv = ["--models", "test", "--quick", "--device", "cpu", "--sections", "forwards,skip,e2e"]
    argv += ["--out", str(tmp_path), "--name", "n", "--threads", "1", "--no-forward-graphs"]
    assert cli.main(argv) == 0
    data = json.loads((tmp_path / "n.json").read_text())
    assert (
        data["engine_options"] == {"forward_graphs": False}
        and "--no-forward-graphs" in data["command"]
    )
    assert len(built) >= 3 and set(built) == {False}
    assert data["skip"] and data["e2e"] and data["forwards"]


def test_profile_rows_list_their_top_kernels(report):
    """A profiled configuration's kernels taking the most time are listed by name in the report
    (the GPU writes them; a row from before they were kept lists none)."""
    from v2.bench.report import markdown

    _, data = report
    row = {
        "model": "7b",
        "batch": 1,
        "policy": "token_reuse_0",
        "wall_ms": 7.0,
        "kernel_ms": {"matmul": 5.0, "attention": 0.6, "other": 0.7},
        "kernels_per_forward": 600,
        "gpu_idle_share": 0.05,
        "host_syncs_per_forward": 0.0,
        "top_kernels": [
            {"name": "nvjet_tst_a|b", "calls": 112, "ms": 5.0},
            {"name": "triton_poi_fused_cos_7", "calls": 27, "ms": 0.1},
        ],
    }
    old = {k: v for k, v in row.items() if k != "top_kernels"} | {"policy": "none"}
    text = markdown({**data, "profile": [row, old]})
    assert "Top kernels, 7b batch 1 token_reuse_0 (per forward):" in text
    assert "| `nvjet_tst_a/b` | 112 | 5.000 |" in text
    assert "| `triton_poi_fused_cos_7` | 27 | 0.100 |" in text
    assert "Top kernels, 7b batch 1 none" not in text


def test_compare_flags_rows_slower_than_the_tolerance(tmp_path, capsys):
    """v2.bench.compare: rows matched by what they measured; times compare after / before,
    tokens/s before / after; slower than 2 % flagged; unmatched rows listed; records from
    different cards refused."""
    from v2.bench.compare import compare, main

    before = {
        "gpu": "H100",
        "forwards": [
            {"model": "7b", "kind": "denoise32", "batch": 1, "prefix": 512, "median_ms": 10.0},
            {"model": "7b", "kind": "commit", "batch": 1, "prefix": 512, "median_ms": 4.0},
        ],
        "e2e": [{"model": "7b", "batch": 1, "tokens_per_s": 100.0}],
        "skip": [{"model": "7b", "batch": 1, "prefix": 512, "policy": "none", "median_ms": 5}],
    }
    after = {
        "gpu": "H100",
        "forwards": [
            {
                "model": "7b",
                "kind": "denoise32",
                "batch": 1,
                "prefix": 512,
                "median_ms": 10.1,
                "attention": "flash",
            },
            {"model": "7b", "kind": "commit", "batch": 1, "prefix": 512, "median_ms": 4.4},
            {
                "model": "7b",
                "kind": "denoise32",
                "batch": 1,
                "prefix": 512,
                "median_ms": 7.0,
                "attention": "flex",
            },
        ],
        "e2e": [
            {
                "model": "7b",
                "batch": 1,
                "commit_per_forward": 1,
                "block_cache": False,
                "tokens_per_s": 90.0,
            }
        ],
    }
    r = compare(before, after)
    got = {k["key"]: round(k["slowdown"], 3) for k in r["rows"]}
    assert got == {
        ("forwards", "7b", "denoise32", 1, 512, "flash"): 1.01,
        ("forwards", "7b", "commit", 1, 512, "flash"): 1.1,
        ("e2e", "7b", 1, 1, False): 1.111,
    }
    assert {s["key"][2] for s in r["slower"] if s["key"][0] == "forwards"} == {"commit"}
    assert len(r["slower"]) == 2
    assert r["only_before"] == [("skip", "7b", 1, 512, "none")]
    assert r["only_after"] == [("forwards", "7b", "denoise32", 1, 512, "flex")]
    a, b = tmp_path / "before.json", tmp_path / "after.json"
    a.write_text(json.dumps(before))
    b.write_text(json.dumps(after))
    assert main([str(a), str(b), "--out", str(tmp_path / "c.md")]) == 0
    text = capsys.readouterr().out
    assert (
        "| forwards model 7b, kind commit, batch 1, prefix 512, attention flash | 4.000 | " in text
    )
    assert "SLOWER" in text and (tmp_path / "c.md").read_text() == text
    b.write_text(json.dumps({**after, "gpu": "H200"}))
    assert main([str(a), str(b)]) == 2
    assert "different devices" in capsys.readouterr().err


def test_forwards_are_timed_with_flex_attention_beside_the_default(report):
    """At batch 1 (up to 8) the window forwards are timed again with FlexAttention, rows labelled
    by backend, compared in the report; the targets read the default backend's rows."""
    out, data = report
    flex = {(r["kind"], r["batch"]) for r in data["forwards"] if r["attention"] == "flex"}
    assert flex == {("denoise32", 1), ("denoise8", 1), ("commit", 1)}
    default = {r["attention"] for r in data["forwards"] if r["attention"] != "flex"}
    assert default == {"packed"}  # the CPU's
    text = (out / "t.md").read_text()
    assert "| test | denoise32 | 1 | 512 | packed |" in text


def test_a_bench_continues_an_earlier_record_of_the_same_device(tmp_path):
    """--continue: the second run's sections join the first run's rows in one record, with one
    set of targets; a record of another grid is refused."""
    base = [sys.executable, "-m", "v2.bench", "--models", "test", "--device", "cpu"]
    base += ["--threads", "1", "--out", str(tmp_path), "--quick"]
    first = subprocess.run(
        [*base, "--name", "a", "--sections", "verify"], cwd=ROOT, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr[-2000:]
    a = tmp_path / "a.json"
    second = subprocess.run(
        [*base, "--name", "b", "--sections", "forwards", "--continue", str(a)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert second.returncode == 0, second.stderr[-2000:]
    data = json.loads((tmp_path / "b.json").read_text())
    earlier = json.loads(a.read_text())
    assert data["verify"] == earlier["verify"] and data["forwards"]
    assert data["continues"]["kept"] == ["verify"]
    assert "Continues `python -m v2.bench" in (tmp_path / "b.md").read_text()
    full = subprocess.run(
        [*base[:-1], "--name", "c", "--sections", "forwards", "--continue", str(a)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert full.returncode == 2 and "its grid is 'quick'" in full.stderr
