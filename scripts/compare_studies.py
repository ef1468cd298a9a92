"""Two finished runs of one study side by side: each cell's numbers with their intervals,
the verdicts, and each run's core-seconds (e.g. the default in float32 and in bf16).

    .venv/bin/python scripts/compare_studies.py RUN_A RUN_B [--names fp32 bf16] [--json F]

RUN_A, RUN_B: checkouts where a study ran (its tables in results/studies/<--study>/), or
folders of its tables (docs/results/<date>). A cell's numbers agree
when each run's estimate lies inside the other run's 95% interval. Core-seconds are the
sum of the wall seconds of every job's timing file under results/benchmarks/ (one thread
per job: seconds are core-seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))
from cfs.results_page import markdown_table  # noqa: E402

METRICS = (("target", 100), ("forgetting_avg", 100), ("kl_to_base", 1))


def core_seconds(run: Path, column: str = "s") -> dict[str, float]:
    """{rule: summed `column`} of the run's timing files: wall seconds ("s"), or the CPU
    seconds the job's processes used ("cpu_time"), which other load on the machine inflates
    less than wall seconds."""
    import pandas as pd

    seconds: dict[str, float] = {}  # none for a folder of tables
    for path in sorted((run / "results" / "benchmarks").rglob("*.tsv")):
        rule = path.relative_to(run / "results" / "benchmarks").parts[0]
        value = float(pd.read_csv(path, sep="\t")[column].iloc[-1])
        seconds[rule] = seconds.get(rule, 0.0) + value
    return seconds


def tables_folder(run: Path, study: str) -> Path:
    """A run's tables: the folder itself where it holds them (docs/results/<date>), else
    results/studies/<study>/ of the checkout where the study ran."""
    return run if (run / "summary.csv").is_file() else run / "results" / "studies" / study


def table(rows: list[list], header: list[str]) -> str:
    return "\n".join(markdown_table(header, rows))


def inside(value, low, high) -> bool:
    return low <= value <= high


def main() -> None:
    import pandas as pd

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs=2, type=Path)
    parser.add_argument("--names", nargs=2, default=["A", "B"])
    parser.add_argument("--study", default="default")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    folders = [tables_folder(run, args.study) for run in args.runs]
    summaries = [pd.read_csv(folder / "summary.csv").set_index("label") for folder in folders]
    verdicts = [pd.read_csv(folder / "verdicts.csv") for folder in folders]
    rows, agree = [], {}
    for label in summaries[0].index:
        a, b = summaries[0].loc[label], summaries[1].loc[label]
        cells = [label]
        for metric, scale in METRICS:
            for row in (a, b):
                low, high = row[f"{metric}_low"], row[f"{metric}_high"]
                cells.append(f"{row[metric] * scale:.3g} [{low * scale:.3g}, {high * scale:.3g}]")
            if pd.isna(a[f"{metric}_low"]) or pd.isna(b[f"{metric}_low"]):
                continue
            agree[f"{label} {metric}"] = inside(
                a[metric], b[f"{metric}_low"], b[f"{metric}_high"]
            ) and inside(b[metric], a[f"{metric}_low"], a[f"{metric}_high"])
        rows.append(cells)
    header = ["cell"] + [f"{m} {n}" for m, _ in METRICS for n in args.names]
    print(table(rows, header))
    disagree = [key for key, same in agree.items() if not same]
    agreeing = len(agree) - len(disagree)
    print(f"numbers agreeing within each other's interval: {agreeing} of {len(agree)}")
    for key in disagree:
        print(f"  outside: {key}")
    verdict_rows, same_verdicts = [], 0
    for first, second in zip(verdicts[0].itertuples(), verdicts[1].itertuples(), strict=True):
        same = (first.verdict, first.kl_verdict) == (second.verdict, second.kl_verdict)
        same_verdicts += same
        verdict_rows.append(
            [
                first.comparison,
                f"{first.verdict} / {first.kl_verdict}",
                f"{second.verdict} / {second.kl_verdict}",
            ]
        )
    print(table(verdict_rows, ["comparison", *(f"{n}: forgetting / KL" for n in args.names)]))
    print(f"verdicts the same: {same_verdicts} of {len(verdict_rows)}")
    seconds = [core_seconds(run) for run in args.runs]
    cpu = [core_seconds(run, "cpu_time") for run in args.runs]
    rules = sorted(set(seconds[0]) | set(seconds[1]))
    cost_rows = [
        [
            rule,
            *(f"{s.get(rule, 0):,.0f}" for s in seconds),
            *(f"{c.get(rule, 0):,.0f}" for c in cpu),
        ]
        for rule in rules
    ]
    totals = [sum(s.values()) for s in seconds]
    cpu_totals = [sum(c.values()) for c in cpu]
    cost_rows.append(["total", *(f"{t:,.0f}" for t in totals + cpu_totals)])
    header = ["rule", *(f"{n} wall s" for n in args.names), *(f"{n} CPU s" for n in args.names)]
    print(table(cost_rows, header))
    if all(totals):
        print(
            f"{args.names[0]} / {args.names[1]}: {totals[0] / totals[1]:.2f}x wall, "
            f"{cpu_totals[0] / cpu_totals[1]:.2f}x CPU"
        )
    if args.json:
        figures = {
            "runs": [str(run) for run in args.runs],
            "names": args.names,
            "agree": {key: bool(value) for key, value in agree.items()},
            "same_verdicts": same_verdicts,
            "verdicts": len(verdict_rows),
            "core_seconds": dict(zip(args.names, seconds, strict=True)),
            "cpu_seconds": dict(zip(args.names, cpu, strict=True)),
        }
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
