"""Tests for the tiny model's tokenizer (v2/tiny/tokenizer.py)."""

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from v2.tiny import tokenizer as tk
from v2.tiny.data import make_problem


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    tk.build_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path):
    return AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)


def test_saved_files_and_size(tok_dir: Path, tok) -> None:
    assert (tok_dir / "tokenizer.json").exists()
    assert (tok_dir / "tokenizer_config.json").exists()
    assert 512 < len(tok) <= 1024


def test_deterministic(tok_dir: Path, tmp_path: Path) -> None:
    tk.build_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tok_dir / name).read_bytes()


def test_round_trip(tok) -> None:
    rng = random.Random(5)
    problems = [make_problem(rng) for _ in range(20)]
    texts = [f"Question: {p['question']}\nAnswer: {p['answer']}" for p in problems]
    texts += ["Ünïcødé, emoji 😀, tabs\tand  spaces\n\n", "x=1e-3; print(f'{x!r}')"]
    chat = [{"role": "user", "content": texts[0]}, {"role": "assistant", "content": "#### 42"}]
    texts.append(tok.apply_chat_template(chat, tokenize=False))
    for text in texts:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_digits_are_single_tokens(tok) -> None:
    for number in ["7", "42", "2024", "9999", "1234567890"]:
        tokens = tok.tokenize(f"has {number} apples")
        assert [t for t in tokens if any(ch.isdigit() for ch in t)] == list(number)


def test_special_tokens(tok) -> None:
    ids = tok.convert_tokens_to_ids(tk.SPECIAL_TOKENS)
    assert len(set(ids)) == 4 and tok.unk_token_id not in ids
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id != tok.pad_token_id
    for special in tk.SPECIAL_TOKENS:  # each is one token, never split
        assert tok.tokenize(f"a{special}b")[1] == special
    mask = tok.convert_tokens_to_ids("|<MASK>|")
    ids = tok.encode("Tom has", add_special_tokens=False) + [mask, mask, tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "Tom has"
    assert "|<MASK>|" in tok.decode(ids)


def test_chat_template(tok) -> None:
    user = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(user, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    custom = [{"role": "system", "content": "Be brief."}, *user]
    rendered = tok.apply_chat_template(custom, tokenize=False)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "helpful assistant" not in rendered
