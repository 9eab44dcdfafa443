"""Log-likelihood requests (v2/lm_adapter.py: `encode_pair`, `release_loglikelihood`, the
model's `loglikelihood`) and the `tiny_mc` multiple-choice task, on CPU: the committed tiny
model (v2/tiny/checkpoint) where the scores must mean something, the random checkpoint of
conftest where only the arithmetic is checked. docs/evaluation.md states the rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from v2 import lm_adapter
from v2.generate import GenerationError
from v2.lm_adapter import FastDLLMEvalLM, release_loglikelihood

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "v2" / "tiny" / "checkpoint"
MC_TEST = REPO / "v2" / "tiny" / "data" / "mc_test.jsonl"
QUESTION = json.loads((REPO / "v2" / "tiny" / "data" / "test.jsonl").read_text().split("\n", 1)[0])


def _instance(args: tuple, doc_id: int) -> Instance:
    return Instance("loglikelihood", doc={}, arguments=args, idx=0, metadata=("t", doc_id, 1))


def _reference_score(model, ids, ctx: list[int], cont: list[int], B: int) -> tuple[float, bool]:
    """The release's rule written out: mask the first continuation token, pad with masks to the
    next block boundary (a whole block when aligned), EOS first, block-causal forward."""
    seq = ctx + cont
    target = seq[len(ctx)]
    seq[len(ctx)] = ids.mask
    pad = B - len(seq) % B
    seq = seq + [ids.eos] + [ids.mask] * (pad - 1)
    pos = torch.arange(len(seq))
    visible = (pos[:, None] // B) >= (pos[None, :] // B)
    with torch.no_grad():
        logits = model(torch.tensor([seq]), pos, visible)[0]
    logp = logits[len(ctx) - 1].log_softmax(-1)
    return logp[target].item(), int(logp.argmax()) == target


def _tiny(batch_size: int) -> FastDLLMEvalLM:
    lm_adapter.reset_run()
    return FastDLLMEvalLM(
        pretrained=str(TINY), batch_size=str(batch_size), device="cpu", dtype="float32"
    )


@pytest.fixture(scope="module")
def tiny() -> FastDLLMEvalLM:
    """The committed tiny model, float32, batches of 4."""
    return _tiny(4)


@pytest.fixture(scope="module")
def lm(checkpoint) -> FastDLLMEvalLM:
    """conftest's random checkpoint, batches of 3."""
    lm_adapter.reset_run()
    return FastDLLMEvalLM(pretrained=str(checkpoint), batch_size="3", device="cpu")


def _chat(lm: FastDLLMEvalLM, content: str) -> str:
    """A context as lm_eval renders it under --apply_chat_template (0-shot)."""
    return lm.apply_chat_template([{"role": "user", "content": content}])


def _aligned_chat_context(lm: FastDLLMEvalLM, B: int) -> str:
    """A chat-rendered context whose token count is a multiple of B: its last block is full,
    so the first continuation token opens the next block."""
    for extra in range(4 * B):
        ctx = _chat(lm, QUESTION["question"] + " Tell me." * extra)
        if len(lm._encode(ctx)) % B == 0:
            return ctx
    raise AssertionError("no block-aligned context found")


# ---- the split ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "context", "continuation"),
    [
        ("chat-rendered, ends in \\n", None, "A"),
        ("chat-rendered, ends in \\n", None, "Noah has"),
        ("ends in \\n", "Question: 2 + 3?\nAnswer:\n", "5"),
        ("ends in a space", "Question: 2 + 3?\nAnswer: ", "5"),
        ("ends in two spaces", "Question: 2 + 3?\nAnswer:  ", "5"),
        ("no trailing whitespace", "Question: 2 + 3?\nAnswer:", " 5"),
    ],
)
def test_split_is_the_releases_where_the_context_is_a_prefix(tiny, kind, context, continuation):
    """The context keeps its trailing whitespace and the first continuation token (the one
    scored) is the continuation's own first token."""
    context = _chat(tiny, QUESTION["question"]) if context is None else context
    enc = tiny._encode
    whole, ctx = enc(context + continuation), enc(context)
    assert whole[: len(ctx)] == ctx  # the release's case
    got_ctx, got_cont = tiny._encode_pair(context, continuation)
    assert got_ctx == ctx and got_cont == whole[len(ctx) :]
    assert got_cont[0] == enc(continuation)[0]
    assert continuation.startswith(tiny.tokenizer.decode(got_cont[:1]))  # not the context's


@pytest.mark.parametrize(
    ("context", "continuation", "context_text", "first_token"),
    [
        ("Answer: ", "A", "Answer:", " A"),  # the release crashes here
        ("Noah ", "has 9", "Noah", " has"),  # the release scores a double space here
        ("Question: 2 + 3?\nAnswer: ", "Noah", "Question: 2 + 3?\nAnswer:", " Noah"),
    ],
)
def test_a_merged_token_is_scored_where_the_context_is_not_a_prefix(
    tiny, context, continuation, context_text, first_token
):
    """The context's last token merges with the continuation's first: the split is at the
    first token where context and whole differ, so the merged token is scored."""
    enc = tiny._encode
    whole, ctx = enc(context + continuation), enc(context)
    assert whole[: len(ctx)] != ctx  # not the release's case
    got_ctx, got_cont = tiny._encode_pair(context, continuation)
    assert got_ctx == enc(context_text) and got_ctx + got_cont == whole
    assert tiny.tokenizer.decode(got_cont[:1]) == first_token
    ((score, greedy),) = tiny.loglikelihood([_instance((context, continuation), 0)])
    ref = _reference_score(tiny.model, tiny.ids, got_ctx, got_cont, tiny.block_size)
    assert (score, greedy) == pytest.approx(ref, abs=1e-5)


def test_empty_context_and_empty_continuation(tiny):
    """An empty context is EOS (lm_eval's convention: the first token needs a position to be
    predicted from); a continuation adding no tokens is an error."""
    eos, enc, split = tiny.ids.eos, tiny._encode, lm_adapter.encode_pair
    assert split(enc, "", "Noah has", eos) == ([eos], enc("Noah has"))
    # a context that is one token merging with the continuation: nothing of it is left
    assert split(enc, " ", "A", eos) == ([eos], enc(" A"))
    with pytest.raises(GenerationError, match="adds no tokens"):
        split(enc, "Answer:", "", eos)


# ---- the scores -----------------------------------------------------------------------------


def test_a_context_ending_in_whitespace_scores_the_answers_token(tiny):
    """The release's MMLU/GPQA case: a chat-rendered context ends in "assistant\\n" (lm_eval's
    target delimiter is then ""); and a plain context ending in a space. The score is the
    answer's first token's, never the context's trailing whitespace's; is_greedy is real."""
    chat = _chat(tiny, QUESTION["question"])
    assert chat.endswith("<|im_start|>assistant\n")
    first_word = QUESTION["answer"].split()[0]  # "Noah": what the tiny model answers
    plain = f"Question: {QUESTION['question']}\nAnswer: "
    cases = [(chat, first_word), (chat, "Jack"), (chat, "A"), (plain, "1")]
    got = tiny.loglikelihood([_instance(c, i) for i, c in enumerate(cases)])
    enc, B = tiny._encode, tiny.block_size
    for (context, continuation), (score, greedy) in zip(cases, got, strict=True):
        answer = _reference_score(tiny.model, tiny.ids, enc(context), enc(continuation), B)
        assert (score, greedy) == pytest.approx(answer, abs=1e-5), (context[-20:], continuation)
        # what lm_eval's autoregressive convention scores: the whitespace moved over
        n = len(context) - len(context.rstrip())
        moved = enc(context[:-n]), enc(context[-n:] + continuation)
        whitespace = _reference_score(tiny.model, tiny.ids, *moved, B)
        assert abs(whitespace[0] - score) > 1e-3
    # the trained model answers "Noah ..." after the chat prompt: a near-certain, greedy token
    assert got[0][0] > -0.01 and got[0][1] is True
    assert got[1][0] < -1 and got[1][1] is False


def test_a_full_last_block_leaves_the_choices_apart(tiny):
    """A chat-rendered context of a multiple of B tokens: the answer letter opens the next
    block. Scoring the context's "\\n" (the last slot of its block, which cannot see the
    letter) gave all four letters one score."""
    B = tiny.block_size
    context = _aligned_chat_context(tiny, B)
    ctx = tiny._encode(context)
    assert len(ctx) % B == 0 and context.endswith("assistant\n")
    letters = ["A", "B", "C", "D"]
    got = tiny.loglikelihood([_instance((context, x), i) for i, x in enumerate(letters)])
    assert len({s for s, _ in got}) == 4
    for x, (score, greedy) in zip(letters, got, strict=True):
        cont = tiny._encode(x)
        assert tiny._encode_pair(context, x) == (ctx, cont)
        assert (score, greedy) == pytest.approx(
            _reference_score(tiny.model, tiny.ids, ctx, cont, B), abs=1e-5
        )


def test_a_batch_of_four_scores_as_four_alone(tiny):
    """Bit for bit: rows of different lengths (below, at and past block boundaries) batched
    together score exactly what each scores alone."""
    B = tiny.block_size
    chat, aligned = _chat(tiny, QUESTION["question"]), _aligned_chat_context(tiny, B)
    cases = [
        (chat, "Noah"),
        (aligned, "B"),
        ("Question: 2 + 3?\nAnswer: ", "5"),
        ("Answer: ", "A"),
        (chat, "Noah has 9 * 17"),
        (aligned, "Noah"),
        ("Noah ", "has 9"),
    ]
    lengths = {len(sum(tiny._encode_pair(*c), [])) for c in cases}
    assert len(lengths) >= 4 and len(tiny._encode(aligned)) % B == 0
    batched = tiny.loglikelihood([_instance(c, i) for i, c in enumerate(cases)])
    alone = _tiny(1)
    assert alone.batch_size == 1 and tiny.batch_size == 4
    one_by_one = alone.loglikelihood([_instance(c, i) for i, c in enumerate(cases)])
    assert batched == one_by_one  # floats compared exactly
    singles = [alone.loglikelihood([_instance(c, 0)])[0] for c in cases]
    assert batched == singles


def test_loglikelihood_is_the_release_rule(lm):
    B, ids = lm.block_size, lm.ids
    # token pairs whose total length is below, at and above a block boundary, batched together
    pairs = [
        ([5 + i for i in range(n_ctx)], [40 + i for i in range(n_cont)])
        for n_ctx, n_cont in [(20, 3), (30, 2), (33, 4), (1, 1), (63, 1), (32, 1), (64, 2)]
    ]
    got = release_loglikelihood(lm.model, ids, [(list(c), list(x)) for c, x in pairs], B, 3)
    for (ctx, cont), (score, greedy) in zip(pairs, got, strict=True):
        ref_score, ref_greedy = _reference_score(lm.model, ids, list(ctx), list(cont), B)
        assert score == pytest.approx(ref_score, abs=1e-4) and greedy == ref_greedy

    # through lm_eval's interface: text requests
    tok = lm.tokenizer
    context, continuation = "Question: What is 2 + 3?\nAnswer:", " 2 + 3 = 5"
    ctx = tok.encode(context, add_special_tokens=False)
    whole = tok.encode(context + continuation, add_special_tokens=False)
    assert whole[: len(ctx)] == ctx
    reqs = [_instance((context, continuation), 0), _instance(("Question: 7 * 8?", " 56"), 1)]
    (score, greedy), _ = lm.loglikelihood(reqs)
    ref = _reference_score(lm.model, ids, ctx, whole[len(ctx) :], B)
    assert score == pytest.approx(ref[0], abs=1e-4) and greedy == ref[1]


def test_loglikelihood_rolling_is_not_supported(lm):
    req = Instance("loglikelihood_rolling", {}, ("text",), 0, metadata=("t", 0, 1))
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([req])


# ---- the tiny_mc task through lm_eval -------------------------------------------------------


def test_multiple_choice_task_with_chat_template(tiny, tmp_path):
    """`v2/eval.py --tasks tiny_mc --apply_chat_template`, run from a folder outside the
    repository: every context ends in "assistant\\n", the continuations are the bare letters,
    each logged score is the letter's (as scored in this process), and distinct choices get
    distinct scores, also for the question whose context fills its last block."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )  # fmt: skip
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(REPO / "v2" / "eval.py"),
        "--model",
        "fast_dllm_v2",
        "--model_args",
        f"pretrained={TINY},dtype=float32",
        "--tasks",
        "tiny_mc",
        "--apply_chat_template",
        "--batch_size",
        "4",
        "--log_samples",
        "--output_path",
        str(out),
    ]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    (samples_file,) = out.rglob("samples_tiny_mc_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    rows = [json.loads(line) for line in MC_TEST.read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(rows))) and len(rows) == 8

    B, enc = tiny.block_size, tiny._encode
    aligned = 0
    for s in samples:
        args = [s["arguments"][f"gen_args_{i}"] for i in range(4)]
        context = args[0]["arg_0"]
        assert all(a["arg_0"] == context for a in args)
        assert context.endswith("<|im_start|>assistant\n")
        assert rows[s["doc_id"]]["question"] in context
        assert [a["arg_1"] for a in args] == ["A", "B", "C", "D"]  # target delimiter ""
        scores = [float(resp[0][0]) for resp in s["resps"]]
        assert len(set(scores)) == 4, (s["doc_id"], scores)
        ctx = enc(context)
        aligned += len(ctx) % B == 0
        for letter, score in zip("ABCD", scores, strict=True):
            ref, _ = _reference_score(tiny.model, tiny.ids, ctx, enc(letter), B)
            assert score == pytest.approx(ref, abs=1e-4)
        best = max(range(4), key=scores.__getitem__)
        assert s["acc"] == float(best == rows[s["doc_id"]]["answer"])
    assert aligned == 1  # the fourth question: its letter opens a new block
