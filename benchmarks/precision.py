"""Precision: the default's fine-tune and evaluation in float32 and in bf16 autocast.

    .venv/bin/python benchmarks/precision.py [--quick] [--rounds 2] [--profile] [--json F]

Needs the default's plain seed-0 training set and held-out samples (`snakemake --cores 2
results/smollm2/ratio0/seed0/train.jsonl results/smollm2/heldout/context_free.jsonl`).
- The limit of each precision here (benchmarks/machine_limit.py) and what `auto` picks.
- A fine-tune: `cfs.train.fine_tune` with the fine_tune rule's settings for that cell
  (its forgetting curves included), once per precision per round, alternating.
- An evaluation: `cfs.evaluate.evaluate` of the base model with the evaluate_finetuned rule's
  settings plus KL to base, once per precision per round; the two precisions' scores side
  by side (per-item scores, the forgetting average, greedy generations, log-likelihoods).
Each run's share of its own precision's limit: the matrix-product FLOPs of the positions
its model computed (forward hooks: 2 x weights a position forward, 3x that in training)
over its seconds. --profile: the top operators of one bf16 run of each.
--quick: a tiny random model, 2 optimizer steps, 8 items a task, one round.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import (
    DEFAULT_MODEL,
    REPO,
    alternate,
    best,
    load_config,
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
from machine_limit import machine_limit

PRECISIONS = ("float32", "bfloat16")
TRAIN_SET = REPO / "results" / "smollm2" / "ratio0" / "seed0" / "train.jsonl"
HELDOUT = REPO / "results" / "smollm2" / "heldout" / "context_free.jsonl"
TEST_SET = REPO / "results" / "data" / "add_sub" / "test.jsonl"


class MatmulCounter:
    """Matrix-product FLOPs of every forward of `model`: 2 x (decoder weights + LM head)
    per position, 3x that for a position trained on (forward and backward)."""

    def __init__(self, model):
        self.head = model.get_output_embeddings().weight.numel()
        weights = sum(p.numel() for p in model.parameters())
        self.body = weights - model.get_input_embeddings().weight.numel()
        if not model.config.tie_word_embeddings:
            self.body -= self.head
        self.per_position = 2 * (self.body + self.head)
        self.flops = 0.0
        self.handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.flops += ids.numel() * self.per_position * (3 if module.training else 1)


def fine_tune_run(model_dir: Path, data: dict, settings: dict, precision: str, work: Path):
    import cfs.train as train

    counters, load = [], train.load_model

    def counted(*args, **kwargs):
        model = load(*args, **kwargs)
        counters.append(MatmulCounter(model))
        return model

    train.load_model = counted
    out = work / f"model-{time.monotonic_ns()}"
    try:
        start = time.perf_counter()
        summary = train.fine_tune(
            model_dir,
            data["train"],
            {**settings, "precision": precision},
            work / f"ckpt-{time.monotonic_ns()}",
            out,
            heldout=data["heldout"],
            target_test=data["test"],
        )
        seconds = time.perf_counter() - start
    finally:
        train.load_model = load
    curves = (out / "curves.csv").read_text() if (out / "curves.csv").exists() else ""
    shutil.rmtree(out, ignore_errors=True)
    return {
        "seconds": seconds,
        "flops": counters[0].flops,
        "precision": summary["precision"],
        "train_loss": summary["train_loss"],
        "curves": curves,
    }


def evaluation_run(model_dir: Path, settings: dict, precision: str, heldout: Path):
    import lm_eval
    from cfs import evaluate

    samples, counters, original, load = {}, [], lm_eval.simple_evaluate, evaluate.load_model

    def keep_samples(*args, **kwargs):
        output = original(*args, **kwargs)
        samples.update(output["samples"])
        return output

    def counted(*args, **kwargs):
        model = load(*args, **kwargs)
        counters.append(MatmulCounter(model))
        return model

    lm_eval.simple_evaluate, evaluate.load_model = keep_samples, counted
    try:
        start = time.perf_counter()
        record = evaluate.evaluate(
            model_dir, {**settings, "precision": precision}, model_dir, heldout, None
        )
        seconds = time.perf_counter() - start
    finally:
        lm_eval.simple_evaluate, evaluate.load_model = original, load
    # lm-eval's own model (cfs-hf) runs the LM head only where a token is read
    requests, sizes = record["requests"], counters[0]
    lm_eval_flops = 2 * sizes.body * requests["layer_positions"]
    lm_eval_flops += 2 * sizes.head * requests["head_positions"]
    return {
        "seconds": seconds,
        "flops": sum(c.flops for c in counters) + lm_eval_flops,
        "precision": record["lm_eval_settings"]["precision"],
        "metrics": record["metrics"],
        "items": record["items"],
        "samples": samples,
    }


def compare_scores(a: dict, b: dict) -> dict:
    """How far the bf16 evaluation's scores are from the float32 one's."""
    items = [
        abs(a["items"][task][item] - b["items"][task][item])
        for task in a["items"]
        for item in a["items"][task]
    ]
    generations, loglikelihoods = [0, 0], []
    for task, logged in a["samples"].items():
        other = {(s["doc_id"], s["filter"]): s for s in b["samples"][task]}
        for sample in logged:
            for mine, theirs in zip(
                sample["resps"], other[sample["doc_id"], sample["filter"]]["resps"], strict=True
            ):
                if isinstance(mine[0], str):
                    generations[0] += mine[0] == theirs[0]
                    generations[1] += 1
                else:
                    loglikelihoods.append(abs(mine[0][0] - theirs[0][0]))
    return {
        "forgetting_avg_points": 100
        * abs(a["metrics"]["forgetting_avg"] - b["metrics"]["forgetting_avg"]),
        "target_points": 100 * abs(a["metrics"]["target"] - b["metrics"]["target"]),
        "max_item_score": max(items),
        "mean_item_score": sum(items) / len(items),
        "identical_generations": f"{generations[0]} of {generations[1]}",
        "max_loglikelihood": max(loglikelihoods, default=0.0),
        "kl_to_base": abs(a["metrics"]["kl_to_base"] - b["metrics"]["kl_to_base"]),
    }


def quick_inputs(work: Path) -> tuple[Path, dict]:
    """--quick: a tiny model, the default task's data and a few context-free samples, in a
    scratch folder holding tasks/ and the data as prepare_task_data writes it (lm-eval
    reads both relative to the working folder, which becomes that folder)."""
    from cfs.arithmetic import prepare_arithmetic
    from cfs.artifacts import write_jsonl

    model_dir = tiny_model(work / "tiny")
    task = load_config()["task"]
    train_set, test_set = prepare_arithmetic({**task, "num_train": 8})
    samples = [{"prompt_token_id": 1, "token_ids": list(range(3, 19)), "finish_reason": "length"}]
    shutil.copytree(REPO / "tasks", work / "tasks")
    data = work / "results" / "data" / task["name"]
    inputs = {
        "train": write_jsonl(work / "train.jsonl", [{**r, "kind": "task"} for r in train_set]),
        "test": write_jsonl(data / "test.jsonl", test_set),
        "heldout": write_jsonl(work / "heldout.jsonl", samples * 4),
    }
    os.chdir(work)
    return model_dir, inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, one round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="top operators of bf16 runs")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.json:
        args.json = str(Path(args.json).resolve())  # --quick works in a scratch folder
    quiet()
    threads = set_threads(args.threads)
    from cfs.modeling import compute_precision

    work = Path(tempfile.mkdtemp(prefix="cfs-bench-precision-"))
    stages = stage_settings()
    train_settings = stages.train("ratio0", 0)
    eval_settings = stages.evaluation("smollm2", "ratio0", 0)
    if args.quick:
        quick_mode()
        args.rounds = 1
        model_dir, data = quick_inputs(work)
        train_settings.update(batch_size=4, micro_batch_size=4, curve_every=1)
        eval_settings["limit"] = 8
        limit = machine_limit(0.05, (64, 128))
    else:
        model_dir = require_model(DEFAULT_MODEL)
        missing = [path for path in (TRAIN_SET, HELDOUT, TEST_SET) if not path.is_file()]
        if missing:
            raise SystemExit(f"run the default's data first (module docstring): no {missing[0]}")
        data = {"train": TRAIN_SET, "heldout": HELDOUT, "test": TEST_SET}
        limit = machine_limit(seconds=2.0)
    auto = compute_precision("auto", "cpu")
    print(
        f"limit on {threads} threads: float32 {limit['float32'] / 1e9:.0f}, bfloat16 "
        f"{limit['bfloat16'] / 1e9:.0f} GFLOP/s ({limit['bfloat16'] / limit['float32']:.1f}x); "
        f"precision auto here: {auto}"
    )
    variants = {}
    for precision in PRECISIONS:
        variants[f"fine-tune {precision}"] = lambda p=precision: fine_tune_run(
            model_dir, data, train_settings, p, work
        )
        variants[f"evaluation {precision}"] = lambda p=precision: evaluation_run(
            model_dir, eval_settings, p, data["heldout"]
        )
    try:
        runs = alternate(variants, args.rounds)
        if args.profile:
            for stage in ("fine-tune", "evaluation"):
                print(f"\n{stage} in bfloat16, top operators by self CPU time:")
                profile_call(variants[f"{stage} bfloat16"], top=20)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures, rows = {}, []
    for name, done in runs.items():
        chosen = best(done)
        precision = name.split()[-1]
        share = chosen["flops"] / chosen["seconds"] / limit[precision]
        figures[name] = {
            key: chosen[key] for key in ("seconds", "all_seconds", "flops", "precision")
        } | {"share_of_limit": share}
        rows.append(
            [
                name,
                chosen["precision"],
                f"{chosen['seconds']:.1f}",
                f"{chosen['flops'] / 1e12:.2f}",
                f"{share:.0%}",
            ]
        )
    print(table(rows, ["run", "computed in", "best s", "TFLOP", "of its limit"]))
    ratios = {
        stage: round_ratios(runs, f"{stage} float32", f"{stage} bfloat16", lambda r: r["seconds"])
        for stage in ("fine-tune", "evaluation")
    }
    for stage, ratio in ratios.items():
        print(f"{stage}: bf16 {ratio['median']:.2f}x faster (rounds {ratio['per_round']})")
    scores = compare_scores(best(runs["evaluation float32"]), best(runs["evaluation bfloat16"]))
    print(
        "bf16 against float32 scores: "
        + ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()
        )
    )
    report(
        "precision",
        {
            "limit": {p: limit[p] for p in PRECISIONS},
            "auto": auto,
            "threads": threads,
            "runs": figures,
            "ratios": ratios,
            "scores": scores,
            "train_settings": train_settings,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
