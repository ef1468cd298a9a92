"""cfs.curves: forgetting curves along a fine-tune (KL to the base model and NLL on the
held-out samples, loss on the target's test set), at step 0 and every `curve_every` steps,
in the Trainer's log, in curves.csv and in TensorBoard; on a tiny model, through
cfs.train.fine_tune as the rule runs it."""

from __future__ import annotations

import pandas as pd
import pytest
from cfs import evaluate
from cfs.modeling import autocast, compute_precision, load_model
from conftest import (
    context_free_samples,
    fine_tune_into,
    quick_train_settings,
    read_jsonl,
    task_records,
    train_log,
    write_jsonl,
)

SETTINGS = quick_train_settings()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("curves")
    return {
        "root": root,
        "task": write_jsonl(root / "task.jsonl", task_records(8, seed=1)),
        "heldout": write_jsonl(
            root / "heldout.jsonl", context_free_samples(5, tokens=(110, 70, 80, 90, 100))
        ),
        "test": write_jsonl(root / "test.jsonl", task_records(6, seed=2)),
    }


def fine_tune(model_dir, files, name, **overrides):
    model, _ = fine_tune_into(
        files["root"] / name,
        model_dir,
        files["task"],
        {**SETTINGS, **overrides},
        heldout=files["heldout"],
        target_test=files["test"],
    )
    return model, train_log(model)


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
    kl, target_loss = table["kl_to_base"].tolist(), table["target_loss"].tolist()
    assert abs(kl[0]) <= 1e-6, f"KL to base at step 0 is {kl[0]}, expected 0"
    assert kl[-1] > 1e-4, f"KL to base after training is {kl[-1]}, expected above 1e-4"
    assert target_loss[-1] < target_loss[0], f"the target loss does not go down: {target_loss}"


def test_last_curve_point_is_the_evaluations_kl(curved, tiny_model_dir, files):
    """The curve's KL at the last step is the post eval's KL of the saved model, both in
    the precision `auto` picks here."""
    base = load_model(tiny_model_dir, "float32").eval()
    model = load_model(curved[0], "float32").eval()
    with autocast(compute_precision("auto", "cpu"), "cpu"):
        measured = evaluate.kl_to_base(base, model, read_jsonl(files["heldout"]), batch_size=8)
    last = pd.read_csv(curved[0] / "curves.csv").iloc[-1]
    assert last["kl_to_base"] == pytest.approx(measured["kl_to_base"], rel=1e-4, abs=1e-7)
    assert last["heldout_nll"] == pytest.approx(measured["heldout_nll"], rel=1e-5)


def test_no_curves_when_curve_every_is_zero(tiny_model_dir, files):
    model_dir, log = fine_tune(tiny_model_dir, files, "flat", curve_every=0)
    logged = [entry for entry in log["log_history"] if "curve/kl_to_base" in entry]
    assert logged == []
    assert not (model_dir / "curves.csv").exists(), "curves.csv written with curve_every 0"


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
    scalars = accumulator.Tags()["scalars"]
    assert "train/curve/target_loss" in scalars, f"no target-loss curve in {scalars}"


def test_no_held_out_target_problems_stop_the_fine_tune_before_the_model_loads(
    tiny_model_dir, files, monkeypatch
):
    from cfs import train
    from cfs.errors import DataError

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the curves' data were checked")

    monkeypatch.setattr(train, "load_model", load_model)
    empty = write_jsonl(files["root"] / "empty_test.jsonl", [])
    with pytest.raises(DataError, match="train.curve_every"):
        fine_tune_into(
            files["root"] / "no_targets",
            tiny_model_dir,
            files["task"],
            {**SETTINGS, "curve_every": 2},
            heldout=files["heldout"],
            target_test=empty,
        )
