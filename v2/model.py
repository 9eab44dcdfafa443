"""The Qwen2 network that Fast-dLLM v2 checkpoints hold, written here so the engine owns every row
it computes: no dependency's internals decide what runs.

Weights keep the Qwen2 names of the checkpoint except two fusions made at load time for speed:
`q/k/v_proj` become one `qkv_proj`, `gate/up_proj` become one `gate_up_proj` (see checkpoint.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The keys a config must have to be built as a Qwen2 network.
QWEN2_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)


class ConfigError(ValueError):
    """The checkpoint's config cannot be run as a Qwen2 network."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    block_size: int = 32  # `bd_size` in the release's config.json

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def layer_weight_count(self) -> int:
        """Matmul weights of one decoder layer (biases and norms are not matmul work)."""
        d, hd = self.hidden_size, self.head_dim
        qkv = d * hd * (self.num_attention_heads + 2 * self.num_key_value_heads)
        return qkv + self.num_attention_heads * hd * d + 3 * d * self.intermediate_size

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        """From config.json as transformers 4.x or 5.x write it, release layout or plain Qwen2."""
        missing = [k for k in QWEN2_KEYS if k not in raw]
        if missing:
            raise ConfigError(f"config.json is not Qwen2-like: missing {', '.join(missing)}")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json: hidden_act {raw['hidden_act']!r}, Qwen2 uses 'silu'")
        if raw.get("use_sliding_window"):
            raise ConfigError("config.json: sliding-window attention is not supported")
        heads, kv_heads = raw["num_attention_heads"], raw["num_key_value_heads"]
        if raw["hidden_size"] % heads or heads % kv_heads:
            raise ConfigError(
                f"config.json: hidden_size {raw['hidden_size']}, {heads} heads and {kv_heads} "
                "KV heads do not divide evenly"
            )
        if raw.get("head_dim", raw["hidden_size"] // heads) != raw["hidden_size"] // heads:
            raise ConfigError("config.json: head_dim must equal hidden_size / num_attention_heads")
        # transformers 4.x writes rope_theta at the top level, 5.x inside rope_parameters.
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or raw.get("rope_scaling"):
            raise ConfigError("config.json: only plain RoPE (no rope scaling) is supported")
        theta = raw.get("rope_theta", rope.get("rope_theta", 1_000_000.0))
        return cls(
            **{k: int(raw[k]) for k in QWEN2_KEYS},
            rope_theta=float(theta),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            block_size=int(raw.get("bd_size", 32)),
        )

    def to_release_dict(self) -> dict:
        """config.json in the layout of the Fast-dLLM v2 release."""
        return {
            "architectures": ["Fast_dLLM_QwenForCausalLM"],
            "auto_map": {
                "AutoConfig": "configuration.Fast_dLLM_QwenConfig",
                "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM",
            },
            "model_type": "Fast_dLLM_Qwen",
            "bd_size": self.block_size,
            "conplemenrary_mask": True,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "use_sliding_window": False,
            "torch_dtype": "bfloat16",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            **{k: getattr(self, k) for k in QWEN2_KEYS},
        }


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, as Qwen2 does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hd = cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            hd,
        )
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * hd)
        self.o_proj = nn.Linear(self.n_heads * hd, cfg.hidden_size, bias=False)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


# attend(q, k, v) -> attention output. q: [..., heads, head_dim], k/v: [..., kv_heads, head_dim]
# for the rows being computed; the caller decides where keys live and which ones a query sees.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend
    ) -> torch.Tensor:
        """x: [..., hidden], only the rows to compute; cos/sin broadcast to [..., heads, hd]."""
        a = self.self_attn
        qkv = a.qkv_proj(self.input_layernorm(x))
        q, k, v = qkv.split(
            [a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim], -1
        )
        lead = x.shape[:-1]
        q = apply_rope(q.view(*lead, a.n_heads, a.head_dim), cos, sin)
        k = apply_rope(k.view(*lead, a.n_kv_heads, a.head_dim), cos, sin)
        out = attend(q, k, v.view(*lead, a.n_kv_heads, a.head_dim))
        x = x + a.o_proj(out.reshape(*lead, a.n_heads * a.head_dim))
        return x + self.mlp(self.post_attention_layernorm(x))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    eager: bool = False,
) -> torch.Tensor:
    """Attention over [batch, heads, q, hd] x [batch, kv_heads, keys, hd]; `mask` is boolean
    (True = visible). `eager` spells it out in matmuls (a reference that FlopCounterMode counts)."""
    if not eager:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


class Network(nn.Module):
    """Qwen2ForCausalLM's computation, exposed layer by layer for the engine."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.eager_attention = False  # set by tests that count FLOPs with FlopCounterMode
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for absolute positions, shaped [*positions.shape, 1, head_dim]."""
        if self._rope is None or self._rope[0].device != positions.device:
            self._rope = self._rope_table(positions.device)
        cos, sin = self._rope
        dtype = self.embed_tokens.weight.dtype
        return cos[positions].to(dtype).unsqueeze(-2), sin[positions].to(dtype).unsqueeze(-2)

    def _rope_table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        exponents = torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta**exponents)
        length = -(-cfg.max_position_embeddings // cfg.block_size) * cfg.block_size
        freqs = torch.arange(length, device=device).float()[:, None] * inv_freq[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head on the rows whose logits are used; float32 out."""
        return self.lm_head(self.norm(hidden)).float()

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Full-sequence forward with no cache: ids [b, T], positions [T] or [b, T], boolean mask
        [T, T] or [b, 1, T, T] (None = all visible). Returns logits [b, T, vocab]. Used by
        training and as the reference the cached engine is tested against."""
        x = self.embed_tokens(ids)
        cos, sin = self.rope(positions)

        def attend(q, k, v):
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if mask is not None and not self.eager_attention and k.shape[1] != q.shape[1]:
                # SDPA's enable_gqa with a mask takes the math kernel (T x T float32 scores
                # kept for backward: what limits training memory); whole K/V heads let the
                # memory-efficient kernel take the mask.
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
            return sdpa(q, k, v, mask, self.eager_attention).transpose(1, 2)

        for layer in self.layers:
            x = layer(x, cos, sin, attend)
        return self.logits(x)


def block_causal_mask(
    q_positions: torch.Tensor, k_positions: torch.Tensor, block_size: int
) -> torch.Tensor:
    """True where a query may see a key: the key's block is not after the query's block."""
    return (q_positions[:, None] // block_size) >= (k_positions[None, :] // block_size)
