"""The tiny-model policy sweep: accuracy first, then interleaved timing rounds (CPU, a few
problems)."""

import json

from v2.tiny import policy_sweep


def test_sweep_times_configs_in_interleaved_rounds(tmp_path):
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
