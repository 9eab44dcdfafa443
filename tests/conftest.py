"""Small random models and checkpoints that the tests build; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from v2.checkpoint import TokenIds, save_release_checkpoint
from v2.model import ModelConfig, Network

SMALL = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
IDS = TokenIds(mask=63, eos=62, pad=61)


def random_network(seed: int = 0, std: float = 0.2, **overrides) -> Network:
    """A random network whose outputs vary with the input (std large enough to be peaky)."""
    torch.manual_seed(seed)
    model = Network(ModelConfig(**{**SMALL, **overrides}))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)
    return model.eval()


def prompt(length: int, offset: int = 0) -> list[int]:
    """A prompt of ordinary tokens (never mask, EOS or pad)."""
    return [(i * 7 + offset) % 60 + 1 for i in range(length)]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    its small forwards gain nothing from threads, and on a busy 2-core machine OpenMP threads
    spinning against other processes cost several times the CPU time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model() -> Network:
    return random_network()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from v2.tiny.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tok(tokenizer_dir: Path):
    """The tiny model's tokenizer, loaded as transformers loads a checkpoint's."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)


@pytest.fixture(scope="module")
def hard(tok):
    """96 hard-family problems encoded for training (v2/tiny/train.py's Samples): with 6 a batch,
    16 batches an epoch."""
    from v2.checkpoint import token_ids
    from v2.tiny import train as tr
    from v2.tiny.data import make_split

    return tr.encode_problems(tok, make_split(96, seed=7, family="hard"), 416, token_ids(tok).mask)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tok) -> Path:
    """A random checkpoint in the release layout (float32 so CPU comparisons are exact)."""
    model = random_network(seed=1, vocab_size=len(tok))
    out = tmp_path_factory.mktemp("checkpoint")
    return save_release_checkpoint(model, out, tokenizer=tok, dtype=torch.float32)
