"""cfs.fetch: what a study fetches from the hub on the submitting host, right after the task
check, through its command (python -m cfs.fetch, offline with an empty HF_HOME): local
tasks need nothing from the hub, which is then not even probed; whether a study reads the
hub (a hub model, a hub dataset, a task not among the local ones); and an uncached hub
evaluation dataset or model fails the fetch at once, naming what is missing, without a
traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import PACKAGE_DIR, REPO


def write_hub_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfs_test_hub.yaml").write_text(
        "task: cfs_test_hub\ndataset_path: cfs-test-org/never-cached-dataset\n"
        "output_type: generate_until\ntest_split: test\ndoc_to_text: '{{q}}'\n"
        "doc_to_target: '{{a}}'\nmetric_list:\n  - metric: exact_match\n"
    )
    return folder


def run_fetch(tmp_path: Path, settings: dict, fetch: dict | None = None):
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("HF_TOKEN", "HF_HOME", "HF_ENDPOINT")
    }
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "empty_hf_home"),
        PYTHONPATH=str(PACKAGE_DIR),
        TOKENIZERS_PARALLELISM="false",
    )
    command = [sys.executable, "-m", "cfs.fetch", "--settings", json.dumps(settings)]
    fetch = fetch or {"models": [], "task": None}
    command += ["--fetch", json.dumps(fetch), "--out", str(tmp_path / "fetched.json")]
    start = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    return result, time.monotonic() - start


LOCAL_TASKS = {
    "include_path": "tasks",
    "target": {"task": "cfs_arith", "metric": "exact_match,strict-match"},
    "forgetting": [{"task": "cfs_capitals", "metric": "p_correct,none"}],
}


def test_local_tasks_need_nothing_from_the_hub(tmp_path):
    result, _ = run_fetch(tmp_path, LOCAL_TASKS)
    assert result.returncode == 0, result.stderr[-3000:]
    fetched = json.loads((tmp_path / "fetched.json").read_text())
    assert fetched["hub_reachable"] is None, "nothing to fetch: the hub is not even probed"
    assert fetched["models"] == [] and fetched["task"] is None
    assert {entry["source"] for entry in fetched["evaluation_datasets"]} == {"local"}
    assert fetched["provenance"]["stage"] == "fetch"


def test_a_study_reads_the_hub_where_a_model_a_dataset_or_a_task_does(tmp_path):
    """What decides, when the DAG is built, whether the models' and the task's preparation
    wait on the fetch."""
    from cfs.fetch import local_task_datasets, reads_the_hub

    local = local_task_datasets(str(REPO / "tasks"))
    assert local["cfs_capitals"] is True and local["cfs_arith"] is True
    assert local["gpqa_diamond_cot_zeroshot_boxed"] is False
    assert local["medqa_4options_think"] is False
    nothing = {"models": [], "task": None}
    evaluation = {**LOCAL_TASKS, "include_path": str(REPO / "tasks")}
    assert reads_the_hub(nothing, evaluation) is False
    model = {"model": "m", "hub_id": "org/m", "revision": None}
    assert reads_the_hub({"models": [model], "task": None}, evaluation) is True
    for task in ("gsm8k", "gpqa_diamond_cot_zeroshot_boxed", "no_such_task"):
        forgetting = [*evaluation["forgetting"], {"task": task, "metric": "acc,none"}]
        assert reads_the_hub(nothing, {**evaluation, "forgetting": forgetting}) is True


def test_an_uncached_hub_evaluation_dataset_fails_the_fetch_by_name(tmp_path):
    folder = write_hub_task(tmp_path / "tasks")
    settings = {
        **LOCAL_TASKS,
        "include_path": [str(REPO / "tasks"), str(folder)],
        "forgetting": [
            {"task": "cfs_capitals", "metric": "p_correct,none"},
            {"task": "cfs_test_hub", "metric": "exact_match,none"},
        ],
    }
    result, elapsed = run_fetch(tmp_path, settings)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert elapsed < 60, f"took {elapsed:.0f} s"
    for text in ("evaluation.forgetting[1]", "cfs_test_hub", "cfs-test-org/never-cached-dataset"):
        assert text in output, f"{text!r} not in:\n{output[-3000:]}"
    assert "HF_HOME" in output and "Traceback" not in output
    assert not (tmp_path / "fetched.json").exists()


def test_an_uncached_hub_model_fails_the_fetch_by_name(tmp_path):
    model = {"model": "olmo", "hub_id": "allenai/OLMo-1B-hf", "revision": None}
    fetch = {"models": [model], "task": None}
    result, _ = run_fetch(tmp_path, LOCAL_TASKS, fetch)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "allenai/OLMo-1B-hf" in output and "Traceback" not in output
