"""Fixed batch lengths and the compiled training step of v2/tiny/train.py: padding leaves the
loss on the real tokens unchanged, torch.compile makes at most one graph per fixed length, and a
compile failure falls back to eager."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from v2.checkpoint import token_ids
from v2.model import Network
from v2.tiny import train as tr
from v2.tiny.data import make_split

B = 32


def test_fixed_lengths_minimise_padding() -> None:
    lengths = torch.tensor([30] * 10 + [64] + [90] * 10)
    assert tr.fixed_lengths(lengths, B, 2) == (32, 96)  # 10 x 32 + 11 x 96 beats 11 x 64 + ...
    assert tr.fixed_lengths(lengths, B, 6) == (32, 64, 96)  # no more lengths than values
    assert tr.fixed_lengths(lengths, B, 1) == (96,)
    assert tr.cover_length(40, (32, 64, 96)) == 64 and tr.cover_length(64, (32, 64, 96)) == 64
    assert tr.cover_length(128, (32, 64, 96)) == 128


def test_hard_task_gets_at_most_six_lengths(tok) -> None:
    samples = tr.encode_problems(tok, make_split(3000, seed=3, family="hard"), 416, 3)
    lengths = tr.fixed_lengths(samples.length, B, 6)
    assert len(lengths) == 6 and all(L % B == 0 for L in lengths)
    assert max(lengths) >= int(samples.length.max()) and max(lengths) <= 416
    # padding to six lengths costs little over padding each sample to its own block multiple
    own = (-(-samples.length // B) * B).sum().item()
    fixed = sum(tr.cover_length(-(-int(n) // B) * B, lengths) for n in samples.length)
    assert fixed < 1.1 * own


def _loss_and_grads(model, batch, masked, mask_id):
    model.zero_grad(set_to_none=True)
    ids, labels = tr.diffusion_inputs(batch, masked, mask_id, B)
    loss = tr.diffusion_loss(model, ids, labels)
    loss.backward()
    return [loss.detach(), *(p.grad.clone() for p in model.parameters())], ids.shape


def test_padded_batch_gives_the_same_loss_and_gradients(tok, hard: tr.Samples) -> None:
    mask_id = token_ids(tok).mask
    torch.manual_seed(0)
    model = Network(tr.default_model_config(len(tok), smoke=True))
    tr.init_weights(model, std=0.1)
    batch = tr.make_batch(hard, torch.arange(6), B)
    masked = tr.noise_mask(batch, B, torch.Generator().manual_seed(1))
    want, shape = _loss_and_grads(model, batch, masked, mask_id)
    padded, pmasked = tr.pad_batch(batch, masked, batch.ids.shape[1] + 3 * B, mask_id)
    got, pshape = _loss_and_grads(model, padded, pmasked, mask_id)
    assert pshape[1] == shape[1] + 6 * B
    # the padding is what a longer cut of the samples holds: mask tokens
    assert torch.equal(padded.ids, hard.tokens[:6, : padded.ids.shape[1]])
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _train(hard, tok, **options) -> tr.TrainResult:
    torch.manual_seed(0)
    model = Network(tr.default_model_config(len(tok), smoke=True))
    tr.init_weights(model)
    cfg = tr.TrainConfig(steps=8, batch_size=6, warmup_steps=2, minutes=5, bucket=True, **options)
    return tr.train(model, hard, token_ids(tok).mask, cfg, torch.device("cpu"), False)


@pytest.mark.parametrize("scope", ["layers", "loss"])
def test_compile_makes_one_graph_per_fixed_length(tok, hard: tr.Samples, scope: str) -> None:
    torch._dynamo.reset()
    counter = CompileCounter()  # counts dynamo's graphs, runs them eager
    options = dict(compile_backend=counter, compile_scope=scope, fixed_lengths=3)
    result = _train(hard, tok, compile=True, **options)
    assert result.compile["scope"] == scope
    assert len(result.lengths) == 3
    assert result.compile["failure"] is None
    assert result.compile["lengths_compiled"] == list(result.lengths)
    # one graph per fixed length, none during training (the layers share theirs)
    assert counter.frame_count == 3
    assert result.compile["calls"] == {"compiled": 8, "eager": 0}
    assert all(getattr(x, "_compiled_call_impl", None) is None for x in result.model.layers)
    # the same steps eager: padding and the compiled path change nothing; nor does padding
    eager = _train(hard, tok, fixed_lengths=3)
    unpadded = _train(hard, tok)
    assert eager.lengths == result.lengths and unpadded.lengths == ()
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(eager.losses))
    torch.testing.assert_close(
        torch.tensor(eager.losses), torch.tensor(unpadded.losses), rtol=1e-5, atol=1e-6
    )
    torch._dynamo.reset()


def test_spent_compile_budget_leaves_lengths_eager(tok, hard: tr.Samples) -> None:
    torch._dynamo.reset()
    counter = CompileCounter()
    options = dict(compile_backend=counter, fixed_lengths=3, compile_budget=0.0)
    result = _train(hard, tok, compile=True, **options)
    assert result.compile["lengths_compiled"] == [] and counter.frame_count == 0
    assert result.compile["calls"] == {"compiled": 0, "eager": 8} and result.steps == 8
    torch._dynamo.reset()


def test_compile_failure_falls_back_to_eager(tok, hard: tr.Samples, capsys) -> None:
    torch._dynamo.reset()

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    result = _train(hard, tok, compile=True, compile_backend=broken, fixed_lengths=2)
    assert result.steps == 8 and "no compiler here" in result.compile["failure"]
    assert result.compile["lengths_compiled"] == []
    assert "torch.compile failed, training continues eager" in capsys.readouterr().err
    torch._dynamo.reset()


def test_compile_presets() -> None:
    parse = tr.build_parser().parse_args
    deep = tr.config_from_args(parse(["--task", "hard", "--arch", "deep"]))
    assert deep.batch_size == 256 and deep.lr == 1.4e-3 and deep.fixed_lengths == 0
    base = tr.config_from_args(parse(["--task", "hard"]))
    assert base.batch_size == 128 and base.lr == 1e-3 and not base.compile
    basic = tr.config_from_args(parse([]))
    assert basic.batch_size == 128 and basic.lr == 1e-3 and basic.warmup_steps == 200
    compiled = tr.config_from_args(parse(["--arch", "deep", "--compile", "--lr", "2e-3"]))
    assert compiled.compile and compiled.fixed_lengths == 6 and compiled.lr == 2e-3
    assert compiled.compile_mode is None and compiled.compile_backend == "inductor"
    given = parse(["--compile", "--fixed-lengths", "3", "--compile-mode", "max-autotune"])
    given = tr.config_from_args(given)
    assert given.fixed_lengths == 3 and given.compile_mode == "max-autotune"
    assert given.compile_budget == 0.35
    assert tr.config_from_args(parse(["--compile-budget", "0.2"])).compile_budget == 0.2
    smoke = tr.config_from_args(parse(["--arch", "deep", "--smoke"]))
    assert smoke.batch_size == 16


def test_unavailable_compile_falls_back_to_eager(tok, hard: tr.Samples, monkeypatch, capsys):
    def unavailable(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported here")

    monkeypatch.setattr(torch, "compile", unavailable)
    result = _train(hard, tok, compile=True, fixed_lengths=2)
    assert result.steps == 8 and "not supported here" in result.compile["failure"]
    assert result.compile["calls"] == {"compiled": 0, "eager": 8}
    assert "training continues eager" in capsys.readouterr().err


def test_out_of_memory_with_compile_splits_the_length_and_compiles_its_micro_batches(
    tok, hard: tr.Samples, monkeypatch
) -> None:
    torch._dynamo.reset()
    calls = []
    real_loss = tr.diffusion_loss

    def flaky_loss(model, ids, labels):
        calls.append(tuple(ids.shape))
        if len(calls) == 4:  # after the 2 warm-ups, the second step runs out of memory once
            raise torch.OutOfMemoryError("simulated")
        return real_loss(model, ids, labels)

    monkeypatch.setattr(tr, "diffusion_loss", flaky_loss)
    result = _train(hard, tok, compile=True, compile_backend=CompileCounter(), fixed_lengths=2)
    assert result.steps == 8 and result.compile["failure"] is None
    rows, columns = calls[3]
    length = columns // 2
    assert result.oom_events == [{"step": 1, "length": length, "micro_batches": 2}]
    # the half-batch shape of that length is compiled right away (call 5), then the step again
    assert calls[4] == calls[5] == calls[6] == (rows // 2, columns)
    assert result.compile["micro_batches"] == {length: 2}
    # only that length splits: every other length's steps stay whole, and nothing runs eager
    assert result.compile["calls"]["eager"] == 0
    later = calls[7:]
    assert all(r == rows // 2 for r, c in later if c == columns)
    assert all(r == rows for r, c in later if c != columns)
    assert any(c != columns for _, c in later)  # the other length was trained too
    torch._dynamo.reset()


def test_a_length_that_does_not_fit_compiles_in_micro_batches(
    tok, hard: tr.Samples, monkeypatch
) -> None:
    L = max(_train(hard, tok, fixed_lengths=2).lengths)  # the longest of the run's lengths
    torch._dynamo.reset()
    calls = []
    real_loss = tr.diffusion_loss

    def small_memory(model, ids, labels):
        calls.append(tuple(ids.shape))
        if tuple(ids.shape) == (12, 2 * L):  # a whole batch (2 x 6 rows) of it does not fit
            raise torch.OutOfMemoryError("simulated")
        return real_loss(model, ids, labels)

    monkeypatch.setattr(tr, "diffusion_loss", small_memory)
    result = _train(hard, tok, compile=True, compile_backend=CompileCounter(), fixed_lengths=2)
    assert result.steps == 8 and result.compile["failure"] is None
    assert result.compile["micro_batches"] == {L: 2}
    assert (6, 2 * L) in calls
    assert result.oom_events == []  # found in the warm-up, no step ran out of memory
    assert result.compile["calls"]["eager"] == 0
    assert result.compile["lengths_compiled"] == sorted(result.lengths)
    torch._dynamo.reset()
