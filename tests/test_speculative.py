"""Causal decodes (v2/speculative.py): the autoregressive decode is the checkpoint's greedy causal
decode (checked against full recomputation), and speculative decoding equals it token for token
for every draft, in batches of mixed prompt lengths, with statistics that add up.

Models are float64 so that "token for token" compares decodes, not rounding: the verifier scores
windows of several tokens where the autoregressive decode scores one, and float32 could flip a
near-tie between two tokens.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import IDS, prompt, random_network
from torch.utils.flop_counter import FlopCounterMode

from v2.checkpoint import TokenIds
from v2.generate import GenerationConfig, GenerationError, generate, main
from v2.policies import make_policy

LENGTHS = (1, 5, 31, 32, 33, 64, 70)
MAX_NEW = 40


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    # std 0.05: outputs follow the prompt without collapsing onto one token
    return random_network(seed=4, std=0.05).double()


def causal_reference(model, p: list[int], max_new: int, eos: int = IDS.eos) -> list[int]:
    """Greedy decoding recomputed from scratch every token: full-sequence forwards under the
    causal rule (a block of one token), no cache."""
    seq = list(p)
    while len(seq) < len(p) + max_new:
        pos = torch.arange(len(seq))
        causal = pos[:, None] >= pos[None, :]
        with torch.no_grad():
            logits = model(torch.tensor([seq]), pos, causal)
        seq.append(int(logits[0, -1].argmax()))
        if seq[-1] == eos:
            break
    return seq[len(p) :]


def decode(model, prompts, decode="speculative", ids=IDS, policy=None, **kwargs):
    cfg = GenerationConfig(**{"max_new_tokens": MAX_NEW, "threshold": 0.5, **kwargs})
    cfg.decode = decode
    return generate(model, prompts, ids, cfg, policy)


def prompts():
    return [prompt(n, offset=n) for n in LENGTHS]


def test_autoregressive_equals_full_recompute(model):
    out = decode(model, prompts(), "autoregressive")
    for p, o in zip(prompts(), out.outputs, strict=True):
        assert o.token_ids == causal_reference(model, p, MAX_NEW)
        assert o.finish_reason == "length"
    # The same checkpoint decoded by block diffusion is a different decoder (the test would be
    # vacuous if the two agreed everywhere).
    diffusion = generate(model, prompts(), IDS, GenerationConfig(max_new_tokens=MAX_NEW))
    assert [o.token_ids for o in diffusion.outputs] != [o.token_ids for o in out.outputs]
    st = out.stats
    assert st.verify_row_forwards == st.generated_tokens == len(LENGTHS) * MAX_NEW
    assert st.verify_forwards == MAX_NEW and st.tokens_per_verify_forward == 1.0
    assert st.drafted_tokens == st.accepted_tokens == 0


@pytest.fixture(scope="module")
def reference(model):
    return [o.token_ids for o in decode(model, prompts(), "autoregressive").outputs]


DRAFTS = {
    "thr0.5_s8": dict(threshold=0.5),
    "thr0.03_s8": dict(threshold=0.03),  # (nearly) the whole run in one forward
    "thr1_s4": dict(threshold=1.0, small_block_size=4),
    "thr0.5_s1": dict(threshold=0.5, small_block_size=1),
    "thr0.5_s32": dict(threshold=0.5, small_block_size=32),
    "block16": dict(threshold=0.5, block_size=16),
}


@pytest.mark.parametrize("draft", DRAFTS)
def test_speculative_equals_autoregressive(model, reference, draft):
    out = decode(model, prompts(), **DRAFTS[draft])
    assert [o.token_ids for o in out.outputs] == reference
    st = out.stats
    # Drafts were really accepted (else this would be the autoregressive decode again) and
    # really rejected (else the verifier would never have had to correct one).
    assert 0 < st.accepted_tokens < st.drafted_tokens
    assert st.verify_row_forwards < st.generated_tokens
    assert st.generated_tokens == st.verify_row_forwards + st.accepted_tokens
    assert st.tokens_per_verify_forward > 1.0
    assert st.forwards["denoise_full"] > 0 and st.forwards["commit"] > 0


POLICIES = {
    "token_ct0.9": dict(policy="token", cosine_threshold=0.9),
    "token_rr0.5": dict(policy="token", reuse_ratio=0.5),
    "layer_ct0.5": dict(policy="layer", cosine_threshold=0.5, protect_first=1, protect_last=1),
    "reuse_k2": dict(policy="reuse", reuse_k=2, layer_subset="middle"),
}


@pytest.mark.parametrize("name", POLICIES)
def test_skipping_drafts_stay_lossless(model, reference, name):
    options = dict(POLICIES[name])
    policy = make_policy(options.pop("policy"), **options)
    out = decode(model, prompts(), policy=policy, threshold=0.3)
    assert [o.token_ids for o in out.outputs] == reference
    st = out.stats
    assert st.executed_flops < st.baseline_flops  # the draft skipped work
    assert st.accepted_tokens > 0


def test_batch_gives_each_row_its_own_tokens_and_drafts(model):
    batch = decode(model, prompts())
    alone = [decode(model, [p]) for p in prompts()]
    assert [o.token_ids for o in batch.outputs] == [a.outputs[0].token_ids for a in alone]
    # With no policy a row's drafts depend on its own tokens only: the batch drafts and accepts
    # what the rows do alone.
    for name in ("drafted_tokens", "accepted_tokens"):
        assert getattr(batch.stats, name) == sum(getattr(a.stats, name) for a in alone)


def test_eos_inside_a_drafted_run(model, reference):
    """Pick as EOS a token the decode produces mid-way: the output stops right after its first
    occurrence, wherever it falls in a verified run."""
    row = reference[2]
    eos = next(t for t in row[5:] if t not in (IDS.mask, IDS.pad))
    ids = TokenIds(mask=IDS.mask, eos=eos, pad=IDS.pad)
    p = prompts()
    ar = decode(model, p, "autoregressive", ids=ids)
    spec = decode(model, p, ids=ids)
    for q, a, s in zip(p, ar.outputs, spec.outputs, strict=True):
        assert a.token_ids == causal_reference(model, q, MAX_NEW, eos=eos)
        assert s.token_ids == a.token_ids and s.finish_reason == a.finish_reason
    assert ar.outputs[2].finish_reason == "eos" and ar.outputs[2].token_ids[-1] == eos
    ignored = decode(model, p, ids=ids, ignore_eos=True)
    assert [o.token_ids for o in ignored.outputs] == reference


@pytest.mark.parametrize("max_new", [1, 2, 3, 9])
def test_small_budgets(model, reference, max_new):
    out = decode(model, prompts(), max_new_tokens=max_new)
    assert [o.token_ids for o in out.outputs] == [r[:max_new] for r in reference]


def test_position_limit(model):
    """A prompt near the model's last position: the row stops at the limit, others go on."""
    limit = model.cfg.max_position_embeddings
    p = [prompt(limit - 3, 1), prompt(10)]
    ar = decode(model, p, "autoregressive")
    spec = decode(model, p)
    assert [len(o.token_ids) for o in ar.outputs] == [3, MAX_NEW]
    assert [o.token_ids for o in spec.outputs] == [o.token_ids for o in ar.outputs]


def test_verifier_flops_match_flop_counter(model):
    """Executed FLOPs of the causal decode (prefill, verify forwards, logits) are what runs."""
    model.eager_attention = True
    try:
        with FlopCounterMode(display=False) as counter:
            out = decode(model, [prompt(7), prompt(20, 3)], "autoregressive", max_new_tokens=6)
        assert out.stats.executed_flops == counter.get_total_flops()
        assert out.stats.forwards["prefill"] == 1
    finally:
        model.eager_attention = False


def test_stats_record(model):
    out = decode(model, prompts()[:3])
    d = out.stats.to_dict()
    for key in (
        "verify_forwards",
        "verify_row_forwards",
        "drafted_tokens",
        "accepted_tokens",
        "acceptance_rate",
        "tokens_per_verify_forward",
        "executed_flops",
        "wall_seconds",
    ):
        assert key in d
    st = out.stats
    assert d["acceptance_rate"] == st.accepted_tokens / st.drafted_tokens
    assert st.decode_row_forwards == (
        st.row_forwards["denoise_full"] + st.row_forwards["commit"] + st.verify_row_forwards
    )
    # No policy: nothing skipped. Attention pads a verify window's rows to the widest (executed,
    # not in the baseline).
    assert st.skip_rate_per_layer() == [0.0] * model.cfg.num_hidden_layers
    assert st.executed_flops >= st.baseline_flops
    back = type(st).from_dict(json.loads(json.dumps(d)))
    assert back.to_dict() == d


@pytest.mark.parametrize(
    ("kwargs", "policy", "message"),
    [
        (dict(decode="nope"), None, "decode must be one of"),
        (dict(decode="speculative", temperature=0.7), None, "greedy"),
        (dict(decode="speculative", use_block_cache=True), None, "use_block_cache"),
        (dict(decode="autoregressive"), "token", "policy applies only to the draft"),
        (dict(decode="speculative", small_block_size=5), None, "divide"),
        (dict(decode="speculative", threshold=0.0), None, "threshold"),
    ],
)
def test_bad_settings_are_clear_errors(model, kwargs, policy, message):
    with pytest.raises(GenerationError, match=message):
        generate(model, [prompt(5)], IDS, GenerationConfig(**kwargs), make_policy(policy))


def test_cli(capsys, checkpoint):
    args = ["--model", str(checkpoint), "--prompt", "Tom has 3 apples.", "--prompt", "Hi"]
    args += ["--max-new-tokens", "20", "--ignore-eos", "--dtype", "float32"]
    texts = {}
    for dec in ("autoregressive", "speculative"):
        assert main([*args, "--decode", dec, "--threshold", "0.3", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        texts[dec] = [o["token_ids"] for o in result["outputs"]]
        assert result["stats"]["verify_forwards"] > 0
    assert texts["speculative"] == texts["autoregressive"]
    assert main([*args, "--decode", "speculative"]) == 0
    assert "verify forwards" in capsys.readouterr().err
    assert main([*args, "--decode", "speculative", "--temperature", "1"]) == 2
    err = capsys.readouterr().err
    assert "greedy" in err and err.count("\n") == 1


def test_tiny_checkpoint_speculative_is_autoregressive():
    """The committed tiny model on its first test problems: speculative decoding (plain drafts
    and drafts under a skipping policy) gives the autoregressive decode, and the trained model's
    own block diffusion drafts mostly what the causal model decodes (a broken draft, e.g. one
    position off, would be rejected almost always)."""
    from pathlib import Path

    from v2.generate import FastDLLM
    from v2.tiny.data import read_jsonl

    root = Path(__file__).resolve().parents[1]
    lm = FastDLLM.load(root / "v2" / "tiny" / "checkpoint", dtype=torch.float64, device="cpu")
    problems = read_jsonl(root / "v2" / "tiny" / "data" / "test.jsonl")[:6]
    ps = lm.encode([f"Question: {p['question']}\nAnswer:" for p in problems], chat=True)
    cfg = dict(max_new_tokens=72, threshold=0.7)
    ar = decode(lm.model, ps, "autoregressive", ids=lm.ids, **cfg)
    assert any(o.finish_reason == "eos" for o in ar.outputs)  # answers end inside the budget
    for policy in (None, make_policy("reuse", reuse_k=2, layer_subset="middle")):
        spec = decode(lm.model, ps, ids=lm.ids, policy=policy, **cfg)
        assert [o.token_ids for o in spec.outputs] == [o.token_ids for o in ar.outputs]
        assert [o.finish_reason for o in spec.outputs] == [o.finish_reason for o in ar.outputs]
        assert spec.stats.acceptance_rate > 0.5 and spec.stats.tokens_per_verify_forward > 2


def test_lm_eval_model_args(checkpoint):
    from lm_eval.api.instance import Instance

    from v2 import lm_adapter

    with pytest.raises(lm_adapter.EvalError, match="decode"):
        lm_adapter.parse_model_args(dict(pretrained=str(checkpoint), decode="greedy"))
    with pytest.raises(lm_adapter.EvalError, match="policy applies only to the draft"):
        lm_adapter.parse_model_args(
            dict(pretrained=str(checkpoint), decode="autoregressive", policy="token")
        )
    outs = {}
    for dec in ("autoregressive", "speculative"):
        run = lm_adapter.reset_run()
        lm = lm_adapter.FastDLLMEvalLM(
            pretrained=str(checkpoint), decode=dec, threshold=0.3, dtype="float32", device="cpu"
        )
        assert run.config["decode"] == dec
        gen = {"until": [], "max_gen_toks": 12}
        reqs = [
            Instance("generate_until", {}, (text, gen), 0, ("t", i, 1))
            for i, text in enumerate(["Question: 1 + 1?\nAnswer:", "Hi"])
        ]
        outs[dec] = lm.generate_until(reqs)
        stats = [s for v in run.requests.values() for s in v]
        assert sum(s.verify_row_forwards for s in stats) > 0
    assert outs["speculative"] == outs["autoregressive"]


def test_engines_of_the_wrong_kind_are_clear_errors(model):
    """The autoregressive decode runs on a causal engine and only it does; a causal engine has
    no denoise forward and a block-diffusion engine no verify forward."""
    from v2.engine import Engine

    causal, diffusion = Engine(model, causal=True), Engine(model, None, 32)
    with pytest.raises(GenerationError, match="causal engine"):
        generate(model, [prompt(5)], IDS, GenerationConfig(max_new_tokens=4), engine=causal)
    cfg = GenerationConfig(max_new_tokens=4)
    cfg.decode = "autoregressive"
    with pytest.raises(GenerationError, match="causal engine"):
        generate(model, [prompt(5)], IDS, cfg, engine=diffusion)
    assert generate(model, [prompt(5)], IDS, cfg, engine=causal).outputs[0].token_ids
    before = causal.stats.to_dict()
    with pytest.raises(RuntimeError, match="verify"):
        causal.denoise(torch.tensor([prompt(8)]), 0, torch.arange(2))
    assert causal.stats.to_dict() == before  # nothing counted
    with pytest.raises(RuntimeError, match="causal engine's forward"):
        diffusion.verify(torch.tensor([prompt(2)]), *torch.tensor([[0], [3], [2]]))
    with pytest.raises(ValueError, match="no policy"):
        Engine(model, make_policy("token", cosine_threshold=0.9), causal=True)
