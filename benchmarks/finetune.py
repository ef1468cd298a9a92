"""Fine-tuning: the pipeline's training throughput, padding share and loop overhead.

The data is the embedded default study's: its task examples (as the prepare_task_data rule
makes them) mixed with context-free samples of the model at the first context-free cell's
ratio (cfs.generate's sampler, cfs.mix), float32 on CPU, the fine_tune rule's settings for
that cell (one epoch of a subset, one checkpoint inside the loop, curves off).
- pipeline: `cfs.train.fine_tune` end to end, with the config's `packing` setting and with
  the other one; every batch the model sees is recorded by a forward hook, so padding is
  counted, not estimated; checkpoint writing is timed apart;
- padded baseline: every example padded to max_length (transformers'
  DataCollatorForSeq2Seq), the stock `Trainer`;
- raw loop: forward, backward, grad clipping and a fused AdamW step (what the Trainer does
  per step, nothing else) on exactly the batches the pipeline's run fed the model.
Goals: >= 95% non-padding tokens; the pipeline's loop, checkpoint writes left out, <= 20%
slower than the raw loop on the same batches (median of the rounds).
--quick: a tiny random model, 3 optimizer steps, one round.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import _common as common

GOAL_NON_PADDING = 0.95
GOAL_OVERHEAD = 0.20


def mixed_set(stages, model_dir: Path, num_task: int, ratio: float) -> list[dict]:
    """The first `num_task` task examples and round(ratio x num_task) context-free samples
    of the model at temperature 1, mixed as cfs.mix does."""
    from cfs.arithmetic import prepare_arithmetic
    from cfs.mix import mix_at_ratio
    from cfs.modeling import load_model, load_tokenizer

    task = prepare_arithmetic(stages.config["task"])[0][:num_task]
    model, tokenizer = load_model(model_dir, "float32").eval(), load_tokenizer(model_dir)
    settings = stages.generation("smollm2", 0, 1.0)
    samples = common.context_free(model, tokenizer, settings, round(num_task * ratio))
    return mix_at_ratio(task, samples, ratio, seed=0)


def counts(batches: list[dict]) -> dict:
    """Real tokens and positions computed of the batches as the model saw them (a packed
    batch has no attention mask and no padding)."""
    positions = sum(batch["input_ids"].numel() for batch in batches)
    padding = sum(int((b["attention_mask"] == 0).sum()) for b in batches if "attention_mask" in b)
    return {"real_tokens": positions - padding, "positions": positions}


def run_pipeline(model_dir: Path, data: Path, settings: dict, work: Path) -> dict:
    import cfs.train as train
    from transformers import Trainer

    batches = []

    def record(module, args, kwargs):
        if module.training:
            inputs = {k: v for k, v in kwargs.items() if k != "num_items_in_batch"}
            batches.append(
                {k: v.detach().clone() for k, v in inputs.items() if hasattr(v, "detach")}
            )

    def hook(model):
        model.register_forward_pre_hook(record, with_kwargs=True)

    out = work / f"model-{time.monotonic_ns()}"
    with (
        common.spy(train, "load_model", then=hook),
        common.spy(Trainer, "_save_checkpoint") as saves,
    ):
        summary = train.fine_tune(model_dir, data, settings, work / f"ckpt-{out.name}", out)
    log = json.loads((out / "train_log.json").read_text())["log_history"]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "seconds": next(e["train_runtime"] for e in reversed(log) if "train_runtime" in e),
        "checkpoint_seconds": sum(seconds for _, seconds in saves),
        "checkpoints": len(saves),
        "steps": summary["global_steps"],
        "batches": batches,
        **counts(batches),
    }


def run_raw_loop(model_dir: Path, batches: list[dict], settings: dict) -> dict:
    """Forward, backward, clip, AdamW step on the recorded batches; nothing else."""
    import torch
    from cfs.distributed import accumulation_steps
    from cfs.modeling import load_model

    torch.manual_seed(settings["seed"])
    model = load_model(model_dir, "float32").train()
    model.config.use_cache = False
    # fused: the Trainer's default optimizer (adamw_torch_fused)
    rate, decay = settings["learning_rate"], settings["weight_decay"]
    optimizer = torch.optim.AdamW(model.parameters(), rate, weight_decay=decay, fused=True)
    accumulation = accumulation_steps(settings["batch_size"], settings["micro_batch_size"])
    start = time.perf_counter()
    for index, batch in enumerate(batches):
        (model(**batch).loss / accumulation).backward()
        if (index + 1) % accumulation == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings["max_grad_norm"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": len(batches) // accumulation, **counts(batches)}


def run_padded_baseline(model_dir: Path, records: list[dict], settings: dict, work: Path):
    """Every example padded to max_length (DataCollatorForSeq2Seq); the stock Trainer with
    the pipeline's arguments."""
    import torch
    from cfs.examples import build_examples
    from cfs.modeling import load_model, load_tokenizer
    from cfs.train import training_arguments
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer

    tokenizer, length = load_tokenizer(model_dir), settings["max_length"]
    examples = build_examples(records, tokenizer, length, "benchmark")
    model = load_model(model_dir, "float32")
    model.config.use_cache = False
    folder = work / f"padded-{time.monotonic_ns()}"
    args = training_arguments({**settings, "save_steps": None}, folder, torch.device("cpu"))
    collator = DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=length)
    result = Trainer(model, args, collator, Dataset.from_list(examples)).train()
    real = sum(len(example["input_ids"]) for example in examples)
    return {
        "seconds": result.metrics["train_runtime"],
        "steps": result.global_step,
        "real_tokens": real * settings["epochs"],
        "positions": len(examples) * length * settings["epochs"],
    }


def main() -> None:
    parser = common.arguments(__doc__, "--model", "--config", "--rounds", "--threads")
    parser.add_argument("--num-task", type=int, help="task examples (default: 4 batches)")
    args = parser.parse_args()
    threads = common.setup(args)
    from cfs.artifacts import write_jsonl
    from cfs.study import parse_cell

    stages = common.stage_settings(args.config)
    work = Path(tempfile.mkdtemp(prefix="cfs-bench-train-"))
    model_dir = common.model_folder(args, work)
    cell = stages.study.method_cells("context_free")[0]
    ratio, settings = parse_cell(cell)["ratio"], stages.train(cell, 0)
    batch = settings["batch_size"]
    num_task = args.num_task or (3 if args.quick else 4) * batch
    records = mixed_set(stages, model_dir, num_task, ratio)
    steps = math.ceil(num_task / batch)
    # float32, as the raw loop and the padded baseline compute (precision.py: bf16)
    settings.update(epochs=1, keep_checkpoints=False, curve_every=0, precision="float32")
    settings["save_steps"] = steps // 2 + 1  # one checkpoint inside the loop
    packing = settings["packing"]
    print(
        f"fine-tuning: {model_dir.name} float32, {threads} torch threads; {len(records)} "
        f"examples ({num_task} task + {len(records) - num_task} context-free at ratio "
        f"{ratio:g}), batch {batch}, max_length {settings['max_length']}, {steps} steps, one "
        f"checkpoint; config packing={packing}"
    )
    data = write_jsonl(work / "train.jsonl", records)
    pipeline, other = f"pipeline (packing={packing})", f"pipeline (packing={not packing})"
    raw, padded = "raw loop, same batches", "padded to max_length, stock Trainer"
    recorded = {}

    def run(flag: bool):
        recorded[flag] = run_pipeline(model_dir, data, {**settings, "packing": flag}, work)
        return {k: v for k, v in recorded[flag].items() if k != "batches"}

    variants = {
        pipeline: lambda: run(packing),
        raw: lambda: run_raw_loop(model_dir, recorded[packing]["batches"], settings),
        padded: lambda: run_padded_baseline(model_dir, records, settings, work),
        other: lambda: run(not packing),
    }
    try:
        runs = common.alternate(variants, 1 if args.quick else args.rounds or 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {name: common.best(values) for name, values in runs.items()}
    for entry in result.values():
        entry["tokens_per_s"] = entry["real_tokens"] / entry["seconds"]
        entry["non_padding"] = entry["real_tokens"] / entry["positions"]
    pipe, base = result[pipeline], result[padded]
    with_checkpoint = pipe["seconds"] / result[raw]["seconds"] - 1
    per_round = common.round_ratios(
        runs, pipeline, raw, lambda r: r["seconds"] - r.get("checkpoint_seconds", 0)
    )
    overhead = per_round["median"] - 1
    rows = [
        [name, r["steps"], r["real_tokens"], f"{r['non_padding']:.1%}", f"{r['seconds']:.2f}"]
        + [f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x"]
        for name, r in result.items()
    ]
    header = ["variant", "steps", "real tokens", "non-padding", "loop s", "tokens/s", "vs padded"]
    print(f"\n{common.table(rows, header)}")
    print(
        f"pipeline loop {pipe['seconds']:.2f} s, of which checkpoint writing "
        f"{pipe['checkpoint_seconds']:.2f} s ({pipe['checkpoints']} checkpoints)\n"
        f"goal: non-padding >= {GOAL_NON_PADDING:.0%}: "
        f"{common.goal(pipe['non_padding'] >= GOAL_NON_PADDING)} ({pipe['non_padding']:.1%})\n"
        f"goal: overhead (without checkpoint writes) <= {GOAL_OVERHEAD:.0%}: "
        f"{common.goal(overhead <= GOAL_OVERHEAD)} ({overhead:+.1%}; "
        f"{with_checkpoint:+.1%} with them)"
    )
    figures = {
        "results": result,
        "overhead_vs_raw": overhead,
        "overhead_vs_raw_per_round": per_round,
    }
    figures["overhead_vs_raw_with_checkpoint"] = with_checkpoint
    figures["tokens_per_s_vs_padded"] = pipe["tokens_per_s"] / base["tokens_per_s"]
    figures |= {"settings": settings, "examples": len(records), "num_task": num_task}
    common.report("finetune", figures, args.json)


if __name__ == "__main__":
    main()
