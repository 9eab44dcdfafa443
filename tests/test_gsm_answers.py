"""One scorer of GSM8K-style answers (v2/tasks/gsm_answers.py), on tricky completions: lm_eval
gsm8k's definitions (its task file's regexes, its filter and metric code, on many strings), and
every path that scores a tiny_gsm answer scoring them alike, each through its real code: the
lm_eval tasks' filter pipeline and metric, the direct backend, the tuner, the training script's
evaluation."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import lm_eval
import pytest
import yaml
from lm_eval.api.metrics import exact_match_hf_evaluate
from lm_eval.filters.extraction import RegexFilter
from lm_eval.tasks import TaskManager

from v2.runs import direct as runs_direct
from v2.runs import sweep as runs_sweep
from v2.stats import Stats
from v2.tasks import gsm_answers as ga

TASKS_DIR = Path(__file__).resolve().parent.parent / "v2" / "tasks"
LM_EVAL_GSM8K = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"

# (completion, reference, strict right, flexible right): worked out by hand from lm_eval gsm8k's
# rules (strict: the FIRST "#### N"; flexible: the last number; commas, "$" and one trailing
# period dropped; no numeric comparison, no stripping).
TABLE = [
    ("3 + 4 = <<3+4=7>>7 apples.\n#### 7", "3+4=7\n#### 7", True, True),
    ("#### 7\n#### 8", "#### 7", True, False),  # several: strict the first, flexible the last
    ("#### 8\n#### 7", "#### 7", False, True),
    ("#### 3\n#### 3.5", "#### 3.5", False, True),
    ("#### 3.5", "#### 3.5", True, True),  # decimals
    ("#### 3.7", "#### 3.5", False, False),
    ("#### 0.50", "#### 0.5", False, False),  # strings, not numbers
    ("#### 1,234", "1000+234=1234\n#### 1,234", True, True),  # commas, both sides
    ("#### 1,234", "#### 1234", True, True),
    ("#### 1,000,000.", "#### 1000000", True, True),  # and a trailing period
    ("#### 12.", "#### 12", True, True),
    ("so 7...", "#### 7", False, False),  # one trailing period only: "7.."
    ("Well... 7", "#### 7", False, True),
    ("The answer is $18.", "#### 18", False, True),  # `$`
    ("#### $18", "#### 18", False, True),  # strict takes no `$`
    ("#### -5", "#### -5", True, True),  # negative numbers
    ("so it is -3", "#### -3", False, True),
    ("#### - 5", "#### -5", False, False),
    ("####7", "#### 7", False, True),  # strict needs "#### "
    ("####  7", "#### 7", False, True),
    ("#### 5\n\nQuestion: what is 12?", "#### 5", True, False),
    ("It costs 5 dollars.\n#### 5 dollars", "#### 5", True, True),
    ("#### 42\n", "#### 42", True, True),
    ("Tom has 3 + 4 = <<3+4=7>>7.\n#### 1,234.", "#### 1234", True, True),
    ("so 12 and then 237 apples", "#### 237", False, True),
    ("no answer here", "#### 3", False, False),  # no answer: "[invalid]"
    ("", "#### 3", False, False),
]
TEXTS = [t for t, *_ in TABLE]
REFS = [r for _, r, *_ in TABLE]
EXPECTED = [(s, f) for *_, s, f in TABLE]


def test_the_table_by_hand():
    assert [
        (ga.hits(t, r)["strict-match"], ga.hits(t, r)["flexible-extract"])
        for t, r in zip(TEXTS, REFS, strict=True)
    ] == EXPECTED
    assert ga.strict_match("#### 7\n#### 8") == "7" and ga.flexible_extract("#### 7\n#### 8") == "8"
    assert ga.strict_match("no answer") == ga.flexible_extract("no") == ga.INVALID
    assert ga.target("Tom: 3+4=7\n#### 1,234.") == "1234"


# ---- the module is lm_eval gsm8k's scorer ------------------------------------------------------


@pytest.fixture(scope="module")
def lm_eval_gsm8k():
    """lm_eval's own gsm8k task file: its filters (lm_eval's RegexFilter) and its metric."""
    config = yaml.safe_load(LM_EVAL_GSM8K.read_text())
    filters = {}
    for f in config["filter_list"]:
        (regex,) = [s for s in f["filter"] if s["function"] == "regex"]
        filters[f["name"]] = RegexFilter(**{k: v for k, v in regex.items() if k != "function"})
    (metric,) = config["metric_list"]
    kwargs = {
        k: v for k, v in metric.items() if k not in ("metric", "aggregation", "higher_is_better")
    }
    return filters, kwargs


def fuzz(n: int, seed: int = 0) -> list[str]:
    """Strings made of the pieces answers are made of (and break on)."""
    pieces = ["####", "#### ", " ", "-", "$", ",", ".", "0", "7", "12", "3.5", "1,234", "\n"]
    pieces += ["So", " the answer is ", "\\boxed{", "}", "<<3+4=7>>", "Question:", "\t", "..."]
    rng = random.Random(seed)
    return ["".join(rng.choices(pieces, k=rng.randint(0, 12))) for _ in range(n)]


def test_the_module_gives_lm_eval_gsm8ks_answers(lm_eval_gsm8k):
    filters, kwargs = lm_eval_gsm8k
    assert ga.STRICT.pattern == filters["strict-match"].regex_pattern
    assert ga.FLEXIBLE.pattern == filters["flexible-extract"].regex_pattern
    assert [p.pattern for p in ga.CLEAN_UP] == kwargs["regexes_to_ignore"]
    texts = TEXTS + fuzz(3000)
    refs = ["#### 7", "3+4=7\n#### 1,234", "#### -3", "#### 3.5", "#### 12.", "#### $18"]
    ours = {"strict-match": ga.strict_match, "flexible-extract": ga.flexible_extract}
    for name, regex in filters.items():
        theirs = [out for (out,) in regex.apply([[t] for t in texts], [None] * len(texts))]
        assert theirs == [ours[name](t) for t in texts], name
        for answer, text in zip(theirs, texts, strict=True):
            for ref in [*refs, text]:  # a reference of any shape, too
                expected = exact_match_hf_evaluate([answer], [ref], **kwargs)["exact_match"]
                assert ga.correct(answer, ref) == bool(expected), (answer, ref)


def test_the_boxed_answer_is_the_last_box():
    assert ga.boxed_answer("First \\boxed{6}, no: \\boxed{7}.") == "7"
    assert ga.correct(ga.boxed_answer("so \\boxed{1,234}"), "#### 1234")
    assert ga.boxed_answer("#### 7") == ga.INVALID


# ---- every path scores the table alike ---------------------------------------------------------


class FakeLM:
    """FastDLLM's generate: each prompt's completion from the table (by its question)."""

    def __init__(self, texts: dict[str, str]):
        self.texts = texts

    def generate(self, prompts, config=None, policy=None, chat=False, engine=None):
        outputs = [SimpleNamespace(text=self.texts[p], token_ids=[1]) for p in prompts]
        st = Stats(1)
        st.generated_tokens, st.wall_seconds = len(prompts), 1.0
        return SimpleNamespace(outputs=outputs, stats=st)

    def engine(self, config=None, policy=None):
        return None


def problems() -> list[dict]:
    return [{"question": f"q{i}", "answer": r} for i, r in enumerate(REFS)]


def fake_lm() -> FakeLM:
    from v2.tiny.train import user_message

    return FakeLM({user_message(p["question"]): t for p, t in zip(problems(), TEXTS, strict=True)})


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("elsewhere"))  # found from any working directory
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        yield manager.load(["tiny_gsm", "tiny_gsm_hard"])["tasks"]


def lm_eval_scores(task) -> list[tuple[bool, bool]]:
    """The task's filter pipeline on the table's completions, then its metric."""
    task.build_all_requests(limit=len(TABLE), rank=0, world_size=1)
    for inst, text in zip(task.instances, TEXTS, strict=True):
        inst.resps = [text]
    task.apply_filters()
    out = []
    for inst, p in zip(task.instances, problems(), strict=True):
        got = {
            k: task.process_results(p, [v])["exact_match"] for k, v in inst.filtered_resps.items()
        }
        assert set(got) == {"strict-match", "flexible-extract"}
        out.append((got["strict-match"] == 1.0, got["flexible-extract"] == 1.0))
    return out


@pytest.mark.parametrize("name", ["tiny_gsm", "tiny_gsm_hard"])
def test_the_lm_eval_tasks_score_the_table(tasks, name):
    task = tasks[name]
    (metric,) = task.config.metric_list
    assert Path(metric["metric"].__code__.co_filename) == TASKS_DIR / "gsm_answers.py"  # ours
    assert lm_eval_scores(task) == EXPECTED


def test_the_direct_backend_scores_the_table(tmp_path):

    path = tmp_path / "s.yaml"
    path.write_text(
        "name: s\npretrained: v2/tiny/checkpoint\ntasks: [tiny_gsm]\nrunner: direct\n"
        "grid:\n  - policy: none\n"
    )
    sweep = runs_sweep.load_sweep(path, tmp_path / "results")
    (cfg,) = sweep.configs
    texts = [f"Question: {p['question']}\nAnswer:" for p in problems()]
    strict, flexible, _ = runs_direct.decode(fake_lm(), cfg, texts, REFS, 4)
    assert list(zip(strict, flexible, strict=True)) == EXPECTED


def test_the_training_evaluation_scores_the_table(monkeypatch):
    from v2.generate import FastDLLM
    from v2.tiny import train as tr

    texts = [tr.user_message(p["question"]) for p in problems()]
    strict, flexible, _ = tr.score(fake_lm(), texts, REFS, None, 3)
    assert list(zip(strict, flexible, strict=True)) == EXPECTED
    monkeypatch.setattr(FastDLLM, "load", classmethod(lambda cls, path: fake_lm()))
    rows = tr.answer_problems("unused", problems())
    assert [r["correct"] for r in rows] == [s for s, _ in EXPECTED]
    assert rows[7]["gold"] == "1234" and rows[7]["text"] == TEXTS[7]


def test_the_tuner_scores_the_table_as_the_task_does(tasks):
    """The tuner took the LAST `#### N` and no decimals: a setting could be chosen on a
    different scorer than the one that reports it. Per problem, its accuracy is the task's
    strict-match."""
    from v2.runs.spec import build_specs
    from v2.tune import evaluate

    def baseline(batch_size: int):
        data = {"pretrained": "x", "tasks": ["tiny_gsm"], "grid": [{"policy": "none"}]}
        (spec,) = build_specs(data, runner="direct", batch_size=batch_size, max_new_tokens=8)
        return spec

    lm = fake_lm()
    task = [s for s, _ in lm_eval_scores(tasks["tiny_gsm"])]
    tuner = [evaluate(lm, [p], baseline(1), True)["accuracy"] == 100.0 for p in problems()]
    assert tuner == task == [s for s, _ in EXPECTED]
    assert evaluate(lm, problems(), baseline(4), True)["accuracy"] == pytest.approx(
        100 * sum(task) / len(task)
    )
