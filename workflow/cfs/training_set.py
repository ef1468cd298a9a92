"""A fine-tune's training set, tokenized once and memory-mapped by every process.

The main process reads the training set, tokenizes it (cfs.examples), puts it in the order
of its step schedule and writes it as Arrow files into a folder beside the checkpoints;
then every process, the main one included, memory-maps those files. N processes share one
copy in the page cache instead of each holding the set as Python lists and an in-memory
Arrow table, and only the main process reads and hashes the input files. A restarted job
reuses the folder when the run's fingerprint (cfs.checkpoints.run_fingerprint) matches.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from cfs.artifacts import read_json, read_jsonl, write_json
from cfs.checkpoints import run_fingerprint
from cfs.distributed import process_rank
from cfs.errors import DataError
from cfs.examples import (
    TASK,
    StepSchedule,
    build_examples,
    count_trained_tokens,
    load_synthetic,
    step_schedule,
)
from cfs.study import Method

log = logging.getLogger("cfs.training_set")

FACTS = "training_set.json"
# what the fine-tune's summary reports of the set, of its facts
SUMMARY_FACTS = (
    "num_examples",
    "num_synthetic_in_set",
    "num_synthetic_term_samples",
    "num_trained_tokens_per_epoch",
)


@dataclass(frozen=True)
class TrainingSet:
    """`rows`: the examples in training order (input_ids, labels, task_example);
    `synthetic`: the synthetic term's samples; `schedule`: the step schedule the rows
    follow, if any; `facts`: the counts of the set and the run's fingerprint
    (training_set.json)."""

    rows: object  # datasets.Dataset
    synthetic: object | None
    schedule: StepSchedule | None
    facts: dict

    @property
    def fingerprint(self) -> str:
        return self.facts["fingerprint"]

    @property
    def summary(self) -> dict:
        return {key: self.facts[key] for key in SUMMARY_FACTS}


def tokenized_folder(checkpoints: Path) -> Path:
    return checkpoints.with_name(checkpoints.name + ".tokenized")


def prepare_training_set(
    state,
    spec: Method,
    settings: dict,
    model_dir: Path,
    tokenizer,
    data: Path,
    folder: Path,
    synthetic: Path | None = None,
    other_inputs: tuple = (),
) -> TrainingSet:
    """The training set of the run, built by the main process of `state` (accelerate's
    PartialState) into `folder` and memory-mapped by all; `synthetic`: the samples of a
    synthetic term. They and the run's `other_inputs` files make part of its fingerprint."""
    with state.main_process_first():
        if state.is_main_process:
            fingerprint = run_fingerprint(model_dir, data, settings, (synthetic, *other_inputs))
            if stored_fingerprint(folder) == fingerprint:
                log.info("reusing the tokenized training set in %s", folder)
            else:
                build(spec, settings, tokenizer, data, synthetic, folder, fingerprint)
        else:
            log.info("process %d: memory-mapping the tokenized training set", process_rank())
        return load(folder)


def stored_fingerprint(folder: Path) -> str | None:
    try:
        return read_json(folder / FACTS)["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None


def build(spec: Method, settings, tokenizer, data: Path, synthetic, folder: Path, fingerprint):
    """Tokenize the set, order it and write it to `folder` (through a partial folder, so a
    killed job never leaves a set that looks complete)."""
    from datasets import Dataset

    records = read_jsonl(data)
    if not records:
        raise DataError(f"{data}: the training set is empty")
    max_length = settings["max_length"]
    examples = build_examples(records, tokenizer, max_length, str(data))
    synthetic_examples = None
    if spec.synthetic_term:
        synthetic_examples = load_synthetic(
            synthetic,
            spec.samples,
            settings["method"]["ratio"],
            len(examples),
            tokenizer,
            max_length,
        )
    kinds = [record["kind"] for record in records]
    schedule = None  # augmenting the set: the Trainer draws random batches of all of it
    if settings["mixing"] == "equal_steps" or set(kinds) == {TASK}:
        schedule = step_schedule(
            records, settings["batch_size"], settings["epochs"], settings["seed"]
        )
    rows = [
        {**example, "task_example": int(kind == TASK)}
        for example, kind in zip(examples, kinds, strict=True)
    ]
    if schedule:
        rows = [rows[index] for index in schedule.order]
    facts = {
        "fingerprint": fingerprint,
        "num_examples": len(examples),
        "num_synthetic_in_set": sum(kind != TASK for kind in kinds),
        "num_synthetic_term_samples": len(synthetic_examples or []),
        "num_trained_tokens_per_epoch": count_trained_tokens(examples),
        "trained_tokens": {
            "task": count_trained_tokens([row for row in rows if row["task_example"]]),
            "samples": count_trained_tokens([row for row in rows if not row["task_example"]]),
        },
        "schedule": dataclasses.asdict(schedule) if schedule else None,
    }
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    Dataset.from_list(rows).save_to_disk(partial / "rows")
    if synthetic_examples:
        Dataset.from_list(synthetic_examples).save_to_disk(partial / "synthetic")
    write_json(partial / FACTS, facts)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    log.info("tokenized the training set: %d rows into %s", len(rows), folder)


def load(folder: Path) -> TrainingSet:
    """The set in `folder`, its Arrow files memory-mapped (datasets.load_from_disk)."""
    from datasets import load_from_disk

    facts = read_json(folder / FACTS)
    synthetic = folder / "synthetic"
    schedule = facts["schedule"]
    return TrainingSet(
        rows=load_from_disk(str(folder / "rows")),
        synthetic=load_from_disk(str(synthetic)) if synthetic.is_dir() else None,
        schedule=StepSchedule(**schedule) if schedule else None,
        facts=facts,
    )
