"""Tasks that draw random numbers while they are built (GPQA shuffles each
question's choices in `process_docs`) are built after seeding, so the base and post evals
of a model see the same answer order."""

from __future__ import annotations

import json
import random

from cfs import evaluate
from conftest import task_entry

TASK_YAML = """task: cfs_shuffled
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
process_docs: !function utils.process_docs
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
UTILS = """import random


def process_docs(dataset):
    def shuffle(doc):  # as lm-eval's gpqa utils.py does, with the global `random`
        choices = list(doc["choices"])
        random.shuffle(choices)
        return {**doc, "choices": choices, "answer": choices.index(doc["choices"][0])}

    return dataset.map(shuffle, load_from_cache_file=False)
"""


def test_tasks_are_built_after_seeding(tmp_path):
    from lm_eval.tasks import TaskManager

    data = tmp_path / "shuffled.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"q{i}", "choices": ["a", "b", "c", "d", "e", "f"]}) + "\n"
            for i in range(20)
        )
    )
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "cfs_shuffled.yaml").write_text(TASK_YAML.format(data=data))
    (folder / "utils.py").write_text(UTILS)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    # num_fewshot makes cfs.evaluate build the Task object itself (configured_task)
    entry = task_entry(task="cfs_shuffled", metric="acc,none", num_fewshot=0)
    orders = []
    for state in (1, 2):  # whatever drew from `random` before (another task, a library)
        random.seed(state)
        (task,) = evaluate.build_tasks(manager, [entry], seed=0)
        orders.append([doc["choices"] for doc in task.test_docs()])
    assert orders[0] == orders[1], "answer order depends on the random state before the eval"
    assert len({tuple(choices) for choices in orders[0]}) > 1, "the task does shuffle"
