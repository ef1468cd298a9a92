"""Fine-tuning with the transformers Trainer, in each of the study's methods.

Task examples carry loss on the response only (prompt tokens masked); context-free samples
and replayed pretraining text carry loss on every token; contextual samples (the base
model's responses to the task prompts) are trained like task examples. The `method`
setting picks full fine-tuning (plain or on a mixed set), LoRA, L2 toward the original
weights, a lambda-weighted synthetic loss term, or a KL-to-base regulariser (cfs.objectives).
Checkpoints go to --checkpoints (outside the declared output) and a restarted run resumes
from the last one.

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
    Records,
    atomic_path,
    line_numbers,
    provenance,
    read_json,
    read_jsonl,
    write_json,
)
from cfs.cli import SettingsError, require, run_stage, set_threads, stage_parser
from cfs.distributed import (
    accumulation_steps,
    distributed_arguments,
    is_main_process,
    process_device,
)
from cfs.modeling import load_model, load_tokenizer
from cfs.objectives import (
    KLToBase,
    L2ToInitial,
    SyntheticBatches,
    WeightedSyntheticLoss,
)

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


def contextual_example(record: dict, max_length: int) -> dict:
    """The base model's response to a task prompt: prompt masked, response trained on; as
    for context-free samples, EOS is there only if the model ended with it."""
    prompt = list(record["prompt_token_ids"])
    response = list(record["token_ids"])
    input_ids = (prompt + response)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def build_examples(records: list[dict], tokenizer, max_length: int, source: str) -> list[dict]:
    examples = []
    for line_number, record in zip(line_numbers(records), records, strict=True):
        kind = record.get("kind")
        if kind == "task":
            example = task_example(record, tokenizer, max_length)
        elif kind in ("context_free", "replay"):
            example = context_free_example(record, max_length)
        elif kind == "contextual":
            example = contextual_example(record, max_length)
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
        gradient_accumulation_steps=accumulation_steps(batch_size, micro_batch),
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


def is_complete_checkpoint(path: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint without a whole one was cut
    short by a kill."""
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def checkpoint_to_resume(checkpoints: Path, fingerprint: str, barrier=lambda: None) -> str | None:
    """The last complete checkpoint of this same run, if any. Checkpoints of another run
    are removed, and so are checkpoints cut short by a kill. With several processes the
    main one tidies up while the others wait at `barrier`."""
    from transformers.trainer_utils import get_last_checkpoint

    if is_main_process():
        stamp = checkpoints / "cfs_run.json"
        if checkpoints.exists():
            same_run = stamp.is_file() and read_json(stamp).get("fingerprint") == fingerprint
            if not same_run:
                log.info("discarding checkpoints of a different run in %s", checkpoints)
                shutil.rmtree(checkpoints)
        checkpoints.mkdir(parents=True, exist_ok=True)
        write_json(stamp, {"fingerprint": fingerprint})
        for path in checkpoints.glob("checkpoint-*"):
            if not is_complete_checkpoint(path):
                log.info("removing %s: cut short before it was complete", path)
                shutil.rmtree(path)
    barrier()
    return get_last_checkpoint(str(checkpoints))


METHODS = ("full", "lora", "l2", "weighted_synthetic", "kl_to_base")


def method_settings(settings: dict) -> dict:
    method = settings.get("method") or {"name": "full"}
    if method.get("name") not in METHODS:
        raise SettingsError(f"train method {method.get('name')!r} is not one of {METHODS}")
    return method


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


def add_lora(model, method: dict):
    from peft import LoraConfig, get_peft_model

    rank = require(method, "rank")
    config = LoraConfig(
        r=rank,
        lora_alpha=method.get("alpha") or rank,
        lora_dropout=method.get("dropout", 0.0),
        target_modules=require(method, "target_modules"),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def make_trainer_class():
    from transformers import Trainer

    class RegularizedTrainer(Trainer):
        """The Trainer's own loss plus lambda times one regularising term, logged apart."""

        def __init__(self, *args, regularizer=None, weight: float = 0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.regularizer = regularizer
            self.weight = weight
            self._position = (-1, 0)
            self._term_values: list[float] = []

        def _micro_step(self) -> tuple[int, int]:
            step, micro = self._position
            current = self.state.global_step
            micro = micro + 1 if step == current else 0
            self._position = (current, micro)
            return current, micro

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.regularizer is None:
                return result
            loss, outputs = result if return_outputs else (result, None)
            term = self.regularizer(model, *self._micro_step())
            self._term_values.append(term.detach().item())
            loss = loss + self.weight * term / self._accumulation_divisor(num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

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
            if self._term_values and "loss" in logs:
                logs[self.regularizer.name] = sum(self._term_values) / len(self._term_values)
                self._term_values = []
            super().log(logs, start_time)

    return RegularizedTrainer


def regularizer_for(method, model, model_dir, synthetic, tokenizer, settings, args, device):
    name = method["name"]
    if name == "l2":
        return L2ToInitial(model)
    if name in ("weighted_synthetic", "kl_to_base"):
        if synthetic is None:
            raise SettingsError(f"train method {name} needs synthetic samples (--synthetic)")
        batches = SyntheticBatches(
            synthetic,
            batch_size=max(1, round(require(method, "ratio") * args.per_device_train_batch_size)),
            seed=require(settings, "seed"),
            collator=padding_collator(tokenizer),
        )
        if name == "weighted_synthetic":
            return WeightedSyntheticLoss(batches, args.gradient_accumulation_steps)
        base = load_model(model_dir, "float32" if device.type == "cpu" else "bfloat16", device)
        return KLToBase(batches, args.gradient_accumulation_steps, base)
    return None


def load_synthetic(path: Path, ratio: float, num_task: int, tokenizer, max_length: int):
    """The first round(ratio * num_task) samples, as training examples."""
    records = read_jsonl(path)
    wanted = round(ratio * num_task)
    if wanted > len(records):
        raise DataError(
            f"{path}: ratio {ratio} needs {wanted} synthetic samples for {num_task} task "
            f"examples, but only {len(records)} were generated: raise generation.num_samples"
        )
    kind = "contextual" if records and "prompt_token_ids" in records[0] else "context_free"
    chosen = [{**record, "kind": kind} for record in records[:wanted]]
    chosen = Records(chosen)
    chosen.line_numbers = line_numbers(records)[:wanted]
    return build_examples(chosen, tokenizer, max_length, str(path))


def fine_tune(
    model_dir: Path,
    data: Path,
    settings: dict,
    checkpoints: Path,
    out: Path,
    synthetic: Path | None = None,
) -> dict:
    from datasets import Dataset

    device = process_device()
    method = method_settings(settings)
    tokenizer = load_tokenizer(model_dir)
    max_length = require(settings, "max_length")
    records = read_jsonl(data)
    if not records:
        raise DataError(f"{data}: the training set is empty")
    examples = build_examples(records, tokenizer, max_length, str(data))
    synthetic_examples = None
    if method["name"] in ("weighted_synthetic", "kl_to_base"):
        if synthetic is None:
            raise SettingsError(f"train method {method['name']} needs --synthetic samples")
        synthetic_examples = load_synthetic(
            synthetic, require(method, "ratio"), len(examples), tokenizer, max_length
        )
    model = load_model(model_dir, "float32", device)
    # No KV cache in training: with one, a packed row's attention would not be split
    # per sample (transformers builds the block-diagonal mask only without a cache).
    model.config.use_cache = False
    if method["name"] == "lora":
        model = add_lora(model, method)
    args = training_arguments(settings, checkpoints, device)
    regularizer = regularizer_for(
        method, model, model_dir, synthetic_examples, tokenizer, settings, args, device
    )
    trainer = make_trainer_class()(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        data_collator=training_collator(tokenizer, settings.get("packing", False)),
        regularizer=regularizer,
        weight=method.get("lambda", 0.0),
    )
    fingerprint = run_fingerprint(model_dir, data, settings)
    if synthetic is not None:
        fingerprint += hashlib.sha256(synthetic.read_bytes()).hexdigest()
    resume_from = checkpoint_to_resume(
        checkpoints, fingerprint, barrier=trainer.accelerator.wait_for_everyone
    )
    if resume_from:
        log.info("resuming from %s", resume_from)
    result = trainer.train(resume_from_checkpoint=resume_from)
    summary = {
        "method": method["name"],
        "train_loss": result.training_loss,
        "global_steps": result.global_step,
        "num_examples": len(examples),
        "num_synthetic_in_set": sum(record["kind"] != "task" for record in records),
        "num_synthetic_term_samples": len(synthetic_examples or []),
        "num_trained_tokens_per_epoch": count_trained_tokens(examples),
        "resumed_from": resume_from,
    }
    save_fine_tuned(trainer, tokenizer, settings, data, summary, out)
    if is_main_process() and not settings.get("keep_checkpoints", False):
        shutil.rmtree(checkpoints, ignore_errors=True)
    return summary


def count_trained_tokens(examples: list[dict]) -> int:
    return sum(sum(label != IGNORE_INDEX for label in ex["labels"]) for ex in examples)


def save_fine_tuned(trainer, tokenizer, settings, data, summary, out: Path) -> None:
    """A plain model folder whatever the method: LoRA adapters are merged into the weights.
    Under FSDP every process takes part in gathering the full weights; the main one writes."""
    state_dict = None
    if trainer.is_fsdp_enabled:
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not trainer.is_world_process_zero():
        return
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.config.use_cache = True
    with atomic_path(out, directory=True) as tmp:
        model.save_pretrained(str(tmp), state_dict=state_dict)
        tokenizer.save_pretrained(str(tmp))
        write_json(
            tmp / "train_log.json", {"summary": summary, "log_history": trainer.state.log_history}
        )
        write_json(
            tmp / "cfs_provenance.json",
            provenance("fine_tune", settings, seed=settings["seed"], data=str(data), **summary),
        )


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="base model folder")
    parser.add_argument("--data", required=True, type=Path, help="training set JSONL")
    parser.add_argument(
        "--synthetic", type=Path, help="samples for the synthetic loss or KL-to-base term"
    )
    parser.add_argument("--checkpoints", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="fine-tuned model folder")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    summary = fine_tune(
        args.model, args.data, args.settings, args.checkpoints, args.out, args.synthetic
    )
    log.info("done: %s", summary)


if __name__ == "__main__":
    run_stage(main)
