"""cfs.mix: task examples plus round(ratio * n_task) samples of a kind (context-free,
contextual or replayed), seeded, as functions and as the `python -m cfs.mix` command, which
streams the sample file (the bytes of the in-memory mix, with only line offsets held)."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc

import pytest
from cfs import mix
from cfs.errors import DataError, SettingsError
from cfs.study import SAMPLE_KINDS
from conftest import PACKAGE_DIR, read_jsonl, stage_settings, write_jsonl

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
    assert sets[0.25] < sets[0.5], "ratio 0.25's samples are not among ratio 0.5's"
    assert sets[0.5] < sets[1.0], "ratio 0.5's samples are not among ratio 1's"


def test_shuffle_is_seeded():
    a = mix.mix_at_ratio(task_records(), samples(), 0.5, seed=1)
    b = mix.mix_at_ratio(task_records(), samples(), 0.5, seed=1)
    c = mix.mix_at_ratio(task_records(), samples(), 0.5, seed=2)
    assert a == b, "the same seed gave another order"
    assert a != c, "seeds 1 and 2 gave the same order"
    assert sorted(map(json.dumps, a)) == sorted(map(json.dumps, c))
    unshuffled = ["task"] * N_TASK + ["context_free"] * 6
    assert [r["kind"] for r in a] != unshuffled, "the task examples come first, unshuffled"


def test_more_samples_than_generated_names_the_counts():
    with pytest.raises(DataError) as caught:
        mix.mix_at_ratio(task_records(), samples(5), 1.0, seed=0)
    message = str(caught.value)
    for needle in ("needs 12", "only 5", "num_samples"):
        assert needle in message, f"{needle!r} not in: {message}"


def test_negative_ratio_is_rejected():
    with pytest.raises(SettingsError, match="ratio"):
        mix.mix_at_ratio(task_records(), samples(), -0.5, seed=0)


# --------------------------------------------------------------------------- CLI


def mix_settings(ratio: float, seed: int) -> dict:
    """cfs.mix's settings for a context-free cell at `ratio` (plain fine-tuning at 0)."""
    cell = f"temp1/ratio{ratio:g}" if ratio else "ratio0"
    return stage_settings().mix(cell, seed)


def run_cli(tmp_path, ratio, generations=None, out_name="mixed.jsonl", seed=0):
    task = write_jsonl(tmp_path / "train.jsonl", task_records())
    out = tmp_path / "out" / out_name
    argv = [
        "--task",
        str(task),
        "--settings",
        json.dumps(mix_settings(ratio, seed)),
        "--out",
        str(out),
    ]
    if generations is not None:
        argv += ["--generations", str(generations)]
    mix.main(argv)
    return out


def written(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


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
    assert (len(small), len(large)) == (3, 12)
    assert set(small) < set(large), "ratio 0.25's samples are not among ratio 1's"


def test_cli_empty_generations_file_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "context_free.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=str(empty)):
        run_cli(tmp_path, 0.5, empty)
    assert written(tmp_path / "out") == [], "files written for an empty generations file"


def test_cli_too_few_generations_writes_nothing(tmp_path):
    generations = write_jsonl(tmp_path / "context_free.jsonl", samples(4))
    with pytest.raises(DataError, match="only 4"):
        run_cli(tmp_path, 0.5, generations)
    assert written(tmp_path / "out") == [], "files written for too few generations"


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
            "--settings",
            json.dumps(mix_settings(0.5, 0)),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(PACKAGE_DIR), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert result.returncode == 1, f"exit code {result.returncode}:\n{result.stderr}"
    assert str(empty) in result.stderr, f"the message does not name {empty}:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    assert written(tmp_path) == ["empty.jsonl", "train.jsonl"], "output written on an error"


@pytest.mark.parametrize("kind", sorted(SAMPLE_KINDS))
def test_mix_keeps_each_kinds_fields(kind):
    """Each kind's records keep the fields its training examples need, and only those."""
    fields = SAMPLE_KINDS[kind].fields
    record = {"index": 0, "source": "x", "text": "t"} | {field: [5] for field in fields}
    mixed = mix.mix_at_ratio(task_records(4), [record] * 2, 0.5, seed=0, kind=kind)
    synthetic = [r for r in mixed if r["kind"] == kind]
    assert len(synthetic) == 2
    assert sorted(synthetic[0]) == sorted({"kind", *fields})


# --------------------------------------------------------------------------- streaming


def streamed_task_records(count: int) -> list[dict]:
    return [
        {"prompt": f"Question {i}: é?", "response": f"Answer {i} ✓", "query": f"q{i}", "x": i}
        for i in range(count)
    ]


def sample_records(count: int, length: int = 8) -> list[dict]:
    return [
        {
            "index": i,
            "prompt_token_id": 1,
            "token_ids": list(range(i, i + length)),
            "finish_reason": "eos" if i % 3 else "length",
            "text": f"sample {i} ü",
        }
        for i in range(count)
    ]


@pytest.mark.parametrize("ratio, seed", [(0.0, 0), (0.25, 1), (0.5, 7), (1.0, 3)])
def test_streamed_mix_writes_the_bytes_of_the_in_memory_mix(tmp_path, ratio, seed):
    task = write_jsonl(tmp_path / "train.jsonl", streamed_task_records(40))
    samples = sample_records(50)
    generations = write_jsonl(tmp_path / "context_free.jsonl", samples)
    (tmp_path / "blank.jsonl").write_text(
        "\n" + generations.read_text().replace("\n", "\n\n", 3), encoding="utf-8"
    )
    expected = write_jsonl(
        tmp_path / "expected.jsonl",
        mix.mix_at_ratio(streamed_task_records(40), samples, ratio, seed),
    )
    for source in ("context_free.jsonl", "blank.jsonl"):  # blank lines are skipped alike
        out = tmp_path / f"out_{source}"
        argv = ["--task", str(task), "--out", str(out)]
        argv += ["--settings", json.dumps(mix_settings(ratio, seed))]
        if ratio:
            argv += ["--generations", str(tmp_path / source)]
        mix.main(argv)
        assert out.read_bytes() == expected.read_bytes()


def test_streamed_mix_holds_line_offsets_not_records(tmp_path):
    """The sample file is read line by line: Python's peak memory stays a small part of
    the file (read whole, its records would take several times the file)."""
    task = write_jsonl(tmp_path / "train.jsonl", streamed_task_records(1000))
    generations = write_jsonl(tmp_path / "cf.jsonl", sample_records(1000, length=2000))
    size = generations.stat().st_size
    argv = ["--task", str(task), "--generations", str(generations)]
    argv += ["--settings", json.dumps(mix_settings(1, 0)), "--out", str(tmp_path / "mixed.jsonl")]
    tracemalloc.start()
    try:
        mix.main(argv)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size > 8_000_000
    assert peak < size / 10, f"peak {peak} bytes for a {size}-byte sample file"
