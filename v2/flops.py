"""FLOP accounting: the one place that turns shapes that ran into floating-point operations
(compute-skipping.md section 5). Every forward adds its work to the statistics as `work(rows,
pairs, logit rows)`; the bench's bounds use the same terms. Checked against torch's
FlopCounterMode, forward kind by forward kind, in tests/test_flops.py.

- a unit (one row through one layer's matmuls): 2 x the layer's matmul weights;
- attention: 4 x (query, key) pairs x attention width (scores and weighted values). A pair is
  one whose score was computed: a masked score (block-causal prefill, causal verify) is computed
  and then discarded, so it counts;
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


def work(cfg: ModelConfig, rows: int = 0, pairs: int = 0, logit_rows: int = 0) -> int:
    """`rows` unit rows through a layer's matmuls, `pairs` attention (query, key) pairs and
    `logit_rows` rows through the head, each summed over the layers they ran in."""
    return rows * unit(cfg) + attention(cfg, pairs) + head(cfg, logit_rows)


def dense_forward(cfg: ModelConfig, rows: int, window: int, keys: int, logit_rows: int) -> int:
    """A forward in which every unit of `rows` x `window` runs every layer, each query over
    `keys` keys, plus `logit_rows` logits."""
    units = rows * window * cfg.num_hidden_layers
    return work(cfg, units, units * keys, logit_rows)
