"""cfs.evaluate: KL to the base model on held-out context-free samples, metric summaries,
and the whole stage (lm-eval on a local target and forgetting task) through its CLI."""

from __future__ import annotations

import functools
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from cfs import data, evaluate, generate, heldout
from cfs.errors import SettingsError
from cfs.generate import sample_context_free
from cfs.modeling import load_model, load_tokenizer
from conftest import (
    REPO,
    TEMPLATE,
    evaluation_settings,
    generation_settings,
    read_jsonl,
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


@pytest.fixture(scope="module")
def perturbed_model_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("perturbed") / "model"
    model = load_model(tiny_model_dir, "float32")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(out)
    load_tokenizer(tiny_model_dir).save_pretrained(out)
    return out


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
    assert math.isfinite(result["heldout_nll"]) and result["heldout_nll"] > 0
    assert result["heldout_tokens"] == sum(len(r["token_ids"]) for r in heldout_samples)


def test_kl_is_positive_after_perturbing_weights(
    tiny_model_dir, perturbed_model_dir, heldout_samples
):
    base = load_model(tiny_model_dir, "float32").eval()
    changed = load_model(perturbed_model_dir, "float32").eval()
    result = evaluate.kl_to_base(base, changed, heldout_samples, batch_size=2)
    assert result["kl_to_base"] > 0
    assert math.isfinite(result["kl_to_base"]) and math.isfinite(result["heldout_nll"])


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
    assert forward != pytest.approx(backward, rel=1e-6)


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
    assert "exact_match,flexible-extract" in message and "cfs_arith" in message
    assert "exact_match,strict-match" in message


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
    assert not (tmp_path / "eval.json").exists()


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
    train, test = data.prepare_arithmetic(
        {"num_train": 4, "num_test": 6, "seed": 0, "steps": 2, "prompt_template": TEMPLATE}
    )
    write_jsonl(root / "results" / "data" / "arith" / "test.jsonl", test)
    heldout = root / "heldout" / "context_free.jsonl"
    generate.main(
        [
            "--model",
            str(tiny_model_dir),
            "--temperature",
            "1.0",
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
    assert 0.0 <= metrics["target"] <= 1.0 and 0.0 <= metrics["forgetting_avg"] <= 1.0
    assert metrics["kl_to_base"] == 0.0
    assert record["cell"] == {"model": "tiny", "method": "base"}
    assert "base" not in record


def test_stage_keeps_each_items_score(stage_runs):
    """Per-item scores of the configured metric, one per test item (limit 3), whose mean is
    the task's metric: what the paired intervals of cfs.statistics resample."""
    for record in (stage_runs["base"], stage_runs["tuned"]):
        assert record["tasks"] == {"target": "cfs_arith", "forgetting": [MC_TASK]}
        assert set(record["items"]) == {"cfs_arith", MC_TASK}
        for task, metric in (("cfs_arith", "target"), (MC_TASK, None)):
            scores = record["items"][task]
            assert sorted(scores) == ["0", "1", "2"]
            assert set(scores.values()) <= {0.0, 1.0}
            expected = (
                record["metrics"][metric] if metric else record["metrics"]["forgetting"][task]
            )
            assert sum(scores.values()) / len(scores) == pytest.approx(expected)


def test_stage_finetuned_eval_has_kl_base_and_change(stage_runs):
    record, base = stage_runs["tuned"], stage_runs["base"]
    metrics = record["metrics"]
    assert metrics["kl_to_base"] > 0 and math.isfinite(metrics["kl_to_base"])
    assert math.isfinite(metrics["heldout_nll"]) and metrics["heldout_nll"] > 0
    assert metrics["heldout_tokens"] == sum(len(r["token_ids"]) for r in stage_runs["heldout"])
    assert record["base"] == base["metrics"]
    for key in ("target", "forgetting_avg", "kl_to_base"):
        assert record["change_from_base"][key] == pytest.approx(metrics[key] - base["metrics"][key])
    assert record["cell"]["temperature"] == 1.0 and record["cell"]["ratio"] == 0.5


def test_stage_provenance_records_seed_versions_and_prompt_id(stage_runs):
    prov = stage_runs["tuned"]["provenance"]
    assert prov["stage"] == "evaluate"
    assert prov["seed"] == 0
    assert prov["packages"]["lm_eval"] and prov["packages"]["torch"]
    assert prov["heldout_provenance"]["prompt_token_id"] == 1
    assert prov["heldout_provenance"]["seed"] == 9
    assert prov["settings"]["limit"] == 3
