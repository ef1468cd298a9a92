"""cfs.task_check: the evaluation's lm-eval task names and metric filters are checked
before any job runs; an error names the config key and the nearest known task name."""

from __future__ import annotations

import functools
import json

import pytest
from cfs import task_check
from cfs.cli import run_stage
from cfs.errors import SettingsError
from conftest import REPO


@pytest.fixture(scope="module")
def index():
    # the local tasks and lm-eval's built-in ones, indexed once (YAML only, no download)
    return task_check.task_index(str(REPO / "tasks"))


def settings(target, *forgetting):
    return {"include_path": "tasks", "target": target, "forgetting": list(forgetting)}


def test_the_paper_configs_tasks_are_known(index):
    import yaml

    for name in ("config.yaml", "olmo.yaml", "reasoning.yaml"):
        evaluation = yaml.safe_load((REPO / "config" / name).read_text())["evaluation"]
        record = task_check.check_tasks({"include_path": "tasks", **evaluation}, index)
        problems = {task["task"]: task["problems"] for task in record["tasks"] if task["problems"]}
        assert problems == {}, f"config/{name}"


def test_a_misspelt_forgetting_task_names_the_key_and_the_nearest_task(index):
    config = settings(
        {"task": "cfs_arith", "metric": "exact_match,flexible-extract"},
        {"task": "cfs_capitals", "metric": "acc,none"},
        {"task": "hellaswagg", "metric": "acc_norm,none"},
    )
    with pytest.raises(SettingsError) as caught:
        task_check.check_tasks(config, index)
    message = str(caught.value)
    for needle in (
        "evaluation.forgetting[1].task",
        "'hellaswagg'",
        "nearest known task: 'hellaswag'",
    ):
        assert needle in message, f"{needle!r} not in: {message}"


def test_tasks_in_the_task_folders_are_checked_against_those_folders_alone(index, monkeypatch):
    """Scanning lm-eval's thousands of built-in task files takes seconds at the start of
    every study: where the folders hold every task, only they are indexed, as the
    evaluations index them; a task they lack is looked up among all tasks."""
    import types

    import lm_eval.tasks

    built = []
    folders_alone = lm_eval.tasks.TaskManager

    def task_manager(*args, include_defaults=True, **kwargs):
        built.append("folders" if not include_defaults else "all")
        if not include_defaults:
            return folders_alone(*args, include_defaults=False, **kwargs)
        return types.SimpleNamespace(task_index=index, all_tasks=sorted(index))

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", task_manager)
    target = {"task": "cfs_add_sub", "metric": "exact_match,strict-match"}
    capitals = {"task": "cfs_capitals", "metric": "acc,none"}
    record = task_check.check_tasks(settings(target, capitals))
    assert [task["task"] for task in record["tasks"]] == ["cfs_add_sub", "cfs_capitals"]
    assert built == ["folders"]
    built.clear()
    with pytest.raises(SettingsError, match="nearest known task: 'hellaswag'"):
        task_check.check_tasks(settings(target, {"task": "hellaswagg", "metric": "acc,none"}))
    assert built == ["folders", "all"]


def test_a_wrong_filter_or_metric_names_the_key(index):
    config = settings(
        {"task": "gsm8k", "metric": "exact_match,flexible_extract"},
        {"task": "arc_easy", "metric": "accuracy,none"},
    )
    with pytest.raises(SettingsError) as caught:
        task_check.check_tasks(config, index)
    message = str(caught.value)
    for needle in (
        "evaluation.target.metric 'exact_match,flexible_extract'",
        "no filter 'flexible_extract'",
        "flexible-extract",
        "evaluation.forgetting[0].metric 'accuracy,none'",
        "no metric 'accuracy'",
    ):
        assert needle in message, f"{needle!r} not in: {message}"


def test_command_line_writes_the_record(tmp_path, index, monkeypatch, caplog):
    monkeypatch.setattr(task_check, "task_index", lambda include_path, tasks=None: index)
    out = tmp_path / "evaluation_tasks.json"
    evaluation = settings(
        {"task": "cfs_arith", "metric": "exact_match,flexible-extract"},
        {"task": "cfs_animals", "metric": "acc_norm,none"},
    )
    argv = ["--settings", json.dumps(evaluation), "--out", str(out)]
    run_stage(task_check.main, argv)
    record = json.loads(out.read_text())
    assert [task["task"] for task in record["tasks"]] == ["cfs_arith", "cfs_animals"]
    evaluation["forgetting"][0]["task"] = "cfs_animal"
    argv = ["--settings", json.dumps(evaluation), "--out", str(tmp_path / "other.json")]
    with pytest.raises(SystemExit) as exit_code:
        run_stage(task_check.main, argv)
    assert exit_code.value.code == 1
    assert not (tmp_path / "other.json").exists(), "a record written for a refused config"
    for needle in ("evaluation.forgetting[0].task", "'cfs_animals'"):
        assert needle in caplog.text, f"{needle!r} not in the log:\n{caplog.text}"


def test_several_task_folders_are_read_together(tmp_path, monkeypatch):
    """evaluation.include_path may list folders: the project's tasks and one's own."""
    import lm_eval.tasks

    # only the two folders are indexed: lm-eval's own task files take seconds to scan
    monkeypatch.setattr(
        lm_eval.tasks,
        "TaskManager",
        functools.partial(lm_eval.tasks.TaskManager, include_defaults=False),
    )
    own = tmp_path / "my_tasks" / "my_task"
    own.mkdir(parents=True)
    (own / "my_task.yaml").write_text(
        "task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: x.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: [a, b]\n"
        "doc_to_target: 0\nmetric_list:\n  - metric: acc\n"
    )
    index = task_check.task_index(["tasks", str(tmp_path / "my_tasks")])
    missing = {"my_task", "cfs_animals", "cfs_add_sub"} - set(index)
    assert missing == set(), "tasks missing from the index of both folders"
    record = task_check.check_tasks(
        settings(
            {"task": "my_task", "metric": "acc,none"},
            {"task": "cfs_animals", "metric": "p_correct,none"},
        ),
        index,
    )
    assert [task["task"] for task in record["tasks"]] == ["my_task", "cfs_animals"]
    with pytest.raises(SettingsError, match=r"evaluation.include_path\[1\]"):
        task_check.task_index(["tasks", str(tmp_path / "missing")])
