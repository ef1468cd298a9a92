"""A stage job's start and end, as Snakemake runs it: `python -m cfs.evaluate` on the
embedded default's base evaluation, through cfs.cli.run_as_process (the imported modules
frozen out of the garbage collector's full collections, and the process ended without the
interpreter's teardown once its outputs are written), against the same stage through
cfs.cli.run_stage alone, which leaves the collector as it is and ends the process as any
Python program ends.

Each round runs both, alternating, each a process of its own with a request cache of its
own, on the same model and settings (the `evaluate_base` rule's, lm-eval's HF model).
With `--vllm-env VENV` (an environment with vLLM's CPU build: scripts/vllm_cpu_env.sh),
both also run there through vLLM (evaluation.backend vllm). Prints each variant's best time,
the saving per job, and whether the two wrote the same metrics.
--quick: a tiny random model, 2 items a task, one round, HF only.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as common

# The stage without run_as_process: run_stage, then the interpreter's own exit.
RUN_STAGE_ONLY = (
    "import sys; from cfs.cli import run_stage; from cfs.evaluate import main; "
    "run_stage(main, sys.argv[1:])"
)
ENDINGS = {"run_as_process": ["-m", "cfs.evaluate"], "run_stage": ["-c", RUN_STAGE_ONLY]}


def evaluation(python: str, ending: str, model: Path, settings: dict, out: Path) -> dict:
    """One `cfs.evaluate` process with `ending`; its metrics."""
    cache = out.with_name(f"{out.stem}_cache")
    shutil.rmtree(cache, ignore_errors=True)  # every run computes every request
    out.unlink(missing_ok=True)
    command = [python, *ENDINGS[ending], "--model", str(model)]
    command += ["--settings", json.dumps(settings), "--out", str(out), "--cache", str(cache)]
    env = {**os.environ, "PYTHONPATH": str(common.REPO / "workflow")}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        sys.exit(f"{ending} failed ({python}):\n{result.stderr[-3000:]}")
    return {"metrics": json.loads(out.read_text())["metrics"]}


def main() -> None:
    parser = common.arguments(__doc__, "--model", "--rounds")
    parser.add_argument("--vllm-env", type=Path, help="a venv with vLLM's CPU build")
    args = parser.parse_args()
    common.setup(args)
    stages = common.stage_settings()
    settings = stages.evaluation("smollm2", "base", stages.config["task"]["seed"])
    folder = Path(tempfile.mkdtemp(prefix="cfs-bench-stage-end-"))
    model_dir = common.model_folder(args, folder)
    common.scratch_study(folder)  # tasks and the task's data in the working folder
    if args.quick:
        settings["limit"] = 2
    backends = {"hf": (sys.executable, "hf")}
    if args.vllm_env and not args.quick:
        backends["vllm"] = (str(args.vllm_env / "bin" / "python"), "vllm")
    rounds = 1 if args.quick else args.rounds or 3
    figures, rows = {}, []
    for name, (python, backend) in backends.items():
        chosen = {**settings, "backend": backend}
        variants = {
            ending: functools.partial(
                evaluation, python, ending, model_dir, chosen, folder / f"{name}_{ending}.json"
            )
            for ending in ENDINGS
        }
        print(f"{name}:")
        runs = common.alternate(variants, rounds)
        best = {ending: common.best(done) for ending, done in runs.items()}
        saving = best["run_stage"]["seconds"] - best["run_as_process"]["seconds"]
        same = best["run_stage"]["metrics"] == best["run_as_process"]["metrics"]
        figures[name] = {
            ending: {"seconds": run["all_seconds"], "best": run["seconds"]}
            for ending, run in best.items()
        }
        ratios = common.round_ratios(runs, "run_as_process", "run_stage")
        figures[name] |= {"saving_s": saving, "ratio": ratios, "same_metrics": same}
        seconds = [f"{best[ending]['seconds']:.2f}" for ending in ("run_stage", "run_as_process")]
        rows.append([name, *seconds, f"{saving:.2f}", f"{ratios['median']:.2f}", str(same)])
    header = ["backend", "run_stage s", "run_as_process s", "saving s", "ratio", "same metrics"]
    print(common.table(rows, header))
    settings = {key: settings[key] for key in ("batch_size", "limit")}
    common.report("stage_end", {"settings": settings, "rounds": rounds, **figures}, args.json)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
