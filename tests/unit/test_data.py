"""cfs.data: the seeded arithmetic task (cfs.arithmetic), and hub or local datasets with a
field mapping and prompt/response templates (the "any model, any dataset" worked example,
config/examples/my_study.yaml), as functions and as the `python -m cfs.data` CLI."""

from __future__ import annotations

import json
import operator
import re

import pytest
from cfs import data
from cfs.arithmetic import arithmetic_problems, prepare_arithmetic
from cfs.errors import SettingsError
from conftest import TEMPLATE, read_jsonl, task_settings, write_jsonl

SETTINGS = {
    "source": "arithmetic",
    "num_train": 40,
    "num_test": 20,
    "seed": 3,
    "steps": 2,
    "prompt_template": TEMPLATE,
}
ANSWER_LINE = re.compile(r"\nThe answer is: (-?\d+)$")
OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def test_problems_are_deterministic_in_seed():
    assert arithmetic_problems(30, seed=5) == arithmetic_problems(30, seed=5)
    assert arithmetic_problems(30, seed=5) != arithmetic_problems(30, seed=6), (
        "seeds 5 and 6 gave the same problems"
    )


def test_problems_are_distinct_and_counted():
    problems = arithmetic_problems(200, seed=0)
    assert len(problems) == 200
    assert len({p["query"] for p in problems}) == 200


@pytest.mark.parametrize("steps", [1, 2])
def test_every_response_ends_with_its_answer_and_the_arithmetic_holds(steps):
    for problem in arithmetic_problems(300, seed=1, steps=steps):
        match = ANSWER_LINE.search(problem["response"])
        assert match is not None, f"no 'The answer is:' line ending: {problem['response']}"
        assert match.group(1) == problem["answer"]
        equations = EQUATION.findall(problem["response"])
        assert len(equations) > 0, f"no equation in: {problem['response']}"
        for left, op, right, result in equations:
            assert OPERATORS[op](int(left), int(right)) == int(result), problem["response"]
        # the last equation's result is the answer
        assert equations[-1][3] == problem["answer"]
        assert len(equations) == steps, problem["response"]


def test_sharing_problem_does_not_ask_what_the_giver_receives():
    """'Ava ... shares the rest among 3 friends, including Ava. How many does Ava get?'
    is not a well-posed question: the friend must differ from the person sharing."""
    for problem in arithmetic_problems(400, seed=0):
        match = re.match(r"(\w+) has \d+ \w+, keeps .* including (\w+)\.", problem["query"])
        if match:
            assert match.group(1) != match.group(2), f"the giver receives: {problem['query']}"


def test_train_and_test_are_disjoint_and_sized():
    train, test = prepare_arithmetic(SETTINGS)
    assert (len(train), len(test)) == (40, 20)
    assert {r["query"] for r in train} & {r["query"] for r in test} == set()


@pytest.mark.parametrize("steps", [1, 2])
def test_no_test_problem_repeats_a_fact_of_another_problem_or_of_training(steps):
    """A problem's arithmetic (its equations) is its fact: a test problem that repeats a
    training problem's sum with another name and item measures recall, not learning."""
    train, test = prepare_arithmetic(
        {**SETTINGS, "steps": steps, "num_train": 256, "num_test": 150}
    )
    facts = [tuple(EQUATION.findall(record["response"])) for record in test]
    assert len(set(facts)) == len(facts), "two test problems share a fact"
    shared = {tuple(EQUATION.findall(record["response"])) for record in train} & set(facts)
    assert shared == set(), f"training problems repeat test facts: {sorted(shared)[:3]}"


def test_more_test_problems_than_facts_is_a_settings_error():
    # one-step problems hold 19 x 8 sums and as many differences
    with pytest.raises(SettingsError, match="task.num_test"):
        prepare_arithmetic({**SETTINGS, "steps": 1, "num_test": 305})


def test_prompts_use_the_template():
    train, test = prepare_arithmetic(SETTINGS)
    for record in train + test:
        assert record["prompt"] == TEMPLATE.format(query=record["query"])


def test_template_with_unknown_field_is_a_settings_error():
    with pytest.raises(SettingsError, match="prompt_template"):
        prepare_arithmetic({**SETTINGS, "prompt_template": "Q: {question}\nA:"})


def test_cli_writes_train_test_and_provenance(tmp_path):
    train_path, test_path = tmp_path / "d" / "train.jsonl", tmp_path / "d" / "test.jsonl"
    data.main(
        ["--settings", json.dumps(SETTINGS), "--train", str(train_path), "--test", str(test_path)]
    )
    train, test = read_jsonl(train_path), read_jsonl(test_path)
    assert (len(train), len(test)) == (40, 20)
    fields = {"query", "prompt", "response", "answer"}
    assert fields <= set(train[0]), f"a record lacks one of {fields}: {train[0]}"
    assert (train, test) == prepare_arithmetic(SETTINGS)
    prov = json.loads((tmp_path / "d" / "train.provenance.json").read_text())
    assert prov["seed"] == 3
    assert (prov["num_train"], prov["num_test"]) == (40, 20)
    assert prov["settings"]["prompt_template"] == TEMPLATE


def test_cli_rejects_unknown_source(tmp_path):
    with pytest.raises(SettingsError, match="source"):
        data.main(
            [
                "--settings",
                json.dumps({**SETTINGS, "source": "gsm8k"}),
                "--train",
                str(tmp_path / "a.jsonl"),
                "--test",
                str(tmp_path / "b.jsonl"),
            ]
        )
    assert list(tmp_path.iterdir()) == []


def test_cli_missing_setting_names_it(tmp_path):
    settings = {k: v for k, v in SETTINGS.items() if k != "num_test"}
    with pytest.raises(SettingsError, match="num_test"):
        data.main(
            [
                "--settings",
                json.dumps(settings),
                "--train",
                str(tmp_path / "a.jsonl"),
                "--test",
                str(tmp_path / "b.jsonl"),
            ]
        )


# --------------------------------------------------------------------------- any dataset

FIELDS = {"query": "question", "options": "options", "reasoning": "reasoning", "answer": "answer"}
R1_PROMPT = "<｜User｜>{query}\n{options}<｜Assistant｜><think>\n"
R1_RESPONSE = "{reasoning}\n</think>\n\n{answer}"


def medical_rows(count: int) -> list[dict]:
    return [
        {
            "question": f"Question {n}?",
            "options": f"A. x{n}\nB. y{n}" if n % 3 else None,
            "reasoning": f"Because {n}.",
            "answer": f"A. x{n}",
            "extra": n,
        }
        for n in range(count)
    ]


def local_settings(data_files, **extra) -> dict:
    return task_settings(
        **{
            "name": "med",
            "source": "local",
            "data_files": data_files,
            "fields": FIELDS,
            "prompt_template": R1_PROMPT,
            "response_template": R1_RESPONSE,
            "num_train": 12,
            "num_test": 5,
            "seed": 4,
            **extra,
        }
    )


def run_data_stage(settings: dict, out_dir) -> tuple[list[dict], list[dict], dict]:
    train, test = out_dir / "train.jsonl", out_dir / "test.jsonl"
    data.main(["--settings", json.dumps(settings), "--train", str(train), "--test", str(test)])
    provenance = json.loads(train.with_suffix(".provenance.json").read_text())
    return read_jsonl(train), read_jsonl(test), provenance


def test_local_jsonl_dataset_with_field_mapping_and_templates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data_files are relative to the working directory
    write_jsonl(tmp_path / "med.jsonl", medical_rows(40))
    train, test, provenance = run_data_stage(local_settings("med.jsonl"), tmp_path / "out")
    assert (len(train), len(test)) == (12, 5)
    example = train[0]
    row = medical_rows(40)[example["source_index"]]
    options = row["options"] or ""  # a missing optional field renders empty
    assert example["prompt"] == f"<｜User｜>{row['question']}\n{options}<｜Assistant｜><think>\n"
    assert example["response"] == f"{row['reasoning']}\n</think>\n\n{row['answer']}"
    assert example["query"] == row["question"]
    held_out = {r["source_index"] for r in test}
    assert held_out & {r["source_index"] for r in train} == set()
    assert (provenance["num_train"], provenance["rows_in_split"]) == (12, 40)
    again, _, _ = run_data_stage(local_settings("med.jsonl"), tmp_path / "again")
    assert again == train, "the same seed chose another subset"
    other, _, _ = run_data_stage(local_settings("med.jsonl", seed=5), tmp_path / "other")
    assert [r["source_index"] for r in other] != [r["source_index"] for r in train], (
        "seeds 4 and 5 chose the same subset"
    )


def test_local_parquet_dataset_with_its_own_test_split(tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    pd.DataFrame(medical_rows(30)).to_parquet(tmp_path / "train.parquet")
    pd.DataFrame(medical_rows(8)).to_parquet(tmp_path / "test.parquet")
    settings = local_settings(
        {"train": "train.parquet", "test": "test.parquet"}, test_split="test", num_train=100
    )
    train, test, provenance = run_data_stage(settings, tmp_path / "out")
    assert len(train) == 30  # fewer rows than num_train: all of them
    assert len(test) == 5
    outside = [r["source_index"] for r in test if r["source_index"] >= 8]
    assert outside == [], "test records from outside the 8 rows of the test split"
    assert provenance["test_split"] == "test"


def test_default_fields_are_query_and_response(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"query": f"q{n}", "response": f"r{n}\nThe answer is: {n}"} for n in range(10)]
    rows.append({"query": "", "response": "no question"})  # skipped: empty query
    write_jsonl(tmp_path / "mm.jsonl", rows)
    settings = task_settings(
        name="mm",
        source="local",
        data_files=["mm.jsonl"],
        prompt_template="### Instruction:\n{query}\n\n### Response:\n",
        num_train=20,
        num_test=1,
        seed=0,
    )
    train, test, _ = run_data_stage(settings, tmp_path / "out")
    assert (len(train), test) == (10, [])
    assert sorted(r["response"] for r in train) == sorted(r["response"] for r in rows[:10])


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"fields": {**FIELDS, "answer": "final_answer"}}, "final_answer"),
        ({"fields": {"reasoning": "reasoning"}}, "must map `query`"),
        ({"response_template": "{reasoning} {rationale}"}, "rationale"),
        ({"data_files": "missing.jsonl"}, "missing.jsonl"),
        ({"data_files": "med.txt"}, "JSONL, JSON, Parquet or CSV"),
        ({"data_files": {"train": "med.jsonl"}, "split": "validation"}, "validation"),
    ],
    ids=["unknown-column", "no-query", "unmapped-placeholder", "no-file", "kind", "no-split"],
)
def test_dataset_mistakes_name_the_key(tmp_path, monkeypatch, change, needle):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "med.jsonl", medical_rows(5))
    (tmp_path / "med.txt").write_text("x")
    with pytest.raises(SettingsError) as caught:
        data.prepare_dataset({**local_settings("med.jsonl"), **change})
    for expected in (needle, "task."):
        assert expected in str(caught.value), f"{expected!r} not in: {caught.value}"
