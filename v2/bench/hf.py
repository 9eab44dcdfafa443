"""The autoregressive baseline: transformers' Qwen2ForCausalLM holding our network's weights
(views, no copy), decoding with `generate` and a static cache, which transformers compiles with
torch.compile (reduce-overhead: CUDA graphs) on a GPU. The fair comparison for a dLLM forward."""

from __future__ import annotations

import time

import torch

from v2.bench.timing import Clock, CompileSetups, median
from v2.model import Network


def hf_model(model: Network):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = model.cfg
    config = Qwen2Config(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings,
        use_sliding_window=False,
    )
    config._attn_implementation = "sdpa"
    H, K, M = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.intermediate_size,
    )
    state = {
        "model.embed_tokens.weight": model.embed_tokens.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        qkv_w, qkv_b = layer.self_attn.qkv_proj.weight, layer.self_attn.qkv_proj.bias
        gate_up = layer.mlp.gate_up_proj.weight
        state.update(
            {
                p + "input_layernorm.weight": layer.input_layernorm.weight,
                p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
                p + "self_attn.q_proj.weight": qkv_w[:H],
                p + "self_attn.k_proj.weight": qkv_w[H : H + K],
                p + "self_attn.v_proj.weight": qkv_w[H + K :],
                p + "self_attn.q_proj.bias": qkv_b[:H],
                p + "self_attn.k_proj.bias": qkv_b[H : H + K],
                p + "self_attn.v_proj.bias": qkv_b[H + K :],
                p + "self_attn.o_proj.weight": layer.self_attn.o_proj.weight,
                p + "mlp.gate_proj.weight": gate_up[:M],
                p + "mlp.up_proj.weight": gate_up[M:],
                p + "mlp.down_proj.weight": layer.mlp.down_proj.weight,
            }
        )
    with torch.device("meta"):
        hf = Qwen2ForCausalLM(config)
    state = {k: v.detach() for k, v in state.items()}
    hf.load_state_dict(state, strict=False, assign=True)
    if c.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    device = model.embed_tokens.weight.device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=config).to(device)
    return hf.eval()


@torch.inference_mode()
def hf_generate(hf, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy, exactly `new_tokens` new tokens per row, static cache."""
    return hf.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        cache_implementation="static",
        pad_token_id=0,
    )


def hf_tokens_per_s(hf, prompts: torch.Tensor, new_tokens: int, repeats: int, clock: Clock):
    clock.sync()
    t = time.perf_counter()
    # The warm-up rule, watching torch.compile's compilations; at least two calls: compile, then
    # record the CUDA graphs (cudagraph trees' recordings are in no counter it reads).
    warmup_calls = clock.warm_up(
        lambda: hf_generate(hf, prompts, new_tokens), [CompileSetups()], at_least=2
    )
    clock.sync()
    warmup = time.perf_counter() - t
    walls = []
    for _ in range(repeats):
        clock.sync()
        t = time.perf_counter()
        out = hf_generate(hf, prompts, new_tokens)
        clock.sync()
        walls.append(time.perf_counter() - t)
    generated = (out.shape[1] - prompts.shape[1]) * prompts.shape[0]
    wall = median(walls)
    return {
        "decoder": "transformers Qwen2ForCausalLM.generate, static cache (torch.compile on GPU)",
        "new_tokens": new_tokens,
        "generated_tokens": generated,
        "wall_s": wall,
        "walls_s": walls,
        "warmup_s": warmup,
        "warmup_calls": warmup_calls,
        "tokens_per_s": generated / wall,
    }
