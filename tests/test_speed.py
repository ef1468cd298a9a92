"""Speed settings are honoured: logits only at trained positions (same loss and gradients),
no unused final checkpoint, bf16 autocast exactly when configured, lm-eval's batch size."""

from __future__ import annotations

import pytest
import torch
from cfs import examples, train
from cfs.data import arithmetic_problems, render
from conftest import TEMPLATE, train_settings, write_jsonl

IGNORE = examples.IGNORE_INDEX


def task_set(path, count=4):
    records = [
        {"kind": "task", "prompt": r["prompt"], "response": r["response"]}
        for r in render(arithmetic_problems(count, seed=3), TEMPLATE)
    ]
    return write_jsonl(path, records)


def packed_batch(tokenizer, count=3):
    records = [
        {"kind": "task", "prompt": r["prompt"], "response": r["response"]}
        for r in render(arithmetic_problems(count, seed=4), TEMPLATE)
    ]
    built = examples.build_examples(records, tokenizer, 64, "x")
    return examples.training_collator(tokenizer, packing=True)(built)


@pytest.mark.parametrize(("packing", "lora"), [(True, False), (False, False), (True, True)])
def test_trained_positions_only_gives_the_same_loss_and_gradients(
    tiny_model_dir, tokenizer, packing, lora
):
    from cfs.modeling import load_model

    records = [
        {"kind": "task", "prompt": r["prompt"], "response": r["response"]}
        for r in render(arithmetic_problems(3, seed=4), TEMPLATE)
    ]
    built = examples.build_examples(records, tokenizer, 64, "x")
    batch = examples.training_collator(tokenizer, packing=packing)(built)
    model = load_model(tiny_model_dir, "float32")
    model.config.use_cache = False
    head = model.lm_head
    if lora:  # peft's wrapper hands logits_to_keep and shift_labels through
        method = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]}
        model = train.add_lora(model, method, 0)
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
    trained = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert head_rows == [batch["input_ids"].numel(), trained]
    assert trained < batch["input_ids"].numel() / 2  # the prompts are most of each example


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
    summary = train.fine_tune(
        tiny_model_dir, task_set(tmp_path / "t.jsonl"), settings, tmp_path / "c", tmp_path / "m"
    )
    assert summary["global_steps"] == 2
    assert saves == ([2] if keep else [])
    assert (tmp_path / "m" / "config.json").is_file()


@pytest.mark.parametrize(("precision", "dtype"), [("float32", "float32"), ("bfloat16", "bfloat16")])
def test_training_precision_setting_is_honoured_on_cpu(
    tiny_model_dir, tmp_path, monkeypatch, precision, dtype
):
    """bf16 autocast (fp32 master weights) when train.precision is bfloat16; fp32 math
    when float32 (the CPU default, `auto`)."""
    import cfs.train as module

    seen = []
    original = module.load_model

    def hooked(*args, **kwargs):
        model = original(*args, **kwargs)
        model.lm_head.register_forward_hook(
            lambda m, i, o: seen.append((o.dtype, m.weight.dtype)) if m.training else None
        )
        return model

    monkeypatch.setattr(module, "load_model", hooked)
    settings = train_settings(epochs=1, batch_size=2, micro_batch_size=2, precision=precision)
    train.fine_tune(
        tiny_model_dir, task_set(tmp_path / "t.jsonl"), settings, tmp_path / "c", tmp_path / "m"
    )
    assert seen and {out for out, _ in seen} == {getattr(torch, dtype)}
    assert {weight for _, weight in seen} == {torch.float32}  # master weights stay fp32


@pytest.mark.parametrize("batch_size", [3, 64])
def test_evaluation_batch_size_reaches_lm_eval(tiny_model_dir, monkeypatch, batch_size):
    """evaluation.batch_size is lm-eval's batch for log-likelihood and generation alike
    (64 in the CPU default: the 48 target questions decode in one batch)."""
    import lm_eval
    from cfs import evaluate
    from conftest import evaluation_settings

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
