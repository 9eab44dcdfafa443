"""One accuracy with standard error (v2.record.accuracy), lm_eval's convention: the sample standard
deviation / sqrt(n); none at n = 1 (lm_eval's "N/A", recorded as None), nothing at n = 0. The
direct backend's metrics, the training script's evaluation and the tuner use it (the direct
backend's n = 1 record: tests/test_direct.py)."""

from __future__ import annotations

import json
import math
import random

import pytest
from lm_eval.api.metrics import mean, mean_stderr

from v2.record import accuracy


def test_no_problem_measures_nothing():
    assert accuracy([]) == {"value": None, "stderr": None}


def test_one_problem_has_no_standard_error():
    assert accuracy([True]) == {"value": 1.0, "stderr": None}
    assert accuracy([False]) == {"value": 0.0, "stderr": None}
    assert json.loads(json.dumps(accuracy([False]))) == {"value": 0.0, "stderr": None}  # JSON


def test_two_problems():
    assert accuracy([True, False]) == {"value": 0.5, "stderr": 0.5}  # sqrt(.5 * .5 / 1)
    assert accuracy([True, True]) == {"value": 1.0, "stderr": 0.0}


@pytest.mark.parametrize("n", [2, 3, 10, 999, 1000])
def test_it_is_lm_evals_mean_and_stderr(n):
    scores = [random.Random(n).random() < 0.7 for _ in range(n)]
    got = accuracy(scores)
    floats = [float(s) for s in scores]
    assert got == {"value": mean(floats), "stderr": mean_stderr(floats)}  # bit for bit
    p = sum(scores) / n
    assert got["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))


def test_the_training_evaluation_uses_it():
    from v2.tiny import train as tr

    assert tr._accuracy([True]) == {"accuracy": 1.0, "stderr": None}  # was NaN
    scores = [i % 3 == 0 for i in range(50)]
    m = accuracy(scores)
    assert tr._accuracy(scores) == {"accuracy": m["value"], "stderr": m["stderr"]}


def test_the_tuner_uses_it():
    from types import SimpleNamespace

    from v2.runs.spec import build_specs
    from v2.stats import Stats
    from v2.tune import evaluate

    def baseline(batch_size: int):
        data = {"pretrained": "x", "tasks": ["tiny_gsm"], "grid": [{"policy": "none"}]}
        (spec,) = build_specs(data, runner="direct", batch_size=batch_size, max_new_tokens=8)
        return spec

    class LM:
        def generate(self, texts, config, policy, chat, engine=None):
            outputs = [SimpleNamespace(text=f"#### {t[-9]}") for t in texts]  # q0 -> 0, ...
            return SimpleNamespace(outputs=outputs, stats=Stats(1))

    problems = [{"question": f"q{i}", "answer": "#### 1"} for i in range(4)]
    one = evaluate(LM(), problems[1:2], baseline(2), False)
    assert one["accuracy"] == 100.0 and one["accuracy_stderr"] is None
    four = evaluate(LM(), problems, baseline(3), False)
    m = accuracy([False, True, False, False])
    assert four["accuracy"] == 100 * m["value"] and four["accuracy_stderr"] == 100 * m["stderr"]
