"""The network against transformers' Qwen2, and checkpoint loading in both layouts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL, random_network

from v2.checkpoint import CheckpointError, load_model, load_tokenizer, save_release_checkpoint
from v2.model import ModelConfig, Network


def hf_qwen2(tie: bool = False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        **SMALL, rope_theta=10000.0, tie_word_embeddings=tie, attn_implementation="eager"
    )
    model = Qwen2ForCausalLM(config).eval()
    for p in model.parameters():  # q/k/v biases are zero at init: make every weight count
        torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers_qwen2(tmp_path, tie):
    hf = hf_qwen2(tie)
    hf.save_pretrained(tmp_path)  # a plain Qwen2 checkpoint (model_type qwen2)
    ours = load_model(tmp_path, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, SMALL["vocab_size"], (2, 40))
    pos = torch.arange(40)
    causal = pos[:, None] >= pos[None, :]
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids, pos, causal)
    assert (got - expected).abs().max().item() <= 1e-4


def test_release_layout_round_trip_single_and_sharded(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=False)
    model = random_network(vocab_size=len(tok))
    ids = torch.randint(0, 60, (1, 20))
    pos = torch.arange(20)
    for name, shard in (("single", None), ("sharded", 40_000)):
        out = save_release_checkpoint(model, tmp_path / name, tok, torch.float32, shard)
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == "Fast_dLLM_Qwen" and config["bd_size"] == 32
        assert "auto_map" in config
        assert (out / "model.safetensors.index.json").exists() == (shard is not None)
        loaded = load_model(out, dtype=torch.float32, device="cpu")
        with torch.no_grad():
            assert torch.equal(loaded(ids, pos), model(ids, pos))
        _, special = load_tokenizer(out)
        assert special.mask == tok.convert_tokens_to_ids("|<MASK>|")
        assert special.eos == tok.convert_tokens_to_ids("<|im_end|>")
        assert special.pad == tok.convert_tokens_to_ids("<|endoftext|>") != special.eos


def test_config_from_transformers_4_and_5_layouts():
    base = {**SMALL, "bd_size": 16}
    v4 = ModelConfig.from_dict({**base, "rope_theta": 5.0})
    v5 = ModelConfig.from_dict(
        {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5.0}}
    )
    assert v4 == v5 and v4.rope_theta == 5.0 and v4.block_size == 16


def test_clear_errors(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="not Qwen2-like"):
        load_model(bad)
    with pytest.raises(CheckpointError, match="mask_token"):
        load_tokenizer(checkpoint, mask_token="<|no-such-token|>")


def test_network_is_ours_not_transformers():
    assert Network.__module__ == "v2.model"
