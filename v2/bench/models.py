"""Models the bench times: Fast-dLLM v2 release shapes with random weights built on the device
(no download; timing does not depend on the weights' values), the committed tiny checkpoint, and a
small test shape."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from v2.checkpoint import TokenIds, load_model
from v2.model import ModelConfig, Network

TINY_CHECKPOINT = Path(__file__).resolve().parents[1] / "tiny" / "checkpoint"

# Fast-dLLM v2 release shapes (fast-dllm-v2.md section 1); "test" is a test-only small config.
SHAPES: dict[str, ModelConfig] = {
    "7b": ModelConfig(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    "1.5b": ModelConfig(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    # 4 layers, not 2: with 2 there is no layer besides the first and last to PASS.
    "test": ModelConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    ),
}
MODELS = (*SHAPES, "tiny")


def build_random(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random weights (normal, std 0.02; norms 1) made on the device: nothing passes the CPU."""
    with torch.device("meta"):
        model = Network(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def special_ids(vocab: int) -> TokenIds:
    return TokenIds(mask=vocab - 1, eos=vocab - 2, pad=vocab - 3)


def load(name: str, device: torch.device, dtype: torch.dtype, need_positions: int):
    """(model, ids, source). The tiny checkpoint's position limit is raised to `need_positions`
    for timing (RoPE is a table; the weights do not depend on it)."""
    if name == "tiny":
        from v2.checkpoint import load_tokenizer

        model = load_model(TINY_CHECKPOINT, dtype=dtype, device=device)
        ids = load_tokenizer(TINY_CHECKPOINT)[1]
        source = str(TINY_CHECKPOINT.relative_to(TINY_CHECKPOINT.parents[2]))
    else:
        model = build_random(SHAPES[name], device, dtype)
        ids = special_ids(model.cfg.vocab_size)
        source = "random weights, normal std 0.02"
    if model.cfg.max_position_embeddings < need_positions:
        model.cfg = replace(model.cfg, max_position_embeddings=need_positions)
        model._rope = None
    return model, ids, source


def ordinary_tokens(ids: TokenIds, vocab: int, n: int, offset: int = 0) -> list[int]:
    special = {ids.mask, ids.eos, ids.pad}
    pool = [t for t in range(min(vocab, 4096)) if t not in special]
    return [pool[(i * 7 + offset * 13) % len(pool)] for i in range(n)]


def token_tensor(ids: TokenIds, vocab: int, b: int, n: int, device) -> torch.Tensor:
    return torch.tensor(
        [ordinary_tokens(ids, vocab, n, r) for r in range(b)], dtype=torch.long, device=device
    )
