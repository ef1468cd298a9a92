"""cfs.examples: what each record of a training set is trained on (task examples, and
context-free or contextual samples), the batches (padded or packed, the LM head only at
trained positions), and the step schedule of equal-step and augmented mixing, checked on
its own and through cfs.train.fine_tune as the rule runs it."""

from __future__ import annotations

import json
import random

import pytest
import torch
from cfs import examples, objectives, train
from cfs.errors import DataError, SettingsError
from cfs.modeling import load_model, load_tokenizer
from cfs.study import SAMPLE_KINDS
from conftest import (
    context_free_samples,
    fine_tune_into,
    quick_train_settings,
    read_jsonl,
    task_records,
    train_log,
    write_jsonl,
)

IGNORE = examples.IGNORE_INDEX


def task_record() -> dict:
    return task_records(1, seed=0)[0]


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
    count = example["input_ids"].count(tokenizer.bos_token_id)
    assert count <= 1, f"{count} BOS tokens in {example['input_ids']}"


def test_task_example_truncates_both_fields_to_max_length(tokenizer):
    record = task_record()
    prompt = ids(tokenizer, record["prompt"])
    max_length = len(prompt) + 3
    example = examples.task_example(record, tokenizer, max_length=max_length)
    assert len(example["input_ids"]) == len(example["labels"]) == max_length
    response = ids(tokenizer, record["response"])
    assert example["labels"][len(prompt) :] == response[:3]
    assert tokenizer.eos_token_id not in example["labels"], "EOS trained on a cut response"


# --------------------------------------------------------------------------- samples


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


def test_contextual_training_example_masks_the_prompt():
    record = {"prompt_token_ids": [5, 6, 7], "token_ids": [8, 9, 2], "finish_reason": "eos"}
    example = examples.sample_example(record, SAMPLE_KINDS["contextual"], max_length=64)
    assert example["input_ids"] == [5, 6, 7, 8, 9, 2]
    assert example["labels"] == [IGNORE, IGNORE, IGNORE, 8, 9, 2]


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


# --------------------------------------------------------------------------- batches


def test_packed_and_padded_micro_batches_give_the_same_loss(tiny_model_dir, tokenizer):
    model = load_model(tiny_model_dir, "float32")
    model.config.use_cache = False
    records = task_records(3, seed=1) + context_free_samples(2)
    built = examples.build_examples(records, tokenizer, 64, "x")
    padded = examples.training_collator(tokenizer, packing=False)(built)
    packed = examples.training_collator(tokenizer, packing=True)(built)
    total = sum(len(example["input_ids"]) for example in built)
    assert tuple(packed["input_ids"].shape) == (1, total), "one row holding every example"
    with torch.no_grad():
        torch.testing.assert_close(model(**packed).loss, model(**padded).loss)


@pytest.mark.parametrize(("packing", "lora"), [(True, False), (False, False), (True, True)])
def test_trained_positions_only_gives_the_same_loss_and_gradients(
    tiny_model_dir, tokenizer, packing, lora
):
    built = examples.build_examples(task_records(3, seed=4), tokenizer, 64, "x")
    batch = examples.training_collator(tokenizer, packing=packing)(built)
    model = load_model(tiny_model_dir, "float32")
    model.config.use_cache = False
    head = model.lm_head
    if lora:  # peft's wrapper hands logits_to_keep and shift_labels through
        method = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]}
        model = objectives.add_lora(model, method, 0)
    head_rows = []
    head.register_forward_hook(lambda m, i, o: head_rows.append(i[0].shape[:-1].numel()))

    def loss_and_grads(inputs):
        model.zero_grad()
        loss = model(**inputs, num_items_in_batch=(batch["labels"] != IGNORE).sum()).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    full_loss, full_grads = loss_and_grads(batch)
    kept_loss, kept_grads = loss_and_grads(examples.trained_positions_only(batch))
    torch.testing.assert_close(kept_loss, full_loss)
    for kept, full in zip(kept_grads, full_grads, strict=True):
        torch.testing.assert_close(kept, full, rtol=1e-4, atol=1e-6)
    positions = batch["input_ids"].numel()
    trained = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert head_rows == [positions, trained], "head rows: every position, then trained ones"
    # the prompts are most of each example
    assert trained < positions / 2, f"{trained} trained positions of {positions}"


# --------------------------------------------------------------------------- step schedule


def test_equal_step_schedule_draws_every_example_once_per_pass():
    records = task_records(8, seed=1) + context_free_samples(4)
    schedule = examples.step_schedule(records, batch_size=4, epochs=2, seed=0)
    assert (schedule.steps, schedule.samples_per_step) == (4, 2)
    blocks = [schedule.order[6 * step : 6 * step + 6] for step in range(4)]
    for first, second in ((0, 1), (2, 3)):  # each epoch: every task example and sample once
        drawn = sorted(blocks[first] + blocks[second])
        assert drawn == list(range(12)), f"epoch of steps {first}, {second} drew {drawn}"
    assert schedule.per_device(2) == 3


def test_every_cell_of_a_seed_trains_on_the_same_task_examples_at_each_step():
    """Plain fine-tuning and a mixed set, whose files hold the task examples in other
    orders, get the same task examples at every step: differences between cells are
    paired on the task's batches."""
    task = task_records(16, seed=1)
    plain = random.Random(1).sample(task, len(task))
    mixed = random.Random(2).sample(task + context_free_samples(8), len(task) + 8)

    def task_steps(records, seed):
        schedule = examples.step_schedule(records, batch_size=4, epochs=2, seed=seed)
        per_step = schedule.task_per_step + schedule.samples_per_step
        chosen = [records[index] for index in schedule.order]
        return [
            sorted(r["prompt"] for r in chosen[start : start + per_step] if r["kind"] == "task")
            for start in range(0, len(chosen), per_step)
        ]

    assert task_steps(plain, seed=0) == task_steps(mixed, seed=0), "same seed, same batches"
    assert task_steps(plain, seed=0) != task_steps(plain, seed=1), "another seed, other batches"


def test_a_mixed_set_of_any_size_gets_its_samples_in_proportion_at_every_step():
    """10 task examples are no whole number of steps of 4: the task stream runs on into
    its next pass, and every step still holds 4 task examples and 4 samples (ratio 1)."""
    records = task_records(10, seed=1) + context_free_samples(10)
    schedule = examples.step_schedule(records, batch_size=4, epochs=1, seed=0)
    assert (schedule.steps, schedule.samples_per_step) == (3, 4), schedule
    for step in range(3):
        block = [records[i]["kind"] for i in schedule.order[8 * step : 8 * step + 8]]
        assert sorted(block) == ["context_free"] * 4 + ["task"] * 4, f"step {step}: {block}"


def test_a_ratio_that_splits_a_sample_per_step_is_refused_naming_the_setting():
    with pytest.raises(SettingsError, match="2.5 samples per step of train.batch_size 4"):
        examples.step_schedule(
            task_records(8, seed=1) + context_free_samples(5), batch_size=4, epochs=1, seed=0
        )


def test_a_task_set_of_any_size_trains_for_ceil_epochs_steps():
    schedule = examples.step_schedule(task_records(10, seed=1), batch_size=4, epochs=1, seed=0)
    assert schedule.steps == 3, "10 examples in steps of 4: 3 steps, as the Trainer counts"
    assert (len(schedule.order), schedule.samples_per_step) == (12, 0)


# --------------------------------------------------------------------------- mixing in training

NUM_TASK = 8
SETTINGS = quick_train_settings()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixing")
    return {
        "root": root,
        "plain": write_jsonl(root / "plain.jsonl", task_records(NUM_TASK, seed=1)),
        "mixed": write_jsonl(
            root / "mixed.jsonl", task_records(NUM_TASK, seed=1) + context_free_samples(NUM_TASK)
        ),
    }


def fine_tune(model_dir, files, name, data, **overrides):
    model, _ = fine_tune_into(
        files["root"] / name, model_dir, files[data], {**SETTINGS, **overrides}
    )
    return train_log(model)["summary"]


def test_equal_step_mixing_keeps_plain_fine_tunings_steps_and_task_examples(tiny_model_dir, files):
    plain = fine_tune(tiny_model_dir, files, "plain", "plain")
    mixed = fine_tune(tiny_model_dir, files, "mixed", "mixed", mixing="equal_steps")
    steps = NUM_TASK // SETTINGS["batch_size"]
    assert (plain["global_steps"], mixed["global_steps"]) == (steps, steps)
    # [task examples, all examples] of each step, as the trainer consumed them
    assert plain["examples_per_step"] == [[4, 4]] * steps
    assert mixed["examples_per_step"] == [[4, 8]] * steps
    assert (plain["mixing"], mixed["mixing"]) == ("none", "equal_steps")


def test_augmented_mixing_takes_more_steps_of_fewer_task_examples(tiny_model_dir, files):
    summary = fine_tune(tiny_model_dir, files, "augmented", "mixed", mixing="augment")
    assert summary["global_steps"] == 2 * NUM_TASK // SETTINGS["batch_size"]
    assert sum(task for task, _ in summary["examples_per_step"]) == NUM_TASK
    totals = [total for _, total in summary["examples_per_step"]]
    assert totals == [4] * summary["global_steps"], "every step a batch of 4 examples"
    assert summary["mixing"] == "augment"


def test_the_effective_lambda_counts_synthetic_tokens_per_task_token(tiny_model_dir, files):
    summary = fine_tune(tiny_model_dir, files, "lambda", "mixed", mixing="equal_steps")
    records = read_jsonl(files["mixed"])
    tokenizer = load_tokenizer(tiny_model_dir)
    built = examples.build_examples(records, tokenizer, SETTINGS["max_length"], "x")
    task_tokens = examples.count_trained_tokens(built[:NUM_TASK])
    sample_tokens = examples.count_trained_tokens(built[NUM_TASK:])
    assert sample_tokens == NUM_TASK * 5  # every sampled token after the prompt token
    assert summary["effective_lambda"] == pytest.approx(sample_tokens / task_tokens)
    prov = json.loads((files["root"] / "lambda" / "model" / "cfs_provenance.json").read_text())
    assert prov["effective_lambda"] == summary["effective_lambda"]


def test_equal_steps_refuses_a_ratio_that_splits_a_sample(tiny_model_dir, tmp_path):
    data = write_jsonl(
        tmp_path / "odd.jsonl", task_records(NUM_TASK, seed=1) + context_free_samples(3)
    )
    with pytest.raises(SettingsError, match="train.mixing"):
        train.fine_tune(
            tiny_model_dir,
            data,
            {**SETTINGS, "mixing": "equal_steps"},
            tmp_path / "c",
            tmp_path / "m",
        )
