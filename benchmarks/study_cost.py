"""What a study cost: the wall seconds of each of its jobs, from the timing file Snakemake
writes for every job (`benchmark:`, results/benchmarks/), summed per rule.

    .venv/bin/python benchmarks/study_cost.py [--config config/quick.yaml] [--json F]

The jobs are the study's own (`snakemake all -n -F` with the config, its `benchmark:`
paths); one that has not run yet is listed as missing. Run with one job per core (the
default config's `threads: 1`), a job's wall seconds are its core-seconds. --quick is the
same on config/quick.yaml (the smallest study).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import defaultdict

from _common import REPO, report, table


def study_benchmarks(config: str | None) -> dict[str, list[str]]:
    """{rule: benchmark files of the study's jobs}, from a forced dry run."""
    command = [sys.executable, "-m", "snakemake", "all", "-n", "-F"]
    if config:
        command += ["--configfile", config]
    output = subprocess.run(command, cwd=REPO, capture_output=True, text=True).stdout
    jobs = defaultdict(list)
    for rule, body in re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", output, re.M):
        found = re.search(r"^    benchmark: (\S+)", body, re.M)
        if found:
            jobs[rule].append(found.group(1))
    if not jobs:
        sys.exit("the dry run listed no jobs:\n" + output[-2000:])
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a --configfile merged over config/config.yaml")
    parser.add_argument("--quick", action="store_true", help="the study of config/quick.yaml")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    config = "config/quick.yaml" if args.quick and not args.config else args.config
    import pandas as pd

    rows, figures, missing = [], {}, []
    for rule, paths in sorted(study_benchmarks(config).items()):
        seconds = []
        for path in paths:
            if (REPO / path).is_file():
                seconds.append(float(pd.read_csv(REPO / path, sep="\t")["s"].iloc[-1]))
            else:
                missing.append(path)
        figures[rule] = {"jobs": len(paths), "measured": len(seconds), "seconds": sum(seconds)}
        mean = sum(seconds) / len(seconds) if seconds else float("nan")
        rows.append([rule, str(len(paths)), f"{sum(seconds):,.0f}", f"{mean:,.0f}"])
    total = sum(rule["seconds"] for rule in figures.values())
    jobs = sum(rule["jobs"] for rule in figures.values())
    rows.append(["total", str(jobs), f"{total:,.0f}", ""])
    print(table(rows, ["rule", "jobs", "seconds", "mean per job"]))
    if missing:
        print(f"{len(missing)} jobs not run yet, e.g. {missing[0]}")
    report(
        "study_cost",
        {"config": config, "rules": figures, "total_seconds": total, "missing": len(missing)},
        args.json,
    )


if __name__ == "__main__":
    main()
