"""Dataset loader for the ``tiny_mc`` lm_eval task (tiny_mc.yaml): multiple-choice questions
from the tiny model's domain, scored by log-likelihood.

``v2/tiny/data/mc_test.jsonl`` holds 8 word problems of the committed test split
(``test.jsonl``), each with four choices: its answer and three distractors (numbers from its
worked solution, or the answer plus or minus a little, or doubled), shuffled with
``random.Random(24)``; ``answer`` is the index of the right choice. The fourth question's
chat-rendered prompt is 96 tokens with the tiny tokenizer, a multiple of the block size 32, so
its scored token opens a new block (the case where scoring the context's trailing "\\n" gave
all four choices one score).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

# Resolved from this file, not the CWD, so ``--include_path v2/tasks`` works from anywhere.
MC_TEST_JSONL = Path(__file__).resolve().parent.parent / "tiny" / "data" / "mc_test.jsonl"


def load_dataset(**kwargs: Any) -> datasets.DatasetDict:
    """The committed questions as a ``DatasetDict`` with a ``test`` split, built in memory (no
    download, nothing written to the datasets cache). lm_eval's keyword arguments (metadata)
    are ignored."""
    with MC_TEST_JSONL.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
