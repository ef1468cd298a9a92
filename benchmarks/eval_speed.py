"""Evaluation speed: lm-eval's stock HF model (`hf`) against cfs-hf (cfs.lm_eval_model) on
the embedded default's evaluation of one model, with the same scores.

Each round runs `cfs.evaluate.run_lm_eval` with the settings the `evaluate_base` rule hands
it (float32), once per backend (alternating), in this process after a warm-up; then:
- how far the two backends' log-likelihoods, greedy generations, per-item scores and
  metrics are apart;
- the positions each computed (layer and LM-head positions, padding included), counted by
  hooks on the model (cfs.lm_eval_model.PositionCounter);
- the share of this machine's fp32 matrix-product limit (machine_limit.py) that the FLOPs
  of those positions make over the time, and over the whole job with the start-up of
  `python -m cfs.evaluate` (imports, task index, model load) added.
--quick: a tiny random model, 8 items a task, one round, the task's data in a scratch folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from timeit import timeit

import _common as common
from machine_limit import machine_limit


def captured_run(model_dir: Path, settings: dict, backend: str) -> dict:
    """run_lm_eval with `backend`, timed, with lm-eval's logged samples kept."""
    import lm_eval
    from cfs import evaluate

    with common.spy(lm_eval, "simple_evaluate") as outputs:
        scores, items, _, requests = evaluate.run_lm_eval(
            model_dir, {**settings, "backend": backend}
        )
    samples = {task: s for output, _ in outputs for task, s in output["samples"].items()}
    return dict(scores=scores, items=items, requests=requests, samples=samples)


def startup_seconds(model_dir: Path, settings: dict, quick: bool) -> dict:
    """An evaluation job's start-up: the interpreter and the stage's imports (not in
    --quick), then (in this process) the local tasks' index and the model load."""
    from cfs.lm_eval_tasks import local_task_manager
    from cfs.modeling import load_model

    env = {**os.environ, "PYTHONPATH": str(common.REPO / "workflow")}
    tasks = settings["include_path"], [settings["target"]["task"]]

    def imports():
        subprocess.run([sys.executable, "-c", "import cfs.evaluate"], env=env, check=True)

    return {
        "imports": 0.0 if quick else timeit(imports, number=1),
        "task_index": timeit(lambda: local_task_manager(*tasks), number=1),
        "model_load": timeit(lambda: load_model(model_dir, "float32"), number=1),
    }


def main() -> None:
    parser = common.arguments(__doc__, "--model", "--rounds", "--threads")
    parser.add_argument("--stock-batch-size", type=int, help="hf's batch size (default: config's)")
    args = parser.parse_args()
    threads = common.setup(args)
    from cfs.modeling import load_model

    stages = common.stage_settings()
    settings = stages.evaluation("smollm2", "base", stages.config["task"]["seed"])
    # float32: the backends are compared to float32's tolerance (precision.py: bf16)
    settings["precision"] = "float32"
    folder = Path(tempfile.mkdtemp(prefix="cfs-bench-eval-"))
    model_dir = common.model_folder(args, folder)
    if args.quick:
        common.scratch_study(folder)
        settings["limit"] = 8
    limit = machine_limit(quick=args.quick)["float32"]
    rounds = 1 if args.quick else args.rounds or 2
    batch = {"hf": args.stock_batch_size or settings["batch_size"]}
    batch["cfs-hf"] = settings["batch_size"]
    captured_run(model_dir, {**settings, "limit": 2}, "cfs-hf")  # warm-up
    variants = {
        backend: lambda b=backend: captured_run(model_dir, {**settings, "batch_size": batch[b]}, b)
        for backend in batch
    }
    chosen = {
        backend: common.best(done) for backend, done in common.alternate(variants, rounds).items()
    }
    same = common.compare_evaluations(chosen["hf"], chosen["cfs-hf"])
    stock, ours = chosen["hf"]["scores"], chosen["cfs-hf"]["scores"]
    same["max_metric_difference"] = max(
        abs(stock[task][key] - ours[task][key]) for task in stock for key in stock[task]
    )
    startup = startup_seconds(model_dir, settings, args.quick)
    body, head = common.matmul_weights(load_model(model_dir, "float32"))
    rows, figures = [], {}
    for backend, run in chosen.items():
        positions = {key: run["requests"][key] for key in ("layer_positions", "head_positions")}
        flops = 2 * body * positions["layer_positions"] + 2 * head * positions["head_positions"]
        share = flops / run["seconds"] / limit
        with_startup = flops / (run["seconds"] + sum(startup.values())) / limit
        figures[backend] = {"batch_size": batch[backend], "seconds": run["all_seconds"]}
        figures[backend] |= {**positions, "flops": flops, "share_of_limit": share}
        figures[backend]["share_of_limit_with_startup"] = with_startup
        rows.append(
            [f"{backend} (batch {batch[backend]})", f"{run['seconds']:.1f}"]
            + [f"{n:,}" for n in positions.values()]
            + [f"{flops / 1e12:.2f}", f"{share:.0%}", f"{with_startup:.0%}"]
        )
    header = ["backend", "best s", "layer pos.", "head pos.", "TFLOP", "of limit", "with start-up"]
    print(f"fp32 limit {limit / 1e9:.0f} GFLOP/s on {threads} threads")
    print(common.table(rows, header))
    speedup = chosen["hf"]["seconds"] / chosen["cfs-hf"]["seconds"]
    layer = figures["hf"]["layer_positions"] / figures["cfs-hf"]["layer_positions"]
    print(f"speed-up per model {speedup:.2f}x; layer positions {layer:.2f}x fewer")
    print(f"start-up (s): {common.listing(startup)}\nhow far apart: {common.listing(same)}")
    figures = {"backends": figures, "speedup": speedup, "layer_position_ratio": layer}
    figures |= {"startup_seconds": startup, "equivalence": same, "fp32_limit_flops": limit}
    settings = {key: settings[key] for key in ("batch_size", "limit")}
    common.report("eval_speed", {"settings": settings, "threads": threads, **figures}, args.json)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
