"""cfs.request_cache: an evaluation's per-request cache, keyed to the model folder (its
files, sizes and times) and the harness settings but not the task list; a cache of another
key is removed, never read. Checked on its own and through the evaluate stage in-process.
(A killed evaluation resuming from its cache: tests/end_to_end/test_resume.py.)"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from cfs import evaluate
from cfs.data import arithmetic_problems, render
from cfs.request_cache import cache_key, cache_prefix
from conftest import REPO, TEMPLATE, evaluation_settings, write_jsonl

HARNESS = {"backend": "cfs-hf", "batch_size": 8, "tasks": {"cfs_capitals": {}}}


def test_the_key_follows_the_model_files_and_the_harness_not_the_tasks(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    key = cache_key(model, HARNESS)
    assert cache_key(model, HARNESS) == key, "the same model and harness gave another key"
    other_tasks = {**HARNESS, "tasks": {"cfs_animals": {}}}
    assert cache_key(model, other_tasks) == key, "the task list changed the key"
    other_batch = {**HARNESS, "batch_size": 4}
    assert cache_key(model, other_batch) != key, "another batch size kept the key"
    (weights,) = model.glob("*.safetensors")
    os.utime(weights, (1, 1))  # rewritten, as a new fine-tune writes it
    assert cache_key(model, HARNESS) != key, "a rewritten weights file kept the key"


def test_a_cache_of_another_key_is_removed(tiny_model_dir, tmp_path):
    folder = tmp_path / "eval_cache"
    folder.mkdir()
    (folder / "0123456789abcdef_rank0.db").write_text("another model's answers")
    prefix = cache_prefix(folder, tiny_model_dir, HARNESS)
    assert prefix == folder / cache_key(tiny_model_dir, HARNESS)
    assert list(folder.iterdir()) == [], "a stale cache was kept"


@pytest.fixture
def evaluation_root(tmp_path, monkeypatch):
    """A working folder with the repository's tasks and the target's test problems."""
    shutil.copytree(REPO / "tasks", tmp_path / "tasks")
    write_jsonl(
        tmp_path / "results" / "data" / "add_sub" / "test.jsonl",
        render(arithmetic_problems(40, seed=2), TEMPLATE),
    )
    monkeypatch.chdir(tmp_path)  # the tasks read their data relative to it
    return tmp_path


def test_another_model_starts_a_fresh_request_cache(tiny_model_dir, evaluation_root):
    """A cache is keyed to the model folder: a fine-tune run again (its files rewritten)
    gets no answer of the model before it."""
    model = evaluation_root / "model"
    shutil.copytree(tiny_model_dir, model)
    out = evaluation_root / "fresh" / "eval.json"
    settings = evaluation_settings(
        forgetting=[{"task": "cfs_capitals", "metric": "p_correct,none"}],
        batch_size=1,
        limit=5,
        dtype="float32",
    )

    def requests() -> dict:
        evaluate.main(
            ["--model", str(model), "--settings", json.dumps(settings)]
            + [
                "--out",
                str(out),
            ]
        )
        return json.loads(out.read_text())["requests"]

    total = sum(requests()["per_task"].values())
    assert requests()["computed"] == 0  # all from the cache
    for weights in model.glob("*.safetensors"):
        os.utime(weights)  # rewritten, as a new fine-tune writes it
    assert requests()["computed"] == total
    assert len(list(out.with_name("eval_cache").iterdir())) == 1  # the stale cache is gone
