"""Forgetting curves: along a fine-tune, every `train.curve_every` optimizer steps (and at
step 0, before the first update), how far the model is from the base model on the held-out
context-free samples (KL to base, and the model's NLL of them: cfs.heldout) and how well
it does the task (the loss of the first `train.curve_target_examples` held-out target
problems).

The base model's log-probabilities on the held-out samples are computed once, at step 0
(the model that trains is the base model then), kept in memory and written beside the
checkpoints, so a resumed run measures against the same base. The points go to the
Trainer's log (and to `train.report_to`) as curve/<name>, and to curves.csv in the model
folder (cfs.train).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from cfs.artifacts import atomic_path, read_jsonl
from cfs.errors import DataError, SettingsError
from cfs.examples import build_examples, padding_collator
from cfs.heldout import kl_and_nll_sums, padded_batches, predicted_logprobs
from cfs.tokens import IGNORE_INDEX

log = logging.getLogger("cfs.curves")
PREFIX = "curve/"
COLUMNS = ("kl_to_base", "heldout_nll", "target_loss")
BASE_FILE = "curve_base_logprobs.pt"
CURVES_FILE = "curves.csv"  # in the fine-tuned model's folder


class ForgettingCurves(TrainerCallback):
    """Logs the curve points at step 0 and every `every` optimizer steps, on every process
    (under FSDP each forward is a collective)."""

    def __init__(self, trainer, heldout, target, collator, every: int, folder, batch_size=8):
        """heldout: the held-out context-free samples; target: training examples of the
        held-out target problems (cfs.examples), padded into batches by `collator`."""
        self.trainer = trainer
        self.heldout = list(padded_batches(heldout, batch_size))
        self.target = [
            collator(target[start : start + batch_size])
            for start in range(0, len(target), batch_size)
        ]
        self.every = every
        self.base_file = Path(folder) / BASE_FILE
        self.base_logprobs: list[torch.Tensor] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.base_logprobs = None  # the model is the base model: measure it now
            self._point(model, state)
            if self.trainer.is_world_process_zero():
                with atomic_path(self.base_file) as tmp:
                    torch.save(self.base_logprobs, tmp)
        else:  # resumed: the base side was written when the run started
            self.base_logprobs = torch.load(self.base_file)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            # logging resets the Trainer's should_log: its own loss log of this step stays due
            should_log = control.should_log
            self._point(model, state)
            control.should_log = should_log

    @torch.no_grad()
    def _point(self, model, state) -> None:
        was_training = model.training
        model.eval()
        kl = nll = count = 0
        measured = []
        for index, (ids, mask) in enumerate(self.heldout):
            logprobs, targets = predicted_logprobs(model, ids, mask)
            measured.append(logprobs.cpu())
            base = logprobs if self.base_logprobs is None else self.base_logprobs[index]
            sums = kl_and_nll_sums(base.to(logprobs.device), logprobs, targets)
            kl, nll, count = kl + sums[0], nll + sums[1], count + sums[2]
        if self.base_logprobs is None:
            self.base_logprobs = measured
        loss, tokens = 0.0, 0
        for batch in self.target:
            batch_loss, batch_tokens = target_nll(model, batch)
            loss, tokens = loss + batch_loss, tokens + batch_tokens
        model.train(was_training)
        point = {"kl_to_base": kl / count, "heldout_nll": nll / count, "target_loss": loss / tokens}
        log.info("step %d: %s", state.global_step, point)
        self.trainer.log({PREFIX + key: value for key, value in point.items()})


def target_nll(model, batch: dict) -> tuple[float, int]:
    """(sum of the token NLL of the trained positions, their count) of a padded batch."""
    device = next(model.parameters()).device
    labels = batch["labels"].to(device)
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).logits
    predicted, following = logits[:, :-1], labels[:, 1:]
    keep = following != IGNORE_INDEX
    logprobs = F.log_softmax(predicted[keep].float(), dim=-1)
    return -logprobs.gather(-1, following[keep][:, None]).sum().item(), int(keep.sum())


def curve_rows(log_history: list[dict]) -> list[dict]:
    """The curve points of a Trainer's log, one row per step."""
    return [
        {"step": entry["step"], **{key: entry[PREFIX + key] for key in COLUMNS}}
        for entry in log_history
        if PREFIX + COLUMNS[0] in entry
    ]


def curve_data(heldout, target_test, tokenizer, settings) -> tuple[list[dict], list[dict]]:
    """The curves' held-out context-free samples and target examples, read (and refused
    when empty) before the model is loaded."""
    if heldout is None or target_test is None:
        raise SettingsError("train.curve_every needs --heldout and --target-test")
    samples = read_jsonl(heldout)
    if not samples:
        raise DataError(f"{heldout}: no held-out samples for the forgetting curves")
    problems = read_jsonl(target_test)[: settings["curve_target_examples"]]
    if not problems:
        raise DataError(
            f"{target_test}: no held-out target problems for the forgetting curves "
            "(train.curve_every); task.num_train takes every row of task.split: set "
            "task.test_split, lower task.num_train, or set train.curve_every to 0"
        )
    target = build_examples(
        [{**record, "kind": "task"} for record in problems],
        tokenizer,
        settings["max_length"],
        str(target_test),
    )
    return samples, target


def forgetting_curves(trainer, samples, target, tokenizer, settings, checkpoints):
    collator = padding_collator(tokenizer)
    return ForgettingCurves(
        trainer, samples, target, collator, settings["curve_every"], checkpoints
    )
