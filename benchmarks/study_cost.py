"""What a study cost: the wall seconds of each of its jobs, from the timing file every job
writes (its `timing` log, results/benchmarks/: cfs.timing), summed per rule.

The jobs are the study's own (`snakemake all -n -F` with the config, the timing files among
their logs); one that has not run yet is counted as missing. Run with one job per core (the
default config's `threads: 1`), a job's wall seconds are its core-seconds. --quick: the same
on config/quick.yaml (the smallest study).
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from collections import defaultdict

from _common import REPO, arguments, report, table

TIMING_DIR = "results/benchmarks/"


def study_timing_files(config: str | None) -> dict[str, list[str]]:
    """{rule: timing files of the study's jobs}, from a forced dry run."""
    command = [sys.executable, "-m", "snakemake", "all", "-n", "-F"]
    command += ["--configfile", config] if config else []
    output = subprocess.run(command, cwd=REPO, capture_output=True, text=True).stdout
    jobs = defaultdict(list)
    for rule, body in re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", output, re.M):
        if found := re.search(r"^    log: (.+)$", body, re.M):
            timing = [path for path in found[1].split(", ") if path.startswith(TIMING_DIR)]
            jobs[rule].extend(timing)
    if not jobs:
        sys.exit("the dry run listed no jobs:\n" + output[-2000:])
    return jobs


def main() -> None:
    parser = arguments(__doc__, "--config")
    args = parser.parse_args()
    config = args.config or ("config/quick.yaml" if args.quick else None)
    rows, figures, missing = [], {}, []
    for rule, paths in sorted(study_timing_files(config).items()):
        seconds = []
        for path in paths:
            if (REPO / path).is_file():
                with open(REPO / path, newline="") as timing:
                    seconds.append(float(list(csv.DictReader(timing, delimiter="\t"))[-1]["s"]))
            else:
                missing.append(path)
        figures[rule] = {"jobs": len(paths), "measured": len(seconds), "seconds": sum(seconds)}
        mean = f"{sum(seconds) / len(seconds):,.0f}" if seconds else ""
        rows.append([rule, len(paths), f"{sum(seconds):,.0f}", mean])
    total = sum(rule["seconds"] for rule in figures.values())
    rows.append(["total", sum(rule["jobs"] for rule in figures.values()), f"{total:,.0f}", ""])
    print(table(rows, ["rule", "jobs", "seconds", "mean per job"]))
    if missing:
        print(f"{len(missing)} jobs not run yet, e.g. {missing[0]}")
    figures = {"rules": figures, "total_seconds": total, "missing": len(missing)}
    report("study_cost", {"config": config, **figures}, args.json)


if __name__ == "__main__":
    main()
