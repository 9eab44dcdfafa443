"""The one scorer of GSM8K-style answers (a reference ends in `#### N`).

Every path that scores a tiny_gsm / GSM8K answer calls this module, so that a setting is chosen
on the scorer that reports it:

- the lm_eval tasks (tiny_gsm, tiny_gsm_hard, tiny_gsm_boxed, gsm8k_boxed YAMLs): their filters
  are `strict_filter`, `flexible_filter` and `boxed_filter`, their metric is `exact_match`;
- the direct backend (v2/runs/direct.py) and the training script's evaluation (v2/tiny/train.py
  `score`), through `hits`;
- the tuner (v2/tune.py), through `hits` (its accuracy is the strict one).

The definitions are lm_eval gsm8k's (lm_eval/tasks/gsm8k/gsm8k.yaml), checked against that file's
own regexes and lm_eval's filter and metric code in tests/test_gsm_answers.py:

- strict-match: the FIRST `#### N` (`STRICT`), stripped; `INVALID` where there is none;
- flexible-extract: the LAST number-like run (`FLEXIBLE`, its first non-empty group), stripped;
- boxed: the content of the LAST `\\boxed{...}` (gsm8k_boxed's; LaTeX money/text wrappers
  removed, a single number alone);
- exact_match: answer and reference both cleaned up by `CLEAN_UP` (each regex removed in turn:
  commas, `$`, everything up to the last `#### `, one trailing period), lower-cased, then equal.
  Nothing else is stripped: `" 7"` is not `"7"`, as in lm_eval.

lm_eval loads this file by its path (`!function gsm_answers.NAME` in a YAML next to it); the
rest of the package imports it as `v2.tasks.gsm_answers`. It needs nothing but `re`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

INVALID = "[invalid]"  # lm_eval's RegexFilter fallback: what a response without an answer gives
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# exact_match's regexes_to_ignore, applied in this order to answer and reference alike
CLEAN_UP = tuple(re.compile(p) for p in (",", r"\$", r"(?s).*#### ", r"\.$"))
_NUMBER = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?")


# ---- extraction (lm_eval's filters) -----------------------------------------------------------


def strict_match(text: str) -> str:
    """The first `#### N` of a response (N as written, "1,234." included), or INVALID."""
    found = STRICT.findall(text if isinstance(text, str) else "")
    return found[0].strip() if found else INVALID


def flexible_extract(text: str) -> str:
    """The last number-like run of a response ("$1,234." included), or INVALID."""
    found = FLEXIBLE.findall(text if isinstance(text, str) else "")
    if not found:
        return INVALID
    groups = [g for g in found[-1] if g]
    return groups[0].strip() if groups else INVALID


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def boxed_answer(text: str) -> str:
    """The final answer of a response: the last \\boxed{} content, with LaTeX money/text wrappers
    removed; a single number inside it is returned alone ("\\$18 \\text{ dollars}" -> "18");
    INVALID where there is none."""
    inner = last_boxed(text if isinstance(text, str) else "")
    if inner is None:
        return INVALID
    inner = re.sub(r"\\text\{([^{}]*)\}", r"\1", inner)
    inner = inner.replace("\\$", "").replace("$", "").replace("\\!", "").replace("\\,", "")
    inner = inner.replace("\\%", "").strip()
    numbers = _NUMBER.findall(inner)
    return numbers[0] if len(numbers) == 1 else inner


# filter name (as in the YAMLs and the records' metric keys) -> extraction
EXTRACT = {
    "strict-match": strict_match,
    "flexible-extract": flexible_extract,
    "boxed": boxed_answer,
}


# ---- comparison (lm_eval's exact_match with gsm8k's settings) --------------------------------


def clean(text: str) -> str:
    """exact_match's clean-up of an answer or a reference (module docstring)."""
    for pattern in CLEAN_UP:
        text = pattern.sub("", text)
    return text.lower()


def target(reference: str) -> str:
    """What a reference ("... #### 1,234") is compared as: "1234"."""
    return clean(reference)


def correct(answer: str, reference: str) -> bool:
    """Whether an extracted answer (a filter's output) equals the reference's."""
    return clean(answer) == target(reference)


def hits(text: str, reference: str, filters: Sequence[str] = ("strict-match", "flexible-extract")):
    """Per filter, whether a response's answer is right: {filter name: bool}."""
    return {name: correct(EXTRACT[name](text), reference) for name in filters}


# ---- lm_eval glue (named by the task YAMLs) ---------------------------------------------------


def strict_filter(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm_eval `custom` filter: every response -> its strict-match answer."""
    return [[strict_match(r) for r in inst] for inst in resps]


def flexible_filter(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm_eval `custom` filter: every response -> its flexible-extract answer."""
    return [[flexible_extract(r) for r in inst] for inst in resps]


def boxed_filter(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm_eval `custom` filter: every response -> its boxed answer."""
    return [[boxed_answer(r) for r in inst] for inst in resps]


def exact_match(references: Sequence[str], predictions: Sequence[str], **_) -> float:
    """lm_eval metric (`metric: !function gsm_answers.exact_match`; the name keys the results as
    `exact_match,<filter>`): the share of predictions equal to their reference."""
    pairs = list(zip(predictions, references, strict=True))
    return sum(correct(p, r) for p, r in pairs) / len(pairs)
