"""The forgetting tasks' per-item scores (tasks/choice_scores.py): acc and acc_norm exactly
as lm-eval's own multiple_choice computes them, and p_correct the softmax probability of the
correct choice."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from conftest import REPO

# every local task that includes the shared multiple-choice file
FORGETTING_TASKS = sorted(
    path.parent.name
    for path in (REPO / "tasks").glob("*/*.yaml")
    if "include: ../multiple_choice.yaml" in path.read_text()
)


@pytest.fixture(scope="module")
def tasks(monkeypatch_module):
    from lm_eval.tasks import TaskManager

    monkeypatch_module.chdir(REPO)  # the task files load their data relative to the repo
    manager = TaskManager(include_path=str(REPO / "tasks"), include_defaults=False)
    return manager.load_task_or_group(FORGETTING_TASKS)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_the_forgetting_tasks_are_found():
    assert "cfs_capitals" in FORGETTING_TASKS, f"local multiple-choice tasks: {FORGETTING_TASKS}"


def lm_eval_builtin(task):
    """The same task with lm-eval's default multiple_choice scoring."""
    from lm_eval.api.task import ConfigurableTask

    config = copy.deepcopy(task.config.to_dict(keep_callable=True))
    config.pop("process_results")
    config["metric_list"] = [
        {"metric": name, "aggregation": "mean", "higher_is_better": True}
        for name in ("acc", "acc_norm", "brier_score")
    ]
    return ConfigurableTask(config=config)


@pytest.mark.parametrize("name", FORGETTING_TASKS)
def test_acc_and_acc_norm_match_lm_evals_multiple_choice(tasks, name):
    task = tasks[name]
    builtin = lm_eval_builtin(task)
    rng = np.random.default_rng(0)
    docs = list(task.test_docs())
    assert len(docs) > 100, f"{name} has {len(docs)} items, expected over 100"
    for doc in docs:
        # log-likelihoods close together, so acc and acc_norm often disagree
        results = [(float(ll), False) for ll in rng.normal(-5.0, 1.0, len(doc["choices"]))]
        ours, theirs = task.process_results(doc, results), builtin.process_results(doc, results)
        ours_acc, theirs_acc = (ours["acc"], ours["acc_norm"]), (theirs["acc"], theirs["acc_norm"])
        assert ours_acc == theirs_acc, f"(acc, acc_norm) of {doc} and log-likelihoods {results}"
        gold, probabilities = theirs["brier_score"]
        assert ours["p_correct"] == pytest.approx(probabilities[gold], abs=1e-12), doc


def test_p_correct_is_the_softmax_probability_of_the_correct_choice(tasks):
    doc = next(iter(tasks["cfs_capitals"].test_docs()))
    loglikelihoods = [-1.0, -2.0, -3.0, -4.0]
    scores = tasks["cfs_capitals"].process_results(doc, [(ll, False) for ll in loglikelihoods])
    expected = np.exp(loglikelihoods[doc["answer"]]) / np.exp(loglikelihoods).sum()
    assert scores["p_correct"] == pytest.approx(expected, rel=1e-12)
    assert 0.0 < scores["p_correct"] < 1.0, f"p_correct {scores['p_correct']} not in (0, 1)"
    # equal log-likelihoods: chance
    even = tasks["cfs_capitals"].process_results(doc, [(-2.0, False)] * 4)
    assert even["p_correct"] == pytest.approx(0.25)


def test_p_correct_norm_does_not_penalise_a_long_right_answer(tasks):
    """A right answer twice as long as its distractors, with twice their log-likelihood
    (the same per character): p_correct puts it below chance, p_correct_norm at chance."""
    doc = {"stem": "A baby swan is a", "choices": ["cub", "calf", "cygnet", "kid"], "answer": 2}
    lengths = np.array([len(choice) for choice in doc["choices"]], dtype=float)
    loglikelihoods = -0.5 * lengths  # the same log-likelihood per character for all four
    scores = tasks["cfs_animals"].process_results(doc, [(ll, False) for ll in loglikelihoods])
    assert scores["p_correct"] < 0.2
    assert scores["p_correct_norm"] == pytest.approx(0.25)
    assert scores["acc_norm"] in (0.0, 1.0)
