"""The committed tiny model loads through the release code path and solves test problems."""

from __future__ import annotations

from pathlib import Path

from v2.checkpoint import read_config
from v2.generate import FastDLLM, GenerationConfig
from v2.tiny.data import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "v2" / "tiny" / "checkpoint"


def test_committed_checkpoint_is_release_layout_and_small():
    cfg = read_config(CHECKPOINT)
    assert cfg.block_size == 32 and cfg.num_hidden_layers >= 8
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert sum(f.stat().st_size for f in CHECKPOINT.iterdir()) <= 20_000_000


def test_committed_checkpoint_answers_five_test_problems():
    problems = read_jsonl(ROOT / "v2" / "tiny" / "data" / "test.jsonl")[:5]
    lm = FastDLLM.load(CHECKPOINT, device="cpu")
    texts = [f"Question: {p['question']}\nAnswer:" for p in problems]
    out = lm.generate(texts, GenerationConfig(max_new_tokens=256, threshold=1.0), chat=True)
    for p, o in zip(problems, out.outputs, strict=True):
        assert o.finish_reason == "eos"
        assert o.text.split("####")[-1].strip() == p["answer"].split("####")[-1].strip()
