"""Synthetic multi-step arithmetic word problems in GSM8K's format.

Every problem follows one quantity (a person's pile of objects) through 2 to 4 arithmetic
steps. The answer has one line per step with a GSM8K calculator annotation such as
``Tom has 3 + 4 = <<3+4=7>>7 apples.`` and ends with ``#### N``. Numbers stay small (operands
up to ~100, multipliers and divisors of one digit, results below 1000) so that a tiny model can
actually learn the arithmetic.

A second family, ``hard`` (:func:`make_hard_problem`), is graded in difficulty inside one split:
each problem draws a level 0..3 (:data:`HARD_LEVELS`) that sets its chain length (2 to 6
operations, at most 6 equations, so an answer fits 256 new tokens), number sizes (results up to
9999), multipliers and divisors (up to 19 at the top level), how often a step is a compound
one (``k`` groups of ``b`` added or removed: two equations) and how many distractor sentences
(facts about other people's other objects that the solution ignores) are mixed into the
question. Its rows carry their ``level``.

CLI: ``python -m v2.tiny.data --out DIR --n-train 200000 --n-test 1000 --seed 0``
(``--family hard`` writes ``hard_test.jsonl`` and ``hard_dev.jsonl`` too)
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

MAX_OPERAND = 100
MAX_RESULT = 999
MAX_FACTOR = 9  # multipliers and divisors are 2..MAX_FACTOR: one-digit multiplication only

NAMES = [
    "Tom", "Anna", "Liam", "Mia", "Noah", "Emma", "Omar", "Sofia", "Ravi", "Chloe",
    "Lucas", "Ava", "Kenji", "Zara", "Mateo", "Lily", "Ethan", "Nora", "Ivan", "Grace",
    "Samir", "Julia", "Ben", "Hana", "Leo", "Maya", "Finn", "Aisha", "Jack", "Elena",
]  # fmt: skip

OBJECTS = [
    "apples", "marbles", "stickers", "books", "pencils", "cookies", "coins", "cards",
    "stamps", "shells", "balloons", "cupcakes", "crayons", "beads", "toy cars", "eggs",
    "flowers", "buttons", "candies", "rocks", "oranges", "feathers", "postcards", "blocks",
    "muffins", "ribbons", "keys", "puzzles", "comics", "lemons",
]  # fmt: skip

# Each step template is (question sentence, answer sentence). ``{eq}`` expands to
# ``a op b = <<a op b=c>>c``; ``{other}`` is a second person, never ``{name}``.
ADD = [
    ("{name} buys {b} more {obj}.", "After buying more, {name} has {eq} {obj}."),
    ("{other} gives {name} {b} {obj}.", "After the gift, {name} has {eq} {obj}."),
    ("{name} finds {b} more {obj}.", "{name} then has {eq} {obj}."),
    ("Then {name} receives {b} {obj} as a present.", "With the present, {name} has {eq} {obj}."),
    ("{name} collects another {b} {obj}.", "Now {name} has {eq} {obj}."),
    ("{name} wins {b} {obj} in a game.", "After winning, {name} has {eq} {obj}."),
    ("{other} adds {b} {obj} to {name}'s pile.", "The pile now holds {eq} {obj}."),
    ("{name} picks up {b} extra {obj}.", "That makes {eq} {obj}."),
    ("The next day {name} gets {b} more {obj}.", "The next day {name} has {eq} {obj}."),
    ("{name} trades for {b} additional {obj}.", "After the trade, {name} has {eq} {obj}."),
]
SUB = [
    ("{name} gives {b} {obj} to {other}.", "After giving some away, {name} has {eq} {obj}."),
    ("{name} loses {b} {obj}.", "After losing some, {name} has {eq} {obj}."),
    ("{name} sells {b} {obj}.", "After selling, {name} has {eq} {obj}."),
    ("{other} borrows {b} of the {obj}.", "{name} is left with {eq} {obj}."),
    ("{name} uses {b} {obj} for a project.", "After the project, {name} has {eq} {obj}."),
    ("{b} of the {obj} get lost.", "Without the lost ones, {name} has {eq} {obj}."),
    ("{name} donates {b} {obj} to a school.", "After donating, {name} has {eq} {obj}."),
    ("{name} throws away {b} {obj}.", "{name} keeps {eq} {obj}."),
    ("{other} takes {b} {obj} from {name}.", "{name} still has {eq} {obj}."),
    ("{name} mails {b} {obj} to a cousin.", "After mailing them, {name} has {eq} {obj}."),
]
MUL = [
    ("{name} then gets {b} times as many {obj} as before.", "{name} now has {eq} {obj}."),
    ("{name}'s collection of {obj} grows to {b} times its size.", "It grows to {eq} {obj}."),
    (
        "Each of {name}'s {obj} is swapped for {b} new ones.",
        "After the swap, {name} has {eq} {obj}.",
    ),
    ("{name} multiplies the number of {obj} by {b}.", "{name} now has {eq} {obj}."),
    ("{other} helps {name} get {b} times the amount of {obj}.", "Now {name} has {eq} {obj}."),
    ("{name}'s pile of {obj} becomes {b} times bigger.", "The pile becomes {eq} {obj}."),
    ("By the end of the week, {name} has {b} times as many {obj}.", "That is {eq} {obj}."),
    ("A machine turns each of {name}'s {obj} into {b} {obj}.", "The machine makes {eq} {obj}."),
    ("{name} ends up with {b} times that many {obj}.", "{name} ends up with {eq} {obj}."),
    ("{name} now has {b} times the {obj} from before.", "{name} has {eq} {obj}."),
]  # fmt: skip
DIV = [
    ("{name} shares the {obj} equally among {b} friends and keeps one share.",
     "One share is {eq} {obj}."),
    ("{name} splits the {obj} into {b} equal piles and keeps one pile.",
     "One pile has {eq} {obj}."),
    ("{name} keeps only 1/{b} of the {obj}.", "{name} keeps {eq} {obj}."),
    ("{name} packs the {obj} into {b} equal bags and gives away all but one bag.",
     "One bag holds {eq} {obj}."),
    ("{name} divides the {obj} evenly among {b} boxes and keeps one box.",
     "One box has {eq} {obj}."),
    ("{name} puts the {obj} in {b} equal rows and keeps just one row.",
     "One row has {eq} {obj}."),
    ("{name} keeps one out of every {b} {obj} and gives the rest away.",
     "{name} keeps {eq} {obj}."),
    ("{name} divides the {obj} into {b} equal groups, and {other} takes all groups but one.",
     "{name} keeps {eq} {obj}."),
    ("{name} hands the {obj} out evenly to {b} tables and sits at one of them.",
     "That table gets {eq} {obj}."),
    ("{name} cuts the pile of {obj} into {b} equal parts and keeps one part.",
     "One part is {eq} {obj}."),
]  # fmt: skip

# Openings without arithmetic: the first step of the answer is then the first operation.
STARTS = [
    "{name} has {a} {obj}.",
    "{name} starts with {a} {obj}.",
    "{name} owns {a} {obj}.",
    "There are {a} {obj} in {name}'s bag.",
    "{name} has a box of {a} {obj}.",
]
# Openings that are themselves a multiplication step.
PRODUCT_STARTS = [
    ("{name} has {a} bags with {b} {obj} in each.", "{name} starts with {eq} {obj}."),
    ("{name} has {a} boxes of {obj} with {b} in each box.", "{name} starts with {eq} {obj}."),
    ("{name} buys {a} packs of {obj}, and each pack has {b}.", "{name} buys {eq} {obj}."),
    ("There are {a} shelves with {b} {obj} on each for {name}.", "{name} has {eq} {obj}."),
]
QUESTIONS = [
    "How many {obj} does {name} have now?",
    "How many {obj} does {name} have at the end?",
    "How many {obj} does {name} end up with?",
    "How many {obj} are left for {name}?",
    "What is the final number of {obj} that {name} has?",
    "How many {obj} does {name} have in the end?",
    "How many {obj} does {name} own after all this?",
    "How many {obj} does {name} have after these steps?",
]

_OPS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a // b,
}


def _equation(a: int, op: str, b: int) -> tuple[str, int]:
    """Return the GSM8K-style text ``a op b = <<a op b=c>>c`` and the result c."""
    c = _OPS[op](a, b)
    return f"{a} {op} {b} = <<{a}{op}{b}={c}>>{c}", c


def _choose_step(rng: random.Random, a: int) -> tuple[str, int] | None:
    """Pick an operation and operand that keep every number small, integral and non-negative."""
    choices: list[tuple[str, int]] = []
    if a + 1 <= MAX_RESULT:
        choices.append(("+", rng.randint(1, min(MAX_OPERAND, MAX_RESULT - a))))
    if a >= 2:  # keep at least one object so later steps still make sense
        choices.append(("-", rng.randint(1, min(MAX_OPERAND, a - 1))))
    if 2 <= a <= MAX_OPERAND and a * 2 <= MAX_RESULT:
        choices.append(("*", rng.randint(2, min(MAX_FACTOR, MAX_RESULT // a))))
    divisors = [d for d in range(2, MAX_FACTOR + 1) if a % d == 0]
    if divisors:
        choices.append(("/", rng.choice(divisors)))
    return rng.choice(choices) if choices else None


def make_problem(rng: random.Random) -> dict[str, str]:
    """Generate one problem ``{"question": ..., "answer": ...}`` using only ``rng``."""
    name, other = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    n_steps = rng.randint(2, 4)
    fields = {"name": name, "other": other, "obj": obj}
    q_lines: list[str] = []
    a_lines: list[str] = []

    if rng.random() < 0.3:
        q_tpl, a_tpl = rng.choice(PRODUCT_STARTS)
        x, y = rng.randint(2, MAX_FACTOR), rng.randint(2, 25)
        eq, value = _equation(x, "*", y)
        q_lines.append(q_tpl.format(a=x, b=y, **fields))
        a_lines.append(a_tpl.format(eq=eq, **fields))
        n_steps -= 1
    else:
        value = rng.randint(2, MAX_OPERAND)
        q_lines.append(rng.choice(STARTS).format(a=value, **fields))

    templates = {"+": ADD, "-": SUB, "*": MUL, "/": DIV}
    for _ in range(n_steps):
        step = _choose_step(rng, value)
        assert step is not None, "every value >= 1 admits at least an addition"
        op, b = step
        q_tpl, a_tpl = rng.choice(templates[op])
        eq, value = _equation(value, op, b)
        q_lines.append(q_tpl.format(b=b, **fields))
        a_lines.append(a_tpl.format(eq=eq, **fields))

    q_lines.append(rng.choice(QUESTIONS).format(**fields))
    a_lines.append(f"#### {value}")
    return {"question": " ".join(q_lines), "answer": "\n".join(a_lines)}


# ---- the graded "hard" family ----------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """How hard one problem of the ``hard`` family is."""

    steps: tuple[int, int]  # operations, opening product included (compound steps count once)
    max_start: int  # the opening amount
    max_operand: int  # added / removed amounts and group sizes
    max_result: int  # every intermediate value stays in 1..max_result
    max_factor: int  # multipliers and divisors are 2..max_factor
    compound: float  # probability that a step is "k groups of b" (two equations)
    distractors: tuple[int, int]  # irrelevant sentences in the question


# Level 0 is the basic family's range; each level up adds length, digits, two-digit factors,
# compound steps and distractors, so accuracy falls by level rather than all at once.
HARD_LEVELS = (
    Level(steps=(2, 3), max_start=100, max_operand=100, max_result=999, max_factor=9,
          compound=0.0, distractors=(0, 1)),
    Level(steps=(3, 4), max_start=300, max_operand=200, max_result=1999, max_factor=9,
          compound=0.15, distractors=(0, 2)),
    Level(steps=(4, 5), max_start=1000, max_operand=500, max_result=4999, max_factor=12,
          compound=0.2, distractors=(1, 2)),
    Level(steps=(5, 6), max_start=2000, max_operand=1000, max_result=9999, max_factor=19,
          compound=0.25, distractors=(1, 3)),
)  # fmt: skip

MAX_HARD_EQUATIONS = 6  # answer lines with an equation, compound steps' two included

# Compound steps: (question, answer line of the k * b product, answer line of the update).
GROUP_ADD = [
    ("{name} buys {k} packs of {obj} with {b} in each pack.",
     "The packs hold {eq1} {obj}.", "{name} now has {eq2} {obj}."),
    ("{other} gives {name} {k} bags with {b} {obj} in each.",
     "The bags hold {eq1} {obj}.", "After the gift, {name} has {eq2} {obj}."),
    ("{name} collects {b} {obj} every day for {k} days.",
     "In {k} days {name} collects {eq1} {obj}.", "{name} then has {eq2} {obj}."),
    ("{name} wins {k} boxes of {obj}, and each box has {b}.",
     "The boxes hold {eq1} {obj}.", "After winning, {name} has {eq2} {obj}."),
]  # fmt: skip
GROUP_SUB = [
    ("{name} gives {b} {obj} to each of {k} friends.",
     "The friends get {eq1} {obj}.", "{name} has {eq2} {obj} left."),
    ("{name} sells {k} bags of {obj} with {b} in each bag.",
     "The bags hold {eq1} {obj}.", "After selling, {name} has {eq2} {obj}."),
    ("{name} uses {b} {obj} a day for {k} days.",
     "In {k} days {name} uses {eq1} {obj}.", "{name} is left with {eq2} {obj}."),
    ("{name} packs {k} boxes with {b} {obj} each and mails them away.",
     "The boxes hold {eq1} {obj}.", "{name} keeps {eq2} {obj}."),
]  # fmt: skip
# Facts the solution ignores: always another object ({obj2}), often another person ({third}).
DISTRACTORS = [
    "{third} has {k} {obj2}.",
    "{third} buys {k} {obj2} at the market.",
    "{third} loses {k} {obj2}.",
    "{name} also has {k} {obj2}.",
    "{third} gives {name} {k} {obj2}.",
    "{name} sells {k} {obj2} to {third}.",
    "There are {k} {obj2} in {third}'s bag.",
    "{third} has {k} bags with {k2} {obj2} in each.",
    "{third} is {k2} years old.",
    "{third} finds {k} {obj2} and keeps {k2} of them.",
]


def _choose_hard_step(rng: random.Random, a: int, lv: Level) -> tuple[str, int]:
    """Like :func:`_choose_step` within the limits of ``lv``."""
    choices: list[tuple[str, int]] = []
    if a < lv.max_result:
        choices.append(("+", rng.randint(1, min(lv.max_operand, lv.max_result - a))))
    if a >= 2:
        choices.append(("-", rng.randint(1, min(lv.max_operand, a - 1))))
    if min(lv.max_factor, lv.max_result // a) >= 2:
        choices.append(("*", rng.randint(2, min(lv.max_factor, lv.max_result // a))))
    divisors = [d for d in range(2, lv.max_factor + 1) if a % d == 0]
    if divisors:
        choices.append(("/", rng.choice(divisors)))
    return rng.choice(choices)


def _compound_step(rng: random.Random, a: int, lv: Level) -> tuple[str, int, int] | None:
    """("+" or "-", k, b) with k groups of b that keep ``a`` within 1..max_result, or None."""
    k = rng.randint(2, min(9, lv.max_factor))
    b = rng.randint(2, max(2, min(lv.max_operand // k, 50)))
    ops = [op for op, c in (("+", a + k * b), ("-", a - k * b)) if 1 <= c <= lv.max_result]
    return (rng.choice(ops), k, b) if ops else None


def make_hard_problem(rng: random.Random, distractors: bool = True) -> dict:
    """One problem of the graded ``hard`` family, ``{"question", "answer", "level"}``.

    The distractor sentences are drawn from their own generator (seeded from ``rng`` whether or
    not they are used), so ``distractors=False`` gives the same problem without them.
    """
    level = rng.randrange(len(HARD_LEVELS))
    lv = HARD_LEVELS[level]
    d_rng = random.Random(rng.getrandbits(64))
    name, other, third = rng.sample(NAMES, 3)
    obj, obj2 = rng.sample(OBJECTS, 2)
    fields = {"name": name, "other": other, "obj": obj}
    n_steps = rng.randint(*lv.steps)
    q_lines: list[str] = []
    a_lines: list[str] = []

    if rng.random() < 0.3:
        q_tpl, a_tpl = rng.choice(PRODUCT_STARTS)
        x = rng.randint(2, lv.max_factor)
        y = rng.randint(2, max(25, min(lv.max_operand, lv.max_result // x) // 4))
        eq, value = _equation(x, "*", y)
        q_lines.append(q_tpl.format(a=x, b=y, **fields))
        a_lines.append(a_tpl.format(eq=eq, **fields))
        n_steps -= 1
    else:
        value = rng.randint(2, lv.max_start)
        q_lines.append(rng.choice(STARTS).format(a=value, **fields))

    templates = {"+": ADD, "-": SUB, "*": MUL, "/": DIV}
    for i in range(n_steps):
        compound = _compound_step(rng, value, lv) if rng.random() < lv.compound else None
        if len(a_lines) + (n_steps - i) + 1 > MAX_HARD_EQUATIONS:  # keeps within max_new_tokens
            compound = None
        if compound is not None:
            op, k, b = compound
            q_tpl, a1_tpl, a2_tpl = rng.choice(GROUP_ADD if op == "+" else GROUP_SUB)
            eq1, groups = _equation(k, "*", b)
            eq2, value = _equation(value, op, groups)
            q_lines.append(q_tpl.format(k=k, b=b, **fields))
            a_lines.append(a1_tpl.format(k=k, eq1=eq1, **fields))
            a_lines.append(a2_tpl.format(eq2=eq2, **fields))
            continue
        op, b = _choose_hard_step(rng, value, lv)
        q_tpl, a_tpl = rng.choice(templates[op])
        eq, value = _equation(value, op, b)
        q_lines.append(q_tpl.format(b=b, **fields))
        a_lines.append(a_tpl.format(eq=eq, **fields))

    n_distractors = d_rng.randint(*lv.distractors)
    if distractors:
        for _ in range(n_distractors):
            sentence = d_rng.choice(DISTRACTORS).format(
                name=name,
                third=third,
                obj2=obj2,
                k=d_rng.randint(2, lv.max_operand),
                k2=d_rng.randint(2, 12),
            )
            q_lines.insert(d_rng.randint(0, len(q_lines)), sentence)
    q_lines.append(rng.choice(QUESTIONS).format(**fields))
    a_lines.append(f"#### {value}")
    return {"question": " ".join(q_lines), "answer": "\n".join(a_lines), "level": level}


FAMILIES: dict[str, Callable[[random.Random], dict]] = {
    "basic": make_problem,
    "hard": make_hard_problem,
}


def make_split(
    n: int, seed: int, exclude: Iterable[str] = frozenset(), family: str = "basic"
) -> list[dict]:
    """``n`` problems of ``family`` (:data:`FAMILIES`) with unique questions, none in
    ``exclude``; deterministic in ``seed``.

    Problems are drawn sequentially, so ``make_split(k, s)`` is a prefix of ``make_split(n, s)``.
    """
    make = FAMILIES[family]
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[dict[str, str]] = []
    max_tries = 100 * n + 1000  # the problem space is huge; this only guards against bugs
    with tqdm(total=n, desc=f"problems (seed {seed})", disable=n < 50_000) as bar:
        for _ in range(max_tries):
            if len(out) >= n:
                break
            problem = make(rng)
            if problem["question"] in seen:
                continue
            seen.add(problem["question"])
            out.append(problem)
            bar.update(1)
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} unique problems after {max_tries} tries")
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict[str, str]]:
    """Load a JSONL file written by :func:`write_splits`."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_splits(out_dir: Path, n_train: int, n_test: int, seed: int) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` under ``out_dir``; return their paths.

    The test split is generated first (seed ``2 * seed + 1``) and the train split (seed
    ``2 * seed``) excludes its questions, so regenerating train with the same ``seed`` and
    ``n_test`` never leaks the committed test set. With ``n_train == 0`` no train file is
    written (its path is still returned).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, test_path = out_dir / "train.jsonl", out_dir / "test.jsonl"
    test = make_split(n_test, seed=2 * seed + 1)
    _write_jsonl(test_path, test)
    if n_train > 0:
        train = make_split(n_train, seed=2 * seed, exclude={p["question"] for p in test})
        _write_jsonl(train_path, train)
    return train_path, test_path


HARD_SEED = 1000  # the hard family's seeds are HARD_SEED + 3 * seed + (0 train, 1 test, 2 dev)
HARD_N_TEST = 1000
HARD_N_DEV = 256


def hard_splits(
    n_train: int, seed: int = 0, n_test: int = HARD_N_TEST, n_dev: int = HARD_N_DEV
) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, test, dev) of the hard family, pairwise disjoint in questions: test first, dev
    excludes test, train excludes both. The committed ``hard_test.jsonl`` and ``hard_dev.jsonl``
    are seed 0's test and dev."""
    base = HARD_SEED + 3 * seed
    test = make_split(n_test, seed=base + 1, family="hard")
    seen = {p["question"] for p in test}
    dev = make_split(n_dev, seed=base + 2, exclude=seen, family="hard")
    seen |= {p["question"] for p in dev}
    train = make_split(n_train, seed=base, exclude=seen, family="hard") if n_train else []
    return train, test, dev


def write_hard_splits(out_dir: Path, n_train: int, seed: int = 0) -> dict[str, Path]:
    """Write ``hard_test.jsonl``, ``hard_dev.jsonl`` and (``n_train > 0``) ``hard_train.jsonl``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test, dev = hard_splits(n_train, seed)
    paths = {}
    for name, rows in (("test", test), ("dev", dev), ("train", train)):
        if rows:
            paths[name] = out_dir / f"hard_{name}.jsonl"
            _write_jsonl(paths[name], rows)
    return paths


_EQUATION = re.compile(r"<<([^<>]*)>>")
_EXPR = re.compile(r"^\s*(-?\d+)\s*([-+*/])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
_FINAL = re.compile(r"^#### (-?\d+)$")


def check_solution(answer: str) -> int:
    """Verify every ``<<a op b=c>>`` equation and the final ``#### N``; return N.

    Raises ValueError if an equation is malformed or wrong, a division is inexact, or the
    final answer is missing or differs from the last equation's result.
    """
    lines = answer.strip().split("\n")
    final = _FINAL.match(lines[-1].strip())
    if final is None:
        raise ValueError(f"last line is not '#### N': {lines[-1]!r}")
    results: list[int] = []
    for line in lines[:-1]:
        for match in _EQUATION.finditer(line):
            expr = _EXPR.match(match.group(1))
            if expr is None:
                raise ValueError(f"malformed equation: {match.group(0)!r}")
            a, op, b, c = int(expr[1]), expr[2], int(expr[3]), int(expr[4])
            if op == "/" and (b == 0 or a % b != 0):
                raise ValueError(f"inexact division: {match.group(0)!r}")
            if _OPS[op](a, b) != c:
                raise ValueError(f"wrong arithmetic: {match.group(0)!r}")
            if not line[match.end() :].startswith(str(c)):
                raise ValueError(f"result not repeated after equation: {line!r}")
            results.append(c)
    if not results:
        raise ValueError("no <<...>> equations found")
    n = int(final.group(1))
    if n != results[-1]:
        raise ValueError(f"final answer {n} != last equation result {results[-1]}")
    return n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="basic")
    parser.add_argument("--n-train", type=int, default=200_000)
    parser.add_argument("--n-test", type=int, default=1000, help="basic family only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.family == "hard":
        paths = write_hard_splits(args.out, args.n_train, args.seed)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return
    train_path, test_path = write_splits(args.out, args.n_train, args.n_test, args.seed)
    print(f"wrote {test_path} ({args.n_test})" + (f" and {train_path}" if args.n_train else ""))


if __name__ == "__main__":
    main()
