"""Tests for the synthetic GSM8K-style data generator (v2/tiny/data.py)."""

import json
import random
import re
from pathlib import Path

import pytest

from v2.tiny import data

COMMITTED_TEST = Path(data.__file__).parent / "data" / "test.jsonl"


def test_same_seed_same_problems() -> None:
    assert data.make_split(50, seed=3) == data.make_split(50, seed=3)
    assert data.make_problem(random.Random(7)) == data.make_problem(random.Random(7))


def test_different_seed_different_problems() -> None:
    assert data.make_split(50, seed=3) != data.make_split(50, seed=4)


def test_generated_solutions_are_correct() -> None:
    problems = data.make_split(500, seed=11)
    ops = set()
    for p in problems:
        n = data.check_solution(p["answer"])
        equations = re.findall(r"<<(\d+)([-+*/])(\d+)=(\d+)>>", p["answer"])
        assert 2 <= len(equations) <= 4
        assert all(0 <= int(c) <= data.MAX_RESULT for *_, c in equations)
        assert p["answer"].endswith(f"#### {n}")
        assert p["question"].endswith("?")
        ops.update(op for _, op, _, _ in equations)
    assert ops == {"+", "-", "*", "/"}


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda a: a.replace("#### ", "#### 1"),  # final answer differs from last result
        lambda a: a.rsplit("\n", 1)[0],  # no final line
        lambda a: re.sub(r"=(\d+)>>", lambda m: f"={int(m[1]) + 1}>>", a, count=1),
        lambda a: "No equations here.\n#### 5",
    ],
)
def test_check_solution_rejects_corrupted(corrupt) -> None:
    answer = data.make_split(1, seed=0)[0]["answer"]
    data.check_solution(answer)
    with pytest.raises(ValueError):
        data.check_solution(corrupt(answer))


def test_check_solution_rejects_inexact_division() -> None:
    with pytest.raises(ValueError):
        data.check_solution("Split 7 / 2 = <<7/2=3>>3 apples.\n#### 3")
    assert data.check_solution("Split 8 / 2 = <<8/2=4>>4 apples.\n#### 4") == 4


def test_write_splits_disjoint_and_reproduces_committed(tmp_path: Path) -> None:
    train_path, test_path = data.write_splits(tmp_path, n_train=2000, n_test=1000, seed=0)
    train, test = data.read_jsonl(train_path), data.read_jsonl(test_path)
    assert len(train) == 2000 and len(test) == 1000
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    # The committed file is exactly what seed 0 generates, so training can regenerate it.
    assert test_path.read_bytes() == COMMITTED_TEST.read_bytes()


def test_write_splits_without_train(tmp_path: Path) -> None:
    train_path, test_path = data.write_splits(tmp_path, n_train=0, n_test=10, seed=1)
    assert not train_path.exists()
    assert len(data.read_jsonl(test_path)) == 10


def test_cli(tmp_path: Path) -> None:
    data.main(["--out", str(tmp_path), "--n-train", "20", "--n-test", "5", "--seed", "2"])
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 20
    assert len((tmp_path / "test.jsonl").read_text().splitlines()) == 5


def test_committed_test_set() -> None:
    rows = [json.loads(line) for line in COMMITTED_TEST.read_text().splitlines()]
    assert len(rows) >= 1000
    assert len({r["question"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == {"question", "answer"}
        data.check_solution(r["answer"])
