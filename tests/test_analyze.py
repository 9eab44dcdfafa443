"""v2.analyze: what the Recorder (an observer) sees equals a direct computation with the
full-sequence network, recording changes nothing, and the thresholds skip what they say."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import IDS, prompt, random_network

from early_exit_generation_functions import EarlyExitPolicy
from layer_skip_generation_functions import LayerSkipPolicy
from v2.analyze import Recorder, aggregate, holds_from, main, skip_scores, thresholds
from v2.engine import Engine
from v2.generate import GenerationConfig, generate

pytestmark = pytest.mark.usefixtures("one_thread")


def layer_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """x_0 .. x_L of a one-block sequence (no prefix: every position sees the whole block)."""
    seen = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
        for layer in model.layers
    ]
    hooks.append(model.norm.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone())))
    try:
        with torch.no_grad():
            model(ids, torch.arange(ids.shape[1]))
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_recorded_numbers_equal_a_direct_computation():
    model = random_network(seed=3)
    L = model.cfg.num_hidden_layers
    m = IDS.mask
    step0 = [prompt(8, r) + [m] * 24 for r in range(2)]
    step1 = [row[:] for row in step0]
    for r, row in enumerate(step1):
        row[8 + r : 14] = prompt(14 - 8 - r, 5)  # a few positions decoded, per row differently
    rec = Recorder(model, m)
    engine = Engine(model)
    engine.allocate(2, 64)
    engine.begin_block()
    for ids in (step0, step1):
        engine.denoise(torch.tensor(ids), 0, torch.arange(32), observer=rec)
    assert [r.step for r in rec.forwards] == [0, 1]

    direct = [layer_inputs(model, torch.tensor(ids)) for ids in (step0, step1)]
    for s, (r, xs, ids) in enumerate(zip(rec.forwards, direct, (step0, step1), strict=True)):
        for i in range(1, L):
            want = F.cosine_similarity(xs[i], xs[i - 1], dim=-1).mean(1)
            torch.testing.assert_close(r.layer_cos[i - 1], want, atol=1e-5, rtol=0)
        for i in range(L):
            if s == 0:
                assert r.token_cos[i].isnan().all()
            else:
                want = F.cosine_similarity(xs[i], direct[0][i], dim=-1).reshape(-1)
                torch.testing.assert_close(r.token_cos[i], want, atol=1e-5, rtol=0)
        t = torch.tensor(ids)
        targets = torch.zeros_like(t, dtype=torch.bool)
        targets[:, :-1] = t[:, 1:] == m
        assert torch.equal(r.targets, targets)
        for d in range(L + 1):
            prob, token = F.softmax(model.logits(xs[d][targets]), -1).max(-1)
            assert torch.equal(r.lens_token[d], token)
            torch.testing.assert_close(r.lens_prob[d], prob, atol=1e-5, rtol=0)
        final = r.lens_token[L]
        for j, h in enumerate(holds_from(r.lens_token).tolist()):
            d = L
            while d > 0 and r.lens_token[d - 1][j] == final[j]:
                d -= 1
            assert h == d

    out = aggregate(rec.forwards, L)
    cos = out["by_step_layer"]["token_cosine"]
    assert cos[0] == [None] * L
    for i in range(L):
        want = F.cosine_similarity(direct[1][i], direct[0][i], dim=-1).mean()
        assert cos[1][i] == pytest.approx(float(want), abs=1e-5)
    assert sum(out["holds_from_depth"]["histogram"]) == out["targets"] == 2 * 24 + 18 + 19


def test_thresholds_skip_at_least_the_fraction_and_no_higher_one_does():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.random(300), np.full(50, -np.inf), np.ones(20)])
    for f, v in thresholds(scores, (0.1, 0.25, 0.5, 0.9)).items():
        f = float(f)
        if f == 0.9:  # 50 of 370 units are never skipped: no threshold reaches 90 %
            assert v is None
            continue
        t = v["threshold"]
        assert v["skipped"] == (scores > t).mean() >= f
        higher = np.unique(scores[scores > t])
        assert (scores > higher[0]).mean() < f  # the next threshold up skips too little


def test_skip_scores_count_every_unit_of_every_forward():
    model = random_network(seed=4)
    rec = Recorder(model, IDS.mask)
    cfg = GenerationConfig(max_new_tokens=40, threshold=0.9)
    generate(model, [prompt(5), prompt(33, 2)], IDS, cfg, observer=rec)
    units = sum(int(r.scope.sum()) * model.cfg.num_hidden_layers for r in rec.forwards)
    for name, s in skip_scores(rec.forwards, model.cfg.num_hidden_layers).items():
        assert s.shape == (units,), name


@pytest.mark.parametrize("block_cache", [False, True])
def test_recording_changes_no_token(block_cache):
    model = random_network(seed=2, std=0.05)
    prompts = [prompt(n, n) for n in (5, 20, 40)]
    cfg = GenerationConfig(max_new_tokens=40, threshold=0.9, use_block_cache=block_cache)
    exit_ = EarlyExitPolicy(exit_threshold=0.05)  # flat predictions here: it still checks
    for inner in (None, LayerSkipPolicy(cosine_threshold=0.5), exit_):
        alone = generate(model, prompts, IDS, cfg, inner)
        rec = Recorder(model, IDS.mask)
        watched = generate(model, prompts, IDS, cfg, inner, observer=rec)
        assert [o.token_ids for o in watched.outputs] == [o.token_ids for o in alone.outputs]
        assert watched.stats.executed_flops == alone.stats.executed_flops
        assert rec.forwards and len(rec.forwards) == sum(
            alone.stats.forwards[k]
            for k in (
                "denoise_full",
                "denoise_sub",
            )
        )


def test_command_line(checkpoint, tmp_path, capsys):
    out = tmp_path / "a"
    argv = ["--model", str(checkpoint), "--prompt", "hello", "--prompt", "two plus two"]
    assert main([*argv, "--max-new-tokens", "40", "--out", str(out)]) == 0
    record = json.loads((out / "analysis.json").read_text())
    assert record["prompts"] == 2 and record["forwards"] > 0
    assert set(record["thresholds"]) == {"token", "layer", "exit"}
    from PIL import Image

    with Image.open(out / "analysis.png") as png:  # four panels, each readable at its size
        assert png.size[0] >= 1000 and png.size[1] >= 700
    assert main(["--model", str(checkpoint), "--task", "nope", "--out", str(out)]) == 2
    assert "unknown task" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --n was ignored with --prompt
        main([*argv, "--n", "2", "--out", str(out)])
    assert "--n counts the problems of --task" in capsys.readouterr().err
