"""Fine-tuning: the pipeline's training throughput, padding share and loop overhead.

    .venv/bin/python benchmarks/finetune.py [--quick] [--model DIR] [--json out.json]

The data is the embedded default study's: its task examples (cfs.data, as the
prepare_task_data rule makes them) mixed with context-free samples of the model at the
first context-free cell's ratio (cfs.generate's sampler, cfs.mix), SmolLM2-135M float32 on
CPU, the fine_tune rule's settings for that cell (one epoch of a subset; curves off).

- pipeline: `cfs.train.fine_tune` end to end, with the config's `packing` setting and
  with the other one; every batch the model sees is recorded through a forward hook, so
  padding is counted, not estimated;
- padded baseline: what a user would otherwise write: every example padded to
  max_length, the plain transformers `Trainer` with its default collator;
- raw loop: forward + backward + grad clipping + fused AdamW step (what the Trainer does
  per step, nothing else) on exactly the batches the pipeline's run fed the model.

Goals: >= 95% non-padding tokens; pipeline train loop <= 20% slower than the raw loop on
the same batches. Checkpoint writing is timed apart (one checkpoint inside the loop, as
in the default study) and reported beside the loop overhead.
--quick: a tiny random model, 3 optimizer steps, one round.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

from _common import (
    DEFAULT_MODEL,
    ForwardClock,
    Timer,
    alternate,
    best,
    goal,
    profile_call,
    quick_mode,
    quiet,
    report,
    require_model,
    round_ratios,
    set_threads,
    stage_settings,
    table,
    tiny_model,
)

GOAL_NON_PADDING = 0.95
GOAL_OVERHEAD = 0.20


def mixed_set(config: dict, model_dir: Path, num_task: int, ratio: float) -> list[dict]:
    """The first `num_task` task examples and round(ratio x num_task) context-free samples
    of the model, mixed as cfs.mix does."""
    from cfs.arithmetic import prepare_arithmetic
    from cfs.generate import sample_context_free
    from cfs.mix import mix_at_ratio
    from cfs.modeling import load_model, load_tokenizer
    from cfs.tokens import context_free_prompt_id

    task = prepare_arithmetic(config["task"])[0][:num_task]
    model, tokenizer = load_model(model_dir, "float32").eval(), load_tokenizer(model_dir)
    generation = config["generation"]
    samples = sample_context_free(
        model,
        tokenizer,
        num_samples=round(num_task * ratio),
        max_new_tokens=generation["max_new_tokens"],
        temperature=1.0,
        top_p=generation["top_p"],
        seed=0,
        batch_size=generation["batch_size"],
        prompt_token_id=context_free_prompt_id(tokenizer, generation["prompt_token_id"]),
    )
    return mix_at_ratio(task, samples, ratio, seed=0)


def count_batch(batch: dict) -> tuple[int, int]:
    """(real tokens, positions the model computed) of one batch as the model saw it."""
    positions = int(batch["input_ids"].numel())
    mask = batch.get("attention_mask")
    return (int(mask.sum()) if mask is not None else positions), positions


class Recorder:
    """Wraps cfs.train.load_model so the fine-tune's model records every batch it sees and
    the time inside its forward; times the Trainer's checkpoint writes."""

    def __init__(self):
        self.batches: list[dict] = []
        self.checkpoint_seconds = 0.0
        self.checkpoints = 0
        self.clock = None

    def __enter__(self):
        import cfs.train as train
        from transformers import Trainer

        self._load, self._save = train.load_model, Trainer._save_checkpoint

        def load_and_hook(*args, **kwargs):
            model = self._load(*args, **kwargs)
            model.register_forward_pre_hook(self._record, with_kwargs=True)
            self.clock = ForwardClock(model)
            return model

        def timed_save(trainer, *args, **kwargs):
            start = time.perf_counter()
            try:
                return self._save(trainer, *args, **kwargs)
            finally:
                self.checkpoint_seconds += time.perf_counter() - start
                self.checkpoints += 1

        train.load_model, Trainer._save_checkpoint = load_and_hook, timed_save
        return self

    def __exit__(self, *exc):
        import cfs.train as train
        from transformers import Trainer

        train.load_model, Trainer._save_checkpoint = self._load, self._save

    def _record(self, module, args, kwargs):
        if module.training:
            self.batches.append(
                {
                    key: value.detach().clone()
                    for key, value in kwargs.items()
                    if hasattr(value, "detach") and key != "num_items_in_batch"
                }
            )


def run_pipeline(model_dir: Path, data: Path, settings: dict, workdir: Path) -> dict:
    from cfs.train import fine_tune

    out = workdir / f"model-{time.monotonic_ns()}"
    with Recorder() as recorder, Timer() as timer:
        summary = fine_tune(model_dir, data, settings, workdir / f"ckpt-{time.monotonic_ns()}", out)
    log = json.loads((out / "train_log.json").read_text())["log_history"]
    shutil.rmtree(out, ignore_errors=True)
    counts = [count_batch(batch) for batch in recorder.batches]
    return {
        "seconds": next(e["train_runtime"] for e in reversed(log) if "train_runtime" in e),
        "end_to_end_seconds": timer.seconds,  # fine_tune(): load, data, loop, final save
        "checkpoint_seconds": recorder.checkpoint_seconds,
        "checkpoints": recorder.checkpoints,
        "forward_seconds": recorder.clock.seconds,
        "steps": summary["global_steps"],
        "batches": recorder.batches,
        "real_tokens": sum(real for real, _ in counts),
        "positions": sum(positions for _, positions in counts),
        "train_loss": summary["train_loss"],
    }


def run_raw_loop(model_dir: Path, batches: list[dict], settings: dict) -> dict:
    """Forward, backward, clip, AdamW step on the recorded batches; nothing else."""
    import torch
    from cfs.distributed import accumulation_steps
    from cfs.modeling import load_model

    torch.manual_seed(settings["seed"])
    model = load_model(model_dir, "float32")
    model.config.use_cache = False
    model.train()
    # the fused AdamW kernel: the Trainer's default optimizer (adamw_torch_fused)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=settings["learning_rate"],
        weight_decay=settings["weight_decay"],
        fused=True,
    )
    accumulation = accumulation_steps(settings["batch_size"], settings["micro_batch_size"])
    clock = ForwardClock(model)
    with Timer() as timer:
        for index, batch in enumerate(batches):
            (model(**batch).loss / accumulation).backward()
            if (index + 1) % accumulation == 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings["max_grad_norm"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    counts = [count_batch(batch) for batch in batches]
    return {
        "seconds": timer.seconds,
        "forward_seconds": clock.seconds,
        "steps": len(batches) // accumulation,
        "real_tokens": sum(real for real, _ in counts),
        "positions": sum(positions for _, positions in counts),
    }


def run_padded_baseline(model_dir: Path, records: list[dict], settings: dict, workdir: Path):
    """Every example padded to max_length; the stock Trainer and its default collator."""
    from cfs.distributed import accumulation_steps
    from cfs.examples import build_examples
    from cfs.modeling import load_model, load_tokenizer
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    tokenizer = load_tokenizer(model_dir)
    length = settings["max_length"]
    rows, real = [], 0
    for example in build_examples(records, tokenizer, length, "benchmark"):
        pad = length - len(example["input_ids"])
        real += len(example["input_ids"])
        rows.append(
            {
                "input_ids": example["input_ids"] + [tokenizer.pad_token_id] * pad,
                "attention_mask": [1] * len(example["input_ids"]) + [0] * pad,
                "labels": example["labels"] + [-100] * pad,
            }
        )
    model = load_model(model_dir, "float32")
    model.config.use_cache = False
    args = TrainingArguments(
        output_dir=str(workdir / f"padded-{time.monotonic_ns()}"),
        learning_rate=settings["learning_rate"],
        lr_scheduler_type=settings["lr_scheduler"],
        num_train_epochs=settings["epochs"],
        per_device_train_batch_size=settings["micro_batch_size"],
        gradient_accumulation_steps=accumulation_steps(
            settings["batch_size"], settings["micro_batch_size"]
        ),
        max_grad_norm=settings["max_grad_norm"],
        seed=settings["seed"],
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        logging_steps=settings["logging_steps"],
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=default_data_collator,
    )
    result = trainer.train()
    return {
        "seconds": result.metrics["train_runtime"],
        "steps": result.global_step,
        "real_tokens": real * settings["epochs"],
        "positions": len(rows) * length * settings["epochs"],
        "train_loss": result.training_loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 steps, one round")
    parser.add_argument("--model", help=f"model folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--config", help="a config file merged over config/config.yaml")
    parser.add_argument("--num-task", type=int, default=None, help="task examples (default 32)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="torch.profiler of the pipeline")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    quiet()
    threads = set_threads(args.threads)
    from cfs.artifacts import write_jsonl

    stages = stage_settings(args.config)
    config = stages.config
    workdir = Path(tempfile.mkdtemp(prefix="cfs-bench-train-"))
    if args.quick:
        quick_mode()
        model_dir = Path(args.model) if args.model else tiny_model(workdir / "tiny")
    else:
        model_dir = require_model(Path(args.model or DEFAULT_MODEL))
    from cfs.study import Study, parse_cell

    # the fine_tune rule's settings for the first context-free cell
    cell = Study(config).method_cells("context_free")[0]
    knobs = parse_cell(cell)
    settings = stages.train(cell, 0)
    batch = settings["batch_size"]
    num_task = args.num_task or (3 * batch if args.quick else 4 * batch)
    records = mixed_set(config, model_dir, num_task, knobs["ratio"])
    steps = math.ceil(num_task / batch)
    # one checkpoint inside the loop, not at the last step; forgetting curves off; float32,
    # as the raw loop and the padded baseline compute (benchmarks/precision.py: bf16)
    settings.update(
        epochs=1,
        keep_checkpoints=False,
        curve_every=0,
        save_steps=steps // 2 + 1,
        precision="float32",
    )
    packing = settings["packing"]
    print(
        f"fine-tuning: {model_dir.name} float32, {threads} torch threads; {len(records)} "
        f"examples ({num_task} task + {len(records) - num_task} context-free at ratio "
        f"{knobs['ratio']:g}), batch {batch}, max_length {settings['max_length']}, "
        f"{steps} steps, one checkpoint; config packing={packing}"
    )
    data = write_jsonl(workdir / "train.jsonl", records)
    names = {
        packing: f"pipeline (packing={packing})",
        not packing: f"pipeline (packing={not packing})",
    }
    recorded: dict[bool, list] = {}

    def pipeline(flag: bool):
        def run():
            result = run_pipeline(model_dir, data, {**settings, "packing": flag}, workdir)
            recorded[flag] = result.pop("batches")
            return result

        return run

    variants = {
        names[packing]: pipeline(packing),
        "raw loop, same batches": lambda: run_raw_loop(model_dir, recorded[packing], settings),
        "padded to max_length, stock Trainer": lambda: run_padded_baseline(
            model_dir, records, settings, workdir
        ),
        names[not packing]: pipeline(not packing),
    }
    try:
        runs = alternate(variants, args.rounds)
        if args.profile:
            print("\nprofile of one pipeline run (torch.profiler, top operators by self CPU time):")
            profile_call(lambda: run_pipeline(model_dir, data, settings, workdir), top=25)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {name: best(values) for name, values in runs.items()}
    for entry in result.values():
        entry["tokens_per_s"] = entry["real_tokens"] / entry["seconds"]
        entry["non_padding"] = entry["real_tokens"] / entry["positions"]
    pipe, raw = result[names[packing]], result["raw loop, same batches"]
    padded = result["padded to max_length, stock Trainer"]
    overhead_with_checkpoint = pipe["seconds"] / raw["seconds"] - 1
    per_round_overhead = round_ratios(
        runs,
        names[packing],
        "raw loop, same batches",
        lambda r: r["seconds"] - r.get("checkpoint_seconds", 0),
    )
    overhead = per_round_overhead["median"] - 1  # the goal's figure: median over rounds
    rows = [
        [
            name,
            entry["steps"],
            entry["real_tokens"],
            f"{entry['non_padding']:.1%}",
            f"{entry['seconds']:.2f}",
            f"{entry['tokens_per_s']:.0f}",
            f"{entry['tokens_per_s'] / padded['tokens_per_s']:.2f}x",
        ]
        for name, entry in result.items()
    ]
    print()
    header = ["variant", "steps", "real tokens", "non-padding", "loop s", "tokens/s", "vs padded"]
    print(table(rows, header))
    print(
        f"\npipeline loop {pipe['seconds']:.2f} s, of which checkpoint writing "
        f"{pipe['checkpoint_seconds']:.2f} s ({pipe['checkpoints']} checkpoints); fine_tune() "
        f"end to end {pipe['end_to_end_seconds']:.2f} s; inside the model's forward: "
        f"pipeline {pipe['forward_seconds']:.2f} s, raw loop {raw['forward_seconds']:.2f} s"
    )
    print(
        f"goal: non-padding >= {GOAL_NON_PADDING:.0%}: "
        f"{goal(pipe['non_padding'] >= GOAL_NON_PADDING)} ({pipe['non_padding']:.1%})"
    )
    print(
        f"goal: overhead (without checkpoint writes) <= {GOAL_OVERHEAD:.0%}: "
        f"{goal(overhead <= GOAL_OVERHEAD)} ({overhead:+.1%}; "
        f"{overhead_with_checkpoint:+.1%} with them)"
    )
    report(
        "finetune",
        {
            "settings": settings,
            "examples": len(records),
            "num_task": num_task,
            "rounds": args.rounds,
            "results": result,
            "pipeline_variant": names[packing],
            "overhead_vs_raw": overhead,
            "overhead_vs_raw_per_round": per_round_overhead,
            "overhead_vs_raw_with_checkpoint": overhead_with_checkpoint,
            "tokens_per_s_vs_padded": pipe["tokens_per_s"] / padded["tokens_per_s"],
            "goal_non_padding_met": pipe["non_padding"] >= GOAL_NON_PADDING,
            "goal_overhead_met": overhead <= GOAL_OVERHEAD,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
