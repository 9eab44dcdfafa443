"""Tests for the tiny model's training script (v2/tiny/train.py): the block-diffusion objective's
attention mask, noise and labels, a short CPU training run and the saved checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from v2.checkpoint import load_model, load_tokenizer, save_release_checkpoint, token_ids
from v2.generate import FastDLLM
from v2.model import Network
from v2.tiny import train as tr
from v2.tiny.data import make_split

B = 32


@pytest.fixture(scope="module")
def mask_id(tok) -> int:
    return token_ids(tok).mask


@pytest.fixture(scope="module")
def samples(tok, mask_id: int) -> tr.Samples:
    return tr.encode_problems(tok, make_split(64, seed=5), max_len=256, mask_id=mask_id)


def test_attention_mask_rules() -> None:
    T = 96  # three blocks
    mask = tr.attention_mask(T, B)
    assert mask.shape == (2 * T, 2 * T) and mask.dtype == torch.bool
    noisy = lambda i: i  # noqa: E731 - row/column of the noisy copy of position i
    clean = lambda i: T + i  # noqa: E731
    # noisy -> noisy: only its own block, in both directions
    assert mask[noisy(40), noisy(33)] and mask[noisy(33), noisy(63)] and mask[noisy(40), noisy(40)]
    assert not mask[noisy(40), noisy(31)] and not mask[noisy(40), noisy(64)]
    assert not mask[noisy(5), noisy(40)]
    # noisy -> clean: strictly earlier blocks only
    assert mask[noisy(40), clean(0)] and mask[noisy(40), clean(31)] and mask[noisy(95), clean(63)]
    assert not mask[noisy(40), clean(40)] and not mask[noisy(40), clean(32)]
    assert not mask[noisy(5), clean(0)] and not mask[noisy(40), clean(70)]
    # clean -> clean: own block (bidirectional) and earlier blocks
    assert mask[clean(33), clean(63)] and mask[clean(63), clean(33)] and mask[clean(70), clean(5)]
    assert not mask[clean(31), clean(32)] and not mask[clean(5), clean(40)]
    # clean never sees noisy
    assert not mask[T:, :T].any()
    # the whole mask against the rule written out position by position
    block = [i // B for i in range(T)]
    for q in range(2 * T):
        for k in range(2 * T):
            bq, bk = block[q % T], block[k % T]
            if q < T and k < T:
                want = bq == bk
            elif q < T:
                want = bk < bq
            else:
                want = k >= T and bk <= bq
            assert bool(mask[q, k]) == want, (q, k)


def test_prompt_is_what_the_engine_sends(tok, samples: tr.Samples) -> None:
    problems = make_split(64, seed=5)
    lm = FastDLLM(None, tok, token_ids(tok))  # encode() only needs the tokenizer
    expected = lm.encode([tr.user_message(p["question"]) for p in problems[:8]], chat=True)
    for i, ids in enumerate(expected):
        L = int(samples.prompt_len[i])
        assert samples.tokens[i, :L].tolist() == ids
        assert tok.decode(ids).endswith("<|im_start|>assistant\n")
        assert "Question: " in tok.decode(ids) and "\nAnswer:<|im_end|>" in tok.decode(ids)
        response = samples.tokens[i, L : int(samples.length[i])].tolist()
        assert tok.decode(response) == problems[i]["answer"] + "<|im_end|>"
        assert response[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_encode_drops_long_samples(tok, mask_id: int) -> None:
    problems = make_split(20, seed=1)
    short = tr.encode_problems(tok, problems, max_len=128, mask_id=mask_id)
    full = tr.encode_problems(tok, problems, max_len=256, mask_id=mask_id)
    assert len(full) == 20 and full.dropped == 0
    assert short.dropped == 20 - len(short) > 0 and int(short.length.max()) <= 128


def test_noise_and_complementary_views(samples: tr.Samples, mask_id: int) -> None:
    batch = tr.make_batch(samples, torch.arange(16), B)
    b, T = batch.ids.shape
    assert T % B == 0 and T >= int(batch.length.max()) > T - B
    pos = torch.arange(T)
    prompt = pos[None] < batch.prompt_len[:, None]
    maskable = tr.maskable(batch, B)
    gen = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(20):
        masked = tr.noise_mask(batch, B, gen)
        assert not (masked & prompt).any()
        assert not masked[:, ::B].any()  # block-first slots never masked
        assert not (masked & (pos[None] >= batch.length[:, None])).any()  # padding never masked
        ids, labels = tr.diffusion_inputs(batch, masked, mask_id, B)
        assert ids.shape == labels.shape == (2 * b, 2 * T)
        views = ids[:, :T] == mask_id
        views &= batch.response().repeat(2, 1)  # padding is the mask token too
        first, second = views[:b], views[b:]
        assert torch.equal(first, masked)
        assert not (first & second).any() and torch.equal(first | second, maskable)
        assert torch.equal(ids[:, T:], batch.ids.repeat(2, 1))  # clean half
        # noisy-half labels: output j-1 predicts masked token j
        noisy_labels = labels[:, :T]
        assert torch.equal(noisy_labels[:, :-1] != tr.IGNORE, views[:, 1:])
        assert noisy_labels[:, -1].eq(tr.IGNORE).all()
        clean2 = batch.ids.repeat(2, 1)
        assert torch.equal(noisy_labels[:, :-1][views[:, 1:]], clean2[:, 1:][views[:, 1:]])
        # clean-half labels: block-first response slots, first view only
        clean_labels = labels[:, T:]
        assert clean_labels[b:].eq(tr.IGNORE).all()
        block_first = batch.response() & (pos % B == 0)[None]
        assert torch.equal(clean_labels[:b, :-1] != tr.IGNORE, block_first[:, 1:])
        assert torch.equal(clean_labels[:b, :-1][block_first[:, 1:]], batch.ids[block_first])
        # every response token is supervised exactly once
        once = (noisy_labels[:b, :-1] != tr.IGNORE).int() + (noisy_labels[b:, :-1] != tr.IGNORE)
        once += (clean_labels[:b, :-1] != tr.IGNORE).int()
        assert torch.equal(once, batch.response()[:, 1:].int())
        rates.append(masked.sum().item() / maskable.sum().item())
    assert 0.3 < sum(rates) / len(rates) < 0.7 and max(rates) - min(rates) > 0.02


def test_block_first_when_prompt_fills_whole_blocks(samples: tr.Samples, mask_id: int) -> None:
    """A response that starts at a block boundary: its first token comes from the clean half's
    last prompt position (the plain AR step after prefill)."""
    batch = tr.make_batch(samples, torch.arange(1), B)
    batch.prompt_len[0] = B * 2
    masked = tr.noise_mask(batch, B, torch.Generator().manual_seed(1))
    _, labels = tr.diffusion_inputs(batch, masked, mask_id, B)
    T = batch.ids.shape[1]
    assert labels[0, T + 2 * B - 1] == batch.ids[0, 2 * B]
    assert not masked[0, 2 * B]


def test_training_lowers_loss_and_saves_a_release_checkpoint(
    tok, samples: tr.Samples, mask_id: int, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = Network(tr.default_model_config(len(tok), smoke=True))
    tr.init_weights(model)
    cfg = tr.TrainConfig(steps=30, batch_size=4, lr=3e-3, warmup_steps=3, minutes=5)
    result = tr.train(model, samples, mask_id, cfg, torch.device("cpu"), progress_bar=False)
    assert result.steps == 30 and len(result.losses) == 30
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 1.0, result.losses

    out = save_release_checkpoint(result.model, tmp_path / "ckpt", tok, dtype=torch.bfloat16)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "Fast_dLLM_Qwen" and config["bd_size"] == 32
    assert config["tie_word_embeddings"] is False and config["vocab_size"] == len(tok)
    assert len(list(out.glob("*.safetensors"))) == 1
    loaded = load_model(out, dtype=torch.float32, device="cpu")
    assert loaded.cfg == model.cfg
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a.to(torch.bfloat16).float(), b), name
    tokenizer, ids = load_tokenizer(out)
    assert ids.mask == mask_id and ids.eos == tok.convert_tokens_to_ids("<|im_end|>")


def test_command_smoke_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    argv = ["--out", str(out), "--smoke", "--steps", "3", "--batch-size", "4", "--n-train", "50"]
    assert tr.main([*argv, "--eval-limit", "2"]) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 3 and log["train_config"]["batch_size"] == 4
    assert log["model_config"]["num_hidden_layers"] == 2 and log["command"].endswith("2")
    for key in ("threshold_1.0", "threshold_0.9"):
        assert log["eval"][key]["n"] == 2 and "tokens_per_forward" in log["eval"][key]
    assert "training summary" in capsys.readouterr().out
    load_model(out, device="cpu")
