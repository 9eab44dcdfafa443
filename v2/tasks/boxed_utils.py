"""Helpers of the `gsm8k_boxed` and `tiny_gsm_boxed` tasks: the GSM8K data (from the hub, or from
a local GSM8K-format JSONL for offline runs and tests) and the filter that extracts the last
`\\boxed{...}` of a response."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import datasets

# A local file of {"question": ..., "answer": "... #### N"} lines replaces GSM8K's test split.
GSM8K_JSONL_ENV = "FAST_DLLM_GSM8K_JSONL"
INVALID = "[invalid]"
_NUMBER = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?")


def load_gsm8k(gsm8k_jsonl: str | None = None, **kwargs: Any) -> datasets.DatasetDict:
    """GSM8K `main` from the hub (train and test), unless a local JSONL is named by
    `--metadata gsm8k_jsonl=PATH` or the environment variable FAST_DLLM_GSM8K_JSONL: then its rows
    are the test split (and there is no train split, so no few-shot examples)."""
    path = gsm8k_jsonl or os.environ.get(GSM8K_JSONL_ENV)
    if path:
        with Path(path).expanduser().open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
    return datasets.load_dataset("openai/gsm8k", "main")


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
    removed; a single number inside it is returned alone ("\\$18 \\text{ dollars}" -> "18")."""
    inner = last_boxed(text if isinstance(text, str) else "")
    if inner is None:
        return INVALID
    inner = re.sub(r"\\text\{([^{}]*)\}", r"\1", inner)
    inner = inner.replace("\\$", "").replace("$", "").replace("\\!", "").replace("\\,", "")
    inner = inner.replace("\\%", "").strip()
    numbers = _NUMBER.findall(inner)
    return numbers[0] if len(numbers) == 1 else inner


def boxed_filter(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm_eval `custom` filter: every response -> its boxed answer."""
    return [[boxed_answer(r) for r in inst] for inst in resps]
