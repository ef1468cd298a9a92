"""The DAG: how long `snakemake -n` takes on the paper's configs (goal: under 5 s).

Each config (default: config/olmo.yaml and config/reasoning.yaml) is dry-run in a throw-away
copy of the workflow's files (no results/): best and median of several runs after a
warm-up. The grids' job counts are checked in tests/workflow/test_dag.py and
test_paper_configs.py, not here. --quick: config/quick.yaml, one run, no warm-up.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO, arguments, best, goal, report, setup, table, timed

GOAL_SECONDS = 5.0


def dry_run(workdir: Path, config: Path) -> dict:
    command = [sys.executable, "-m", "snakemake", "-n", "--configfile", str(config)]
    result = subprocess.run(
        command, cwd=workdir, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    if result.returncode != 0:
        raise SystemExit(f"snakemake -n failed on {config}:\n{result.stdout[-3000:]}")
    jobs = re.search(r"^total\s+(\d+)$", result.stdout, re.M)
    return {"jobs": int(jobs[1]) if jobs else 0}


def bench(config: Path, repeats: int, quick: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="cfs-bench-dag-") as workdir:
        shutil.copy2(REPO / "Snakefile", workdir)
        for name in ("workflow", "config", "tasks", "envs"):
            ignore = shutil.ignore_patterns("__pycache__")
            shutil.copytree(REPO / name, Path(workdir) / name, ignore=ignore)
        if not quick:
            dry_run(Path(workdir), config)  # warm-up: byte-compiling, file-system caches
        runs = [timed(lambda: dry_run(Path(workdir), config)) for _ in range(repeats)]
    name = config.relative_to(REPO) if config.is_relative_to(REPO) else config
    return {"config": str(name), **best(runs)}


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("configs", nargs="*", type=Path, help="config files (default: paper)")
    parser.add_argument("--repeats", type=int, help="timed dry runs per config (default 5)")
    args = parser.parse_args()
    setup(args)
    names = ["quick.yaml"] if args.quick else ["olmo.yaml", "reasoning.yaml"]
    configs = args.configs or [REPO / "config" / name for name in names]
    repeats = args.repeats or (1 if args.quick else 5)
    results = [bench(config.resolve(), repeats, args.quick) for config in configs]
    rows = [
        [r["config"], r["jobs"], f"{r['seconds']:.2f}", f"{r['median_seconds']:.2f}"]
        + [goal(r["seconds"] < GOAL_SECONDS)]
        for r in results
    ]
    print(table(rows, ["config", "jobs", "best s", "median s", f"< {GOAL_SECONDS:g} s"]))
    report("dag", {"repeats": repeats, "results": results}, args.json)


if __name__ == "__main__":
    main()
