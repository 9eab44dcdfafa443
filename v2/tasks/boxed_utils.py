"""The GSM8K data of the `gsm8k_boxed` task: from the hub, or from a local GSM8K-format JSONL for
offline runs and tests. Its answers are scored by gsm_answers.py (the `\\boxed{...}` extraction
included)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import datasets

# A local file of {"question": ..., "answer": "... #### N"} lines replaces GSM8K's test split.
GSM8K_JSONL_ENV = "FAST_DLLM_GSM8K_JSONL"


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
