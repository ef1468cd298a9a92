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
from cfs.arithmetic import arithmetic_problems, render
from cfs.request_cache import RANK_SUFFIX, cache_key, cache_prefix, cached_requests
from conftest import REPO, TEMPLATE, evaluation_settings, write_jsonl

HARNESS = {"backend": "cfs-hf", "batch_size": 8, "tasks": {"cfs_capitals": {}}}


def test_the_key_follows_the_model_files_and_the_harness_not_the_tasks(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    key = cache_key(model, HARNESS, 0)
    assert cache_key(model, HARNESS, 0) == key, "the same model and harness gave another key"
    other_tasks = {**HARNESS, "tasks": {"cfs_animals": {}}}
    assert cache_key(model, other_tasks, 0) == key, "the task list changed the key"
    other_batch = {**HARNESS, "batch_size": 4}
    assert cache_key(model, other_batch, 0) != key, "another batch size kept the key"
    (weights,) = model.glob("*.safetensors")
    os.utime(weights, (1, 1))  # rewritten, as a new fine-tune writes it
    assert cache_key(model, HARNESS, 0) != key, "a rewritten weights file kept the key"


def test_a_cache_of_another_key_is_removed(tiny_model_dir, tmp_path):
    folder = tmp_path / "eval_cache"
    folder.mkdir()
    (folder / "0123456789abcdef_rank0.db").write_text("another model's answers")
    prefix = cache_prefix(folder, tiny_model_dir, HARNESS, 0)
    assert prefix == folder / cache_key(tiny_model_dir, HARNESS, 0)
    assert list(folder.iterdir()) == [], "a stale cache was kept"


def test_a_cache_file_without_its_table_holds_no_requests(tmp_path):
    """A job killed, or read, between creating the SQLite file and its table."""
    from sqlitedict import SqliteDict

    prefix = tmp_path / "0123456789abcdef"
    path = tmp_path / (prefix.name + RANK_SUFFIX)
    path.touch()
    assert cached_requests(prefix) == 0
    with SqliteDict(str(path), autocommit=True) as cache:
        cache["a request"] = 1.0
    assert cached_requests(prefix) == 1


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
    gets no answer of the model before it. The cache works in scratch, as the rules run it,
    and is kept beside the evaluation."""
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
            + ["--scratch", str(evaluation_root / "scratch"), "--out", str(out)]
        )
        return json.loads(out.read_text())["requests"]

    total = sum(requests()["per_task"].values())
    assert requests()["computed"] == 0  # all from the cache
    for weights in model.glob("*.safetensors"):
        os.utime(weights)  # rewritten, as a new fine-tune writes it
    assert requests()["computed"] == total
    assert len(list(out.with_name("eval_cache").iterdir())) == 1  # the stale cache is gone
    assert list((evaluation_root / "scratch").iterdir()) == [], "a working copy was left"


SAMPLED = {"until": ["\n\n"], "do_sample": True, "temperature": 1.0, "max_gen_toks": 6}
PROMPTS = ["The capital of France is", "A dog says", "2 + 3 =", "yes"]


@pytest.fixture(scope="module")
def sampling_model(tiny_model_dir):
    from cfs.lm_eval_model import SharedPrefixHFLM

    return SharedPrefixHFLM(
        pretrained=str(tiny_model_dir), batch_size=4, device="cpu", dtype="float32"
    )


def sampled_requests(repeats: int = 3) -> list:
    """Each prompt sampled `repeats` times, as lm-eval sends a task's repeats: the same
    arguments again."""
    from lm_eval.api.instance import Instance

    return [
        Instance(request_type="generate_until", doc={}, arguments=(prompt, dict(SAMPLED)), idx=0)
        for prompt in PROMPTS
        for _ in range(repeats)
    ]


def chunked_cache(model, path, chunk_size: int = 4, seed: int = 0):
    from cfs.request_cache import caching_lm_class

    return caching_lm_class(chunk_size, seed)(model, str(path))


def test_sampled_generations_are_cached_each_repeat_apart(sampling_model, tmp_path):
    cache = chunked_cache(sampling_model, tmp_path / "c_rank0.db")
    answers = cache.generate_until(sampled_requests())
    assert len(answers) == 12
    assert len(cache.dbdict) == 12, f"{len(cache.dbdict)} of 12 sampled answers cached"
    repeats = [answers[index : index + 3] for index in range(0, 12, 3)]
    assert any(len(set(group)) > 1 for group in repeats), f"repeats alike: {repeats}"
    again = chunked_cache(sampling_model, tmp_path / "c_rank0.db").generate_until(
        sampled_requests()
    )
    assert again == answers, "the cached answers were not returned as they were"


def test_a_lost_chunk_is_sampled_again_as_the_uninterrupted_run_sampled_it(
    sampling_model, tmp_path, monkeypatch
):
    """A job killed after 2 of 3 chunks: the restart computes only the third chunk's 4
    requests (counted at the model), and its answers are the uninterrupted run's."""
    from cfs.request_cache import generation_keys

    whole = chunked_cache(sampling_model, tmp_path / "whole_rank0.db").generate_until(
        sampled_requests()
    )
    killed = chunked_cache(sampling_model, tmp_path / "killed_rank0.db")
    killed.generate_until(sampled_requests())
    for key in generation_keys(sampled_requests())[8:]:
        del killed.dbdict[key]
    killed.dbdict.commit()
    sent = []
    original = type(sampling_model).generate_until

    def counted(self, requests, *args):
        sent.append(len(requests))
        return original(self, requests, *args)

    monkeypatch.setattr(type(sampling_model), "generate_until", counted)
    resumed = chunked_cache(sampling_model, tmp_path / "killed_rank0.db").generate_until(
        sampled_requests()
    )
    assert sent == [4], f"requests sent to the model per chunk on restart: {sent}"
    assert resumed == whole, "the restarted chunk was sampled otherwise"


def test_another_seed_keys_another_cache(tiny_model_dir):
    assert cache_key(tiny_model_dir, HARNESS, 0) != cache_key(tiny_model_dir, HARNESS, 1)


def test_in_scratch_the_cache_is_copied_back_after_each_chunk(
    sampling_model, tiny_model_dir, tmp_path
):
    """On a cluster the SQLite file works in node-local scratch (shared filesystems lock it)
    and the evaluation's own copy is brought up to date after every chunk: a job killed
    mid-evaluation loses at most one chunk there too."""
    from cfs.request_cache import cache_file, cached_requests, caching_lm_class, working_cache

    folder, scratch = tmp_path / "eval_cache", tmp_path / "scratch"
    kept_counts, work_files = [], []
    with working_cache(folder, scratch, tiny_model_dir, HARNESS, 0) as (
        prefix,
        copy_back,
    ):
        assert prefix.is_relative_to(scratch), f"the cache works at {prefix}"

        def after_chunk():
            copy_back()
            kept_counts.append(cached_requests(folder / prefix.name))
            work_files.append(cache_file(prefix).is_file())

        cache = caching_lm_class(4, 0, after_chunk)(sampling_model, str(cache_file(prefix)))
        answers = cache.generate_until(sampled_requests())
    assert kept_counts == [4, 8, 12], "requests in the evaluation's copy after each chunk"
    assert all(work_files)
    assert list(scratch.iterdir()) == [], "the working copy was left in scratch"
    with working_cache(folder, scratch, tiny_model_dir, HARNESS, 0) as (
        prefix,
        _,
    ):
        assert cached_requests(prefix) == 12, "a restart did not start from the copy back"
        again = caching_lm_class(4, 0)(sampling_model, str(cache_file(prefix)))
        assert again.generate_until(sampled_requests()) == answers
