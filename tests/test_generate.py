"""Block-diffusion decoding: cache exactness, batching, thresholds, sampling, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import IDS, prompt, random_network

from v2.generate import GenerationConfig, GenerationError, generate, main
from v2.model import block_causal_mask

LENGTHS = (5, 31, 32, 33, 64, 70)


def reference_decode(model, p: list[int], max_new: int, threshold: float, S: int = 8):
    """The decoding rule recomputed from scratch every step: full-sequence forwards under the
    block-causal rule, no cache (single row, greedy)."""
    B = model.cfg.block_size
    seq = list(p)
    end = len(p) + max_new
    while len(seq) < end:
        start = (len(seq) // B) * B
        if len(seq) == start:  # a plain AR step from the clean prefix opens the block
            logits = model(
                torch.tensor([seq]),
                torch.arange(len(seq)),
                block_causal_mask(torch.arange(len(seq)), torch.arange(len(seq)), B),
            )
            seq.append(int(logits[0, -1].argmax()))
            if seq[-1] == IDS.eos:
                break
            continue
        block = seq[start:] + [IDS.mask] * (start + B - len(seq))
        pending = [start + j >= len(seq) and start + j < end for j in range(B)]
        for k in range(B // S):
            while any(pending[k * S : (k + 1) * S]):
                full = seq[:start] + block
                pos = torch.arange(len(full))
                logits = model(torch.tensor([full]), pos, block_causal_mask(pos, pos, B))[0]
                conf, tok = logits.softmax(-1).max(-1)  # position i predicts token i + 1
                cands = [j for j in range(k * S, (k + 1) * S) if pending[j]]
                best = max(cands, key=lambda j: conf[start + j - 1])
                for j in cands:
                    if j == best or conf[start + j - 1] > threshold:
                        block[j], pending[j] = int(tok[start + j - 1]), False
        seq = seq[:start] + block
        gen = seq[len(p) :]
        if IDS.eos in gen:
            return gen[: gen.index(IDS.eos) + 1]
        seq = seq[: min(len(seq), end)]
    return seq[len(p) : end]


# The random test model is nearly uniform (confidences about 0.03): 0.03 commits some slots of a
# sub-block per forward and not others.
@pytest.mark.parametrize("threshold", [1.0, 0.03])
def test_cached_decoding_equals_full_recompute(model, threshold):
    for length in (5, 32, 40):
        p = prompt(length)
        got = generate(model, [p], IDS, GenerationConfig(max_new_tokens=45, threshold=threshold))
        assert got.outputs[0].token_ids == reference_decode(model, p, 45, threshold)


@pytest.mark.parametrize("block_cache", [False, True])
@pytest.mark.parametrize("threshold", [1.0, 0.9, 0.03])
def test_batch_gives_each_prompt_its_own_tokens(model, threshold, block_cache):
    prompts = [prompt(n, offset=n) for n in LENGTHS]
    cfg = GenerationConfig(max_new_tokens=40, threshold=threshold, use_block_cache=block_cache)
    batch = generate(model, prompts, IDS, cfg)
    for p, out in zip(prompts, batch.outputs, strict=True):
        alone = generate(model, [p], IDS, cfg).outputs[0]
        assert out.token_ids == alone.token_ids and out.finish_reason == alone.finish_reason


def test_rows_honour_their_own_budget_and_eos():
    model = random_network(seed=3)
    prompts = [prompt(5), prompt(40, 3)]
    out = generate(
        model, prompts, IDS, GenerationConfig(max_new_tokens=37, threshold=1.0, ignore_eos=True)
    )
    assert [len(o.token_ids) for o in out.outputs] == [37, 37]
    assert {o.finish_reason for o in out.outputs} == {"length"}
    # Make EOS the most likely token everywhere: every row stops after its first token.
    with torch.no_grad():
        model.lm_head.weight[IDS.eos] += 100.0
    out = generate(model, prompts, IDS, GenerationConfig(max_new_tokens=37, threshold=1.0))
    assert all(o.token_ids == [IDS.eos] and o.finish_reason == "eos" for o in out.outputs)


def test_two_prompts_of_exactly_one_block_differ():
    model = random_network(std=0.05)  # less degenerate: the output follows the prompt
    a, b = prompt(32, 0), prompt(32, 5)
    out = generate(model, [a, b], IDS, GenerationConfig(max_new_tokens=16, threshold=1.0))
    assert out.outputs[0].token_ids != out.outputs[1].token_ids
    assert out.stats.forwards["prefill"] == 1


def test_threshold_one_is_one_token_per_denoise_forward(model):
    # Prompt of one block: prefill, AR token at 32, then 31 masks -> 31 denoise + 1 commit.
    out = generate(
        model,
        [prompt(32)],
        IDS,
        GenerationConfig(max_new_tokens=33, threshold=1.0, ignore_eos=True),
    )
    assert out.stats.forwards == {"prefill": 1, "denoise_full": 31, "denoise_sub": 0, "commit": 1}
    assert out.stats.generated_tokens == 33
    cached = GenerationConfig(
        max_new_tokens=33, threshold=1.0, ignore_eos=True, use_block_cache=True
    )
    out = generate(model, [prompt(32)], IDS, cached)
    # One full-block forward opens each sub-block; the rest run on the sub-block alone.
    assert out.stats.forwards == {"prefill": 1, "denoise_full": 4, "denoise_sub": 27, "commit": 1}


def test_lower_threshold_commits_several_tokens_per_forward(model):
    cfg = dict(max_new_tokens=64, ignore_eos=True)
    slow = generate(model, [prompt(10)], IDS, GenerationConfig(threshold=1.0, **cfg)).stats
    fast = generate(model, [prompt(10)], IDS, GenerationConfig(threshold=0.03, **cfg)).stats
    assert fast.forwards["denoise_full"] < slow.forwards["denoise_full"]


def test_sampling_is_per_row():
    """Near-zero temperature samples each row's own argmax (sub-blocks of one slot fix the
    decoding order); the release's bug (every row sampled from row 0's distribution) would give
    row 1 row 0's tokens."""
    model = random_network(seed=12, std=0.05)  # a seed with no near-tie in the argmax
    prompts = [prompt(20, 0), prompt(20, 9)]
    one_slot = dict(max_new_tokens=20, threshold=1.0, small_block_size=1)
    greedy = [generate(model, [p], IDS, GenerationConfig(**one_slot)).outputs[0] for p in prompts]
    sampled = generate(
        model, prompts, IDS, GenerationConfig(**one_slot, temperature=1e-6, top_p=0.9, seed=0)
    )
    assert [o.token_ids for o in sampled.outputs] == [g.token_ids for g in greedy]
    assert greedy[0].token_ids != greedy[1].token_ids
    warm = GenerationConfig(max_new_tokens=20, threshold=1.0, temperature=1.0, seed=7)
    first, again = (generate(model, prompts, IDS, warm).outputs for _ in range(2))
    assert [o.token_ids for o in first] == [o.token_ids for o in again]  # seeded: reproducible


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(threshold=0.0), "threshold"),
        (dict(small_block_size=5), "divide"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(top_p=1.5), "top_p"),
        (dict(block_size=0), "block size must be >= 2, got 0"),  # 0 is not "the checkpoint's"
    ],
)
def test_bad_config_is_a_clear_error(model, kwargs, message):
    with pytest.raises(GenerationError, match=message):
        generate(model, [prompt(5)], IDS, GenerationConfig(**kwargs))


def test_bad_prompts_are_clear_errors(model):
    with pytest.raises(GenerationError, match="no prompts"):
        generate(model, [], IDS)
    with pytest.raises(GenerationError, match="empty prompt"):
        generate(model, [[]], IDS)
    with pytest.raises(GenerationError, match="positions"):
        generate(model, [prompt(600)], IDS)


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json(capsys, checkpoint):
    code, out, _ = run_cli(
        capsys,
        "--model",
        str(checkpoint),
        "--prompt",
        "Tom has 3 apples.",
        "--prompt",
        "Hi",
        "--chat",
        "--max-new-tokens",
        "40",
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    assert len(result["outputs"]) == 2
    # the settings in force are printed with the result, the default threshold included
    assert result["config"]["threshold"] == 0.9 and result["config"]["max_new_tokens"] == 40
    assert result["config"]["policy"] == {"policy": "none"}
    assert set(result["outputs"][0]) == {"text", "token_ids", "finish_reason"}
    stats = result["stats"]
    assert set(stats["forwards"]) == {"prefill", "denoise_full", "denoise_sub", "commit"}
    for key in (
        "generated_tokens",
        "tokens_per_forward",
        "executed_units",
        "baseline_units",
        "executed_flops",
        "baseline_flops",
        "wall_seconds",
        "tokens_per_second",
    ):
        assert key in stats
    assert stats["generated_tokens"] == sum(len(o["token_ids"]) for o in result["outputs"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", ""], "empty prompt"),
        (["--prompt", "x " * 600], "positions"),
        (["--prompt", "hi", "--threshold", "0"], "threshold"),
        (["--prompt", "hi", "--small-block-size", "5"], "divide"),
        (["--prompt", "hi", "--mask-token", "<nope>"], "mask_token"),
        # -1 was accepted (issue 25): a cosine threshold is >= 0
        (["--prompt", "hi", "--policy", "token", "--cosine-threshold", "-1"], "must be >= 0"),
        (["--prompt", "hi", "--policy", "layer", "--cosine-threshold", "nan"], "must be >= 0"),
        (["--prompt", "hi", "--cosine-threshold", "0.9"], "need a policy"),
        # a bad name or value: one line, not argparse's usage
        (["--prompt", "hi", "--policy", "tokn"], "unknown policy 'tokn'; choose one of none"),
        (["--prompt", "hi", "--policy", "reuse", "--reuse-k", "two"], "(an integer), got 'two'"),
    ],
)
def test_cli_bad_input_is_one_line(capsys, checkpoint, args, message):
    code, _, err = run_cli(capsys, "--model", str(checkpoint), *args)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("chat", [["--chat"], []])
@pytest.mark.parametrize("prompts", [[""], ["   "], ["hi", " \n "]])
def test_cli_refuses_an_empty_prompt(capsys, checkpoint, chat, prompts):
    """As the chatbot and the app refuse an empty message (with --chat the template alone was
    decoded): one line, status 2, nothing decoded."""
    args = [a for text in prompts for a in ("--prompt", text)]
    code, out, err = run_cli(capsys, "--model", str(checkpoint), *chat, *args)
    assert (
        code == 2 and out == "" and err.startswith("error: empty prompt") and err.count("\n") == 1
    )
    if len(prompts) > 1:
        assert "(--prompt 2 of 2)" in err


@pytest.mark.parametrize("json_mode", [False, True])
def test_cli_says_when_the_answer_is_cut_to_fit_the_context(capsys, checkpoint, json_mode):
    """The test checkpoint has 512 positions: a prompt of ~480 tokens leaves no room for 64."""
    long = ["--prompt", "x " * 240, "--prompt", "hi", "--max-new-tokens", "64"]
    long += ["--threshold", "0.5", "--ignore-eos"] + (["--json"] if json_mode else [])
    code, out, err = run_cli(capsys, "--model", str(checkpoint), *long)
    assert code == 0
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1, err
    assert "answer 1 was cut at" in notes[0] and "512 positions" in notes[0]
    if json_mode:
        result = json.loads(out)
        assert result["notes"] == [notes[0].removeprefix("note: ")]
        assert len(result["outputs"][0]["token_ids"]) < 64
        assert len(result["outputs"][1]["token_ids"]) == 64


@pytest.mark.parametrize(
    ("device", "message"),
    [("foo", "unknown device 'foo'"), ("mps", "only cpu and cuda")]
    + ([] if torch.cuda.is_available() else [("cuda", "no CUDA GPU here")]),
)
def test_cli_bad_device_is_one_argparse_line(capsys, checkpoint, device, message):
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, "--model", str(checkpoint), "--prompt", "hi", "--device", device)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_cli_missing_checkpoint(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--model", str(tmp_path / "none"), "--prompt", "hi")
    assert code == 2 and "not found" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "note"),
    [
        (["--policy", "token"], "policy 'token' with its defaults can skip nothing"),
        (["--policy", "layer", "--cosine-threshold", "1"], "this run is the baseline"),
        (["--policy", "token", "--cosine-threshold", "0.5"], None),
        ([], None),
        # options past the test checkpoint's depth (4 layers): enabled, yet nothing to skip
        (["--policy", "token", "--cosine-threshold", "0.5", "--min-layer", "4"], "of 4 layers"),
        (["--policy", "exit", "--exit-threshold", "0.5", "--min-layer", "4"], "of 4 layers"),
        (["--policy", "layer", "--cosine-threshold", "0.5", "--protect-first", "3"], "of 4 layers"),
        (["--policy", "layer", "--cosine-threshold", "0.5", "--protect-first", "2"], None),
        (["--policy", "token", "--cosine-threshold", "0.5", "--min-layer", "3"], None),
    ],
)
def test_cli_says_when_a_policy_runs_as_the_baseline(capsys, checkpoint, args, note):
    """As the lm_eval path does: a policy that can skip nothing is named as the baseline."""
    prompt = ["--prompt", "hi", "--max-new-tokens", "4", "--json"]
    code, _, err = run_cli(capsys, "--model", str(checkpoint), *prompt, *args)
    assert code == 0
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    if note:
        assert len(notes) == 1 and note in notes[0], err
    else:
        assert notes == [], err


def test_settings_are_declared_once():
    """Every generation setting is a GenerationConfig field; the flags of each command, lm_eval's
    model_args and the chat /set names are derived from it, with one default per entry point."""
    import argparse
    from dataclasses import fields

    from v2 import analyze, chatbot, lm_adapter
    from v2.chat import SETTINGS
    from v2.generate import (
        EVAL_DEFAULTS,
        GenerationConfig,
        build_parser,
        config_from_args,
        settings,
    )

    declared = {f.name: f.default for f in settings()}
    assert set(declared) == {f.name for f in fields(GenerationConfig)} - {"cuda_graphs"}
    args = build_parser().parse_args(["--model", "m", "--prompt", "p"])
    assert {k: getattr(args, k) for k in declared} == declared
    assert config_from_args(args) == GenerationConfig()
    for parser in (chatbot.build_parser(), analyze.build_parser()):
        extra = ["--prompt", "p"] if parser.prog.endswith("analyze") else []
        ns = parser.parse_args(["--model", "m", *extra])
        shown = {k: getattr(ns, k) for k in declared if hasattr(ns, k)}
        assert shown and shown == {k: declared[k] for k in shown}
        assert config_from_args(ns) == GenerationConfig(**shown)
    model_args = {k: v for k, v in lm_adapter.MODEL_ARGS.items() if k in declared}
    assert set(model_args) == set(declared) - {"ignore_eos"}
    assert model_args["threshold"] == EVAL_DEFAULTS["threshold"] == 1.0
    others = set(model_args) - {"threshold", "max_new_tokens"}
    assert {k: model_args[k] for k in others} == {k: declared[k] for k in others}
    assert set(SETTINGS) == set(declared) - {"decode"}
    # a flag's help shows the default in force
    help = argparse.ArgumentParser.format_help(build_parser())
    assert "(default: 0.9)" in help


def test_diffusion_has_no_tokens_per_verify_forward(model):
    st = generate(model, [prompt(5)], IDS, GenerationConfig(max_new_tokens=8)).stats
    assert st.verify_forwards == 0 and st.tokens_per_verify_forward is None
    assert st.to_dict()["tokens_per_verify_forward"] is None


def test_cli_autoregressive_summary_names_no_diffusion_settings(capsys, checkpoint):
    args = ["--prompt", "hi", "--decode", "autoregressive", "--max-new-tokens", "4"]
    code, _, err = run_cli(capsys, "--model", str(checkpoint), *args, "--threshold", "0.5")
    assert code == 0 and "[autoregressive, no policy:" in err
    assert "threshold" not in err and "drafted" not in err and "1.00 tokens/verify forward" in err


def test_the_model_keeps_one_engine_per_settings():
    """generate reuses the model's engine for equal settings, whatever the policy object: two
    policies with equal options share one engine (its buffers, graphs and policy object); other
    options, another policy or other generation settings get a new one."""
    from layer_skip_generation_functions import LayerReusePolicy
    from token_skip_generation_functions import TokenSkipPolicy
    from v2.generate import engine_for
    from v2.policy import Policy

    model = random_network()
    cfg = GenerationConfig(max_new_tokens=16)

    def engine(policy, config=cfg):
        generate(model, [prompt(5)], IDS, config, policy)
        return model._v2_engine

    first = engine(TokenSkipPolicy(cosine_threshold=0.9))
    assert engine(TokenSkipPolicy(cosine_threshold=0.9)) is first
    assert engine_for(model, cfg, TokenSkipPolicy(cosine_threshold=0.9)) is first
    assert engine(TokenSkipPolicy(cosine_threshold=0.95)) is not first
    token = engine(TokenSkipPolicy(cosine_threshold=0.9))
    assert token is not first  # the model keeps the last engine only
    assert engine(TokenSkipPolicy(cosine_threshold=0.9)) is token
    assert engine(LayerReusePolicy(reuse_k=2)) is not token

    class Mine(TokenSkipPolicy):  # same options, another class: it may plan otherwise
        pass

    token = engine(TokenSkipPolicy(cosine_threshold=0.9))
    assert engine(Mine(cosine_threshold=0.9)) is not token
    none = engine(None)
    assert engine(None) is none
    assert engine(None, GenerationConfig(max_new_tokens=16, use_block_cache=True)) is not none
    assert engine(None, GenerationConfig(max_new_tokens=16, block_size=16)) is not none
    # A policy that declares no options is known by its object alone.
    custom = Policy()
    mine = engine(custom)
    assert engine(custom) is mine and engine(Policy()) is not mine


def test_a_forced_commit_schedule_commits_k_per_forward():
    """commit_per_forward k: the k most confident candidates of each row (all if fewer), whatever
    the threshold; k = 1 is the threshold-1 decode token for token."""
    from v2.block_loop import commit_rule

    cand = torch.tensor([[True, True, True, False], [False, True, False, False]])
    conf = torch.tensor([[0.1, 0.9, 0.5, 0.99], [0.2, 0.3, 0.8, 0.1]])
    assert commit_rule(cand, conf, 0.05, per_forward=2).tolist() == [
        [False, True, True, False],
        [False, True, False, False],
    ]
    model = random_network(seed=2)
    prompts = [prompt(5), prompt(40, 3)]
    one = generate(model, prompts, IDS, GenerationConfig(max_new_tokens=40, threshold=1.0))
    k1 = GenerationConfig(max_new_tokens=40, threshold=0.5, commit_per_forward=1)
    assert [o.token_ids for o in generate(model, prompts, IDS, k1).outputs] == [
        o.token_ids for o in one.outputs
    ]
    k4 = GenerationConfig(max_new_tokens=40, commit_per_forward=4, ignore_eos=True)
    st = generate(model, prompts, IDS, k4).stats
    assert st.forwards["denoise_full"] <= 2 * 40 / 4 + 4  # 4 per forward, sub-block remainders
    for bad in (dict(commit_per_forward=0), dict(commit_per_forward=2, decode="speculative")):
        with pytest.raises(GenerationError, match="commit_per_forward"):
            GenerationConfig(**bad).validate(32)
