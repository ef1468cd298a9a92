"""cfs.mix: task examples plus round(ratio * n_task) context-free samples."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cfs import mix
from cfs.errors import DataError, SettingsError
from conftest import PACKAGE_DIR, read_jsonl, write_jsonl

N_TASK, N_GENERATED = 12, 20


def task_records(n=N_TASK):
    return [{"prompt": f"Q{i}?\n", "response": f"A{i}.", "answer": str(i)} for i in range(n)]


def samples(n=N_GENERATED):
    return [
        {
            "index": i,
            "prompt_token_id": 1,
            "token_ids": [10 + i, 20 + i, 2] if i % 3 else [10 + i, 30 + i, 40 + i],
            "finish_reason": "eos" if i % 3 else "length",
            "text": f"sample {i}",
        }
        for i in range(n)
    ]


def synthetic(mixed):
    return [tuple(r["token_ids"]) for r in mixed if r["kind"] == "context_free"]


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 1.0, 1.5])
def test_mixed_size_is_task_plus_rounded_ratio(ratio):
    mixed = mix.mix_at_ratio(task_records(), samples(), ratio, seed=0)
    expected_synthetic = round(ratio * N_TASK)
    assert len(mixed) == N_TASK + expected_synthetic
    assert sum(r["kind"] == "task" for r in mixed) == N_TASK
    assert len(synthetic(mixed)) == expected_synthetic


def test_task_examples_all_present_with_prompt_and_response():
    mixed = mix.mix_at_ratio(task_records(), samples(), 0.5, seed=0)
    got = sorted((r["prompt"], r["response"]) for r in mixed if r["kind"] == "task")
    assert got == sorted((r["prompt"], r["response"]) for r in task_records())


def test_synthetic_samples_keep_prompt_id_and_finish_reason():
    mixed = mix.mix_at_ratio(task_records(), samples(), 1.0, seed=0)
    by_ids = {tuple(s["token_ids"]): s for s in samples()}
    for record in mixed:
        if record["kind"] == "context_free":
            source = by_ids[tuple(record["token_ids"])]
            assert record["prompt_token_id"] == source["prompt_token_id"]
            assert record["finish_reason"] == source["finish_reason"]


def test_synthetic_samples_are_taken_in_generation_order():
    mixed = mix.mix_at_ratio(task_records(), samples(), 0.5, seed=0)
    first_six = {tuple(s["token_ids"]) for s in samples()[:6]}
    assert set(synthetic(mixed)) == first_six


def test_smaller_ratio_is_subset_of_larger():
    sets = {
        ratio: set(synthetic(mix.mix_at_ratio(task_records(), samples(), ratio, seed=ratio_seed)))
        for ratio_seed, ratio in enumerate([0.25, 0.5, 1.0])
    }
    assert sets[0.25] < sets[0.5] < sets[1.0]


def test_shuffle_is_seeded():
    a = mix.mix_at_ratio(task_records(), samples(), 0.5, seed=1)
    b = mix.mix_at_ratio(task_records(), samples(), 0.5, seed=1)
    c = mix.mix_at_ratio(task_records(), samples(), 0.5, seed=2)
    assert a == b
    assert a != c
    assert sorted(map(json.dumps, a)) == sorted(map(json.dumps, c))
    assert [r["kind"] for r in a] != ["task"] * N_TASK + ["context_free"] * 6  # shuffled


def test_more_samples_than_generated_names_the_counts():
    with pytest.raises(DataError) as caught:
        mix.mix_at_ratio(task_records(), samples(5), 1.0, seed=0)
    message = str(caught.value)
    assert "needs 12" in message and "only 5" in message
    assert "num_samples" in message


def test_negative_ratio_is_rejected():
    with pytest.raises(SettingsError, match="ratio"):
        mix.mix_at_ratio(task_records(), samples(), -0.5, seed=0)


# --------------------------------------------------------------------------- CLI


def run_cli(tmp_path, ratio, generations=None, out_name="mixed.jsonl", seed=0):
    task = write_jsonl(tmp_path / "train.jsonl", task_records())
    out = tmp_path / "out" / out_name
    argv = [
        "--task",
        str(task),
        "--ratio",
        str(ratio),
        "--settings",
        json.dumps({"seed": seed}),
        "--out",
        str(out),
    ]
    if generations is not None:
        argv += ["--generations", str(generations)]
    mix.main(argv)
    return out


@pytest.mark.parametrize("ratio", [0, 0.25, 0.5, 1.0])
def test_cli_sizes_and_provenance(tmp_path, ratio):
    generations = write_jsonl(tmp_path / "context_free.jsonl", samples())
    out = run_cli(tmp_path, ratio, generations if ratio else None)
    mixed = read_jsonl(out)
    assert len(mixed) == N_TASK + round(ratio * N_TASK)
    prov = json.loads(out.with_suffix(".provenance.json").read_text())
    assert prov["ratio"] == ratio
    assert prov["num_task"] == N_TASK
    assert prov["num_synthetic"] == round(ratio * N_TASK)
    assert prov["seed"] == 0


def test_cli_smaller_ratio_subset_of_larger(tmp_path):
    generations = write_jsonl(tmp_path / "context_free.jsonl", samples())
    small = synthetic(read_jsonl(run_cli(tmp_path, 0.25, generations, "small.jsonl")))
    large = synthetic(read_jsonl(run_cli(tmp_path, 1.0, generations, "large.jsonl")))
    assert len(small) == 3 and len(large) == 12
    assert set(small) < set(large)


def test_cli_empty_generations_file_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "context_free.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=str(empty)):
        run_cli(tmp_path, 0.5, empty)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_too_few_generations_writes_nothing(tmp_path):
    generations = write_jsonl(tmp_path / "context_free.jsonl", samples(4))
    with pytest.raises(DataError, match="only 4"):
        run_cli(tmp_path, 0.5, generations)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_generation_missing_field_names_file_and_line(tmp_path):
    records = samples(6)
    del records[2]["finish_reason"]
    generations = write_jsonl(tmp_path / "context_free.jsonl", records)
    with pytest.raises(DataError, match=r"context_free.jsonl:3: .*finish_reason"):
        run_cli(tmp_path, 0.5, generations)


def test_cli_positive_ratio_without_generations_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match="--generations"):
        run_cli(tmp_path, 0.5, None)


def test_module_cli_exits_1_with_one_clear_line_on_empty_generations(tmp_path):
    task = write_jsonl(tmp_path / "train.jsonl", task_records())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = tmp_path / "mixed.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cfs.mix",
            "--task",
            str(task),
            "--generations",
            str(empty),
            "--ratio",
            "0.5",
            "--settings",
            '{"seed": 0}',
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(PACKAGE_DIR), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert result.returncode == 1
    assert str(empty) in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert not out.with_suffix(".provenance.json").exists()
