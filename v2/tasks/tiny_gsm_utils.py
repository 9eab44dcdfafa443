"""Dataset loader for the ``tiny_gsm`` lm_eval task (see ``tiny_gsm.yaml``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

# Resolved from this file, not the CWD, so ``--include_path v2/tasks`` works from anywhere.
TEST_JSONL = Path(__file__).resolve().parent.parent / "tiny" / "data" / "test.jsonl"


def load_dataset(**kwargs: Any) -> datasets.DatasetDict:
    """Return the committed test problems as a ``DatasetDict`` with a ``test`` split.

    lm_eval calls ``custom_dataset(**metadata, **dataset_kwargs)``; those kwargs (task
    version, model args passed via ``--metadata``) are irrelevant here and ignored.
    """
    with TEST_JSONL.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    # Built in memory: no download and no writes to the HF datasets cache.
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
