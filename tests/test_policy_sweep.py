"""The tiny-model policy sweep: accuracy first, then interleaved timing rounds (CPU, a few
problems)."""

import json

from v2.tiny import policy_sweep


def test_sweep_times_configs_in_interleaved_rounds(tmp_path, monkeypatch, capsys):
    calls = []
    real_run = policy_sweep.run

    def spy(lm, texts, gold, policy_name, options, batch, threshold):
        calls.append((policy_name, tuple(options.items()), batch, len(texts)))
        return real_run(lm, texts, gold, policy_name, options, batch, threshold)

    monkeypatch.setattr(policy_sweep, "run", spy)
    out = tmp_path / "s.json"
    argv = [
        "--out",
        str(out),
        "--n",
        "3",
        "--n-speed32",
        "2",
        "--n-speed1",
        "1",
        "--only",
        "baseline",
        "reuse_k1",
        "--speed-rounds",
        "2",
    ]
    assert policy_sweep.main(argv) == 0
    d = json.loads(out.read_text())
    assert d["planned"] == ["baseline", "reuse_k1"] and d["settings"]["speed_rounds_done"] == 2
    base, k1 = d["configs"]["baseline"], d["configs"]["reuse_k1"]
    assert base["accuracy"]["flexible"]["n"] == 3
    # reuse_k1 is the baseline exactly: same tokens, same executed FLOPs
    assert base["accuracy"]["stats"]["executed_flops"] == k1["accuracy"]["stats"]["executed_flops"]
    for c in (base, k1):
        rounds = c["tokens_per_second_b32_rounds"]
        assert len(rounds) == 2 and len(c["tokens_per_second_b1_rounds"]) == 2
        assert min(rounds) <= c["tokens_per_second_b32"] <= max(rounds)
    # the warm-up ran every timed config's timed work once before the first timed round
    timed_work = [("none", (), 32, 2), ("none", (), 1, 1)]
    timed_work += [
        ("reuse", (("reuse_k", 1), ("layer_subset", "middle")), b, n) for b, n in ((32, 2), (1, 1))
    ]
    accuracy_pass = 2
    warmup = calls[accuracy_pass : accuracy_pass + 4]
    assert sorted(warmup) == sorted(timed_work)
    assert len(calls) == accuracy_pass + 4 * (1 + 2)  # warm-up + 2 timed rounds
    for c in (base, k1):
        for key in ("b32", "b1"):
            sp = c[f"tokens_per_second_{key}_spread"]
            rounds = c[f"tokens_per_second_{key}_rounds"]
            assert sp == {
                "min": min(rounds),
                "median": c[f"tokens_per_second_{key}"],
                "max": max(rounds),
                "rounds": 2,
            }
    out = capsys.readouterr().out
    assert "median [min - max] over rounds" in out and "CPU timings are not results" in out
