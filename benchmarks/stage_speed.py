"""Fine-tuning and evaluation jobs of the default study, before and after (issue 13).

    .venv/bin/python benchmarks/stage_speed.py [--before HEAD] [--rounds 2] [--stages train,eval]
        [--epochs E] [--after-precision bfloat16] [--before-eval-batch-size 32] [--json out.json]

Each job runs as the pipeline runs it: `python -m cfs.train` / `python -m cfs.evaluate` in a
fresh process with --threads = the cores, the default study's settings (config/config.yaml,
schema defaults filled in, seed 0; plain fine-tuning on the task's training examples; the base
eval). "before" runs the code of git revision --before (`git archive`), "after" the working
tree's; both run the working tree's settings and data, so only the code differs. The two
alternate round by round and each keeps its best round.

Reported per job: wall seconds (start-up included), for fine-tuning the tokens through the
model per second of the Trainer's loop and of the whole job, for evaluation the positions
the model computed (benchmarks/_positions.py), the scores (which must not change), and
each stage's share of the machine limit (benchmarks/machine_limit.py): model FLOP/s =
6 x params x tokens/s (training) or 2 x params x positions/s (evaluation), over the
matmul FLOP/s of the precision used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    DEFAULT_MODEL,
    REPO,
    alternate,
    best,
    load_config,
    machine,
    quiet,
    report,
    require_model,
    round_ratios,
    table,
)

GOAL_TRAIN, GOAL_EVAL = 2.0, 2.0


def code_at(revision: str, into: Path) -> Path:
    """workflow/ and config/ of `revision`, unpacked under `into`."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", revision, "workflow", "config"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def train_settings(config: dict, epochs: float | None) -> dict:
    settings = {**config["train"], "seed": 0, "method": {"name": "plain", "ratio": 0.0}}
    return settings if epochs is None else {**settings, "epochs": epochs}


def eval_settings(config: dict) -> dict:
    evaluation = config["evaluation"]
    keys = ("include_path", "target", "forgetting", "batch_size", "limit", "backend")
    settings = {key: evaluation[key] for key in keys}
    settings.update(
        model_args=evaluation.get("model_args", {}),
        apply_chat_template=evaluation.get("apply_chat_template", False),
        kl=evaluation["kl"],
        kl_batch_size=evaluation["kl"]["batch_size"],
        seed=0,
        dtype="auto",
        cell={"model": "smollm2", "method": "base"},
    )
    for key in ("generation_batch_size",):  # evaluation keys added after --before
        if key in evaluation:
            settings[key] = evaluation[key]
    return settings


def run_job(root: Path, module: str, args: list[str], threads: int, workdir: Path) -> dict:
    count = workdir / f"positions-{time.monotonic_ns()}.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(root / "workflow"),
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    command = [sys.executable, str(REPO / "benchmarks" / "_positions.py"), str(count), module]
    start, cpu = time.perf_counter(), children_cpu_seconds()
    done = subprocess.run(
        [*command, *args, "--threads", str(threads)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds, cpu = time.perf_counter() - start, children_cpu_seconds() - cpu
    if done.returncode:
        sys.exit(f"{module} failed:\n{done.stderr[-3000:]}")
    return {"seconds": seconds, "cpu_seconds": cpu, **json.loads(count.read_text())}


def children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def plain_set(task: str, workdir: Path) -> Path:
    """The plain fine-tune's set: the task's training examples, as the pipeline wrote them."""
    source = REPO / "results" / "data" / task / "train.jsonl"
    if not source.is_file():
        sys.exit(f"no task data: run `.venv/bin/snakemake --cores 2 {source.relative_to(REPO)}`")
    records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    path = workdir / "plain.jsonl"
    path.write_text("".join(json.dumps({**r, "kind": "task"}) + "\n" for r in records))
    return path


def fine_tune_job(root, model_dir, data, settings, threads, workdir):
    def run():
        out = workdir / f"model-{time.monotonic_ns()}"
        job = run_job(
            root,
            "cfs.train",
            [
                "--model",
                str(model_dir),
                "--data",
                str(data),
                "--settings",
                json.dumps(settings),
                "--checkpoints",
                str(workdir / f"ckpt-{time.monotonic_ns()}"),
                "--out",
                str(out),
            ],
            threads,
            workdir,
        )
        log = json.loads((out / "train_log.json").read_text())
        runtime = next(
            e["train_runtime"] for e in reversed(log["log_history"]) if "train_runtime" in e
        )
        losses = [e["loss"] for e in log["log_history"] if "loss" in e]
        shutil.rmtree(out, ignore_errors=True)
        return {
            **job,
            "loop_seconds": runtime,
            "steps": log["summary"]["global_steps"],
            "train_loss": log["summary"]["train_loss"],
            "last_logged_loss": losses[-1] if losses else None,
        }

    return run


def eval_job(root, model_dir, settings, threads, workdir):
    def run():
        out = workdir / f"eval-{time.monotonic_ns()}.json"
        job = run_job(
            root,
            "cfs.evaluate",
            ["--model", str(model_dir), "--settings", json.dumps(settings), "--out", str(out)],
            threads,
            workdir,
        )
        record = json.loads(out.read_text())
        return {**job, "metrics": record["metrics"], "lm_eval": record["lm_eval"]}

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="HEAD", help="git revision of 'before'")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stages", default="train,eval")
    parser.add_argument("--epochs", type=float, help="override train.epochs (default: config)")
    parser.add_argument(
        "--after-precision",
        choices=["auto", "float32", "bfloat16"],
        help="train.precision of the 'after' fine-tune only (with --before HEAD: bf16 vs fp32)",
    )
    parser.add_argument(
        "--before-eval-batch-size",
        type=int,
        help="evaluation.batch_size of the 'before' eval only (32: the setting before issue 13)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--limit-seconds", type=float, default=1.0, help="machine limit timing")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    quiet()
    import torch
    from machine_limit import machine_limit
    from safetensors import safe_open

    torch.set_num_threads(args.threads)
    model_dir = require_model(args.model)
    with safe_open(str(model_dir / "model.safetensors"), "pt") as weights:
        params = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    stages = args.stages.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="cfs-bench-speed-"))
    before_root = code_at(args.before, workdir / "before")
    roots = {"before": before_root, "after": REPO}
    config = load_config()
    print(f"machine limit ({args.threads} threads): timing matmuls ...", flush=True)
    limit = machine_limit(args.limit_seconds)
    print(
        f"  fp32 {limit['float32'] / 1e9:.0f} GFLOP/s, bf16 {limit['bfloat16'] / 1e9:.0f} GFLOP/s;"
        f" model {params / 1e6:.1f} M parameters; {args.threads} threads; before = {args.before}"
    )
    from cfs.examples import build_examples
    from cfs.modeling import load_tokenizer

    data = plain_set(config["task"]["name"], workdir)
    tokenizer = load_tokenizer(model_dir)
    variants = {}
    tokens_per_epoch = sum(
        len(example["input_ids"])
        for example in build_examples(
            [json.loads(line) for line in data.read_text().splitlines()],
            tokenizer,
            config["train"]["max_length"],
            "x",
        )
    )
    settings = {}
    for name, root in roots.items():
        if "train" in stages:
            settings[f"train {name}"] = train_settings(config, args.epochs)
            if name == "after" and args.after_precision:
                settings["train after"]["precision"] = args.after_precision
            variants[f"fine-tune {name}"] = fine_tune_job(
                root, model_dir, data, settings[f"train {name}"], args.threads, workdir
            )
        if "eval" in stages:
            settings[f"eval {name}"] = eval_settings(config)
            if name == "before" and args.before_eval_batch_size:
                settings["eval before"]["batch_size"] = args.before_eval_batch_size
            variants[f"eval {name}"] = eval_job(
                root, model_dir, settings[f"eval {name}"], args.threads, workdir
            )
    order = [v for stage in ("fine-tune", "eval") for v in variants if v.startswith(stage)]
    try:
        runs = alternate({name: variants[name] for name in order}, args.rounds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {name: best(values) for name, values in runs.items()}
    rows, summary = [], {}
    for name, entry in result.items():
        if name.startswith("fine-tune"):
            precision = settings["train " + name.split()[-1]].get("precision", "auto")
            dtype = "bfloat16" if precision == "bfloat16" else "float32"
            epochs = settings["train " + name.split()[-1]]["epochs"]
            tokens = tokens_per_epoch * epochs
            loop_rate, job_rate = tokens / entry["loop_seconds"], tokens / entry["seconds"]
            entry.update(tokens=tokens, loop_tokens_per_s=loop_rate, job_tokens_per_s=job_rate)
            entry["mfu_loop"] = 6 * params * loop_rate / limit[dtype]
            rows.append(
                [
                    name,
                    f"{entry['seconds']:.1f}",
                    f"{entry['loop_seconds']:.1f}",
                    f"{tokens:.0f} tokens, {entry['steps']} steps",
                    f"{loop_rate:.0f} (loop), {job_rate:.0f} (job)",
                    f"{entry['mfu_loop']:.1%} of {dtype}",
                    f"loss {entry['train_loss']:.4f}",
                ]
            )
        else:
            rate = entry["positions"] / entry["seconds"]
            entry["mfu_job"] = 2 * params * rate / limit["float32"]
            rows.append(
                [
                    name,
                    f"{entry['seconds']:.1f}",
                    "",
                    f"{entry['positions']} positions, {entry['calls']} forwards",
                    f"{rate:.0f} positions/s (job)",
                    f"{entry['mfu_job']:.1%} of float32",
                    f"target {entry['metrics']['target']:.4f}, "
                    f"forgetting {entry['metrics']['forgetting_avg']:.4f}",
                ]
            )
    print()
    print(table(rows, ["job", "wall s", "loop s", "work", "rate", "MFU", "result"]))
    if "train" in stages:
        b, a = result["fine-tune before"], result["fine-tune after"]
        ratios = round_ratios(
            runs, "fine-tune before", "fine-tune after", lambda r: r["loop_seconds"]
        )
        summary["train_loop_speedup"] = a["loop_tokens_per_s"] / b["loop_tokens_per_s"]
        summary["train_job_speedup"] = b["seconds"] / a["seconds"]
        summary["train_loop_speedup_per_round"] = ratios
        summary["train_loss_difference"] = a["train_loss"] - b["train_loss"]
        print(
            f"\nfine-tune tokens/s, after / before: loop {summary['train_loop_speedup']:.2f}x "
            f"(per round {ratios['per_round']}), whole job {summary['train_job_speedup']:.2f}x; "
            f"train loss {b['train_loss']:.5f} -> {a['train_loss']:.5f}; goal >= {GOAL_TRAIN}x: "
            f"{'met' if summary['train_loop_speedup'] >= GOAL_TRAIN else 'MISSED'}"
        )
    if "eval" in stages:
        b, a = result["eval before"], result["eval after"]
        ratios = round_ratios(runs, "eval before", "eval after", lambda r: r["seconds"])
        summary["eval_speedup"] = b["seconds"] / a["seconds"]
        summary["eval_speedup_per_round"] = ratios
        summary["eval_scores_identical"] = b["lm_eval"] == a["lm_eval"]
        print(
            f"eval seconds per model, before / after: {summary['eval_speedup']:.2f}x "
            f"(per round {ratios['per_round']}); scores identical: "
            f"{summary['eval_scores_identical']}; goal >= {GOAL_EVAL}x: "
            f"{'met' if summary['eval_speedup'] >= GOAL_EVAL else 'MISSED'}"
        )
        if not summary["eval_scores_identical"]:
            for task in b["lm_eval"]:
                if b["lm_eval"][task] != a["lm_eval"].get(task):
                    print(f"  {task}: before {b['lm_eval'][task]}, after {a['lm_eval'].get(task)}")
    report(
        "stage_speed",
        {
            "before": args.before,
            "threads": args.threads,
            "machine": machine(),
            "machine_limit": limit,
            "params": params,
            "settings": settings,
            "results": result,
            **summary,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
