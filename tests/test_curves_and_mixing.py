"""Forgetting curves along a fine-tune (cfs.curves) and equal-step mixing (cfs.examples):
on a tiny model, through cfs.train.fine_tune as the rule runs it."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from cfs import evaluate, examples, train
from cfs.data import arithmetic_problems, render
from cfs.errors import SettingsError
from cfs.modeling import load_model, load_tokenizer
from conftest import TEMPLATE, read_jsonl, train_settings, write_jsonl

SETTINGS = train_settings(
    learning_rate=5e-3,
    lr_scheduler="constant",
    warmup_ratio=0.0,
    epochs=1,
    batch_size=4,
    micro_batch_size=2,
    max_length=64,
    logging_steps=1,
)
NUM_TASK = 8


def task_records(n=NUM_TASK, seed=1):
    return [
        {"kind": "task", "prompt": r["prompt"], "response": r["response"]}
        for r in render(arithmetic_problems(n, seed=seed), TEMPLATE)
    ]


def samples(n, start=60):
    return [
        {
            "kind": "context_free",
            "index": i,
            "prompt_token_id": 1,
            "token_ids": [start + i, 70 + i, 80 + i, 90 + i, 100 + i],
            "finish_reason": "length",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("curves")
    heldout = samples(5, start=110)
    return {
        "root": root,
        "plain": write_jsonl(root / "plain.jsonl", task_records()),
        "mixed": write_jsonl(root / "mixed.jsonl", task_records() + samples(NUM_TASK)),
        "heldout": write_jsonl(root / "heldout.jsonl", heldout),
        "test": write_jsonl(root / "test.jsonl", task_records(6, seed=2)),
    }


def fine_tune(model_dir, files, name, data="plain", **overrides):
    out = files["root"] / name
    settings = {**SETTINGS, **overrides}
    train.fine_tune(
        model_dir,
        files[data],
        settings,
        out / "checkpoints",
        out / "model",
        heldout=files["heldout"],
        target_test=files["test"],
    )
    return out / "model", json.loads((out / "model" / "train_log.json").read_text())


# --------------------------------------------------------------------------- curves


@pytest.fixture(scope="module")
def curved(tiny_model_dir, files):
    return fine_tune(tiny_model_dir, files, "curved", epochs=2, curve_every=2)


def test_curves_are_logged_at_step_zero_and_every_k_steps(curved):
    model_dir, log = curved
    steps = [entry["step"] for entry in log["log_history"] if "curve/kl_to_base" in entry]
    assert steps == [0, 2, 4]  # 2 epochs of 8 examples in steps of 4: 4 steps
    table = pd.read_csv(model_dir / "curves.csv")
    assert table["step"].tolist() == [0, 2, 4]
    assert list(table.columns) == ["step", "kl_to_base", "heldout_nll", "target_loss"]


def test_curve_kl_is_zero_at_step_zero_and_grows(curved):
    table = pd.read_csv(curved[0] / "curves.csv")
    assert abs(table["kl_to_base"].iloc[0]) <= 1e-6
    assert table["kl_to_base"].iloc[-1] > 1e-4
    assert table["target_loss"].iloc[-1] < table["target_loss"].iloc[0]  # it learns the task


def test_last_curve_point_is_the_evaluations_kl(curved, tiny_model_dir, files):
    """The curve's KL at the last step is the post eval's KL of the saved model."""
    base = load_model(tiny_model_dir, "float32").eval()
    model = load_model(curved[0], "float32").eval()
    measured = evaluate.kl_to_base(base, model, read_jsonl(files["heldout"]), batch_size=8)
    last = pd.read_csv(curved[0] / "curves.csv").iloc[-1]
    assert last["kl_to_base"] == pytest.approx(measured["kl_to_base"], rel=1e-4, abs=1e-7)
    assert last["heldout_nll"] == pytest.approx(measured["heldout_nll"], rel=1e-5)


def test_no_curves_when_curve_every_is_zero(tiny_model_dir, files):
    model_dir, log = fine_tune(tiny_model_dir, files, "flat", curve_every=0)
    assert not any("curve/kl_to_base" in entry for entry in log["log_history"])
    assert not (model_dir / "curves.csv").exists()


# --------------------------------------------------------------------------- mixing


def test_equal_step_mixing_keeps_plain_fine_tunings_steps_and_task_examples(tiny_model_dir, files):
    _, plain = fine_tune(tiny_model_dir, files, "plain")
    _, mixed = fine_tune(tiny_model_dir, files, "mixed", data="mixed", mixing="equal_steps")
    plain_steps, mixed_steps = plain["summary"]["global_steps"], mixed["summary"]["global_steps"]
    assert plain_steps == mixed_steps == NUM_TASK // SETTINGS["batch_size"]
    # [task examples, all examples] of each step, as the trainer consumed them
    assert plain["summary"]["examples_per_step"] == [[4, 4]] * plain_steps
    assert mixed["summary"]["examples_per_step"] == [[4, 8]] * mixed_steps
    assert mixed["summary"]["mixing"] == "equal_steps" and plain["summary"]["mixing"] == "none"


def test_augmented_mixing_takes_more_steps_of_fewer_task_examples(tiny_model_dir, files):
    _, log = fine_tune(tiny_model_dir, files, "augmented", data="mixed", mixing="augment")
    summary = log["summary"]
    assert summary["global_steps"] == 2 * NUM_TASK // SETTINGS["batch_size"]
    assert sum(task for task, _ in summary["examples_per_step"]) == NUM_TASK
    assert all(total == 4 for _, total in summary["examples_per_step"])
    assert summary["mixing"] == "augment"


def test_the_effective_lambda_counts_synthetic_tokens_per_task_token(tiny_model_dir, files):
    _, log = fine_tune(tiny_model_dir, files, "lambda", data="mixed", mixing="equal_steps")
    summary = log["summary"]
    records = read_jsonl(files["mixed"])
    tokenizer = load_tokenizer(tiny_model_dir)
    built = examples.build_examples(records, tokenizer, SETTINGS["max_length"], "x")
    task_tokens = examples.count_trained_tokens(built[:NUM_TASK])
    sample_tokens = examples.count_trained_tokens(built[NUM_TASK:])
    assert sample_tokens == NUM_TASK * 5  # every sampled token after the prompt token
    assert summary["effective_lambda"] == pytest.approx(sample_tokens / task_tokens)
    prov = json.loads((files["root"] / "lambda" / "model" / "cfs_provenance.json").read_text())
    assert prov["effective_lambda"] == summary["effective_lambda"]


def test_equal_steps_refuses_a_ratio_that_splits_a_sample(tiny_model_dir, files, tmp_path):
    data = write_jsonl(tmp_path / "odd.jsonl", task_records() + samples(3))
    with pytest.raises(SettingsError, match="train.mixing"):
        train.fine_tune(
            tiny_model_dir,
            data,
            {**SETTINGS, "mixing": "equal_steps"},
            tmp_path / "c",
            tmp_path / "m",
        )


def test_equal_step_schedule_draws_every_example_once_per_pass():
    records = task_records(8) + samples(4)
    schedule = examples.step_schedule(records, batch_size=4, epochs=2, seed=0)
    assert schedule.steps == 4 and schedule.samples_per_step == 2
    blocks = [schedule.order[6 * step : 6 * step + 6] for step in range(4)]
    for first, second in ((0, 1), (2, 3)):  # each epoch: every task example and sample once
        drawn = sorted(blocks[first] + blocks[second])
        assert drawn == list(range(12)), f"epoch of steps {first}, {second} drew {drawn}"
    assert schedule.per_device(2) == 3


def test_every_cell_of_a_seed_trains_on_the_same_task_examples_at_each_step():
    """Plain fine-tuning and a mixed set, whose files hold the task examples in other
    orders, get the same task examples at every step: differences between cells are
    paired on the task's batches."""
    import random

    task = task_records(16)
    plain = random.Random(1).sample(task, len(task))
    mixed = random.Random(2).sample(task + samples(8), len(task) + 8)

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


def test_a_task_set_of_any_size_trains_for_ceil_epochs_steps():
    schedule = examples.step_schedule(task_records(10), batch_size=4, epochs=1, seed=0)
    assert schedule.steps == 3, "10 examples in steps of 4: 3 steps, as the Trainer counts"
    assert len(schedule.order) == 12 and schedule.samples_per_step == 0


# --------------------------------------------------------------------------- tracking


def test_losses_and_curves_reach_tensorboard(tiny_model_dir, files, monkeypatch):
    """train.report_to: the Trainer's logs, the curves with them, in a TensorBoard event
    file beside the model (read back offline)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    model_dir, _ = fine_tune(
        tiny_model_dir, files, "tracked", curve_every=1, report_to=["tensorboard"]
    )
    (events,) = (model_dir.parent / "tensorboard").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events)).Reload()
    # the loss of every step, with a curve point at every step beside it
    for tag, steps in (("train/curve/kl_to_base", [0, 1, 2]), ("train/loss", [1, 2])):
        assert [event.step for event in accumulator.Scalars(tag)] == steps, tag
    assert "train/curve/target_loss" in accumulator.Tags()["scalars"]
