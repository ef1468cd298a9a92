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
    Records,
    add_folder_fingerprint,
    atomic_path,
    line_numbers,
    provenance,
    read_json,
    read_jsonl,
    write_json,
)
from cfs.cli import require, run_stage, set_threads, stage_parser
from cfs.distributed import (
    accumulation_steps,
    distributed_arguments,
    fsdp_load_device,
    is_main_process,
    process_device,
    process_rank,
    reads_weights,
    world_size,
)
from cfs.errors import DataError, SettingsError
from cfs.modeling import load_model, load_tokenizer
from cfs.objectives import (
    KLToBase,
    L2ToInitial,
    SyntheticBatches,
    WeightedSyntheticLoss,
)
from cfs.saving import (
    cast_floating,
    full_state_dict,
    lora_layers,
    merge_lora,
    record_dtype,
    save_dtype,
)
from cfs.study import TRAINERS
from cfs.tokens import IGNORE_INDEX

log = logging.getLogger("cfs.train")


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
    micro_batch = min(settings["micro_batch_size"], batch_size)
    if batch_size % micro_batch:
        raise SettingsError(
            f"train.batch_size ({batch_size}) must be a multiple of "
            f"train.micro_batch_size ({micro_batch})"
        )
    precision = settings["precision"]
    use_bf16 = precision == "bfloat16" or (precision == "auto" and device.type == "cuda")
    distributed = distributed_arguments(settings)
    return TrainingArguments(
        output_dir=str(checkpoints),
        learning_rate=require(settings, "learning_rate"),
        lr_scheduler_type=settings["lr_scheduler"],
        warmup_steps=settings["warmup_ratio"],
        weight_decay=settings["weight_decay"],
        num_train_epochs=require(settings, "epochs"),
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation_steps(batch_size, micro_batch),
        max_grad_norm=settings["max_grad_norm"],
        seed=require(settings, "seed"),
        data_seed=require(settings, "seed"),
        # Random batches: grouping by length would put task examples and (shorter)
        # context-free samples into separate batches and change what is being mixed.
        train_sampling_strategy="random",
        bf16=use_bf16,
        use_cpu=device.type == "cpu",
        logging_steps=settings["logging_steps"],
        save_strategy="steps",
        save_steps=settings["save_steps"],
        save_total_limit=1,
        report_to="none",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        # recompute each layer's activations in the backward pass; under FSDP its own
        # activation checkpointing does it (cfs.distributed.distributed_arguments)
        activation_checkpointing=settings["gradient_checkpointing"] and not distributed.get("fsdp"),
        **distributed,
    )


def run_fingerprint(model_dir: Path, data: Path, settings: dict) -> str:
    """What makes one training run: a checkpoint of another run must not be resumed."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(data.read_bytes())
    add_folder_fingerprint(digest, model_dir)
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


def method_settings(settings: dict) -> dict:
    method = require(settings, "method")
    if method.get("name") not in TRAINERS:
        raise SettingsError(f"train method {method.get('name')!r} is not one of {TRAINERS}")
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


def add_lora(model, method: dict, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    set_seed(seed)  # the adapters' random init: the same in every process and every run
    rank = require(method, "rank")
    config = LoraConfig(
        r=rank,
        lora_alpha=method.get("alpha") or rank,
        lora_dropout=method.get("dropout", 0.0),
        target_modules=require(method, "target_modules"),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


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


def skip_final_checkpoint():
    """A callback: the Trainer also checkpoints at the last step, but fine_tune saves the
    model right after and, without `keep_checkpoints`, deletes checkpoints/, so that write
    is never read (for OLMo-1B ~14 GB of weights and AdamW state). It runs after the
    Trainer's own DefaultFlowCallback, so its decision comes last."""
    from transformers import TrainerCallback

    class SkipFinalCheckpoint(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = False
            return control

    return SkipFinalCheckpoint()


def make_trainer_class():
    from transformers import Trainer

    class RegularizedTrainer(Trainer):
        """The Trainer's own loss plus lambda times one regularising term, logged apart.

        L2 is added to the task loss (one backward). The synthetic terms run their own
        forward and backward after the task's, so the two graphs never coexist in memory;
        under DDP/FSDP the second backward's gradients are averaged over the processes like
        the first's. The term is logged from a running on-device sum: no `.item()` (a
        device sync) per micro-step, one per logging step."""

        def __init__(self, *args, regularizer=None, weight: float = 0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.regularizer = regularizer
            self.weight = weight
            self._position = (-1, 0)
            self._term_sum = None
            self._term_share = 0.0

        def _micro_step(self) -> tuple[int, int]:
            step, micro = self._position
            current = self.state.global_step
            micro = micro + 1 if step == current else 0
            self._position = (current, micro)
            return current, micro

        def _trainable_parameters(self) -> list:
            """The parameters the optimizer updates: under FSDP2, the sharded ones."""
            if self.optimizer is not None:
                return [p for group in self.optimizer.param_groups for p in group["params"]]
            return [p for p in self.model.parameters() if p.requires_grad]

        def _setup_regularizer(self) -> None:
            """After the model is wrapped (sharded) and before a checkpoint is loaded: the
            L2 reference must be the base weights, on the parameters that train."""
            if isinstance(self.regularizer, L2ToInitial) and not self.regularizer.ready:
                self.regularizer.setup(self._trainable_parameters())
            if isinstance(self.regularizer, KLToBase) and self.is_fsdp_enabled:
                if not getattr(self.regularizer, "_sharded", False):
                    self.regularizer.shard_base(self.accelerator)
                    self.regularizer._sharded = True

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

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = trained_positions_only(inputs)
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
            # every process logs at the same steps (the Trainer gathers the loss there)
            if self._term_sum is not None and "loss" in logs:
                mean = self._term_sum / self._term_share
                if self.accelerator.num_processes > 1:
                    mean = self.accelerator.reduce(mean, reduction="mean")
                logs[self.regularizer.name] = mean.item()
                self._term_sum, self._term_share = None, 0.0
            super().log(logs, start_time)

    return RegularizedTrainer


def regularizer_for(method, model_dir, synthetic, tokenizer, settings, args, device):
    name = method["name"]
    if name == "l2":
        return L2ToInitial()  # the reference is taken once the model is wrapped
    if name in ("weighted_synthetic", "kl_to_base"):
        if synthetic is None:
            raise SettingsError(f"train method {name} needs synthetic samples (--synthetic)")
        ratio, batch_size = require(method, "ratio"), require(settings, "batch_size")
        per_step = round(ratio * batch_size)
        if per_step < 1 or per_step % world_size():
            raise SettingsError(
                f"methods.{name}: ratio {ratio} x train.batch_size {batch_size} gives "
                f"{per_step} synthetic samples per optimizer step; it must be at least 1 and "
                f"a multiple of the {world_size()} processes (each draws its own share)"
            )
        batches = SyntheticBatches(
            synthetic,
            per_step=per_step,
            accumulation=args.gradient_accumulation_steps,
            seed=require(settings, "seed"),
            collator=padding_collator(tokenizer),
            rank=process_rank(),
            world=world_size(),
        )
        if name == "weighted_synthetic":
            return WeightedSyntheticLoss(batches)
        # Under FSDP the base model is loaded on the CPU and sharded with the model that
        # trains (KLToBase.shard_base), never whole on one GPU.
        if not reads_weights(args):
            log.info(
                "process %d: the model without its weights (rank 0 reads them)", process_rank()
            )
        base = load_model(
            model_dir,
            "float32" if device.type == "cpu" else "bfloat16",
            fsdp_load_device(args, device),
            weights=reads_weights(args),
        )
        return KLToBase(batches, base)
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
    # The arguments first: they join the process group, which loading under FSDP needs.
    args = training_arguments(settings, checkpoints, device)
    # Under FSDP the weights are read once (by rank 0; the others build the model on the
    # meta device) and kept on the CPU until accelerate shards them onto the GPUs.
    if not reads_weights(args):
        log.info("process %d: the model without its weights (rank 0 reads them)", process_rank())
    model = load_model(
        model_dir, "float32", fsdp_load_device(args, device), weights=reads_weights(args)
    )
    # No KV cache in training: with one, a packed row's attention would not be split
    # per sample (transformers builds the block-diagonal mask only without a cache).
    model.config.use_cache = False
    if method["name"] == "lora":
        model = add_lora(model, method, require(settings, "seed"))
    regularizer = regularizer_for(
        method, model_dir, synthetic_examples, tokenizer, settings, args, device
    )
    trainer = make_trainer_class()(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        data_collator=training_collator(tokenizer, settings["packing"]),
        regularizer=regularizer,
        weight=method.get("lambda", 0.0),
        callbacks=[] if settings["keep_checkpoints"] else [skip_final_checkpoint()],
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
        "fsdp": trainer.is_fsdp_enabled,
    }
    if isinstance(regularizer, WeightedSyntheticLoss):
        summary["synthetic_term"] = synthetic_draws(regularizer)
    save_fine_tuned(trainer, tokenizer, settings, data, summary, out)
    if is_main_process() and not settings["keep_checkpoints"]:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return summary


def count_trained_tokens(examples: list[dict]) -> int:
    return sum(sum(label != IGNORE_INDEX for label in ex["labels"]) for ex in examples)


def synthetic_draws(term: WeightedSyntheticLoss) -> dict:
    """What the synthetic term drew in this run, over all processes: samples per optimizer
    step (configured: round(ratio x train.batch_size)) and how many of them were distinct."""
    drawn = [term.drawn]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        drawn = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(drawn, term.drawn)
    steps: dict[int, list[int]] = {}
    for part in drawn:
        for step, indices in part.items():
            steps.setdefault(int(step), []).extend(indices)
    counts = sorted({len(indices) for indices in steps.values()})
    distinct = sorted({len(set(indices)) for indices in steps.values()})
    return {
        "samples_per_step": term.batches.per_step,
        "steps": len(steps),
        "drawn_per_step": counts,
        "distinct_per_step": distinct,
    }


def save_fine_tuned(trainer, tokenizer, settings, data, summary, out: Path) -> None:
    """A plain model folder whatever the method, in the save precision
    (`train.save_precision`). Every process takes part in gathering the full weights (a
    collective under FSDP); the main one then merges LoRA adapters into the gathered full
    weights and writes (cfs.saving)."""
    state_dict = full_state_dict(trainer)
    if not trainer.is_world_process_zero():
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "get_base_model"):  # peft: merge the adapters into the weights
        state_dict = merge_lora(state_dict, lora_layers(model))
        model = model.get_base_model()
    dtype = save_dtype(settings["save_precision"], trainer.args.bf16)
    state_dict = cast_floating(state_dict, dtype)
    model.config.use_cache = True
    with atomic_path(out, directory=True) as tmp:
        model.save_pretrained(str(tmp), state_dict=state_dict)
        record_dtype(tmp, dtype)
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
