"""Fine-tuning with the transformers Trainer, in each of the study's methods.

The training set's records are task examples and, for a mixing method, the samples mixed
in at its ratio (cfs.examples says what each is trained on). The cell's method
(cfs.study.METHODS) picks the objective: full fine-tuning, LoRA, L2 toward the original
weights, a lambda-weighted synthetic loss term, or a KL-to-base regulariser
(cfs.objectives, cfs.trainer). Checkpoints go to --checkpoints (outside the declared
output) and a restarted run resumes from the last one. The main process tokenizes the set
once, beside them, and every process memory-maps it (cfs.training_set).

    python -m cfs.train --model results/models/smollm2/base \
        --data results/smollm2/temp0.7/ratio0.5/seed0/train.jsonl \
        --settings '{"learning_rate": 1e-4, ..., "method": {"name": "context_free", ...}}' \
        --checkpoints .../checkpoints --out .../model
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from cfs.checkpoints import checkpoint_to_resume
from cfs.cli import require, require_gpus, run_as_process, set_threads, stage_parser
from cfs.distributed import (
    accumulation_steps,
    distributed_arguments,
    fsdp_load_device,
    is_main_process,
    join_process_group,
    leave_process_group,
    process_device,
    process_rank,
    reads_weights,
    sharded_checkpoints,
    training_record,
    weights_dtype,
)
from cfs.errors import SettingsError
from cfs.examples import CountingCollator, mixing_record, training_collator
from cfs.hub import go_offline_unless_reachable
from cfs.modeling import compute_precision, load_model, load_tokenizer
from cfs.objectives import TrainingInputs, objective_for
from cfs.saving import save_fine_tuned
from cfs.snapshots import parse_snapshots
from cfs.study import METHODS, Method
from cfs.training_set import prepare_training_set, tokenized_folder

log = logging.getLogger("cfs.train")


def training_arguments(settings: dict, checkpoints: Path, device: torch.device, steps=None):
    """The Trainer's arguments; `steps` (a StepSchedule) fixes the examples and the number
    of every optimizer step, else (a set augmented with samples) the Trainer draws random
    batches of the whole set for train.epochs."""
    from transformers import TrainingArguments

    batch_size = require(settings, "batch_size")
    micro_batch = min(settings["micro_batch_size"], batch_size)
    if batch_size % micro_batch:
        raise SettingsError(
            f"train.batch_size ({batch_size}) must be a multiple of "
            f"train.micro_batch_size ({micro_batch})"
        )
    use_bf16 = compute_precision(settings["precision"], device) == "bfloat16"
    distributed = sharded_checkpoints(distributed_arguments(settings))
    return TrainingArguments(
        output_dir=str(checkpoints),
        learning_rate=require(settings, "learning_rate"),
        lr_scheduler_type=settings["lr_scheduler"],
        warmup_steps=settings["warmup_ratio"],
        weight_decay=settings["weight_decay"],
        num_train_epochs=require(settings, "epochs"),
        max_steps=steps.steps if steps else -1,
        per_device_train_batch_size=steps.per_device(micro_batch) if steps else micro_batch,
        gradient_accumulation_steps=accumulation_steps(batch_size, micro_batch),
        max_grad_norm=settings["max_grad_norm"],
        seed=require(settings, "seed"),
        data_seed=require(settings, "seed"),
        # Random batches: grouping by length would put task examples and (shorter)
        # context-free samples into separate batches and change what is being mixed.
        train_sampling_strategy="sequential" if steps else "random",
        bf16=use_bf16,
        use_cpu=device.type == "cpu",
        logging_steps=settings["logging_steps"],
        # save_steps null: checkpoints only every train.save_minutes (cfs.trainer)
        **(
            {"save_strategy": "steps", "save_steps": settings["save_steps"]}
            if settings["save_steps"]
            else {"save_strategy": "no"}
        ),
        save_total_limit=1,
        report_to=settings["report_to"],
        dataloader_num_workers=0,
        remove_unused_columns=False,
        # recompute each layer's activations in the backward pass; under FSDP its own
        # activation checkpointing does it (cfs.distributed.distributed_arguments)
        activation_checkpointing=settings["gradient_checkpointing"] and not distributed.get("fsdp"),
        **distributed,
    )


def training_precision(args, model) -> str:
    """What the fine-tune computed in: 'bfloat16 autocast, float32 weights' or 'float32'."""
    weights = str(next(model.parameters()).dtype).removeprefix("torch.")
    return f"bfloat16 autocast, {weights} weights" if args.bf16 else weights


def study_method(settings: dict) -> Method:
    """The cell's method (cfs.study.METHODS), which must train."""
    name = require(require(settings, "method"), "name")
    trained = [m for m, spec in METHODS.items() if spec.trains]
    if name not in trained:
        raise SettingsError(f"train method {name!r} is not one of {', '.join(trained)}")
    return METHODS[name]


def fine_tune(
    model_dir: Path,
    data: Path,
    settings: dict,
    checkpoints: Path,
    out: Path,
    synthetic: Path | None = None,
    heldout: Path | None = None,
    target_test: Path | None = None,
    snapshots: dict[float, Path] | None = None,
) -> dict:
    """Fine-tune the model at `model_dir` on `data` with the cell's method; `synthetic`:
    the samples of a synthetic loss term; `heldout` and `target_test`: the forgetting
    curves' held-out context-free samples and target problems (train.curve_every);
    `snapshots`: {fraction of the steps: folder} of the models saved along training."""
    from cfs.trainer import (
        RegularizedTrainer,
        checkpoint_callbacks,
        examples_per_step,
        term_record,
    )

    device = process_device()
    spec, method = study_method(settings), settings["method"]
    objective = objective_for(spec.trains)
    tokenizer = load_tokenizer(model_dir)
    if spec.synthetic_term and synthetic is None:
        raise SettingsError(f"train method {spec.name} needs --synthetic samples")
    training_set = prepare_training_set(
        join_process_group(device),
        spec,
        settings,
        model_dir,
        tokenizer,
        data,
        tokenized_folder(checkpoints),
        synthetic=synthetic if spec.synthetic_term else None,
        other_inputs=(heldout, target_test),
    )
    schedule = training_set.schedule
    curve_inputs = None
    if settings["curve_every"]:
        from cfs.curves import curve_data

        curve_inputs = curve_data(heldout, target_test, tokenizer, settings)
    if "tensorboard" in settings["report_to"]:  # beside the model, not in the working folder
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out.parent / "tensorboard"))
    # The arguments before the model: under FSDP they say which process reads the weights.
    args = training_arguments(settings, checkpoints, device, schedule)
    # Under FSDP the weights are read once (by rank 0; the others build the model on the
    # meta device) and kept on the CPU until accelerate shards them onto the GPUs.
    if not reads_weights(args):
        log.info("process %d: the model without its weights (rank 0 reads them)", process_rank())
    model = load_model(
        model_dir,
        weights_dtype(objective, args, device),
        fsdp_load_device(args, device),
        weights=reads_weights(args),
    )
    # No KV cache in training: with one, a packed row's attention would not be split
    # per sample (transformers builds the block-diagonal mask only without a cache).
    model.config.use_cache = False
    model = objective.prepare_model(model, method, require(settings, "seed"))
    regularizer = objective.build(
        TrainingInputs(method, settings, model_dir, training_set.synthetic, tokenizer, args, device)
    )
    trainer = RegularizedTrainer(
        model=model,
        args=args,
        train_dataset=training_set.rows,
        data_collator=CountingCollator(training_collator(tokenizer, settings["packing"])),
        regularizer=regularizer,
        weight=method["lambda"] if regularizer else 0.0,
        callbacks=checkpoint_callbacks(settings),
    )
    if curve_inputs:
        from cfs.curves import forgetting_curves

        trainer.add_callback(
            forgetting_curves(trainer, *curve_inputs, tokenizer, settings, checkpoints)
        )
    saved_along = None
    if snapshots:
        from cfs.snapshots import Snapshots

        saved_along = Snapshots(trainer, tokenizer, settings, data, snapshots, checkpoints)
        trainer.add_callback(saved_along)
    resume_from = checkpoint_to_resume(
        checkpoints, training_set.fingerprint, barrier=trainer.accelerator.wait_for_everyone
    )
    if resume_from:
        log.info("resuming from %s", resume_from)
    result = trainer.train(resume_from_checkpoint=resume_from)
    summary = {
        "method": spec.name,
        "objective": spec.trains,
        "train_loss": result.training_loss,
        "global_steps": result.global_step,
        **training_set.summary,
        **mixing_record(settings, regularizer, method, training_set.facts, schedule),
        "examples_per_step": examples_per_step(trainer),
        "resumed_from": resume_from,
        "fsdp": trainer.is_fsdp_enabled,
        "precision": training_precision(args, model),
        "regularizer": term_record(trainer),
        **training_record(trainer),
    }
    if regularizer is not None:
        summary.update(regularizer.summary())
    save_fine_tuned(trainer, tokenizer, settings, data, summary, out)
    if saved_along and is_main_process():
        saved_along.finish()
    if is_main_process():
        shutil.rmtree(tokenized_folder(checkpoints), ignore_errors=True)
        if not settings["keep_checkpoints"]:
            shutil.rmtree(checkpoints, ignore_errors=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="base model folder")
    parser.add_argument("--data", required=True, type=Path, help="training set JSONL")
    parser.add_argument(
        "--synthetic", type=Path, help="samples for the synthetic loss or KL-to-base term"
    )
    parser.add_argument("--heldout", type=Path, help="curves: held-out context-free samples")
    parser.add_argument("--target-test", type=Path, help="curves: held-out target problems")
    parser.add_argument(
        "--snapshots",
        nargs="*",
        help="folders <cell>/at<FRACTION>/seed<S>/snapshot: the model after that share of steps",
    )
    parser.add_argument("--checkpoints", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="fine-tuned model folder")
    args = parser.parse_args(argv)
    require_gpus(args.gpus)
    set_threads(args.threads)
    # a compute node without network reads what the first job fetched into the cache
    go_offline_unless_reachable()
    summary = fine_tune(
        args.model,
        args.data,
        args.settings,
        args.checkpoints,
        args.out,
        synthetic=args.synthetic,
        heldout=args.heldout,
        target_test=args.target_test,
        snapshots=parse_snapshots(args.snapshots),
    )
    log.info("done: %s", summary)


if __name__ == "__main__":
    run_as_process(main, then=leave_process_group)
