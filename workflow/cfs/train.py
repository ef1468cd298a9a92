"""Full fine-tuning on a mixed set with the transformers Trainer.

Task examples carry loss on the response only (prompt tokens masked); context-free samples
carry loss on every generated token. Checkpoints go to --checkpoints (outside the declared
output) and a restarted run resumes from the last one.

    python -m cfs.train --model results/models/smollm2/base \
        --data results/smollm2/temp0.7/ratio0.5/train.jsonl \
        --settings '{"learning_rate": 1e-4, ...}' --checkpoints .../checkpoints --out .../model
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

from cfs.artifacts import (
    DataError,
    atomic_path,
    line_numbers,
    provenance,
    read_json,
    read_jsonl,
    write_json,
)
from cfs.cli import SettingsError, require, run_stage, set_threads, stage_parser
from cfs.distributed import distributed_arguments
from cfs.modeling import load_model, load_tokenizer, pick_device

log = logging.getLogger("cfs.train")
IGNORE_INDEX = -100


def task_example(record: dict, tokenizer, max_length: int) -> dict:
    """Prompt tokens get IGNORE_INDEX; the response and a closing EOS are trained on."""
    prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
    response = tokenizer(record["response"], add_special_tokens=False)["input_ids"]
    response = response + [tokenizer.eos_token_id]
    input_ids = (prompt + response)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def context_free_example(record: dict, max_length: int) -> dict:
    """Every generated token is trained on. No EOS is added: a sample cut at the length
    limit must not learn to end there; one that ended with EOS already holds it."""
    input_ids = ([record["prompt_token_id"]] + list(record["token_ids"]))[:max_length]
    labels = [IGNORE_INDEX] + input_ids[1:]
    return {"input_ids": input_ids, "labels": labels}


def build_examples(records: list[dict], tokenizer, max_length: int, source: str) -> list[dict]:
    examples = []
    for line_number, record in zip(line_numbers(records), records, strict=True):
        kind = record.get("kind")
        if kind == "task":
            example = task_example(record, tokenizer, max_length)
        elif kind == "context_free":
            example = context_free_example(record, max_length)
        else:
            raise DataError(f"{source}:{line_number}: unknown example kind {kind!r}")
        if all(label == IGNORE_INDEX for label in example["labels"]):
            raise DataError(f"{source}:{line_number}: no trainable tokens within max_length")
        examples.append(example)
    return examples


def training_arguments(settings: dict, checkpoints: Path, device: torch.device):
    from transformers import TrainingArguments

    batch_size = require(settings, "batch_size")
    micro_batch = min(settings.get("micro_batch_size", batch_size), batch_size)
    if batch_size % micro_batch:
        raise SettingsError(
            f"train.batch_size ({batch_size}) must be a multiple of "
            f"train.micro_batch_size ({micro_batch})"
        )
    precision = settings.get("precision", "auto")
    use_bf16 = precision == "bfloat16" or (precision == "auto" and device.type == "cuda")
    return TrainingArguments(
        output_dir=str(checkpoints),
        learning_rate=require(settings, "learning_rate"),
        lr_scheduler_type=settings.get("lr_scheduler", "cosine"),
        warmup_steps=settings.get("warmup_ratio", 0.03),
        weight_decay=settings.get("weight_decay", 0.0),
        num_train_epochs=require(settings, "epochs"),
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=batch_size // micro_batch,
        max_grad_norm=settings.get("max_grad_norm", 1.0),
        seed=require(settings, "seed"),
        data_seed=require(settings, "seed"),
        # Random batches: grouping by length would put task examples and (shorter)
        # context-free samples into separate batches and change what is being mixed.
        train_sampling_strategy="random",
        bf16=use_bf16,
        use_cpu=device.type == "cpu",
        logging_steps=settings.get("logging_steps", 5),
        save_strategy="steps",
        save_steps=settings.get("save_steps", 50),
        save_total_limit=1,
        report_to="none",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        **distributed_arguments(settings),
    )


def run_fingerprint(model_dir: Path, data: Path, settings: dict) -> str:
    """What makes one training run: a checkpoint of another run must not be resumed."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(data.read_bytes())
    for path in sorted(model_dir.glob("*")):
        if path.is_file():
            digest.update(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
    return digest.hexdigest()


def checkpoint_to_resume(checkpoints: Path, fingerprint: str) -> str | None:
    """The last checkpoint of this same run, if any; checkpoints of another run are removed."""
    from transformers.trainer_utils import get_last_checkpoint

    stamp = checkpoints / "cfs_run.json"
    if checkpoints.exists():
        same_run = stamp.is_file() and read_json(stamp).get("fingerprint") == fingerprint
        if not same_run:
            log.info("discarding checkpoints of a different run in %s", checkpoints)
            shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    write_json(stamp, {"fingerprint": fingerprint})
    return get_last_checkpoint(str(checkpoints))


def fine_tune(model_dir: Path, data: Path, settings: dict, checkpoints: Path, out: Path) -> dict:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer

    device = pick_device()
    tokenizer = load_tokenizer(model_dir)
    records = read_jsonl(data)
    if not records:
        raise DataError(f"{data}: the training set is empty")
    examples = build_examples(records, tokenizer, require(settings, "max_length"), str(data))
    dataset = Dataset.from_list(examples)
    model = load_model(model_dir, "float32", device)
    args = training_arguments(settings, checkpoints, device)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(
            tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8
        ),
    )
    resume_from = checkpoint_to_resume(checkpoints, run_fingerprint(model_dir, data, settings))
    if resume_from:
        log.info("resuming from %s", resume_from)
    result = trainer.train(resume_from_checkpoint=resume_from)
    num_trained_tokens = sum(
        sum(label != IGNORE_INDEX for label in example["labels"]) for example in examples
    )
    summary = {
        "train_loss": result.training_loss,
        "global_steps": result.global_step,
        "num_examples": len(examples),
        "num_context_free": sum(record["kind"] == "context_free" for record in records),
        "num_trained_tokens_per_epoch": num_trained_tokens,
        "resumed_from": resume_from,
    }
    with atomic_path(out, directory=True) as tmp:
        trainer.save_model(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        write_json(
            tmp / "train_log.json", {"summary": summary, "log_history": trainer.state.log_history}
        )
        write_json(
            tmp / "cfs_provenance.json",
            provenance("fine_tune", settings, seed=settings["seed"], data=str(data), **summary),
        )
    if not settings.get("keep_checkpoints", False):
        shutil.rmtree(checkpoints, ignore_errors=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="base model folder")
    parser.add_argument("--data", required=True, type=Path, help="mixed training JSONL")
    parser.add_argument("--checkpoints", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="fine-tuned model folder")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    summary = fine_tune(args.model, args.data, args.settings, args.checkpoints, args.out)
    log.info("done: %s", summary)


if __name__ == "__main__":
    run_stage(main)
