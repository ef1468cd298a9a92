"""Evaluation speed: lm-eval's stock HF model (`hf`) against cfs-hf (cfs.lm_eval_model) on
the embedded default's evaluation of one model, with the same scores.

    .venv/bin/python benchmarks/eval_speed.py [--model DIR] [--quick] [--rounds 2] [--json F]

Each round runs `cfs.evaluate.run_lm_eval` with the settings the `evaluate_base` rule hands
it, once per backend (alternating), in this process after a warm-up, and times it; then:
- every metric and every per-item score, and the log-likelihood of every request, of the
  two backends (greedy generations must be the same strings);
- the positions each computed (layer and LM-head positions, padding included), counted
  by hooks on the model (cfs.lm_eval_model.PositionCounter);
- the share of this machine's fp32 matrix-product limit (benchmarks/machine_limit.py)
  that the FLOPs of those positions make over the time, and over the whole job with the
  start-up of `python -m cfs.evaluate` (imports, task index, model load) added.
--quick: a tiny random model, 8 items a task, one round, the target's held-out problems
made by cfs.data in a scratch folder (what the prepare_task_data rule writes).
"""

from __future__ import annotations

import argparse
import json
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
    load_config,
    quick_mode,
    quiet,
    report,
    require_model,
    set_threads,
    stage_settings,
    table,
    tiny_model,
)
from machine_limit import machine_limit

# fp32 sums in another order: relative to the log-likelihood (lm-eval's own HF model moves
# by more between batch sizes 1 and 64: up to 6.3e-5 absolute on these tasks)
LOGLIKELIHOOD_RTOL = 1e-5


def eval_settings(quick: bool) -> dict:
    stages = stage_settings()
    settings = stages.evaluation("smollm2", "base", stages.config["task"]["seed"])
    if quick:
        settings["limit"] = 8
    # float32: the two backends' numbers are compared to float32's tolerance
    # (benchmarks/precision.py compares the precisions)
    settings["precision"] = "float32"
    return settings


def scratch_folder(model_dir: Path | None) -> tuple[Path, Path]:
    """--quick: a folder holding tasks/ and the default task's data as prepare_task_data
    writes it (lm-eval reads both relative to the working folder), and a tiny model."""
    from cfs.data import main as prepare_task_data

    folder = Path(tempfile.mkdtemp(prefix="cfs-bench-eval-"))
    shutil.copytree(REPO / "tasks", folder / "tasks")
    task = load_config()["task"]
    data = folder / "results" / "data" / task["name"]
    prepare_task_data(
        [
            "--settings",
            json.dumps(task),
            "--train",
            str(data / "train.jsonl"),
            "--test",
            str(data / "test.jsonl"),
        ]
    )
    return folder, model_dir or tiny_model(folder / "model")


def captured_run(model_dir, settings: dict, backend: str):
    """run_lm_eval with `backend`, timed, with lm-eval's logged samples kept."""
    import lm_eval
    from cfs import evaluate

    samples = {}
    original = lm_eval.simple_evaluate

    def keep_samples(*args, **kwargs):
        output = original(*args, **kwargs)
        samples.update(output["samples"])
        return output

    lm_eval.simple_evaluate = keep_samples
    try:
        start = time.perf_counter()
        scores, items, _, requests = evaluate.run_lm_eval(
            model_dir, {**settings, "backend": backend}
        )
        seconds = time.perf_counter() - start
    finally:
        lm_eval.simple_evaluate = original
    return {
        "seconds": seconds,
        "scores": scores,
        "items": items,
        "requests": requests,
        "samples": samples,
    }


def responses(samples: dict) -> dict:
    """{(task, doc id, request): response} of the logged samples (one filter each)."""
    found = {}
    for task, logged in samples.items():
        for sample in logged:
            for index, response in enumerate(sample["resps"]):
                found[(task, sample["doc_id"], index)] = response[0]
    return found


def compare(stock: dict, ours: dict) -> dict:
    """The largest log-likelihood difference, the differing generations and scores."""
    worst, relative, greedy_flips, texts = 0.0, 0.0, 0, 0
    a, b = responses(stock["samples"]), responses(ours["samples"])
    assert a.keys() == b.keys(), "the two backends answered different requests"
    for key in a:
        if isinstance(a[key], str):
            texts += a[key] != b[key]
        else:
            worst = max(worst, abs(a[key][0] - b[key][0]))
            relative = max(relative, abs(a[key][0] - b[key][0]) / max(abs(a[key][0]), 1e-30))
            greedy_flips += a[key][1] != b[key][1]
    item_diff = max(
        abs(stock["items"][task][item] - ours["items"][task][item])
        for task in stock["items"]
        for item in stock["items"][task]
    )
    score_diff = max(
        abs(stock["scores"][task][key] - ours["scores"][task][key])
        for task in stock["scores"]
        for key in stock["scores"][task]
    )
    return {
        "max_loglikelihood_difference": worst,
        "max_relative_loglikelihood_difference": relative,
        "greedy_flag_flips": greedy_flips,
        "different_generations": texts,
        "max_item_score_difference": item_diff,
        "max_metric_difference": score_diff,
    }


def flops(model_dir, positions: dict) -> float:
    """Matrix-product FLOPs of the counted positions: 2 x the decoder's weights per layer
    position, 2 x the LM head's per head position (attention scores are negligible at
    these lengths)."""
    from cfs.modeling import load_model

    model = load_model(model_dir, "float32")
    head = model.get_output_embeddings().weight.numel()
    embedding = model.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - embedding
    if not model.config.tie_word_embeddings:
        body -= head
    return 2 * body * positions["layer_positions"] + 2 * head * positions["head_positions"]


def startup_seconds(model_dir, settings: dict, quick: bool) -> dict:
    """The start-up of an evaluation job: the interpreter and the stage's imports (not in
    --quick), then (in-process) the task index of the local tasks and the model load."""
    imports = 0.0
    if not quick:
        command = [sys.executable, "-c", "import cfs.evaluate"]
        start = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(REPO / "workflow")}
        subprocess.run(command, check=True, env=env)
        imports = time.perf_counter() - start
    from cfs.lm_eval_tasks import local_task_manager
    from cfs.modeling import load_model

    start = time.perf_counter()
    local_task_manager(settings["include_path"], [settings["target"]["task"]])
    index = time.perf_counter() - start
    start = time.perf_counter()
    load_model(model_dir, "float32")
    load = time.perf_counter() - start
    return {"imports": imports, "task_index": index, "model_load": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help=f"model folder to evaluate (default: {DEFAULT_MODEL})")
    parser.add_argument("--quick", action="store_true", help="tiny model, 8 items a task")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--stock-batch-size",
        type=int,
        help="evaluation.batch_size of the stock run (default: the config's); cfs-hf runs "
        "with the config's",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if args.json:
        args.json = str(Path(args.json).resolve())  # --quick works in a scratch folder
    quiet()
    threads = set_threads(args.threads)
    settings = eval_settings(args.quick)
    if args.quick:
        quick_mode()
        folder, model_dir = scratch_folder(Path(args.model).resolve() if args.model else None)
        os.chdir(folder)
        args.rounds = 1
        limit = machine_limit(0.05, (64, 128))["float32"]
    else:
        folder, model_dir = None, require_model(Path(args.model or DEFAULT_MODEL))
        limit = machine_limit(seconds=2.0)["float32"]
    runs = {"hf": [], "cfs-hf": []}
    captured_run(model_dir, {**settings, "limit": 2}, "cfs-hf")  # warm-up
    batch = {
        "hf": args.stock_batch_size or settings["batch_size"],
        "cfs-hf": settings["batch_size"],
    }
    for _ in range(args.rounds):
        for backend in runs:
            run_settings = {**settings, "batch_size": batch[backend]}
            runs[backend].append(captured_run(model_dir, run_settings, backend))
    best = {backend: min(done, key=lambda run: run["seconds"]) for backend, done in runs.items()}
    same = compare(best["hf"], best["cfs-hf"])
    startup = startup_seconds(model_dir, settings, args.quick)
    rows, figures = [], {}
    for backend, run in best.items():
        positions = {k: run["requests"][k] for k in ("layer_positions", "head_positions")}
        work = flops(model_dir, positions)
        job = run["seconds"] + sum(startup.values())
        figures[backend] = {
            "batch_size": batch[backend],
            "seconds": [r["seconds"] for r in runs[backend]],
            **positions,
            "flops": work,
            "share_of_limit": work / run["seconds"] / limit,
            "share_of_limit_with_startup": work / job / limit,
        }
        rows.append(
            [
                f"{backend} (batch {batch[backend]})",
                f"{run['seconds']:.1f}",
                f"{positions['layer_positions']:,}",
                f"{positions['head_positions']:,}",
                f"{work / 1e12:.2f}",
                f"{figures[backend]['share_of_limit']:.0%}",
                f"{figures[backend]['share_of_limit_with_startup']:.0%}",
            ]
        )
    header = ["backend", "best s", "layer pos.", "head pos.", "TFLOP", "of limit", "with start-up"]
    print(f"fp32 limit {limit / 1e9:.0f} GFLOP/s on {threads} threads")
    print(table(rows, header))
    speedup = best["hf"]["seconds"] / best["cfs-hf"]["seconds"]
    layer = figures["hf"]["layer_positions"] / figures["cfs-hf"]["layer_positions"]
    print(f"speed-up per model {speedup:.2f}x; layer positions {layer:.2f}x fewer")
    print("start-up (s): " + ", ".join(f"{k} {v:.1f}" for k, v in startup.items()))
    print("same results: " + ", ".join(f"{k} {v:g}" for k, v in same.items()))
    ok = (
        same["max_relative_loglikelihood_difference"] <= LOGLIKELIHOOD_RTOL
        and same["different_generations"] == 0
    )
    report(
        "eval_speed",
        {
            "settings": {k: settings[k] for k in ("batch_size", "limit")},
            "fp32_limit_flops": limit,
            "threads": threads,
            "backends": figures,
            "speedup": speedup,
            "layer_position_ratio": layer,
            "startup_seconds": startup,
            "equivalence": same,
        },
        args.json,
    )
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
    if not ok:
        sys.exit("cfs-hf's results differ from lm-eval's HF model beyond the tolerance")


if __name__ == "__main__":
    main()
