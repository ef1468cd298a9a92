"""cfs.train: loss masking of task and context-free examples, and a short real fine-tune."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cfs import examples, train
from cfs.data import arithmetic_problems, render
from cfs.errors import DataError, SettingsError
from cfs.study import SAMPLE_KINDS
from conftest import TEMPLATE, model_weights, train_settings, write_jsonl

IGNORE = examples.IGNORE_INDEX


def task_record():
    problem = render(arithmetic_problems(1, seed=0), TEMPLATE)[0]
    return {"kind": "task", "prompt": problem["prompt"], "response": problem["response"]}


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- task examples


def test_task_example_masks_prompt_and_trains_response_plus_eos(tokenizer):
    record = task_record()
    prompt, response = ids(tokenizer, record["prompt"]), ids(tokenizer, record["response"])
    example = examples.task_example(record, tokenizer, max_length=512)
    assert example["input_ids"] == prompt + response + [tokenizer.eos_token_id]
    assert example["labels"][: len(prompt)] == [IGNORE] * len(prompt)
    assert example["labels"][len(prompt) :] == response + [tokenizer.eos_token_id]
    assert len(example["labels"]) == len(example["input_ids"])


def test_task_example_has_no_doubled_bos(tokenizer):
    example = examples.task_example(task_record(), tokenizer, max_length=512)
    assert example["input_ids"].count(tokenizer.bos_token_id) <= 1


def test_task_example_truncates_both_fields_to_max_length(tokenizer):
    record = task_record()
    prompt = ids(tokenizer, record["prompt"])
    max_length = len(prompt) + 3
    example = examples.task_example(record, tokenizer, max_length=max_length)
    assert len(example["input_ids"]) == len(example["labels"]) == max_length
    response = ids(tokenizer, record["response"])
    assert example["labels"][len(prompt) :] == response[:3]
    assert tokenizer.eos_token_id not in example["labels"]


# --------------------------------------------------------------------------- context-free


def test_context_free_eos_sample_trains_every_token():
    record = {
        "kind": "context_free",
        "prompt_token_id": 1,
        "token_ids": [40, 41, 42, 2],
        "finish_reason": "eos",
    }
    example = examples.sample_example(record, SAMPLE_KINDS["context_free"], max_length=64)
    assert example["input_ids"] == [1, 40, 41, 42, 2]
    assert example["labels"] == [IGNORE, 40, 41, 42, 2]


def test_context_free_length_sample_gets_no_eos_appended():
    record = {
        "kind": "context_free",
        "prompt_token_id": 0,
        "token_ids": [40, 41, 42, 43],
        "finish_reason": "length",
    }
    example = examples.sample_example(record, SAMPLE_KINDS["context_free"], max_length=64)
    assert example["input_ids"] == [0, 40, 41, 42, 43]
    assert example["labels"] == [IGNORE, 40, 41, 42, 43]
    assert example["labels"].count(IGNORE) == 1


def test_context_free_truncated_to_max_length():
    record = {
        "kind": "context_free",
        "prompt_token_id": 1,
        "token_ids": list(range(10, 30)),
        "finish_reason": "length",
    }
    example = examples.sample_example(record, SAMPLE_KINDS["context_free"], max_length=8)
    assert example["input_ids"] == [1] + list(range(10, 17))
    assert example["labels"] == [IGNORE] + list(range(10, 17))


# --------------------------------------------------------------------------- build_examples


def test_build_examples_dispatches_on_kind(tokenizer):
    cf = {
        "kind": "context_free",
        "prompt_token_id": 1,
        "token_ids": [50, 51],
        "finish_reason": "length",
    }
    records = [task_record(), cf]
    built = examples.build_examples(records, tokenizer, 128, "mixed.jsonl")
    assert built[0] == examples.task_example(records[0], tokenizer, 128)
    assert built[1] == {"input_ids": [1, 50, 51], "labels": [IGNORE, 50, 51]}


def test_unknown_kind_names_file_and_line(tokenizer):
    records = [task_record(), {"kind": "pretraining", "text": "x"}]
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: .*pretraining"):
        examples.build_examples(records, tokenizer, 128, "mixed.jsonl")


def test_missing_kind_names_file_and_line(tokenizer):
    with pytest.raises(DataError, match=r"data\.jsonl:1:"):
        examples.build_examples([{"prompt": "p", "response": "r"}], tokenizer, 128, "data.jsonl")


def test_example_with_nothing_to_train_is_rejected(tokenizer):
    record = task_record()
    prompt_length = len(ids(tokenizer, record["prompt"]))
    with pytest.raises(DataError, match=r"set\.jsonl:1: no trainable tokens"):
        examples.build_examples([record], tokenizer, prompt_length, "set.jsonl")


def test_batch_size_not_multiple_of_micro_batch_names_both_keys(tmp_path):
    settings = {
        "batch_size": 6,
        "micro_batch_size": 4,
        "learning_rate": 1e-3,
        "epochs": 1,
        "seed": 0,
    }
    with pytest.raises(SettingsError, match="batch_size.*micro_batch_size"):
        train.training_arguments(settings, tmp_path / "ckpt", torch.device("cpu"))


def test_training_arguments_accumulate_to_the_effective_batch(tmp_path):
    settings = {
        **train_settings(),
        "batch_size": 8,
        "micro_batch_size": 2,
        "learning_rate": 1e-3,
        "epochs": 1,
        "seed": 0,
        "warmup_ratio": 0.1,
    }
    args = train.training_arguments(settings, tmp_path / "ckpt", torch.device("cpu"))
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 8
    assert args.learning_rate == 1e-3
    # warmup is a ratio of the training steps: 10% of 100 steps is 10 steps
    assert args.get_warmup_steps(100) == 10


# --------------------------------------------------------------------------- fine-tune


@pytest.fixture(scope="module")
def fine_tuned(tiny_model_dir, tmp_path_factory):
    """One real 2-step fine-tune of the tiny model on a small mixed set, via the CLI."""
    root = tmp_path_factory.mktemp("fine_tune")
    task = [
        {"kind": "task", "prompt": r["prompt"], "response": r["response"]}
        for r in render(arithmetic_problems(6, seed=1), TEMPLATE)
    ]
    cf = [
        {
            "kind": "context_free",
            "prompt_token_id": 1,
            "token_ids": [60 + i, 70 + i, 80 + i],
            "finish_reason": "length",
        }
        for i in range(2)
    ]
    data = write_jsonl(root / "train.jsonl", task + cf)
    settings = {
        **train_settings(),
        "learning_rate": 5e-3,
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "epochs": 1,
        "batch_size": 4,
        "micro_batch_size": 2,
        "max_length": 64,
        "seed": 0,
        "save_steps": 1,
        "logging_steps": 1,
        "mixing": "augment",  # 8 examples in 2 steps of 4
    }
    checkpoints, out = root / "checkpoints", root / "model"
    train.main(
        [
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--settings",
            json.dumps(settings),
            "--checkpoints",
            str(checkpoints),
            "--out",
            str(out),
        ]
    )
    return {"out": out, "checkpoints": checkpoints, "root": root, "data": data}


def test_fine_tune_writes_model_with_logs_and_provenance(fine_tuned):
    out = fine_tuned["out"]
    for name in ("config.json", "train_log.json", "cfs_provenance.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    log = json.loads((out / "train_log.json").read_text())
    summary = log["summary"]
    assert summary["num_examples"] == 8
    assert summary["num_synthetic_in_set"] == 2
    assert summary["global_steps"] == 2  # 8 examples / effective batch 4
    assert math.isfinite(summary["train_loss"]) and summary["train_loss"] > 0
    losses = [entry["loss"] for entry in log["log_history"] if "loss" in entry]
    assert losses and all(math.isfinite(float(loss)) for loss in losses)
    prov = json.loads((out / "cfs_provenance.json").read_text())
    assert prov["stage"] == "fine_tune"
    assert prov["seed"] == 0
    assert prov["data"] == str(fine_tuned["data"])
    assert prov["settings"]["learning_rate"] == 5e-3


def test_fine_tune_counts_trained_tokens(fine_tuned, tokenizer):
    from cfs.artifacts import read_jsonl

    records = read_jsonl(fine_tuned["data"])
    built = examples.build_examples(records, tokenizer, 64, "x")
    expected = sum(sum(label != IGNORE for label in ex["labels"]) for ex in built)
    summary = json.loads((fine_tuned["out"] / "train_log.json").read_text())["summary"]
    assert summary["num_trained_tokens_per_epoch"] == expected


def test_fine_tune_changes_the_weights(fine_tuned, tiny_model_dir):
    base, tuned = model_weights(tiny_model_dir), model_weights(fine_tuned["out"])
    assert set(base) == set(tuned)
    changed = [name for name in base if not torch.equal(base[name], tuned[name])]
    assert changed, "no parameter changed during fine-tuning"
    assert all(torch.isfinite(t).all() for t in tuned.values())


def test_fine_tune_removes_checkpoints_and_temp_folders(fine_tuned):
    assert not fine_tuned["checkpoints"].exists()
    leftovers = [p.name for p in fine_tuned["root"].iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_fine_tuned_model_loads_and_predicts(fine_tuned):
    from cfs.modeling import load_model

    model = load_model(fine_tuned["out"], "float32")
    logits = model(torch.tensor([[1, 60, 70]])).logits
    assert logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(logits).all()


def test_fine_tune_on_empty_set_is_an_error(tiny_model_dir, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    with pytest.raises(DataError, match="empty"):
        train.fine_tune(
            tiny_model_dir,
            data,
            {**train_settings(), "max_length": 64},
            tmp_path / "c",
            tmp_path / "m",
        )
    assert not (tmp_path / "m").exists()


def test_changed_settings_do_not_resume_from_an_old_runs_checkpoints(tiny_model_dir, tmp_path):
    """Snakemake reruns fine_tune in the same cell (same --checkpoints) when a train
    setting changes. With checkpoints kept (train.keep_checkpoints, or left behind by a
    killed run) the new run must not pick up the old run's state: here the old run had
    finished, so resuming would train 0 steps and publish the old model as the new one."""
    records = [
        {"kind": "task", "prompt": r["prompt"], "response": r["response"]}
        for r in render(arithmetic_problems(4, seed=2), TEMPLATE)
    ]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    settings = {
        **train_settings(),
        "learning_rate": 1e-2,
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "epochs": 1,
        "batch_size": 2,
        "micro_batch_size": 2,
        "max_length": 64,
        "seed": 0,
        "save_steps": 1,
        "logging_steps": 1,
        "keep_checkpoints": True,
    }
    checkpoints = tmp_path / "checkpoints"
    train.fine_tune(tiny_model_dir, data, settings, checkpoints, tmp_path / "old")
    changed = {**settings, "learning_rate": 1e-4}
    summary = train.fine_tune(tiny_model_dir, data, changed, checkpoints, tmp_path / "new")
    assert summary["resumed_from"] is None
    old, new = model_weights(tmp_path / "old"), model_weights(tmp_path / "new")
    assert any(not torch.equal(old[name], new[name]) for name in old)
