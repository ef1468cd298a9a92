"""The DAG: how long `snakemake -n` takes on the paper's configs (goal: under 5 s).

    .venv/bin/python benchmarks/dag.py [--quick] [CONFIG ...]   # default: the paper configs

Each config is dry-run in a throw-away copy of the workflow's files (no results/): best and
median of several runs after a warm-up, and the floors of the same machine (`snakemake
--version`, and `--list-rules`: parsing without a DAG). The job counts of each grid are
checked in tests/workflow/test_dag.py and test_paper_configs.py, not here.

--quick: config/quick.yaml, one timed run, no floors.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, goal, quick_mode, report, table, wait_for_quiet

GOAL_SECONDS = 5.0


def snakemake(workdir: Path, *args: str) -> tuple[str, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", *args], cwd=workdir, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}")
    return result.stdout, seconds


def bench(config: Path, repeats: int, quick: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="cfs-bench-dag-") as tmp:
        workdir = Path(tmp)
        shutil.copy2(REPO / "Snakefile", workdir / "Snakefile")
        for name in ("workflow", "config", "tasks", "envs"):
            shutil.copytree(
                REPO / name, workdir / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        files = ["--configfile", str(config)]
        if not quick:
            snakemake(workdir, "-n", *files)  # warm-up: byte-compile, file-system caches
        times, output = [], ""
        for _ in range(repeats):
            wait_for_quiet(120)
            output, seconds = snakemake(workdir, "-n", *files)
            times.append(seconds)
        floors = {}
        if not quick:
            floors["startup"] = min(snakemake(workdir, "--version")[1] for _ in range(3))
            floors["parse"] = min(snakemake(workdir, "--list-rules", *files)[1] for _ in range(3))
    total = re.search(r"^total\s+(\d+)$", output, re.M)
    return {
        "config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config),
        "jobs": int(total.group(1)) if total else 0,
        "dry_run_seconds": times,
        "dry_run_best": min(times),
        "dry_run_median": statistics.median(times),
        "snakemake_startup_best": floors.get("startup"),
        "parse_only_best": floors.get("parse"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", type=Path, help="config files (default: paper)")
    parser.add_argument("--quick", action="store_true", help="config/quick.yaml, one run")
    parser.add_argument("--repeats", type=int, default=None, help="timed dry runs per config")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.quick:
        quick_mode()
    default = ["quick.yaml"] if args.quick else ["olmo.yaml", "reasoning.yaml"]
    configs = args.configs or [REPO / "config" / name for name in default]
    repeats = args.repeats or (1 if args.quick else 5)
    print(f"DAG: snakemake -n on {os.cpu_count()} CPU cores, {repeats} timed runs per config")
    results = [bench(config.resolve(), repeats, args.quick) for config in configs]
    rows = [
        [r["config"], r["jobs"], f"{r['dry_run_best']:.2f}", f"{r['dry_run_median']:.2f}"]
        + [f"{r[k]:.2f}" if r[k] else "" for k in ("snakemake_startup_best", "parse_only_best")]
        + [goal(r["dry_run_best"] < GOAL_SECONDS)]
        for r in results
    ]
    header = ["config", "jobs", "best s", "median s", "--version s", "--list-rules s"]
    print(table(rows, [*header, f"< {GOAL_SECONDS:g} s"]))
    report("dag", {"results": results}, args.json)


if __name__ == "__main__":
    main()
