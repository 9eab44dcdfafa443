"""The ``tiny_gsm`` and ``tiny_gsm_hard`` lm_eval tasks (v2/tasks/) load their committed test
splits from any working directory, with lm_eval gsm8k's prompt, stops and filters."""

import json
from pathlib import Path

import pytest
from lm_eval.tasks import TaskManager

TASKS_DIR = Path(__file__).resolve().parent.parent / "v2" / "tasks"
DATA = TASKS_DIR.parent / "tiny" / "data"
SPLITS = {"tiny_gsm": DATA / "test.jsonl", "tiny_gsm_hard": DATA / "hard_test.jsonl"}


@pytest.fixture(scope="module", params=list(SPLITS))
def task(request, tmp_path_factory: pytest.TempPathFactory):
    name = request.param
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("elsewhere"))  # data must not be found via the CWD
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        assert name in manager.all_tasks
        yield name, manager.load([name])["tasks"][name]


def test_docs_are_the_committed_split(task) -> None:
    name, task = task
    docs = list(task.test_docs())
    rows = [json.loads(line) for line in SPLITS[name].read_text().splitlines()]
    assert len(docs) == len(rows) >= 1000
    assert [d["question"] for d in docs[:5]] == [r["question"] for r in rows[:5]]
    assert task.doc_to_text(docs[0]) == f"Question: {docs[0]['question']}\nAnswer:"
    assert task.doc_to_target(docs[0]) == docs[0]["answer"]
    assert task.config.num_fewshot == 0
    assert task.config.generation_kwargs["until"] == ["Question:", "</s>", "<|im_end|>"]


def test_filters_and_metric(task) -> None:
    _, task = task
    task.build_all_requests(limit=2, rank=0, world_size=1)
    first, second = task.instances
    first.resps = ["Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 42"]
    second.resps = ["so 12 and then 237 apples"]
    task.apply_filters()
    assert first.filtered_resps == {"strict-match": "42", "flexible-extract": "42"}
    assert second.filtered_resps == {"strict-match": "[invalid]", "flexible-extract": "237"}
    doc = first.doc
    gold = doc["answer"].rsplit("#### ", 1)[1]
    assert task.process_results(doc, [gold])["exact_match"] == 1.0
    assert task.process_results(doc, [gold + "1"])["exact_match"] == 0.0
