"""The graded ``hard`` problem family of v2/tiny/data.py and its committed splits."""

import random
import re
from pathlib import Path

import pytest

from v2.tiny import data

DATA = Path(data.__file__).parent / "data"
EQUATION = re.compile(r"<<(\d+)([-+*/])(\d+)=(\d+)>>")


@pytest.mark.parametrize("seed", range(8))
def test_solutions_are_right_for_many_seeds(seed: int) -> None:
    for family in data.FAMILIES:
        for p in data.make_split(300, seed=seed, family=family):
            n = data.check_solution(p["answer"])
            assert p["answer"].endswith(f"#### {n}") and p["question"].endswith("?")


def test_hard_family_is_graded() -> None:
    problems = data.make_split(4000, seed=5, family="hard")
    levels: dict[int, list[dict]] = {}
    for p in problems:
        levels.setdefault(p["level"], []).append(p)
    assert sorted(levels) == [0, 1, 2, 3]
    ops, lengths = set(), []
    for level, rows in sorted(levels.items()):
        lv = data.HARD_LEVELS[level]
        assert 0.2 < len(rows) / len(problems) < 0.3
        eqs = [EQUATION.findall(p["answer"]) for p in rows]
        assert all(2 <= len(e) <= data.MAX_HARD_EQUATIONS for e in eqs)
        for e in eqs:
            assert all(1 <= int(c) <= lv.max_result for *_, c in e)
            assert all(int(b) <= lv.max_factor for _, op, b, _ in e if op == "/")
            ops.update(op for _, op, _, _ in e)
        lengths.append(sum(len(e) for e in eqs) / len(eqs))
        # the top level multiplies and divides by two-digit factors
        if level == 3:
            assert any(op in "*/" and int(b) >= 10 for e in eqs for _, op, b, _ in e)
    assert ops == {"+", "-", "*", "/"}
    assert lengths == sorted(lengths) and lengths[-1] > lengths[0] + 2.5


def test_distractors_do_not_change_the_answer() -> None:
    with_any = 0
    for i in range(300):
        p = data.make_hard_problem(random.Random(i))
        core = data.make_hard_problem(random.Random(i), distractors=False)
        assert p["answer"] == core["answer"] and p["level"] == core["level"]
        sentences = re.split(r"(?<=[.?]) ", p["question"])
        core_sentences = re.split(r"(?<=[.?]) ", core["question"])
        extra = [s for s in sentences if s not in core_sentences]
        # the question is the core question with whole sentences inserted
        assert [s for s in sentences if s in core_sentences] == core_sentences
        assert len(extra) == len(sentences) - len(core_sentences)
        asked = re.search(r"How many (.+?) (?:does|are)|number of (.+?) that", core_sentences[-1])
        obj = asked[1] or asked[2]
        for s in extra:  # a distractor is about some other object
            assert f" {obj}" not in f" {s}", (s, obj)
        with_any += bool(extra)
    assert with_any > 150


def test_hard_splits_are_disjoint_and_committed() -> None:
    train, test, dev = data.hard_splits(3000, seed=0)
    q = [{p["question"] for p in split} for split in (train, test, dev)]
    assert len(q[0]) == 3000 and len(q[1]) == data.HARD_N_TEST and len(q[2]) == data.HARD_N_DEV
    assert not (q[0] & q[1] or q[0] & q[2] or q[1] & q[2])
    assert data.read_jsonl(DATA / "hard_test.jsonl") == test
    assert data.read_jsonl(DATA / "hard_dev.jsonl") == dev
    for path in ("hard_test.jsonl", "hard_dev.jsonl"):
        assert (DATA / path).stat().st_size < 1_000_000
        for row in data.read_jsonl(DATA / path):
            assert set(row) == {"question", "answer", "level"}
            data.check_solution(row["answer"])


def test_write_hard_splits_reproduces_committed_files(tmp_path: Path) -> None:
    paths = data.write_hard_splits(tmp_path, n_train=10)
    assert (paths["test"]).read_bytes() == (DATA / "hard_test.jsonl").read_bytes()
    assert (paths["dev"]).read_bytes() == (DATA / "hard_dev.jsonl").read_bytes()
    assert len(data.read_jsonl(paths["train"])) == 10


def test_basic_family_unchanged_by_the_family_argument(tmp_path: Path) -> None:
    assert data.make_split(50, seed=3) == data.make_split(50, seed=3, family="basic")
    _, test_path = data.write_splits(tmp_path, n_train=0, n_test=1000, seed=0)
    assert test_path.read_bytes() == (DATA / "test.jsonl").read_bytes()


def test_cli_hard(tmp_path: Path) -> None:
    data.main(["--out", str(tmp_path), "--family", "hard", "--n-train", "7"])
    assert len((tmp_path / "hard_train.jsonl").read_text().splitlines()) == 7
    assert len((tmp_path / "hard_test.jsonl").read_text().splitlines()) == 1000
