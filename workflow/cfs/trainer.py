"""The transformers Trainer with one regularising term (cfs.objectives.Objective) beside
the task loss.

L2 is added to the task loss (one backward). The synthetic terms (weighted synthetic NLL,
KL to base) run their own forward and backward after the task's, so the two graphs never
coexist in memory; under DDP/FSDP the second backward's gradients are averaged over the
processes like the first's. The term is logged from a running on-device sum: no `.item()`
(a device sync) per micro-step, one per logging step.
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import Trainer, TrainerCallback

from cfs.distributed import gather
from cfs.examples import trained_positions_only

log = logging.getLogger("cfs.trainer")
NEGLIGIBLE_SHARE = 1e-3  # of the logged loss, below which a term changes nothing


class RegularizedTrainer(Trainer):
    """The Trainer's own loss plus `weight` times `regularizer`'s term, logged apart."""

    def __init__(self, *args, regularizer=None, weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.regularizer = regularizer
        self.weight = weight
        self._position = (-1, 0)
        self._term_sum = None
        self._term_share = 0.0
        self.examples_per_step: dict[int, list[int]] = {}  # step -> [task, all] (this process)

    def _micro_step(self) -> tuple[int, int]:
        """(optimizer step, micro-step within it) of the batch being trained on."""
        step, micro = self._position
        current = self.state.global_step
        micro = micro + 1 if step == current else 0
        self._position = (current, micro)
        return current, micro

    def trainable_parameters(self) -> list:
        """The parameters the optimizer updates: under FSDP2, the sharded ones."""
        if self.optimizer is not None:
            return [p for group in self.optimizer.param_groups for p in group["params"]]
        return [p for p in self.model.parameters() if p.requires_grad]

    def _setup_regularizer(self) -> None:
        """After the model is wrapped (sharded) and before a checkpoint is loaded: the
        L2 reference must be the base weights, on the parameters that train; the frozen
        base of KL to base is sharded like the model (Objective.attach)."""
        if self.regularizer is not None:
            self.regularizer.attach(self)

    def create_scheduler(self, *args, **kwargs):
        # called once the optimizer holds the wrapped (sharded) parameters, before an
        # FSDP checkpoint is loaded
        self._setup_regularizer()
        return super().create_scheduler(*args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # without FSDP a checkpoint is loaded before the model is wrapped: take the
        # reference first (DDP keeps the parameter objects)
        self._setup_regularizer()
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _record_term(self, term: torch.Tensor, share: float) -> None:
        value = term.detach().float() * share
        self._term_sum = value if self._term_sum is None else self._term_sum + value
        self._term_share += share

    def _count_examples(self, inputs: dict) -> dict:
        """Pops the batch's example counts (cfs.examples.CountingCollator) into the log."""
        counts = [int(inputs.pop(key)) for key in ("num_task_examples", "num_examples")]
        step = self.examples_per_step.setdefault(self.state.global_step, [0, 0])
        step[0], step[1] = step[0] + counts[0], step[1] + counts[1]
        return inputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = trained_positions_only(self._count_examples(inputs))
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.regularizer is None or self.regularizer.separate_backward:
            return result
        loss, outputs = result if return_outputs else (result, None)
        term = self.regularizer(model, *self._micro_step())
        self._record_term(term, 1.0)
        loss = loss + self.weight * term / self._accumulation_divisor(num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.regularizer is None or not self.regularizer.separate_backward:
            return loss
        with self.compute_loss_context_manager():
            term, share = self.regularizer(model, *self._micro_step())
        if term is None:  # no samples in this micro-step, on every process alike
            return loss
        scaled = self.weight * share * term
        self.accelerator.backward(scaled)
        self._record_term(term, share)
        return loss + scaled.detach()

    def _accumulation_divisor(self, num_items_in_batch) -> int:
        # Where the task loss is already normalised over the whole accumulated batch,
        # training_step does not divide by the accumulation steps: do it for the term.
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        return self.current_gradient_accumulation_steps if scaled else 1

    def log(self, logs, start_time=None):
        # every process logs at the same steps (the Trainer gathers the loss there), and
        # once more at the end with the run's mean loss: steps after the last logged one
        # (all of them, in a run shorter than train.logging_steps) are logged there
        loss = logs.get("loss", logs.get("train_loss"))
        if self._term_sum is not None and loss is not None:
            mean = self._term_sum / self._term_share
            if self.accelerator.num_processes > 1:
                mean = self.accelerator.reduce(mean, reduction="mean")
            # the logged loss holds the weighted term: its share of it shows a term too
            # small to change the fine-tune (term_record)
            logs.update(self.regularizer.logged(mean.item(), self.weight, loss))
            self._term_sum, self._term_share = None, 0.0
        super().log(logs, start_time)


class SaveEveryMinutes(TrainerCallback):
    """A checkpoint once `minutes` have passed since the last one (or since the run
    started), whatever the time per step: `train.save_minutes`. The main process's clock
    decides, and every process learns its decision at each step (one small broadcast), so
    all of them save at the same step: under FSDP a checkpoint is a collective."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.last = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        due = [time.monotonic() - self.last >= self.seconds]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(due, src=0)
        if due[0]:
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.last = time.monotonic()


class SkipFinalCheckpoint(TrainerCallback):
    """The Trainer also checkpoints at the last step, but cfs.train saves the model right
    after and, without `keep_checkpoints`, deletes checkpoints/, so that write is never
    read (for OLMo-1B ~14 GB of weights and AdamW state). It runs after the Trainer's own
    DefaultFlowCallback, so its decision comes last."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = False
        return control


def examples_per_step(trainer) -> list[list[int]]:
    """[task examples, all examples] of each optimizer step, as the trainer consumed them
    (summed over the processes)."""
    steps: dict[int, list[int]] = {}
    for part in gather(trainer.examples_per_step):
        for step, (task, total) in part.items():
            both = steps.setdefault(int(step), [0, 0])
            both[0], both[1] = both[0] + task, both[1] + total
    return [steps[step] for step in sorted(steps)]


def term_record(trainer) -> dict | None:
    """The regularising term's weight and its largest logged share of the loss; a term that
    stays below NEGLIGIBLE_SHARE of it leaves the fine-tune as it would be without it, so
    it is flagged (and warned about) rather than reported as a method that did nothing."""
    if trainer.regularizer is None:
        return None
    key = f"{trainer.regularizer.name}_share"
    shares = [entry[key] for entry in trainer.state.log_history if key in entry]
    largest = max(shares) if shares else None
    negligible = largest is not None and largest < NEGLIGIBLE_SHARE
    if negligible:
        log.warning(
            "the %s term (lambda %g) stayed below %g of the loss (at most %.3g): this "
            "fine-tune is the same as one without it; raise its lambda",
            trainer.regularizer.name,
            trainer.weight,
            NEGLIGIBLE_SHARE,
            largest,
        )
    return {
        "name": trainer.regularizer.name,
        "lambda": trainer.weight,
        "largest_share_of_loss": largest,
        "negligible": negligible,
    }


def checkpoint_callbacks(settings: dict) -> list:
    """`train.save_minutes` (a checkpoint once that much time has passed) and, unless
    checkpoints are kept, no checkpoint at the last step (the model is saved right after)."""
    minutes = settings["save_minutes"]
    callbacks = [SaveEveryMinutes(minutes)] if minutes else []
    return callbacks if settings["keep_checkpoints"] else [*callbacks, SkipFinalCheckpoint()]
