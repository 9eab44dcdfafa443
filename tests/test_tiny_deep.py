"""The deep architecture, the hard task's training options (length buckets, dev curve, early
stop) and the model card of v2/tiny/train.py and v2/tiny/card.py."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from v2.checkpoint import load_model, save_release_checkpoint, token_ids
from v2.model import Network
from v2.tiny import card
from v2.tiny import train as tr
from v2.tiny.data import make_split

VOCAB = 865  # the committed tokenizer's size


def test_deep_config_is_deep_gqa_and_small(tmp_path: Path) -> None:
    cfg = tr.default_model_config(VOCAB, arch="deep")
    assert cfg.num_hidden_layers >= 24
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.hidden_size % cfg.num_attention_heads == 0
    model = Network(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 9e6 < n < 12e6
    out = save_release_checkpoint(model, tmp_path / "deep", dtype=torch.bfloat16)
    assert sum(f.stat().st_size for f in out.glob("*.safetensors")) <= 25e6
    assert "24 layers" in tr.describe_model(cfg, n)
    # the committed checkpoint's architecture is unchanged
    base = tr.default_model_config(VOCAB)
    committed = json.loads((Path(tr.__file__).parent / "checkpoint" / "config.json").read_text())
    assert base.num_hidden_layers == committed["num_hidden_layers"] == 8
    assert base.hidden_size == committed["hidden_size"]


def test_bucketed_batches_cover_each_epoch_and_pad_less(tok) -> None:
    problems = make_split(512, seed=4, family="hard")
    samples = tr.encode_problems(tok, problems, 416, token_ids(tok).mask)
    assert samples.dropped == 0
    n, bs = len(samples), 16
    padded = {}
    for bucket in (False, True):
        it = tr.batches(samples, bs, 32, torch.Generator().manual_seed(0), bucket=bucket)
        epoch = [next(it) for _ in range(n // bs)]
        # every sample once per epoch (the prompt identifies a sample)
        seen = {
            tuple(row[:length].tolist())
            for b in epoch
            for row, length in zip(b.ids, b.prompt_len, strict=True)
        }
        assert len(seen) == n
        padded[bucket] = sum(b.ids.numel() for b in epoch)
    assert padded[True] < 0.85 * padded[False]


def test_basic_batches_are_unchanged_without_buckets(tok) -> None:
    """Without buckets the order is the old one: randperm per epoch, consecutive slices."""
    samples = tr.encode_problems(tok, make_split(40, seed=1), 256, token_ids(tok).mask)
    gen = torch.Generator().manual_seed(3)
    it = tr.batches(samples, 8, 32, gen)
    got = [next(it).ids for _ in range(5)]
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(3))
    for i, ids in enumerate(got):
        want = tr.make_batch(samples, order[8 * i : 8 * i + 8], 32).ids
        assert torch.equal(ids, want)


def test_config_presets() -> None:
    args = tr.build_parser().parse_args(["--task", "hard", "--arch", "deep"])
    cfg = tr.config_from_args(args)
    assert cfg.task == "hard" and cfg.max_len == 416 and cfg.bucket and cfg.dev_every_s == 60
    assert cfg.n_train == 250_000
    assert cfg.stop_at_dev_acc is None and not cfg.compile
    args = tr.build_parser().parse_args(["--task", "hard", "--no-bucket", "--dev-every-s", "5"])
    cfg = tr.config_from_args(args)
    assert not cfg.bucket and cfg.dev_every_s == 5
    basic = tr.config_from_args(tr.build_parser().parse_args([]))
    assert basic.max_len == 256 and not basic.bucket and basic.dev_every_s is None


def test_training_problems_exclude_test_and_dev() -> None:
    cfg = tr.TrainConfig(task="hard", n_train=300)
    problems = tr.training_problems(cfg)
    held_out = {p["question"] for path in tr.TASK_SPLITS["hard"] for p in tr.read_jsonl(path)}
    assert len(problems) == 300 and not {p["question"] for p in problems} & held_out


def test_hard_smoke_run_with_dev_curve_and_card(tmp_path: Path) -> None:
    out = tmp_path / "run" / "checkpoint"
    argv = ["--out", str(out), "--task", "hard", "--arch", "deep", "--smoke", "--steps", "3"]
    argv += ["--batch-size", "4", "--n-train", "40", "--dev-every-s", "0", "--dev-limit", "3"]
    assert tr.main([*argv, "--eval-limit", "3"]) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["task"] == "hard" and log["test_file"] == "v2/tiny/data/hard_test.jsonl"
    assert log["steps"] == 3 and log["stopped"] == "steps"
    # one dev evaluation before each step and one of the final weights
    assert [p["step"] for p in log["dev_curve"]] == [0, 1, 2, 3]
    assert all(0 <= p["dev_accuracy"] <= 1 and p["seconds"] >= 0 for p in log["dev_curve"])
    assert log["dev_problems"] == 3
    assert [p["step"] for p in log["loss_curve"]] == [3] and log["loss_curve"][0]["loss"] > 0
    for key in ("threshold_1.0", "threshold_0.9"):
        r = log["eval"][key]
        assert r["n"] == 3 and "tokens_per_forward" in r and "stderr" in r["strict_match"]
        assert sum(v["n"] for v in r["strict_by_level"].values()) == 3
    load_model(out, device="cpu")
    rows = tr.answer_problems(out, tr.read_jsonl(tr.TASK_SPLITS["hard"][0])[:2])
    assert [set(r) for r in rows] == [{"question", "gold", "text", "correct"}] * 2

    readme = card.write_card(out, commit="abc1234", run="bash sbatch/train_deep_tiny.sh X")
    text = readme.read_text()
    assert "abc1234" in text and "bash sbatch/train_deep_tiny.sh X" in text
    assert "| 0.9 | 3 |" in text and "Tokens per forward at threshold 0.9" in text
    assert "No analysis" in text  # analysis.json is missing: said, not invented
    assert "| 3 | 5-6 | 2000 |" in text  # the level table
    assert (out / "loss.png").exists() and (out / "dev_accuracy.png").exists()


def test_stop_at_dev_accuracy(tok) -> None:
    samples = tr.encode_problems(tok, make_split(16, seed=2, family="hard"), 416, 3)
    model = Network(tr.default_model_config(len(tok), smoke=True))
    cfg = tr.TrainConfig(steps=50, batch_size=4, dev_every_s=0.0, stop_at_dev_acc=0.5, minutes=5)
    accuracies = iter([0.1, 0.2, 0.6, 0.9])
    dev = lambda model: next(accuracies)  # noqa: E731
    result = tr.train(model, samples, 3, cfg, torch.device("cpu"), False, dev)
    assert result.stopped == "dev accuracy" and result.steps == 2
    assert [p["dev_accuracy"] for p in result.dev_curve] == [0.1, 0.2, 0.6]


def test_card_layer_profile(tmp_path: Path) -> None:
    analysis = {
        "num_layers": 3,
        "by_step_layer": {
            "layer_cosine": [[None, 0.5, 0.7], [None, 0.7, 0.9]],
            "token_cosine": [[None, None, None], [0.9, 0.8, 0.7]],
        },
    }
    profile = card.layer_profile(analysis)
    assert profile["layer_cosine"] == [None, 0.6, pytest.approx(0.8)]
    assert profile["token_cosine"] == [0.9, 0.8, 0.7]
    card.plot_layer_profile(profile, tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_masked_gqa_forward_matches_the_eager_reference(tok) -> None:
    """Training's masked forward expands K/V heads (memory-efficient SDPA); same result."""
    torch.manual_seed(0)
    model = Network(tr.default_model_config(len(tok), smoke=True))
    tr.init_weights(model, std=0.2)
    assert model.cfg.num_key_value_heads < model.cfg.num_attention_heads
    ids = torch.randint(0, len(tok), (2, 128))
    mask = tr.attention_mask(64, 32)
    positions = torch.arange(64).repeat(2)
    fast = model(ids, positions, mask)
    model.eager_attention = True
    torch.testing.assert_close(fast, model(ids, positions, mask), rtol=1e-4, atol=1e-4)


def _gradients(samples, micro_batches: int, tok) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = Network(tr.default_model_config(len(tok), smoke=True))
    tr.init_weights(model)
    batch = tr.make_batch(samples, torch.arange(8), 32)
    masked = tr.noise_mask(batch, 32, torch.Generator().manual_seed(0))
    ids, labels = tr.diffusion_inputs(batch, masked, token_ids(tok).mask, 32)
    loss = tr.accumulate_gradients(
        tr.diffusion_loss, model, ids, labels, micro_batches, contextlib.nullcontext()
    )
    return [loss, *(p.grad for p in model.parameters())]


def test_micro_batches_give_the_same_step(tok) -> None:
    samples = tr.encode_problems(tok, make_split(8, seed=6, family="hard"), 416, 3)
    whole, split = _gradients(samples, 1, tok), _gradients(samples, 4, tok)
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_out_of_memory_retries_the_step_in_micro_batches(tok, monkeypatch) -> None:
    calls, lengths = [], []
    real_loss = tr.diffusion_loss

    def flaky_loss(model, ids, labels):
        calls.append(ids.shape[0])
        lengths.append(ids.shape[1] // 2)
        if len(calls) == 2:  # the second step runs out of memory once
            raise torch.OutOfMemoryError("simulated")
        return real_loss(model, ids, labels)

    monkeypatch.setattr(tr, "diffusion_loss", flaky_loss)
    samples = tr.encode_problems(tok, make_split(16, seed=2, family="hard"), 416, 3)
    model = Network(tr.default_model_config(len(tok), smoke=True))
    cfg = tr.TrainConfig(steps=3, batch_size=4, minutes=5)
    result = tr.train(model, samples, 3, cfg, torch.device("cpu"), progress_bar=False)
    assert result.steps == 3
    assert result.oom_events == [{"step": 1, "length": lengths[1], "micro_batches": 2}]
    # rows: 2 views x 4 problems, then halves for that step's length (the third step's too)
    assert calls[:4] == [8, 8, 4, 4] and lengths[2] == lengths[3] == lengths[1]
    assert calls[4:] == ([4, 4] if lengths[4] == lengths[1] else [8])
