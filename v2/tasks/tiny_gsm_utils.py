"""Dataset loaders for the ``tiny_gsm`` and ``tiny_gsm_hard`` lm_eval tasks (their YAML files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

# Resolved from this file, not the CWD, so ``--include_path v2/tasks`` works from anywhere.
DATA = Path(__file__).resolve().parent.parent / "tiny" / "data"
TEST_JSONL = DATA / "test.jsonl"
HARD_TEST_JSONL = DATA / "hard_test.jsonl"


def _from_jsonl(path: Path) -> datasets.DatasetDict:
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    # Built in memory: no download and no writes to the HF datasets cache.
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_dataset(**kwargs: Any) -> datasets.DatasetDict:
    """Return the committed test problems as a ``DatasetDict`` with a ``test`` split.

    lm_eval calls ``custom_dataset(**metadata, **dataset_kwargs)``; those kwargs (task
    version, model args passed via ``--metadata``) are irrelevant here and ignored.
    """
    return _from_jsonl(TEST_JSONL)


def load_hard_dataset(**kwargs: Any) -> datasets.DatasetDict:
    """The committed hard test problems (``hard_test.jsonl``), like :func:`load_dataset`."""
    return _from_jsonl(HARD_TEST_JSONL)
