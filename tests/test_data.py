"""cfs.data: the seeded arithmetic task, as functions and as the `python -m cfs.data` CLI."""

from __future__ import annotations

import json
import operator
import re

import pytest
from cfs import data
from cfs.errors import SettingsError
from conftest import TEMPLATE, read_jsonl

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
    assert data.arithmetic_problems(30, seed=5) == data.arithmetic_problems(30, seed=5)
    assert data.arithmetic_problems(30, seed=5) != data.arithmetic_problems(30, seed=6)


def test_problems_are_distinct_and_counted():
    problems = data.arithmetic_problems(200, seed=0)
    assert len(problems) == 200
    assert len({p["query"] for p in problems}) == 200


@pytest.mark.parametrize("steps", [1, 2])
def test_every_response_ends_with_its_answer_and_the_arithmetic_holds(steps):
    for problem in data.arithmetic_problems(300, seed=1, steps=steps):
        match = ANSWER_LINE.search(problem["response"])
        assert match, problem["response"]
        assert match.group(1) == problem["answer"]
        equations = EQUATION.findall(problem["response"])
        assert equations, problem["response"]
        for left, op, right, result in equations:
            assert OPERATORS[op](int(left), int(right)) == int(result), problem["response"]
        # the last equation's result is the answer
        assert equations[-1][3] == problem["answer"]
        assert len(equations) == steps, problem["response"]


def test_sharing_problem_does_not_ask_what_the_giver_receives():
    """'Ava ... shares the rest among 3 friends, including Ava. How many does Ava get?'
    is not a well-posed question: the friend must differ from the person sharing."""
    for problem in data.arithmetic_problems(400, seed=0):
        match = re.match(r"(\w+) has \d+ \w+, keeps .* including (\w+)\.", problem["query"])
        if match:
            assert match.group(1) != match.group(2), problem["query"]


def test_train_and_test_are_disjoint_and_sized():
    train, test = data.prepare_arithmetic(SETTINGS)
    assert (len(train), len(test)) == (40, 20)
    assert not {r["query"] for r in train} & {r["query"] for r in test}


def test_prompts_use_the_template():
    train, test = data.prepare_arithmetic(SETTINGS)
    for record in train + test:
        assert record["prompt"] == TEMPLATE.format(query=record["query"])
        assert record["prompt"].startswith("### Instruction:\n")
        assert record["prompt"].endswith("### Response:\n")


def test_template_with_unknown_field_is_a_settings_error():
    with pytest.raises(SettingsError, match="prompt_template"):
        data.prepare_arithmetic({**SETTINGS, "prompt_template": "Q: {question}\nA:"})


def test_cli_writes_train_test_and_provenance(tmp_path):
    train_path, test_path = tmp_path / "d" / "train.jsonl", tmp_path / "d" / "test.jsonl"
    data.main(
        ["--settings", json.dumps(SETTINGS), "--train", str(train_path), "--test", str(test_path)]
    )
    train, test = read_jsonl(train_path), read_jsonl(test_path)
    assert (len(train), len(test)) == (40, 20)
    assert set(train[0]) >= {"query", "prompt", "response", "answer"}
    expected_train, expected_test = data.prepare_arithmetic(SETTINGS)
    assert train == expected_train and test == expected_test
    prov = json.loads((tmp_path / "d" / "train.provenance.json").read_text())
    assert prov["seed"] == 3
    assert prov["num_train"] == 40 and prov["num_test"] == 20
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
