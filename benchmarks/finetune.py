"""Fine-tuning: the pipeline's training throughput, padding share and loop overhead.

    .venv/bin/python benchmarks/finetune.py [--quick] [--json out.json]

The data is the embedded default study's: arithmetic task examples mixed at ratio 1 with
context-free samples of the base model (results/ files where the pipeline made them, else
made here with the pipeline's own functions), SmolLM2-135M float32 on CPU, the `train:`
settings of config/config.yaml (one epoch of a subset, to keep the run short).

- pipeline: `cfs.train.fine_tune` end to end, with the config's `packing` setting and,
  for comparison, with packing off (the padding collator); every batch the model sees is
  recorded through a forward hook, so padding is counted, not estimated;
- padded baseline: what a user would otherwise write — every example padded to
  max_length, the plain transformers `Trainer` with its default collator;
- raw loop: forward + backward + grad clipping + fused AdamW step (what the Trainer does
  per step, nothing else) on exactly the batches the pipeline's run fed the model.

Goals: >= 95% non-padding tokens; pipeline train loop <= 20% slower than the raw
loop on the same batches. Checkpoint writing is timed apart (the default study writes one
per fine-tune) and reported beside the loop overhead.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

from _common import (
    DEFAULT_CONFIG,
    DEFAULT_MODEL,
    REPO,
    ForwardClock,
    Timer,
    alternate,
    best,
    goal,
    load_config,
    machine,
    profile_call,
    quiet,
    report,
    require_model,
    round_ratios,
    set_threads,
    table,
)
from cfs.generate import sample_context_free

GOAL_NON_PADDING = 0.95
GOAL_OVERHEAD = 0.20


# --------------------------------------------------------------------------- data


def task_records(config: dict, count: int) -> list[dict]:
    path = REPO / "results" / "data" / config["task"]["name"] / "train.jsonl"
    if path.is_file():
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        from cfs.data import arithmetic_problems, render

        task = config["task"]
        problems = arithmetic_problems(task.get("num_train", 64), config["study"].get("seed", 0))
        records = render(problems, task["prompt_template"])
    if len(records) < count:
        raise SystemExit(f"only {len(records)} task examples, {count} wanted")
    return records[:count]


def context_free_samples(config: dict, model_dir: Path, count: int) -> list[dict]:
    path = REPO / "results" / "smollm2" / "temp1" / "context_free.jsonl"
    if path.is_file():
        samples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if len(samples) >= count:
            return samples[:count]
    from cfs.modeling import load_model, load_tokenizer
    from cfs.tokens import context_free_prompt_id

    print(f"  generating {count} context-free samples with the pipeline (none in results/)")
    model, tokenizer = load_model(model_dir, "float32").eval(), load_tokenizer(model_dir)
    generation = config.get("generation", {})
    return sample_context_free(
        model,
        tokenizer,
        num_samples=count,
        max_new_tokens=generation.get("max_new_tokens", 48),
        temperature=1.0,
        top_p=generation.get("top_p", 1.0),
        seed=config["study"].get("seed", 0),
        batch_size=generation.get("batch_size", 32),
        prompt_token_id=context_free_prompt_id(tokenizer, generation.get("prompt_token_id")),
    )


def mixed_set(config: dict, model_dir: Path, num_task: int, ratio: float) -> list[dict]:
    from cfs.mix import mix_at_ratio

    task = task_records(config, num_task)
    samples = context_free_samples(config, model_dir, round(num_task * ratio))
    return mix_at_ratio(task, samples, ratio, config["study"].get("seed", 0))


# --------------------------------------------------------------------------- batches


def count_batch(batch: dict) -> tuple[int, int]:
    """(real tokens, positions the model computed) of one batch as the model saw it."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    positions = int(input_ids.numel())
    real = int(mask.sum()) if mask is not None else positions
    return real, positions


class BatchRecorder:
    """Wraps cfs.train.load_model so the fine-tune's model records every batch it sees."""

    def __init__(self):
        self.batches: list[dict] = []

    def install(self, train_module):
        original = train_module.load_model

        def load_and_hook(*args, **kwargs):
            model = original(*args, **kwargs)
            if not self.batches and not getattr(self, "_hooked", False):
                self._hooked = True
                model.register_forward_pre_hook(self._record, with_kwargs=True)
                self.clock = ForwardClock(model)
            return model

        train_module.load_model = load_and_hook
        return original

    def _record(self, module, args, kwargs):
        if module.training:
            keep = {
                key: value.detach().clone()
                for key, value in kwargs.items()
                if hasattr(value, "detach") and key != "num_items_in_batch"
            }
            self.batches.append(keep)


class CheckpointTimer:
    """Times the Trainer's checkpoint writes (model + optimizer state) inside its loop."""

    def __init__(self):
        self.seconds = 0.0
        self.count = 0

    def install(self):
        from transformers import Trainer

        original = Trainer._save_checkpoint
        timer = self

        def timed_save(trainer, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(trainer, *args, **kwargs)
            finally:
                timer.seconds += time.perf_counter() - start
                timer.count += 1

        Trainer._save_checkpoint = timed_save
        return original


# --------------------------------------------------------------------------- variants


def run_pipeline(model_dir: Path, data: Path, settings: dict, workdir: Path) -> dict:
    import cfs.train as train
    from transformers import Trainer

    recorder, checkpoints = BatchRecorder(), CheckpointTimer()
    original_load = recorder.install(train)
    original_save = checkpoints.install()
    out = workdir / f"model-{time.monotonic_ns()}"
    try:
        with Timer() as timer:
            summary = train.fine_tune(
                model_dir, data, settings, workdir / f"ckpt-{time.monotonic_ns()}", out
            )
    finally:
        train.load_model = original_load
        Trainer._save_checkpoint = original_save
    log = json.loads((out / "train_log.json").read_text())["log_history"]
    runtime = next(entry["train_runtime"] for entry in reversed(log) if "train_runtime" in entry)
    shutil.rmtree(out, ignore_errors=True)
    real = positions = 0
    for batch in recorder.batches:
        r, p = count_batch(batch)
        real += r
        positions += p
    return {
        "seconds": runtime,  # the Trainer's own loop time (train_runtime)
        "end_to_end_seconds": timer.seconds,  # fine_tune(): load, data, loop, final save
        "checkpoint_seconds": checkpoints.seconds,
        "forward_seconds": recorder.clock.seconds,
        "checkpoints": checkpoints.count,
        "steps": summary["global_steps"],
        "batches": recorder.batches,
        "real_tokens": real,
        "positions": positions,
        "train_loss": summary["train_loss"],
    }


def run_raw_loop(model_dir: Path, batches: list[dict], settings: dict) -> dict:
    """Forward, backward, clip, AdamW step on the recorded batches; nothing else."""
    import torch
    from cfs.modeling import load_model

    torch.manual_seed(settings.get("seed", 0))
    model = load_model(model_dir, "float32")
    model.config.use_cache = False
    model.train()
    # the fused AdamW kernel: the Trainer's default optimizer (adamw_torch_fused), and what
    # a user who cares about speed writes; the for-loop default is several times slower
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=settings["learning_rate"],
        weight_decay=settings.get("weight_decay", 0.0),
        fused=True,
    )
    forward_backward = 0.0
    losses = []
    clock = ForwardClock(model)
    with Timer() as timer:
        for batch in batches:
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            forward_backward += time.perf_counter() - start
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.get("max_grad_norm", 1.0))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    real = positions = 0
    for batch in batches:
        r, p = count_batch(batch)
        real += r
        positions += p
    return {
        "seconds": timer.seconds,
        "forward_backward_seconds": forward_backward,
        "forward_seconds": clock.seconds,
        "steps": len(batches),
        "real_tokens": real,
        "positions": positions,
        "mean_loss": sum(losses) / len(losses),
    }


def run_padded_baseline(model_dir: Path, records: list[dict], settings: dict, workdir: Path):
    """Every example padded to max_length; the stock Trainer and its default collator."""
    import torch
    from cfs.examples import build_examples
    from cfs.modeling import load_model, load_tokenizer
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    tokenizer = load_tokenizer(model_dir)
    length = settings["max_length"]
    examples = build_examples(records, tokenizer, length, "benchmark")
    rows, real = [], 0
    for example in examples:
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
        lr_scheduler_type=settings.get("lr_scheduler", "cosine"),
        num_train_epochs=settings["epochs"],
        per_device_train_batch_size=settings.get("micro_batch_size", settings["batch_size"]),
        gradient_accumulation_steps=settings["batch_size"]
        // settings.get("micro_batch_size", settings["batch_size"]),
        max_grad_norm=settings.get("max_grad_norm", 1.0),
        seed=settings.get("seed", 0),
        use_cpu=not torch.cuda.is_available(),
        save_strategy="no",
        report_to="none",
        logging_steps=settings.get("logging_steps", 5),
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=default_data_collator,
    )
    result = trainer.train()
    steps = result.global_step
    return {
        "seconds": result.metrics["train_runtime"],
        "steps": steps,
        "real_tokens": real * settings["epochs"],
        "positions": len(rows) * length * settings["epochs"],
        "train_loss": result.training_loss,
    }


# --------------------------------------------------------------------------- main


def packing_supported() -> bool:
    import cfs.train as train

    return "packing" in inspect.getsource(train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 task examples, one round")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--num-task", type=int, default=None, help="task examples (default 32)")
    parser.add_argument("--ratio", type=float, default=1.0, help="context-free per task example")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="torch.profiler of the pipeline")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    quiet()
    set_threads(args.threads)
    import torch

    model_dir = require_model(args.model)
    config = load_config(args.config)
    num_task = args.num_task or (16 if args.quick else 32)
    rounds = args.rounds or 1
    records = mixed_set(config, model_dir, num_task, args.ratio)
    settings = {**config.get("train", {}), "seed": config["study"].get("seed", 0)}
    settings.update(epochs=1, keep_checkpoints=False)
    micro = settings.get("micro_batch_size", settings["batch_size"])
    steps = math.ceil(len(records) / micro) // (settings["batch_size"] // micro)
    # one checkpoint inside the loop, as in the default study (64 steps, save_steps 50);
    # not at the last step, where the Trainer would write a second one
    settings["save_steps"] = steps // 2 + 1 if steps > 2 else 10**6
    packing = settings.get("packing", False)
    print(
        f"fine-tuning: {model_dir.name} float32 on {machine()['nproc']} CPU cores, "
        f"{torch.get_num_threads()} torch threads; {len(records)} examples ({num_task} task + "
        f"{len(records) - num_task} context-free), batch {settings['batch_size']}, "
        f"max_length {settings['max_length']}, 1 epoch = {steps} steps, one checkpoint; "
        f"config packing={packing}"
    )
    workdir = Path(tempfile.mkdtemp(prefix="cfs-bench-train-"))
    data = workdir / "train.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    variants = {}
    recorded: dict[str, list] = {}

    def pipeline(packing_on: bool):
        def run():
            result = run_pipeline(model_dir, data, {**settings, "packing": packing_on}, workdir)
            recorded[str(packing_on)] = result.pop("batches")
            return result

        return run

    names = {}
    if packing_supported():
        names[True] = "pipeline (packing)"
        names[False] = "pipeline (padding collator)"
    else:
        names[False] = "pipeline"
    default_name = names[bool(packing) if packing_supported() else False]
    variants[default_name] = pipeline(bool(packing) if packing_supported() else False)
    variants["raw loop, same batches"] = lambda: run_raw_loop(
        model_dir, recorded[str(bool(packing) if packing_supported() else False)], settings
    )
    variants["padded to max_length, stock Trainer"] = lambda: run_padded_baseline(
        model_dir, records, settings, workdir
    )
    for flag, name in names.items():
        if name not in variants:
            variants[name] = pipeline(flag)
    try:
        runs = alternate(variants, rounds)
        if args.profile:
            print("\nprofile of one pipeline run (torch.profiler, top operators by self CPU time):")
            profile_call(
                lambda: run_pipeline(
                    model_dir, data, {**settings, "packing": bool(packing)}, workdir
                ),
                top=25,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {name: best(values) for name, values in runs.items()}
    for entry in result.values():
        entry["tokens_per_s"] = entry["real_tokens"] / entry["seconds"]
        entry["non_padding"] = entry["real_tokens"] / entry["positions"]
    pipe = result[default_name]
    raw = result["raw loop, same batches"]
    padded = result["padded to max_length, stock Trainer"]
    loop_ex_checkpoint = pipe["seconds"] - pipe["checkpoint_seconds"]
    overhead_best = loop_ex_checkpoint / raw["seconds"] - 1
    overhead_with_checkpoint = pipe["seconds"] / raw["seconds"] - 1
    speedup = pipe["tokens_per_s"] / padded["tokens_per_s"]
    per_round_overhead = round_ratios(
        runs,
        default_name,
        "raw loop, same batches",
        lambda r: r["seconds"] - r.get("checkpoint_seconds", 0),
    )
    overhead = per_round_overhead["median"] - 1  # the goal's figure: median over rounds
    per_round_speedup = round_ratios(
        runs,
        default_name,
        "padded to max_length, stock Trainer",
        lambda r: r["real_tokens"] / r["seconds"],
    )
    rows = []
    for name, entry in result.items():
        rows.append(
            [
                name,
                entry["steps"],
                entry["real_tokens"],
                f"{entry['non_padding']:.1%}",
                f"{entry['seconds']:.2f}",
                f"{entry['tokens_per_s']:.0f}",
                f"{entry['tokens_per_s'] / padded['tokens_per_s']:.2f}x",
            ]
        )
    print()
    print(
        table(
            rows,
            ["variant", "steps", "real tokens", "non-padding", "loop s", "tokens/s", "vs padded"],
        )
    )
    print(
        f"\npipeline loop {pipe['seconds']:.2f} s, of which checkpoint writing "
        f"{pipe['checkpoint_seconds']:.2f} s ({pipe['checkpoints']} checkpoints: at save_steps "
        f"and the Trainer's save at the last step); "
        f"fine_tune() end to end {pipe['end_to_end_seconds']:.2f} s"
    )
    print(
        f"time inside the model's forward: pipeline {pipe['forward_seconds']:.2f} s, "
        f"raw loop {raw['forward_seconds']:.2f} s"
    )
    print(
        f"raw loop {raw['seconds']:.2f} s "
        f"(forward+backward {raw['forward_backward_seconds']:.2f} s)"
    )
    print(
        f"overhead vs raw loop (best rounds): {overhead_best:+.1%} without the checkpoint "
        f"writes, {overhead_with_checkpoint:+.1%} with them"
    )
    print(
        "within each round: pipeline loop (without checkpoints) / raw loop "
        f"{', '.join(f'{r - 1:+.1%}' for r in per_round_overhead['per_round'])}; pipeline / "
        f"padded tokens/s {', '.join(f'{r:.2f}x' for r in per_round_speedup['per_round'])}"
    )
    print(
        f"goal: non-padding >= {GOAL_NON_PADDING:.0%}: "
        f"{goal(pipe['non_padding'] >= GOAL_NON_PADDING)}"
        f" ({pipe['non_padding']:.1%})"
    )
    print(
        f"goal: overhead <= {GOAL_OVERHEAD:.0%}: {goal(overhead <= GOAL_OVERHEAD)} "
        f"({overhead:+.1%})"
    )
    report(
        "finetune",
        {
            "settings": settings,
            "examples": len(records),
            "num_task": num_task,
            "rounds": rounds,
            "results": result,
            "pipeline_variant": default_name,
            "overhead_vs_raw": overhead,
            "overhead_vs_raw_best_rounds": overhead_best,
            "overhead_vs_raw_per_round": per_round_overhead,
            "tokens_per_s_vs_padded_per_round": per_round_speedup,
            "overhead_vs_raw_with_checkpoint": overhead_with_checkpoint,
            "tokens_per_s_vs_padded": speedup,
            "goal_non_padding_met": pipe["non_padding"] >= GOAL_NON_PADDING,
            "goal_overhead_met": overhead <= GOAL_OVERHEAD,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
