"""The reasoning tasks' answers (tasks/reasoning/boxed_answers.py and the task YAMLs beside
it): the letter of a boxed answer in its LaTeX spellings (none where the box holds no
choice or is cut before it closes), GPQA Diamond's variant that reads the box before the
built-in extraction and is otherwise the built-in task, MedQA in the format the model was
trained on, and both tasks built and scored by lm-eval on local rows of their columns."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_jsonl

TASKS = REPO / "tasks" / "reasoning"


@pytest.fixture(scope="module")
def boxed():
    sys.path.insert(0, str(TASKS))
    try:
        import boxed_answers
    finally:
        sys.path.remove(str(TASKS))
    return boxed_answers


@pytest.mark.parametrize(
    "answer, letter",
    [
        (r"The answer is \boxed{B}.", "B"),
        (r"**Answer:** \boxed{(C)}", "C"),
        (r"\boxed{\text{D}}", "D"),
        (r"\boxed{\textbf{(A)} 3.2 eV}", "A"),
        (r"\boxed{B. 450 nm}", "B"),
        (r"\boxed {A}", "A"),
        (r"$\boxed{\mathrm{C}}$", "C"),
        (r"\boxed{Option B}", "B"),
        (r"first \boxed{A}, on reflection \boxed{C}", "C"),
        (r"\boxed{3.5}", None),
        (r"\boxed{E}", None),  # not one of four choices
        (r"\boxed{b}", None),
        (r"\boxed{Because}", None),
        ("The answer is (A)", None),
        (r"\boxed{B", None),  # cut before the brace closes
    ],
)
def test_boxed_letter(boxed, answer, letter):
    assert boxed.boxed_letter(answer) == letter


def task_filter(task_file: Path, name: str):
    """The task's filter pipeline `name`, built as lm-eval builds it."""
    from lm_eval.filters import build_filter_ensemble
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(task_file, resolve_func=True)
    (entry,) = [item for item in config["filter_list"] if item["name"] == name]
    steps = [
        (step["function"], {k: v for k, v in step.items() if k != "function"})
        for step in entry["filter"]
    ]
    return build_filter_ensemble(name, steps)


def filtered(ensemble, answers: list[str], doc: dict) -> list[str]:
    resps = [answers]
    for step in ensemble.filters:
        resps = list(step().apply(resps, [doc]))
    return resps[0] if isinstance(resps[0], list) else [resps[0]]


GPQA_DOC = {"choices": ["1 eV", "2 eV", "3 eV", "4 eV"], "answer": "(B)"}


def test_gpqa_boxed_filter_reads_the_box_first_then_the_built_in_extraction():
    task_file = TASKS / "gpqa_diamond_cot_zeroshot_boxed.yaml"
    boxed_first = task_filter(task_file, "boxed-flexible-extract")
    built_in = task_filter(task_file, "flexible-extract")
    assert filtered(boxed_first, [r"so \boxed{B}"], GPQA_DOC) == ["(B)"]
    assert filtered(built_in, [r"so \boxed{B}"], GPQA_DOC) == ["[invalid]"], (
        "the built-in extraction now reads a box"
    )
    # no box: the built-in extraction, unchanged
    for answer in ("The answer is (C).", "It must be 4 eV."):
        assert filtered(boxed_first, [answer], GPQA_DOC) == filtered(built_in, [answer], GPQA_DOC)
    # a box without a letter: the built-in extraction on the whole answer
    assert filtered(boxed_first, [r"(D) since \boxed{4}"], GPQA_DOC) == ["(D)"]


def test_gpqa_variant_is_the_built_in_task_but_for_its_filters():
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    built_in_file = Path(lm_eval.__file__).parent / "tasks" / "gpqa" / "cot_zeroshot"
    built_in = load_yaml(built_in_file / "gpqa_diamond_cot_zeroshot.yaml", resolve_func=True)
    variant = load_yaml(TASKS / "gpqa_diamond_cot_zeroshot_boxed.yaml", resolve_func=True)
    same = set(built_in) - {"task", "tag", "filter_list", "process_docs"}
    assert set(variant) - {"task", "filter_list", "process_docs"} == same
    assert {key: variant[key] for key in same} == {key: built_in[key] for key in same}
    assert variant["process_docs"].__code__.co_code == built_in["process_docs"].__code__.co_code
    assert variant["filter_list"][:2] == built_in["filter_list"]


def test_medqa_in_the_trained_format(boxed):
    task_file = TASKS / "medqa_4options_think.yaml"
    doc = {"sent1": "A 30-year-old man...", "label": 2}
    doc.update({f"ending{index}": f"Drug {index}" for index in range(4)})
    from datasets import Dataset

    (processed,) = boxed.medqa_docs(Dataset.from_list([doc]))
    assert processed["answer"] == "(C)" and processed["choices"][2] == "Drug 2"
    prompt = boxed.medqa_prompt(processed)
    assert prompt == (
        "A 30-year-old man...\nAnswer Choices:\nA. Drug 0\nB. Drug 1\nC. Drug 2\nD. Drug 3"
    )
    ensemble = task_filter(task_file, "boxed-flexible-extract")
    for answer in (r"\boxed{C}", "The answer is C. Drug 2", "Answer: C", "Drug 2."):
        assert filtered(ensemble, [answer], processed) == ["(C)"], answer


def local_copy(task_file: Path, folder: Path, rows: list[dict]) -> str:
    """The task with its hub dataset swapped for a local file of the same columns: the
    YAML as lm-eval builds it, offline."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(TASKS / "boxed_answers.py", folder)
    data = write_jsonl(folder / "rows.jsonl", rows)
    text = task_file.read_text()
    text = re.sub(r"^dataset_path: .*$", "dataset_path: json", text, flags=re.M)
    text = re.sub(r"^dataset_name: .*$", "", text, flags=re.M)
    for split in ("training_split", "validation_split", "test_split"):
        text = re.sub(rf"^{split}: .*$", f"{split}: train", text, flags=re.M)
    text += f"dataset_kwargs:\n  data_files:\n    train: {data}\n"
    name = re.search(r"^task: (.*)$", text, re.M).group(1)
    (folder / task_file.name).write_text(text)
    return name


def test_the_reasoning_tasks_build_and_score_in_lm_eval(tiny_model_dir, tmp_path):
    """Both local tasks, with their data swapped for local rows of the same columns, run
    through lm-eval end to end (a random model's answers: only the plumbing is tested)."""
    from cfs import evaluate
    from conftest import evaluation_settings

    medqa = [
        {"sent1": f"Question {i}?", "label": i % 4, **{f"ending{j}": f"drug {j}" for j in range(4)}}
        for i in range(3)
    ]
    gpqa = [
        {
            "Question": f"Which {i}?",
            "Correct Answer": "right",
            **{f"Incorrect Answer {j}": f"wrong {j}" for j in (1, 2, 3)},
        }
        for i in range(3)
    ]
    folder = tmp_path / "tasks"
    medqa_name = local_copy(TASKS / "medqa_4options_think.yaml", folder, medqa)
    gpqa_name = local_copy(TASKS / "gpqa_diamond_cot_zeroshot_boxed.yaml", folder / "g", gpqa)
    settings = evaluation_settings(
        include_path=str(folder),
        target={
            "task": medqa_name,
            "metric": "exact_match,boxed-flexible-extract",
            "gen_kwargs": {"max_gen_toks": 4},
        },
        forgetting=[
            {
                "task": gpqa_name,
                "metric": "exact_match,boxed-flexible-extract",
                "gen_kwargs": {"max_gen_toks": 4},
            }
        ],
        batch_size=4,
        dtype="float32",
    )
    scores, items, _, _ = evaluate.run_lm_eval(tiny_model_dir, settings)
    for name in (medqa_name, gpqa_name):
        assert 0.0 <= scores[name]["exact_match,boxed-flexible-extract"] <= 1.0
        assert len(items[name]) == 3
