"""cfs.train: the Trainer's arguments, a short real fine-tune through the CLI (its model,
log, provenance and cleanup), LoRA (float32 adapters on a bfloat16 base; weights in
bfloat16 only for LoRA on a GPU without FSDP), checkpoints (every N steps or every N
minutes), the training precision, and no device sync per micro-step for the regulariser's
log."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
from cfs import examples, objectives, train, trainer
from cfs.errors import DataError, SettingsError
from cfs.modeling import load_model, load_tokenizer
from conftest import (
    assert_weights_differ,
    context_free_samples,
    fine_tune_into,
    lora_model,
    model_weights,
    quick_train_settings,
    read_jsonl,
    task_records,
    train_settings,
    write_jsonl,
)

IGNORE = examples.IGNORE_INDEX


# --------------------------------------------------------------------------- arguments


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
    """One real 2-step fine-tune of the tiny model on a small mixed set, via the CLI, its
    model also saved after half its steps."""
    root = tmp_path_factory.mktemp("fine_tune")
    cf = context_free_samples(2, tokens=(60, 70, 80), index=False)
    data = write_jsonl(root / "train.jsonl", task_records(6, seed=1) + cf)
    settings = quick_train_settings(save_steps=1, mixing="augment")  # 8 examples, 2 steps of 4
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
            "--snapshots",
            str(root / "at0.5" / "seed0" / "snapshot"),
            "--out",
            str(out),
        ]
    )
    return {
        "out": out,
        "checkpoints": checkpoints,
        "root": root,
        "data": data,
        "half": root / "at0.5" / "seed0" / "snapshot",
    }


def test_fine_tune_writes_model_with_logs_and_provenance(fine_tuned):
    out = fine_tuned["out"]
    for name in ("config.json", "train_log.json", "cfs_provenance.json", "tokenizer.json"):
        assert (out / name).is_file(), f"no {name} in {out}"
    log = json.loads((out / "train_log.json").read_text())
    summary = log["summary"]
    assert summary["num_examples"] == 8
    assert summary["num_synthetic_in_set"] == 2
    assert summary["global_steps"] == 2  # 8 examples / effective batch 4
    loss = summary["train_loss"]
    assert math.isfinite(loss) and loss > 0, f"train_loss {loss}, expected finite and positive"
    losses = [float(entry["loss"]) for entry in log["log_history"] if "loss" in entry]
    assert len(losses) == 2, f"logged losses {losses}, expected one per step"
    assert all(math.isfinite(loss) for loss in losses), f"logged losses {losses}"
    prov = json.loads((out / "cfs_provenance.json").read_text())
    assert prov["stage"] == "fine_tune"
    assert prov["seed"] == 0
    assert prov["data"] == str(fine_tuned["data"])
    assert prov["settings"]["learning_rate"] == 5e-3


def test_the_model_after_half_the_steps_is_saved_as_a_model_of_its_own(fine_tuned, tiny_model_dir):
    half = fine_tuned["half"]
    summary = json.loads((half / "train_log.json").read_text())["summary"]
    assert (summary["step"], summary["max_steps"], summary["fraction"]) == (1, 2, 0.5)
    assert_weights_differ(tiny_model_dir, half)
    assert_weights_differ(half, fine_tuned["out"])
    assert json.loads((half / "config.json").read_text())["use_cache"] is True


def test_fine_tune_counts_trained_tokens(fine_tuned, tokenizer):
    built = examples.build_examples(read_jsonl(fine_tuned["data"]), tokenizer, 64, "x")
    expected = sum(sum(label != IGNORE for label in ex["labels"]) for ex in built)
    summary = json.loads((fine_tuned["out"] / "train_log.json").read_text())["summary"]
    assert summary["num_trained_tokens_per_epoch"] == expected


def test_fine_tune_changes_the_weights(fine_tuned, tiny_model_dir):
    assert_weights_differ(tiny_model_dir, fine_tuned["out"])
    tuned = model_weights(fine_tuned["out"])
    assert sorted(tuned) == sorted(model_weights(tiny_model_dir)), "other tensors than base's"
    not_finite = [name for name, tensor in tuned.items() if not torch.isfinite(tensor).all()]
    assert not_finite == [], f"tensors with non-finite values: {not_finite}"


def test_fine_tune_removes_checkpoints_and_temp_folders(fine_tuned):
    assert not fine_tuned["checkpoints"].exists(), "checkpoints left after the final save"
    leftovers = [p.name for p in fine_tuned["root"].iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_fine_tuned_model_loads_and_predicts(fine_tuned):
    model = load_model(fine_tuned["out"], "float32")
    logits = model(torch.tensor([[1, 60, 70]])).logits
    assert tuple(logits.shape) == (1, 3, model.config.vocab_size)
    assert torch.isfinite(logits).all(), "non-finite logits"


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
    assert not (tmp_path / "m").exists(), "a model folder written for an empty set"


def test_changed_settings_do_not_resume_from_an_old_runs_checkpoints(tiny_model_dir, tmp_path):
    """Snakemake reruns fine_tune in the same cell (same --checkpoints) when a train
    setting changes. With checkpoints kept (train.keep_checkpoints, or left behind by a
    killed run) the new run must not pick up the old run's state: here the old run had
    finished, so resuming would train 0 steps and publish the old model as the new one."""
    data = write_jsonl(tmp_path / "train.jsonl", task_records(4, seed=2))
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
    assert summary["resumed_from"] is None, f"resumed from {summary['resumed_from']}"
    assert_weights_differ(tmp_path / "old", tmp_path / "new")


def count_saves(monkeypatch) -> list:
    from transformers import Trainer

    saves = []
    original = Trainer._save_checkpoint

    def counted(self, *args, **kwargs):
        saves.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_save_checkpoint", counted)
    return saves


@pytest.mark.parametrize("keep", [False, True])
def test_final_checkpoint_is_written_only_when_checkpoints_are_kept(
    tiny_model_dir, tmp_path, monkeypatch, keep
):
    saves = count_saves(monkeypatch)
    settings = train_settings(
        epochs=1, batch_size=2, micro_batch_size=2, save_steps=100, keep_checkpoints=keep
    )
    data = write_jsonl(tmp_path / "t.jsonl", task_records(4, seed=3))
    summary = train.fine_tune(tiny_model_dir, data, settings, tmp_path / "c", tmp_path / "m")
    assert summary["global_steps"] == 2
    assert saves == ([2] if keep else [])
    assert (tmp_path / "m" / "config.json").is_file(), "no model saved"


def test_save_minutes_and_save_steps_reach_the_trainer(tmp_path):
    settings = train_settings(save_steps=None, save_minutes=60, batch_size=4, micro_batch_size=2)
    args = train.training_arguments(settings, tmp_path / "ckpt", torch.device("cpu"))
    assert args.save_strategy == "no"
    names = [type(c).__name__ for c in trainer.checkpoint_callbacks(settings)]
    assert names == ["SaveEveryMinutes", "SkipFinalCheckpoint"]  # the last word last
    settings = train_settings(save_steps=5, batch_size=4, micro_batch_size=2)
    args = train.training_arguments(settings, tmp_path / "ckpt", torch.device("cpu"))
    assert (args.save_strategy, args.save_steps) == ("steps", 5)
    assert [type(c).__name__ for c in trainer.checkpoint_callbacks(settings)] == [
        "SkipFinalCheckpoint"
    ]


@pytest.mark.parametrize(
    ("precision", "native_bf16", "dtype"),
    [
        ("float32", True, "float32"),
        ("bfloat16", False, "bfloat16"),
        ("auto", True, "bfloat16"),
        ("auto", False, "float32"),
    ],
)
def test_training_precision_setting_is_honoured_on_cpu(
    tiny_model_dir, tmp_path, monkeypatch, precision, native_bf16, dtype
):
    """bf16 autocast (fp32 master weights) when train.precision is bfloat16, or `auto` on a
    CPU with native bf16; fp32 math when float32, or `auto` on a CPU without. The fine-tune
    records what it computed in."""
    monkeypatch.setattr("cfs.modeling.native_bf16", lambda device: native_bf16)
    seen = []
    original = train.load_model

    def hooked(*args, **kwargs):
        model = original(*args, **kwargs)
        model.lm_head.register_forward_hook(
            lambda m, i, o: seen.append((o.dtype, m.weight.dtype)) if m.training else None
        )
        return model

    monkeypatch.setattr(train, "load_model", hooked)
    settings = train_settings(epochs=1, batch_size=2, micro_batch_size=2, precision=precision)
    data = write_jsonl(tmp_path / "t.jsonl", task_records(4, seed=3))
    summary = train.fine_tune(tiny_model_dir, data, settings, tmp_path / "c", tmp_path / "m")
    assert len(seen) > 0, "no training forward of the LM head was seen"
    assert {out for out, _ in seen} == {getattr(torch, dtype)}
    assert {weight for _, weight in seen} == {torch.float32}  # master weights stay fp32
    recorded = "bfloat16 autocast, float32 weights" if dtype == "bfloat16" else "float32"
    assert summary["precision"] == recorded
    provenance = json.loads((tmp_path / "m" / "cfs_provenance.json").read_text())
    assert provenance["precision"] == recorded
    saved = load_model(tmp_path / "m", "auto")
    assert next(saved.parameters()).dtype == torch.float32, "a CPU fine-tune saves fp32"


def test_no_device_sync_per_micro_step_for_the_term_log(tiny_model_dir, tmp_path, monkeypatch):
    """The regulariser's value is logged from an on-device running sum; no
    `.item()` (a device sync) inside compute_loss or training_step."""
    data = write_jsonl(tmp_path / "train.jsonl", task_records(8, seed=3))
    real_item = torch.Tensor.item
    synced_in = []

    def item(self):
        caller = inspect.stack()[1]
        if caller.filename.endswith("train.py") and caller.function in (
            "compute_loss",
            "training_step",
        ):
            synced_in.append(caller.function)
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    settings = quick_train_settings(
        lr_scheduler="cosine",
        save_steps=100,
        logging_steps=2,
        method={"name": "l2", "lambda": 1.0, "reduction": "mean"},
    )
    train.fine_tune(tiny_model_dir, data, settings, tmp_path / "c", tmp_path / "m")
    assert synced_in == []
    log = json.loads((tmp_path / "m" / "train_log.json").read_text())["log_history"]
    assert [entry["step"] for entry in log if "l2" in entry] == [2]


# --------------------------------------------------------------------------- LoRA

LORA = {
    "name": "lora",
    "rank": 4,
    "alpha": 8,
    "dropout": 0.0,
    "target_modules": ["q_proj", "v_proj"],
}


def test_lora_trains_only_adapters_and_saves_a_loadable_model(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir, "float32")
    parameters = len(list(model.parameters()))
    wrapped = objectives.add_lora(model, LORA, seed=0)
    trainable = sorted(n for n, p in wrapped.named_parameters() if p.requires_grad)
    assert len(trainable) > 0, "LoRA left nothing to train"
    assert [n for n in trainable if "lora_" not in n] == [], "trainable base weights"
    # in the wrapped model the base weights are frozen: only adapters can move
    frozen = [n for n, p in wrapped.named_parameters() if not p.requires_grad]
    assert len(frozen) == parameters, "not every base weight is frozen"

    data = write_jsonl(tmp_path / "task.jsonl", task_records(8, seed=1))
    settings = quick_train_settings(save_steps=100, method=LORA)
    out, summary = fine_tune_into(tmp_path, tiny_model_dir, data, settings)
    assert summary["method"] == "lora"
    merged, base = model_weights(out), model_weights(tiny_model_dir)
    assert sorted(merged) == sorted(base), "the merged model has other tensors than base's"
    changed = sorted(name for name in base if not torch.equal(base[name], merged[name]))
    # merging moves only the adapted projections; everything else is the base model
    assert len(changed) > 0, "merging the adapters changed no weight"
    others = [name for name in changed if not name.endswith(("q_proj.weight", "v_proj.weight"))]
    assert others == [], "weights outside the adapted projections changed"
    reloaded = load_model(out, "float32")
    tokenizer = load_tokenizer(out)
    ids = torch.tensor([tokenizer("2 + 2 =", add_special_tokens=False)["input_ids"]])
    assert torch.isfinite(reloaded(input_ids=ids).logits).all(), "non-finite logits"


def test_lora_on_a_bf16_base_keeps_float32_adapters(tiny_model_dir):
    """What cfs.distributed.weights_dtype relies on: peft upcasts the adapters of a bf16 model."""
    peft_model = lora_model(tiny_model_dir, torch.bfloat16)
    dtypes = {
        name: parameter.dtype
        for name, parameter in peft_model.named_parameters()
        if parameter.requires_grad
    }
    assert dtypes and set(dtypes.values()) == {torch.float32}, dtypes
    frozen = {p.dtype for p in peft_model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
