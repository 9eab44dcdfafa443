"""Synthetic multi-step arithmetic word problems in GSM8K's format.

Every problem follows one quantity (a person's pile of objects) through 2 to 4 arithmetic
steps. The answer has one line per step with a GSM8K calculator annotation such as
``Tom has 3 + 4 = <<3+4=7>>7 apples.`` and ends with ``#### N``. Numbers stay small (operands
up to ~100, multipliers and divisors of one digit, results below 1000) so that a tiny model can
actually learn the arithmetic.

CLI: ``python -m v2.tiny.data --out DIR --n-train 200000 --n-test 1000 --seed 0``
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable, Iterable
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


def make_split(n: int, seed: int, exclude: Iterable[str] = frozenset()) -> list[dict[str, str]]:
    """``n`` problems with unique questions, none in ``exclude``; deterministic in ``seed``.

    Problems are drawn sequentially, so ``make_split(k, s)`` is a prefix of ``make_split(n, s)``.
    """
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[dict[str, str]] = []
    max_tries = 100 * n + 1000  # the problem space is huge; this only guards against bugs
    with tqdm(total=n, desc=f"problems (seed {seed})", disable=n < 50_000) as bar:
        for _ in range(max_tries):
            if len(out) >= n:
                break
            problem = make_problem(rng)
            if problem["question"] in seen:
                continue
            seen.add(problem["question"])
            out.append(problem)
            bar.update(1)
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} unique problems after {max_tries} tries")
    return out


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
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
    parser.add_argument("--n-train", type=int, default=200_000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train_path, test_path = write_splits(args.out, args.n_train, args.n_test, args.seed)
    print(f"wrote {test_path} ({args.n_test})" + (f" and {train_path}" if args.n_train else ""))


if __name__ == "__main__":
    main()
