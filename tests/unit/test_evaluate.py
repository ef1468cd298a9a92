"""cfs.evaluate: KL to the base model on held-out context-free samples (the
regulariser's token KL), metric summaries, the lm-eval settings it passes (batch size,
backend, model arguments, and of cfs.lm_eval_tasks: sampled answers averaged into
pass@1, tasks built after seeding), answers cut before a reasoning model's think-end
token counted in the eval's record, and the whole stage (lm-eval on a local target and
forgetting task) through its CLI."""

from __future__ import annotations

import functools
import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cfs import arithmetic, evaluate, generate, heldout, lm_eval_tasks, objectives, tokens
from cfs.errors import SettingsError
from cfs.generate import sample_context_free
from cfs.modeling import load_model, load_tokenizer
from conftest import (
    REPO,
    TEMPLATE,
    evaluation_settings,
    generation_settings,
    read_jsonl,
    task_entry,
    write_jsonl,
)

MC_TASK = "cfs_test_mc"


@pytest.fixture(scope="module")
def heldout_samples(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir, "float32").eval(), load_tokenizer(tiny_model_dir)
    samples = sample_context_free(
        model,
        tokenizer,
        num_samples=5,
        max_new_tokens=9,
        temperature=1.0,
        top_p=1.0,
        seed=3,
        batch_size=5,
        prompt_token_id=1,
    )
    # ragged lengths, so padding is exercised
    for cut, record in zip([9, 4, 7, 2, 9], samples, strict=True):
        record["token_ids"] = record["token_ids"][:cut]
    return samples


def reference_kl_and_nll(base, model, samples):
    """Token by token, one sample at a time, no padding."""
    kls, nlls = [], []
    for record in samples:
        ids = torch.tensor([[record["prompt_token_id"], *record["token_ids"]]])
        with torch.no_grad():
            p = F.log_softmax(base(ids).logits[0, :-1].double(), -1)
            q = F.log_softmax(model(ids).logits[0, :-1].double(), -1)
        kls += (p.exp() * (p - q)).sum(-1).tolist()
        nlls += (-q.gather(-1, ids[0, 1:, None])).squeeze(-1).tolist()
    return sum(kls) / len(kls), sum(nlls) / len(nlls), len(kls)


def test_kl_is_exactly_zero_for_identical_models(tiny_model_dir, heldout_samples):
    base = load_model(tiny_model_dir, "float32").eval()
    same = load_model(tiny_model_dir, "float32").eval()
    result = evaluate.kl_to_base(base, same, heldout_samples, batch_size=2)
    assert result["kl_to_base"] == 0.0
    nll = result["heldout_nll"]
    assert math.isfinite(nll) and nll > 0, f"held-out NLL {nll}, expected finite and positive"
    assert result["heldout_tokens"] == sum(len(r["token_ids"]) for r in heldout_samples)


def test_kl_is_positive_after_perturbing_weights(
    tiny_model_dir, perturbed_model_dir, heldout_samples
):
    base = load_model(tiny_model_dir, "float32").eval()
    changed = load_model(perturbed_model_dir, "float32").eval()
    result = evaluate.kl_to_base(base, changed, heldout_samples, batch_size=2)
    kl, nll = result["kl_to_base"], result["heldout_nll"]
    assert math.isfinite(kl) and kl > 0, f"KL {kl}, expected finite and positive"
    assert math.isfinite(nll), f"held-out NLL {nll}"


def test_kl_and_nll_match_a_token_by_token_reference(
    tiny_model_dir, perturbed_model_dir, heldout_samples
):
    base = load_model(tiny_model_dir, "float32").eval()
    changed = load_model(perturbed_model_dir, "float32").eval()
    kl, nll, count = reference_kl_and_nll(base, changed, heldout_samples)
    for batch_size in (1, 3, 8):
        result = evaluate.kl_to_base(base, changed, heldout_samples, batch_size=batch_size)
        assert result["heldout_tokens"] == count
        assert result["kl_to_base"] == pytest.approx(kl, rel=1e-4)
        assert result["heldout_nll"] == pytest.approx(nll, rel=1e-5)


def test_kl_direction_is_base_to_model(tiny_model_dir, perturbed_model_dir, heldout_samples):
    base = load_model(tiny_model_dir, "float32").eval()
    changed = load_model(perturbed_model_dir, "float32").eval()
    forward = evaluate.kl_to_base(base, changed, heldout_samples)["kl_to_base"]
    backward = evaluate.kl_to_base(changed, base, heldout_samples)["kl_to_base"]
    reference, _, _ = reference_kl_and_nll(base, changed, heldout_samples)
    assert forward == pytest.approx(reference, rel=1e-4)
    assert forward != pytest.approx(backward, rel=1e-6), (
        f"KL(base || model) {forward} equals KL(model || base) {backward}"
    )


def test_heldout_batches_right_pad_and_mask():
    samples = [
        {"prompt_token_id": 1, "token_ids": [5, 6, 7]},
        {"prompt_token_id": 1, "token_ids": [8]},
    ]
    ((ids, mask),) = heldout.padded_batches(samples, batch_size=2)
    assert ids.tolist() == [[1, 5, 6, 7], [1, 8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


SETTINGS = {
    "target": {"task": "cfs_arith", "metric": "exact_match,flexible-extract"},
    "forgetting": [{"task": "a", "metric": "acc,none"}, {"task": "b", "metric": "acc,none"}],
}


def test_summarise_averages_forgetting_tasks():
    scores = {
        "cfs_arith": {"exact_match,flexible-extract": 0.25, "exact_match,strict-match": 0.0},
        "a": {"acc,none": 0.5},
        "b": {"acc,none": 0.75},
    }
    summary = evaluate.summarise(scores, SETTINGS)
    assert summary == {"target": 0.25, "forgetting_avg": 0.625, "forgetting": {"a": 0.5, "b": 0.75}}


def test_missing_metric_names_task_metric_and_what_exists():
    scores = {
        "cfs_arith": {"exact_match,strict-match": 0.0},
        "a": {"acc,none": 0.5},
        "b": {"acc,none": 0.5},
    }
    with pytest.raises(SettingsError) as caught:
        evaluate.summarise(scores, SETTINGS)
    message = str(caught.value)
    for needle in ("exact_match,flexible-extract", "cfs_arith", "exact_match,strict-match"):
        assert needle in message, f"{needle!r} not in: {message}"


def test_base_model_without_heldout_is_rejected(tiny_model_dir, tmp_path):
    with pytest.raises(SettingsError, match="--heldout"):
        evaluate.main(
            [
                "--model",
                str(tiny_model_dir),
                "--base-model",
                str(tiny_model_dir),
                "--settings",
                "{}",
                "--out",
                str(tmp_path / "eval.json"),
            ]
        )
    assert not (tmp_path / "eval.json").exists(), "eval.json written for a refused run"


# --------------------------------------------------------------------------- the stage


def write_mc_task(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"question": f"Is {n} an even number?", "choices": ["yes", "no"], "label": n % 2}
        for n in range(6)
    ]
    write_jsonl(folder / "test.jsonl", rows)
    (folder / f"{MC_TASK}.yaml").write_text(
        f"task: {MC_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'test.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )


@pytest.fixture(scope="module")
def stage_runs(tiny_model_dir, perturbed_model_dir, tmp_path_factory):
    """Run the evaluate stage twice, as the pipeline does: the base model, then a changed
    model against it. lm-eval runs for real on 3 target and 3 forgetting examples."""
    root = tmp_path_factory.mktemp("evaluate")
    shutil.copytree(REPO / "tasks" / "target", root / "tasks" / "target")
    write_mc_task(root / "tasks" / MC_TASK)
    train, test = arithmetic.prepare_arithmetic(
        {"num_train": 4, "num_test": 6, "seed": 0, "steps": 2, "prompt_template": TEMPLATE}
    )
    write_jsonl(root / "results" / "data" / "arith" / "test.jsonl", test)
    heldout = root / "heldout" / "context_free.jsonl"
    generate.main(
        [
            "--model",
            str(tiny_model_dir),
            "--settings",
            json.dumps(generation_settings(num_samples=3, max_new_tokens=6, seed=9, batch_size=3)),
            "--out",
            str(heldout),
        ]
    )
    settings = evaluation_settings(
        include_path=str(root / "tasks"),
        target={"task": "cfs_arith", "metric": "exact_match,flexible-extract"},
        forgetting=[{"task": MC_TASK, "metric": "acc,none"}],
        batch_size=4,
        limit=3,
        kl={"batch_size": 2},
        dtype="float32",
    )
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(root)  # the cfs_arith task reads results/data/arith/test.jsonl
    # Index only our local tasks: lm-eval's own ~13k task YAMLs take ~15 s per run to
    # scan and none of them is used here (the pipeline test runs the unpatched stage).
    import lm_eval.tasks

    monkeypatch.setattr(
        lm_eval.tasks,
        "TaskManager",
        functools.partial(lm_eval.tasks.TaskManager, include_defaults=False),
    )
    try:
        base_eval = root / "base" / "eval.json"
        evaluate.main(
            [
                "--model",
                str(tiny_model_dir),
                "--settings",
                json.dumps(settings),
                "--out",
                str(base_eval),
            ]
        )
        cell = {"model": "tiny", "method": "context_free", "temperature": 1.0, "ratio": 0.5}
        tuned_eval = root / "temp1" / "ratio0.5" / "eval.json"
        evaluate.main(
            [
                "--model",
                str(perturbed_model_dir),
                "--base-model",
                str(tiny_model_dir),
                "--heldout",
                str(heldout),
                "--base-eval",
                str(base_eval),
                "--settings",
                json.dumps({**settings, "cell": cell}),
                "--out",
                str(tuned_eval),
            ]
        )
    finally:
        monkeypatch.undo()
    return {
        "base": json.loads(base_eval.read_text()),
        "tuned": json.loads(tuned_eval.read_text()),
        "heldout": read_jsonl(heldout),
    }


def test_stage_base_eval_has_metrics_from_lm_eval(stage_runs):
    record = stage_runs["base"]
    metrics = record["metrics"]
    assert set(record["lm_eval"]) == {"cfs_arith", MC_TASK}
    assert metrics["target"] == record["lm_eval"]["cfs_arith"]["exact_match,flexible-extract"]
    assert metrics["forgetting"] == {MC_TASK: record["lm_eval"][MC_TASK]["acc,none"]}
    assert metrics["forgetting_avg"] == metrics["forgetting"][MC_TASK]
    for key in ("target", "forgetting_avg"):
        assert 0.0 <= metrics[key] <= 1.0, f"{key} {metrics[key]} outside [0, 1]"
    assert metrics["kl_to_base"] == 0.0
    assert record["cell"] == {"model": "tiny", "method": "base"}
    assert "base" not in record, "the base model's eval names a base of its own"


def test_stage_keeps_each_items_score(stage_runs):
    """Per-item scores of the configured metric, one per test item (limit 3), whose mean is
    the task's metric: what the paired intervals of cfs.statistics resample."""
    for record in (stage_runs["base"], stage_runs["tuned"]):
        assert record["tasks"] == {"target": "cfs_arith", "forgetting": [MC_TASK]}
        assert set(record["items"]) == {"cfs_arith", MC_TASK}
        for task, metric in (("cfs_arith", "target"), (MC_TASK, None)):
            scores = record["items"][task]
            assert sorted(scores) == ["0", "1", "2"]
            assert set(scores.values()) <= {0.0, 1.0}, f"{task} item scores {scores}"
            expected = (
                record["metrics"][metric] if metric else record["metrics"]["forgetting"][task]
            )
            assert sum(scores.values()) / len(scores) == pytest.approx(expected)


def test_stage_finetuned_eval_has_kl_base_and_change(stage_runs):
    record, base = stage_runs["tuned"], stage_runs["base"]
    metrics = record["metrics"]
    for key in ("kl_to_base", "heldout_nll"):
        value = metrics[key]
        assert math.isfinite(value) and value > 0, f"{key} {value}, expected finite and positive"
    assert metrics["heldout_tokens"] == sum(len(r["token_ids"]) for r in stage_runs["heldout"])
    assert record["base"] == base["metrics"]
    for key in ("target", "forgetting_avg", "kl_to_base"):
        assert record["change_from_base"][key] == pytest.approx(metrics[key] - base["metrics"][key])
    assert (record["cell"]["temperature"], record["cell"]["ratio"]) == (1.0, 0.5)


def test_stage_provenance_records_seed_versions_and_prompt_id(stage_runs):
    prov = stage_runs["tuned"]["provenance"]
    assert prov["stage"] == "evaluate"
    assert prov["seed"] == 0
    for package in ("lm_eval", "torch"):
        assert prov["packages"][package], f"no {package} version in {prov['packages']}"
    assert prov["heldout_provenance"]["prompt_token_id"] == 1
    assert prov["heldout_provenance"]["seed"] == 9
    assert prov["settings"]["limit"] == 3


# --------------------------------------------------------------------------- lm-eval settings


@pytest.mark.parametrize("batch_size", [3, 64])
def test_evaluation_batch_size_reaches_lm_eval(tiny_model_dir, monkeypatch, batch_size):
    """evaluation.batch_size is lm-eval's batch for log-likelihood and generation alike
    (64 in the CPU default: the 48 target questions decode in one batch)."""
    import lm_eval

    seen = []

    class Stop(Exception):
        pass

    def fake_evaluate(model, **kwargs):
        seen.append(model.batch_size)
        raise Stop

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    with pytest.raises(Stop):
        evaluate.run_lm_eval(tiny_model_dir, evaluation_settings(batch_size=batch_size))
    assert seen == [batch_size]


def test_lm_eval_backend_and_model_args(tiny_model_dir):
    backend, args = evaluate.lm_eval_model_args(
        tiny_model_dir,
        evaluation_settings(
            dtype="float32", precision="float32", model_args={"think_end_token": "</think>"}
        ),
    )
    assert backend == "cfs-hf"  # the schema's default
    assert args == {
        "pretrained": str(tiny_model_dir),
        "dtype": "float32",
        "think_end_token": "</think>",
    }
    with pytest.raises(SettingsError, match="evaluation.backend is 'vllm'"):
        evaluate.lm_eval_model_args(tiny_model_dir, evaluation_settings(backend="vllm"))
    with pytest.raises(SettingsError, match="pretrained"):
        evaluate.lm_eval_model_args(
            tiny_model_dir, evaluation_settings(model_args={"pretrained": "x"})
        )


def test_post_eval_with_another_harness_than_the_base_eval_is_refused(tmp_path):
    settings = evaluation_settings(
        target={"task": "t", "metric": "acc,none"},
        forgetting=[{"task": "f", "metric": "acc,none"}],
        batch_size=8,
    )
    base = evaluate.lm_eval_harness_settings(settings, "hf", {"pretrained": "a", "dtype": "x"})
    same = evaluate.lm_eval_harness_settings(settings, "hf", {"pretrained": "b", "dtype": "x"})
    evaluate.check_same_harness({"lm_eval_settings": base}, same, tmp_path / "base.json")
    evaluate.check_same_harness({}, same, tmp_path / "base.json")  # written before: accepted
    other = evaluate.lm_eval_harness_settings(settings, "vllm", {"pretrained": "b", "dtype": "x"})
    with pytest.raises(SettingsError) as caught:
        evaluate.check_same_harness({"lm_eval_settings": base}, other, tmp_path / "base.json")
    for needle in ("backend", "'hf'"):
        assert needle in str(caught.value), f"{needle!r} not in: {caught.value}"


def test_a_post_eval_in_another_precision_than_the_base_eval_is_refused(
    tiny_model_dir, tmp_path, monkeypatch
):
    """`auto` resolves per machine: a base eval in bf16 and a post eval on a machine
    without native bf16 would compare two precisions."""
    settings = evaluation_settings(
        target={"task": "t", "metric": "acc,none"},
        forgetting=[{"task": "f", "metric": "acc,none"}],
        precision="auto",
    )

    def harness(native):
        monkeypatch.setattr("cfs.modeling.native_bf16", lambda device: native)
        backend, model_args = evaluate.lm_eval_model_args(tiny_model_dir, settings)
        return evaluate.lm_eval_harness_settings(settings, backend, model_args)

    in_bf16, in_fp32 = harness(True), harness(False)
    assert in_bf16["precision"] == "bfloat16 autocast, float32 weights"
    assert in_fp32["precision"] == "float32"
    evaluate.check_same_harness({"lm_eval_settings": in_bf16}, harness(True), tmp_path / "b")
    with pytest.raises(SettingsError, match="precision"):
        evaluate.check_same_harness({"lm_eval_settings": in_bf16}, in_fp32, tmp_path / "b")


def test_bf16_evaluation_autocasts_lm_eval_and_the_kl(tiny_model_dir, monkeypatch):
    settings = evaluation_settings(precision="bfloat16")
    _, model_args = evaluate.lm_eval_model_args(tiny_model_dir, settings)
    assert model_args["mixed_precision_dtype"] == "bfloat16"
    _, model_args = evaluate.lm_eval_model_args(
        tiny_model_dir, evaluation_settings(precision="float32")
    )
    assert "mixed_precision_dtype" not in model_args
    with pytest.raises(SettingsError, match="mixed_precision_dtype"):
        evaluate.lm_eval_model_args(
            tiny_model_dir, evaluation_settings(model_args={"mixed_precision_dtype": "float16"})
        )


# --------------------------------------------------------------------------- the KL


class Logits(torch.nn.Module):
    """A stand-in causal LM: fixed logits per token id."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    @property
    def device(self):
        return self.anchor.device

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_evaluation_kl_is_the_regulariser_token_kl():
    torch.manual_seed(0)
    base, model = Logits(torch.randn(6, 6)), Logits(torch.randn(6, 6))
    samples = [
        {"prompt_token_id": 1, "token_ids": [2, 3, 4]},
        {"prompt_token_id": 1, "token_ids": [5]},
    ]
    result = evaluate.kl_to_base(base, model, samples, batch_size=2)
    ((input_ids, mask),) = heldout.padded_batches(samples, batch_size=2)
    labels = input_ids.masked_fill(mask == 0, tokens.IGNORE_INDEX)
    expected = objectives.token_kl(base.table[input_ids], model.table[input_ids], labels)
    assert result["heldout_tokens"] == 4
    assert result["kl_to_base"] == pytest.approx(expected.item(), rel=1e-6)
    # by hand: the predicting positions hold ids 1, 2, 3 (first sample) and 1 (second)
    kl = [
        torch.nn.functional.kl_div(
            model.table[i].log_softmax(-1),
            base.table[i].log_softmax(-1),
            log_target=True,
            reduction="sum",
        ).item()
        for i in (1, 2, 3, 1)
    ]
    assert result["kl_to_base"] == pytest.approx(sum(kl) / 4, rel=1e-5)


# --------------------------------------------------------------------------- tasks

SHUFFLED_TASK = """task: cfs_shuffled
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
process_docs: !function utils.process_docs
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
SHUFFLING_UTILS = """import random


def process_docs(dataset):
    def shuffle(doc):  # as lm-eval's gpqa utils.py does, with the global `random`
        choices = list(doc["choices"])
        random.shuffle(choices)
        return {**doc, "choices": choices, "answer": choices.index(doc["choices"][0])}

    return dataset.map(shuffle, load_from_cache_file=False)
"""


def test_tasks_are_built_after_seeding(tmp_path):
    """Tasks that draw random numbers while they are built (GPQA shuffles each question's
    choices in `process_docs`) are built after seeding, so the base and post evals of a
    model see the same answer order."""
    from lm_eval.tasks import TaskManager

    rows = tmp_path / "shuffled.jsonl"
    write_jsonl(rows, [{"question": f"q{i}", "choices": list("abcdef")} for i in range(20)])
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "cfs_shuffled.yaml").write_text(SHUFFLED_TASK.format(data=rows))
    (folder / "utils.py").write_text(SHUFFLING_UTILS)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    # num_fewshot makes cfs.lm_eval_tasks build the Task object itself (configured_task)
    entry = task_entry(task="cfs_shuffled", metric="acc,none", num_fewshot=0)
    orders = []
    for state in (1, 2):  # whatever drew from `random` before (another task, a library)
        random.seed(state)
        (task,) = lm_eval_tasks.build_tasks(manager, [entry], seed=0)
        orders.append([doc["choices"] for doc in task.test_docs()])
    assert orders[0] == orders[1], "answer order depends on the random state before the eval"
    distinct = {tuple(choices) for choices in orders[0]}
    assert len(distinct) > 1, "the task does not shuffle: the test shows nothing"


def write_generative_task(folder, name: str = "cfs_test_gen") -> str:
    """A generate_until task whose filter extracts a digit (regex, then take_first)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "test.jsonl", [{"q": f"{n} is", "label": str(n % 2)} for n in range(4)])
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'test.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{q}}"\ndoc_to_target: "{{label}}"\n'
        "generation_kwargs:\n  until: ['\\n']\n  do_sample: false\n  max_gen_toks: 4\n"
        "filter_list:\n  - name: digit\n    filter:\n"
        "      - function: regex\n        regex_pattern: '([0-9])'\n"
        "      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return name


def test_repeats_average_each_questions_answers_into_pass_at_1(
    tiny_model_dir, tmp_path, monkeypatch
):
    """k answers per question, each extracted and scored by the task's own filter and
    metric, averaged per question, then over questions; gen_kwargs reach the requests."""
    import lm_eval.models.huggingface as hf

    name = write_generative_task(tmp_path / "tasks" / "gen")
    other = write_generative_task(tmp_path / "tasks" / "gen2", name="cfs_test_gen2")
    answers = ["x 1", "0", "1!", "zz", "0", "0", "1", "1 0", "1", "0", "0", "?", "1", "1", "0"]
    seen = []

    def fake_generate_until(self, requests, disable_tqdm=False):
        """The n-th request of the sampled task gets answers[n] (clones are consecutive)."""
        out = []
        for request in requests:
            number = sum(r.task_name == request.task_name for r in seen)
            seen.append(request)
            out.append(answers[number % len(answers)] if request.task_name == name else "0")
        return out

    monkeypatch.setattr(hf.HFLM, "generate_until", fake_generate_until)
    settings = evaluation_settings(
        include_path=str(tmp_path / "tasks"),
        target={
            "task": name,
            "metric": "exact_match,digit",
            "repeats": 3,
            "gen_kwargs": {"do_sample": True, "temperature": 0.6, "top_p": 0.95},
        },
        forgetting=[{"task": other, "metric": "exact_match,digit"}],  # greedy, 1 answer
        batch_size=4,
        dtype="float32",
        backend="hf",  # the stock model, whose generate_until is replaced above
    )
    scores, items, harness, _ = evaluate.run_lm_eval(tiny_model_dir, settings)
    sampled = [request for request in seen if request.task_name == name]
    assert len(sampled) == 4 * 3  # 4 questions x 3 answers
    assert [request.args[1]["temperature"] for request in sampled] == [0.6] * 12
    assert [request.args[1]["top_p"] for request in sampled] == [0.95] * 12
    assert len([request for request in seen if request.task_name == other]) == 4
    labels = [str(n % 2) for n in range(4)]
    expected = 0.0
    for question, label in enumerate(labels):
        extracted = [re.search(r"[0-9]", a) for a in answers[3 * question : 3 * question + 3]]
        hits = [m is not None and m.group(0) == label for m in extracted]
        expected += sum(hits) / 3 / len(labels)
    assert scores[name]["exact_match,digit"] == pytest.approx(expected)
    assert harness["backend"] == "hf"
    assert harness["tasks"][name]["repeats"] == 3
    # per question: the mean of its 3 answers' scores, as the task metric averages
    assert sum(items[name].values()) / 4 == pytest.approx(expected)
    thirds = {0.0, 1 / 3, 2 / 3, 1.0}
    assert set(items[name].values()) <= thirds, f"item scores {items[name]}, expected thirds"


def test_repeats_on_a_log_likelihood_task_is_refused(tmp_path):
    folder = tmp_path / "tasks" / "mc"
    folder.mkdir(parents=True)
    write_jsonl(folder / "test.jsonl", [{"q": "1?", "choices": ["a", "b"], "label": 0}])
    (folder / "cfs_test_mc2.yaml").write_text(
        f"task: cfs_test_mc2\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'test.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n"
    )
    manager = lm_eval_tasks.local_task_manager(str(tmp_path / "tasks"), ["cfs_test_mc2"])
    with pytest.raises(SettingsError, match="not generative"):
        lm_eval_tasks.configured_task(
            manager, task_entry(task="cfs_test_mc2", metric="acc,none", repeats=4)
        )
    entry = task_entry(task="cfs_test_mc2", metric="acc,none")
    assert lm_eval_tasks.configured_task(manager, entry) == "cfs_test_mc2"


def test_an_evaluation_counts_its_cut_answers(tiny_model_dir, tmp_path):
    """Through lm-eval with the cfs-hf backend: a random tiny model never writes </think>,
    so each of its answers is cut, scored as no answer and counted in the eval's record."""
    name = write_generative_task(tmp_path / "tasks" / "gen", "cfs_test_think")
    settings = evaluation_settings(
        include_path=str(tmp_path / "tasks"),
        target={"task": name, "metric": "exact_match,digit"},
        forgetting=[{"task": name, "metric": "exact_match,digit"}],
        batch_size=4,
        dtype="float32",
        model_args={"think_end_token": "</think>"},
    )
    scores, _, harness, requests = evaluate.run_lm_eval(tiny_model_dir, settings)
    assert harness["cut_answers"]
    assert requests["cut_answers"] == {name: {"answers": 4, "cut": 4}}
    assert scores[name]["exact_match,digit"] == 0.0


def test_vllm_evals_of_other_seeds_share_the_base_evals_harness(tiny_model_dir, monkeypatch):
    """vLLM gets each replicate's seed in its model_args; the harness compared with the
    base eval's (taken at the task's seed) leaves it out."""
    monkeypatch.setattr("cfs.vllm_backend.vllm_usable", lambda: True)

    def harness(seed):
        settings = evaluation_settings(
            target={"task": "t", "metric": "acc,none"},
            forgetting=[{"task": "f", "metric": "acc,none"}],
            backend="vllm",
            seed=seed,
        )
        backend, model_args = evaluate.lm_eval_model_args(tiny_model_dir, settings)
        assert model_args["seed"] == seed  # vLLM still samples with the replicate's seed
        return evaluate.lm_eval_harness_settings(settings, backend, model_args)

    base = harness(0)
    for seed in (1, 2):
        evaluate.check_same_harness({"lm_eval_settings": base}, harness(seed), Path("base.json"))


def test_lm_eval_runs_no_other_process(tiny_model_dir, tmp_path, monkeypatch):
    """lm-eval's report of the environment (pip list, lscpu and git, in subprocesses: a
    second per call) is left out of an evaluation; cfs records its own provenance."""
    import subprocess

    started = []
    popen_init = subprocess.Popen.__init__

    def recording_init(self, args, *rest, **options):
        started.append(args)
        popen_init(self, args, *rest, **options)

    monkeypatch.setattr(subprocess.Popen, "__init__", recording_init)
    name = write_generative_task(tmp_path / "tasks" / "gen")
    settings = evaluation_settings(
        include_path=str(tmp_path / "tasks"),
        target={"task": name, "metric": "exact_match,digit"},
        forgetting=[{"task": name, "metric": "exact_match,digit"}],
        batch_size=4,
        limit=2,
        dtype="float32",
    )
    scores, *_ = evaluate.run_lm_eval(tiny_model_dir, settings)
    assert "exact_match,digit" in scores[name]
    assert started == []
