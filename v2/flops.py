"""FLOP accounting: the one place that turns shapes that ran into floating-point operations
(compute-skipping.md section 5). Used by the engine's statistics and the bench's bounds; checked
against torch's FlopCounterMode in tests/test_policies.py.

- a unit (one row through one layer's matmuls): 2 x the layer's matmul weights;
- attention: 4 x (query, key) pairs x attention width (scores and weighted values);
- logits: 2 x hidden x vocab per row.
Norms, RoPE, activations and biases are not matmul work and are not counted.
"""

from __future__ import annotations

from v2.model import ModelConfig


def unit(cfg: ModelConfig) -> int:
    return 2 * cfg.layer_weight_count


def attention(cfg: ModelConfig, pairs: int = 1) -> int:
    return 4 * pairs * cfg.num_attention_heads * cfg.head_dim


def head(cfg: ModelConfig, rows: int) -> int:
    return rows * 2 * cfg.hidden_size * cfg.vocab_size


def dense_forward(cfg: ModelConfig, rows: int, window: int, keys: int, logit_rows: int) -> int:
    """A forward in which every unit of `rows` x `window` runs every layer, each query over
    `keys` keys, plus `logit_rows` logits."""
    units = rows * window
    per_layer = units * unit(cfg) + attention(cfg, units * keys)
    return cfg.num_hidden_layers * per_layer + head(cfg, logit_rows)
