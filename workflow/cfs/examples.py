"""Training examples and batches: what each record of a training set is trained on.

Task examples carry loss on the response only (prompt tokens masked) and a closing EOS.
Samples (cfs.study.SAMPLE_KINDS) carry loss on every token after their prompt: the
context-free prompt token, or the task prompt a contextual sample answers; no EOS is
added, so a sample cut at the length limit does not learn to end there.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from cfs.artifacts import Records, line_numbers, read_jsonl
from cfs.errors import DataError, SettingsError
from cfs.study import SAMPLE_KINDS, SampleKind
from cfs.tokens import IGNORE_INDEX

TASK = "task"


def task_example(record: dict, tokenizer, max_length: int) -> dict:
    """Prompt tokens get IGNORE_INDEX; the response and a closing EOS are trained on."""
    prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
    response = tokenizer(record["response"], add_special_tokens=False)["input_ids"]
    response = response + [tokenizer.eos_token_id]
    return _example(prompt, response, max_length)


def sample_example(record: dict, kind: SampleKind, max_length: int) -> dict:
    """Every sampled token is trained on; EOS only where the sample ended with it."""
    return _example(kind.prompt_ids(record), list(record["token_ids"]), max_length)


def _example(prompt: list[int], trained: list[int], max_length: int) -> dict:
    input_ids = (prompt + trained)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + trained)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def build_examples(records: list[dict], tokenizer, max_length: int, source: str) -> list[dict]:
    """One example per record of a training set; `kind` says how it is trained on."""
    examples = []
    for line_number, record in zip(line_numbers(records), records, strict=True):
        kind = record.get("kind")
        if kind == TASK:
            example = task_example(record, tokenizer, max_length)
        elif kind in SAMPLE_KINDS:
            example = sample_example(record, SAMPLE_KINDS[kind], max_length)
        else:
            known = ", ".join([TASK, *SAMPLE_KINDS])
            raise DataError(
                f"{source}:{line_number}: unknown example kind {kind!r} (known: {known})"
            )
        if all(label == IGNORE_INDEX for label in example["labels"]):
            raise DataError(f"{source}:{line_number}: no trainable tokens within max_length")
        examples.append(example)
    return examples


def load_synthetic(path, kind: str, ratio: float, num_task: int, tokenizer, max_length: int):
    """The first round(ratio * num_task) samples of `path`, as training examples."""
    records = read_jsonl(path)
    wanted = round(ratio * num_task)
    if wanted > len(records):
        raise DataError(
            f"{path}: ratio {ratio} needs {wanted} synthetic samples for {num_task} task "
            f"examples, but only {len(records)} were generated: raise generation.num_samples"
        )
    chosen = Records({**record, "kind": kind} for record in records[:wanted])
    chosen.line_numbers = line_numbers(records)[:wanted]
    return build_examples(chosen, tokenizer, max_length, str(path))


def count_trained_tokens(examples: list[dict]) -> int:
    return sum(sum(label != IGNORE_INDEX for label in ex["labels"]) for ex in examples)


def padding_collator(tokenizer):
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8
    )


def training_collator(tokenizer, packing: bool):
    """Packing concatenates a micro-batch into one row with restarting position ids; the
    attention mask is then block-diagonal, so samples never attend to each other."""
    if packing:
        from transformers import DataCollatorWithFlattening

        return DataCollatorWithFlattening(separator_id=IGNORE_INDEX)
    return padding_collator(tokenizer)


def trained_positions_only(inputs: dict) -> dict:
    """The LM head (and the loss's log-softmax over the vocabulary) only at the positions
    that predict a trained token: the same loss and gradients, without that work at prompt
    positions (half the tokens of the default study's task examples). `logits_to_keep` is
    a boolean (batch, length) mask; the labels, already shifted, are those positions' next
    tokens."""
    labels = inputs.get("labels")
    if labels is None or "logits_to_keep" in inputs:
        return inputs
    following = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    keep = following != IGNORE_INDEX
    kept = following[keep]
    return {**inputs, "labels": kept, "shift_labels": kept, "logits_to_keep": keep}


@dataclass(frozen=True)
class StepSchedule:
    """`steps` optimizer steps, each of `task_per_step` task examples and
    `samples_per_step` mixed-in samples, the training set's examples taken in `order`."""

    order: list[int]
    steps: int
    task_per_step: int
    samples_per_step: int

    def per_device(self, micro_batch: int) -> int:
        """Examples per micro-batch: `micro_batch` task examples and their samples."""
        examples = micro_batch * (self.task_per_step + self.samples_per_step)
        if examples % self.task_per_step:
            raise SettingsError(
                f"train.mixing equal_steps: train.micro_batch_size {micro_batch} x "
                f"{self.samples_per_step} samples per {self.task_per_step} task examples is not "
                "a whole number of samples per micro-batch"
            )
        return examples // self.task_per_step


def step_schedule(records: list[dict], batch_size: int, epochs: float, seed: int):
    """The order of a training set's examples that gives every optimizer step `batch_size`
    task examples and the set's samples in proportion (ratio x batch_size), for
    ceil(epochs x task examples / batch_size) steps.

    The task examples come from a seeded permutation per pass over them, taken in the
    order of their text, not of the file: every cell of a seed, mixed or not, trains on the
    same task examples at the same step, so the differences between cells are paired on
    the task's batches as well as on the seed. Samples are drawn through a stream of their
    own (a pass over them need not end with an epoch), and each step's examples shuffled."""
    kinds = [record["kind"] for record in records]
    task = sorted(
        (index for index, kind in enumerate(kinds) if kind == TASK),
        key=lambda index: (records[index]["prompt"], records[index]["response"]),
    )
    samples = [index for index, kind in enumerate(kinds) if kind != TASK]
    if not task:
        raise DataError("the training set has no task examples")
    exact = len(samples) * batch_size / len(task)
    per_step = round(exact)
    if abs(exact - per_step) > 0.01 * max(per_step, 1):
        raise SettingsError(
            f"train.mixing equal_steps: {len(samples)} samples per {len(task)} task examples "
            f"are {exact:g} samples per step of train.batch_size {batch_size}, not a whole "
            "number; change the ratio or the batch size, or set train.mixing: augment"
        )
    steps = max(1, math.ceil(epochs * len(task) / batch_size))
    task_stream = _permutations(task, random.Random(seed))
    sample_stream = _permutations(samples, random.Random(f"samples {seed}"))
    within_step = random.Random(f"steps {seed}")
    order = []
    for _ in range(steps):
        block = [next(task_stream) for _ in range(batch_size)]
        block += [next(sample_stream) for _ in range(per_step)]
        within_step.shuffle(block)
        order += block
    return StepSchedule(order, steps, batch_size, per_step)


def _permutations(indices: list[int], rng: random.Random):
    if not indices:
        return
    while True:
        yield from rng.sample(indices, len(indices))


class CountingCollator:
    """Collates like `collator` and adds how many task examples the batch holds
    (`num_task_examples`, from each example's `task_example` flag), for the trainer's log."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features: list[dict]) -> dict:
        features = [dict(feature) for feature in features]
        count = sum(feature.pop("task_example") for feature in features)
        batch = self.collator(features)
        batch["num_task_examples"] = torch.tensor(count)
        batch["num_examples"] = torch.tensor(len(features))
        return batch


def mixing_record(settings, regularizer, method, facts: dict, schedule) -> dict:
    """How the cell's samples met the task examples: the reading of the ratio it trained
    with and the effective lambda, synthetic loss tokens per task loss token over what it
    trained on (`facts["trained_tokens"]`, cfs.training_set; for a separate synthetic
    term: its lambda, a weight on per-token means)."""
    tokens = facts["trained_tokens"]
    mixed = tokens["samples"] > 0
    record = {
        "mixing": (settings["mixing"] if mixed else "none"),
        "synthetic_tokens_per_task_token": tokens["samples"] / tokens["task"],
        "effective_lambda": tokens["samples"] / tokens["task"],
    }
    if schedule and mixed:
        record["samples_per_step"] = schedule.samples_per_step
    if regularizer is not None and regularizer.separate_backward:
        record["effective_lambda"] = method["lambda"]
    return record
