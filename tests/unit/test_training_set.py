"""cfs.training_set: the main process tokenizes the training set once into Arrow files;
every process memory-maps them, and a restarted run reuses them while its inputs hold."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from accelerate import PartialState
from cfs import examples, training_set
from cfs.modeling import load_tokenizer
from cfs.study import METHODS
from conftest import (
    context_free_samples,
    quick_train_settings,
    read_jsonl,
    task_records,
    write_jsonl,
)

NUM_TASK = 8


class OtherProcess:
    """A process other than the main one, as accelerate's PartialState presents it."""

    is_main_process = False

    @contextlib.contextmanager
    def main_process_first(self):
        yield


class NoTokenizer:
    def __call__(self, *args, **kwargs):
        raise AssertionError("the training set was tokenized again")


@pytest.fixture
def mixed(tmp_path):
    records = task_records(NUM_TASK, seed=2) + context_free_samples(NUM_TASK // 2)
    return write_jsonl(tmp_path / "train.jsonl", records)


def prepare(model_dir, data: Path, folder: Path, tokenizer=None, state=None, **overrides):
    settings = quick_train_settings(mixing="equal_steps", **overrides)
    return training_set.prepare_training_set(
        state or PartialState(cpu=True),
        METHODS[settings["method"]["name"]],
        settings,
        model_dir,
        tokenizer or load_tokenizer(model_dir),
        data,
        folder,
    )


def test_the_set_is_memory_mapped_in_the_schedule_order(tiny_model_dir, mixed, tmp_path):
    folder = tmp_path / "checkpoints.tokenized"
    built = prepare(tiny_model_dir, mixed, folder)
    assert built.rows.cache_files, "the rows are read from Arrow files, not held in memory"
    assert all(Path(f["filename"]).is_relative_to(folder) for f in built.rows.cache_files)
    tokenizer = load_tokenizer(tiny_model_dir)
    records = read_jsonl(mixed)
    expected = examples.build_examples(records, tokenizer, 64, str(mixed))
    assert len(built.rows) == len(built.schedule.order)
    for row, index in zip(built.rows, built.schedule.order, strict=True):
        assert row["input_ids"] == expected[index]["input_ids"]
        assert row["labels"] == expected[index]["labels"]
        assert row["task_example"] == int(records[index]["kind"] == examples.TASK)
    assert built.facts["num_examples"] == len(records)
    assert built.facts["num_synthetic_in_set"] == NUM_TASK // 2


def test_a_restarted_run_reuses_the_set_and_a_changed_input_rebuilds_it(
    tiny_model_dir, mixed, tmp_path
):
    folder = tmp_path / "checkpoints.tokenized"
    first = prepare(tiny_model_dir, mixed, folder)
    again = prepare(tiny_model_dir, mixed, folder, tokenizer=NoTokenizer())
    assert again.fingerprint == first.fingerprint
    write_jsonl(mixed, task_records(NUM_TASK, seed=5) + context_free_samples(NUM_TASK // 2))
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare(tiny_model_dir, mixed, folder, tokenizer=NoTokenizer())
    assert prepare(tiny_model_dir, mixed, folder).fingerprint != first.fingerprint


def test_other_processes_read_neither_the_data_nor_the_tokenizer(tiny_model_dir, mixed, tmp_path):
    folder = tmp_path / "checkpoints.tokenized"
    main = prepare(tiny_model_dir, mixed, folder)
    mixed.unlink()
    other = prepare(tiny_model_dir, mixed, folder, tokenizer=NoTokenizer(), state=OtherProcess())
    assert other.fingerprint == main.fingerprint
    assert other.rows.cache_files and len(other.rows) == len(main.rows)


def test_a_build_cut_short_is_not_reused(tiny_model_dir, mixed, tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints.tokenized"

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(training_set, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare(tiny_model_dir, mixed, folder)
    monkeypatch.undo()
    assert not folder.exists()
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare(tiny_model_dir, mixed, folder, tokenizer=NoTokenizer())
