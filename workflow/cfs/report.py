"""The study's tables, verdicts and figures, with their uncertainty.

- `cell`: one cell's eval.json over its seeds (means, 95% intervals, every seed's metrics).
- `table`: summary.csv (each cell's mean over seeds and 95% interval, cfs.statistics),
  differences.csv (each cell minus plain fine-tuning and minus base, paired intervals) and
  verdicts.csv (the paper's claims, answered by those intervals).
- `figures`: target and forgetting average against temperature and against ratio (plain
  fine-tuning is ratio 0, the first point of each ratio curve), and the trade-off of target
  gain against forgetting and KL, for context-free data and for every method; error bars
  are the 95% intervals.

    python -m cfs.report cell --evals results/m/temp1/ratio1/seed*/eval.json --out .../eval.json
    python -m cfs.report table --evals results/*/.../eval.json --out results/summary.csv \
        --differences results/differences.csv --verdicts results/verdicts.csv
    python -m cfs.report figures --summary results/summary.csv --out-dir results/figures
"""

from __future__ import annotations

import argparse
import logging
from collections import defaultdict
from pathlib import Path

import pandas as pd

from cfs.artifacts import atomic_path, read_json, write_json
from cfs.cli import run_stage
from cfs.errors import DataError
from cfs.figures import read_curves, write_figures
from cfs.results_page import results_page
from cfs.statistics import (
    CONFIDENCE,
    paired_difference,
    paired_seed_difference,
    seed_interval,
    two_level_bootstrap,
)
from cfs.study import (
    KNOB_LABELS,
    KNOB_MEANINGS,
    METHODS,
    PROPOSED,
    report_order,
)

log = logging.getLogger("cfs.report")
KNOBS = tuple(KNOB_LABELS)
ITEM_METRICS = ("target", "forgetting_avg")  # scored per test item: two-level bootstrap
SEED_METRICS = ("kl_to_base", "heldout_nll")  # one number per seed: t interval over seeds


def cell_label(cell: dict) -> str:
    """'context_free T1 r0.5', 'l2 λ1e+06', 'base'."""
    knobs = [
        f"{KNOB_LABELS[knob]}{cell[knob]:g}"
        for knob in KNOBS
        if cell.get(knob) is not None and not (cell["method"] == "plain" and knob == "ratio")
    ]
    return " ".join([cell.get("method") or "?"] + knobs)


class Cell:
    """One cell's evals, one per seed (the base model: one eval)."""

    def __init__(self, records: list[dict]):
        self.records = sorted(records, key=lambda r: r.get("provenance", {}).get("seed") or 0)
        first = self.records[0]
        self.info = {k: v for k, v in first.get("cell", {}).items()}
        self.label = cell_label(self.info)
        self.settings = first.get("settings") or {}

    @property
    def seeds(self) -> list:
        return [record.get("provenance", {}).get("seed") for record in self.records]

    def task_names(self, metric: str) -> list[str]:
        tasks = self.records[0]["tasks"]
        return [tasks["target"]] if metric == "target" else list(tasks["forgetting"])

    def items(self) -> list[dict]:
        return [record["items"] for record in self.records]

    def has_items(self) -> bool:
        return all("items" in record and "tasks" in record for record in self.records)

    def metric(self, name: str) -> tuple[float, float, float]:
        """(mean over seeds, low, high)."""
        if name in ITEM_METRICS and self.has_items():
            tables = [
                [[scores[i] for i in sorted(scores)] for scores in (s[task] for s in self.items())]
                for task in self.task_names(name)
            ]
            return two_level_bootstrap(tables)
        return seed_interval([record["metrics"].get(name) for record in self.records])


def read_cells(eval_paths: list[Path]) -> list[Cell]:
    """Per-seed evals grouped by cell (model, method, knobs)."""
    groups = defaultdict(list)
    for path in eval_paths:
        record = read_json(path)
        record["metrics"]  # noqa: B018 - a file without metrics is not an eval
        record["eval_path"] = str(path)
        key = tuple(sorted((k, v) for k, v in record.get("cell", {}).items() if k != "seed"))
        groups[key].append(record)
    return [Cell(records) for records in groups.values()]


def summary_row(cell: Cell) -> dict:
    row = {"model": cell.info.get("model"), "method": cell.info.get("method")}
    row.update(label=cell.label, **{knob: cell.info.get(knob) for knob in KNOBS})
    row.update(seeds=" ".join(str(s) for s in cell.seeds), num_seeds=len(cell.records))
    for name in ITEM_METRICS + SEED_METRICS:
        row[name], row[f"{name}_low"], row[f"{name}_high"] = cell.metric(name)
    forgetting = [record["metrics"]["forgetting"] for record in cell.records]
    for task in forgetting[0]:
        row[f"forgetting:{task}"] = sum(f[task] for f in forgetting) / len(forgetting)
    base = cell.records[0].get("base")
    if base:
        row["base_target"] = base["target"]
        row["base_forgetting_avg"] = base["forgetting_avg"]
    trained = [record["provenance"].get("model_provenance") or {} for record in cell.records]
    row["training_precision"] = joined(t.get("precision") for t in trained)
    row["evaluation_precision"] = joined(
        record.get("lm_eval_settings", {}).get("precision") for record in cell.records
    )
    row["mixing"] = trained[0].get("mixing")
    lambdas = [t["effective_lambda"] for t in trained if "effective_lambda" in t]
    row["effective_lambda"] = sum(lambdas) / len(lambdas) if lambdas else None
    row["eval_paths"] = " ".join(record["eval_path"] for record in cell.records)
    return row


def joined(values) -> str | None:
    """The distinct values (in order) as one string; None when there are none."""
    distinct = list(dict.fromkeys(value for value in values if value))
    return " / ".join(distinct) if distinct else None


def sort_rows(table: pd.DataFrame) -> pd.DataFrame:
    order = {method: position for position, method in enumerate(report_order())}
    table = table.assign(_order=table["method"].map(order).fillna(len(order)))
    table = table.sort_values(["model", "_order", *KNOBS], na_position="first")
    return table.drop(columns="_order").reset_index(drop=True)


def build_summary(eval_paths: list[Path]) -> pd.DataFrame:
    return sort_rows(pd.DataFrame([summary_row(cell) for cell in read_cells(eval_paths)]))


def compare(a: Cell, b: Cell, metric: str) -> tuple[float, float, float]:
    """a - b with its paired 95% interval: over seeds and items for the scores, over seeds
    (Student t) for a metric with one number per seed (KL to base)."""
    if metric in SEED_METRICS:
        values = [[record["metrics"].get(metric) for record in cell.records] for cell in (a, b)]
        return paired_seed_difference(*values)
    return paired_difference(a.items(), b.items(), a.task_names(metric))


def build_differences(cells: list[Cell]) -> pd.DataFrame:
    """Each cell minus plain fine-tuning and minus base, per model, on the target, the
    forgetting average and KL to base, with paired 95% intervals."""
    rows = []
    for model in sorted({c.info.get("model") for c in cells}):
        own = [c for c in cells if c.info.get("model") == model and c.has_items()]
        references = {c.info["method"]: c for c in own if c.info["method"] in ("base", "plain")}
        for cell in own:
            if cell.info["method"] == "base":
                continue
            for versus, reference in references.items():
                if reference is cell:
                    continue
                for metric in (*ITEM_METRICS, "kl_to_base"):
                    difference, low, high = compare(cell, reference, metric)
                    rows.append(
                        {
                            "model": model,
                            "method": cell.info["method"],
                            "label": cell.label,
                            "versus": versus,
                            "metric": metric,
                            "difference": difference,
                            "low": low,
                            "high": high,
                            "num_seeds": len(cell.records),
                        }
                    )
    return pd.DataFrame(
        rows,
        columns=[
            "model",
            "method",
            "label",
            "versus",
            "metric",
            "difference",
            "low",
            "high",
            "num_seeds",
        ],
    )


def sweep_claim(knob: str) -> str:
    """The claim that a knob of context-free data matters, e.g. the temperature."""
    return f"{KNOB_MEANINGS.get(knob, 'the ' + knob)} changes what context-free data keeps"


def verdict(kind: str, low: float, high: float, margin: float | None = None) -> str:
    """A claim's answer from a paired 95% interval of (context-free data - the other):
    - keeps_more: supported above 0, contradicted below 0;
    - matters (a knob): supported when the interval excludes 0;
    - approximates: supported when the interval lies within +-margin, contradicted when
      it excludes 0 beyond the margin; inconclusive otherwise, and without a margin."""
    if kind == "keeps_more":
        return "supported" if low > 0 else "contradicted" if high < 0 else "inconclusive"
    if kind == "matters":
        return "supported" if low > 0 or high < 0 else "inconclusive"
    if margin is not None and margin > 0 and -margin <= low and high <= margin:
        return "supported"
    return "contradicted" if low > 0 or high < 0 else "inconclusive"


def claim_comparisons(cells: list[Cell]):
    """(claim, context-free cell, other cell, kind of claim: `verdict`). Each method with
    a claim in cfs.study.METHODS is compared with every context-free cell that shares its
    `paired_on` knobs; within context-free data, each knob's largest value is compared with
    its smallest at the same other knobs."""
    by_method = defaultdict(list)
    for cell in cells:
        by_method[cell.info["method"]].append(cell)
    proposed = by_method[PROPOSED]
    for name, spec in METHODS.items():
        if spec.claim is None:
            continue
        for other in by_method[name]:
            for cell in proposed:
                if all(cell.info.get(k) == other.info.get(k) for k in spec.paired_on):
                    yield spec.claim, cell, other, spec.claim_kind
    knobs = METHODS[PROPOSED].knobs
    for knob in knobs:
        lines = defaultdict(list)
        for cell in proposed:
            lines[tuple(cell.info.get(k) for k in knobs if k != knob)].append(cell)
        for line in lines.values():
            if len(line) > 1:
                line.sort(key=lambda c: c.info[knob])
                yield sweep_claim(knob), line[-1], line[0], "matters"


VERDICT_COLUMNS = [
    "model",
    "claim",
    "comparison",
    "forgetting_avg_difference",
    "low",
    "high",
    "verdict",
    "kl_to_base_difference",
    "kl_low",
    "kl_high",
    "kl_verdict",
    "target_difference",
    "target_low",
    "target_high",
    "margin",
    "kl_margin",
    "num_seeds",
]


def build_verdicts(cells: list[Cell]) -> pd.DataFrame:
    """The paper's claims, one row per comparison, each answered on the forgetting average
    (higher keeps more) and on KL to base (lower is nearer the base model: the answer is
    given on its negation, so that "supported" means the same), with the target's change
    beside them: a score can rise because the model sharpens, and KL to base tells whether
    the model also stayed near base. An "approximates" claim's margin is a third of plain
    fine-tuning's change from base (forgetting average, KL to base): what the study sets
    out to resolve."""
    rows = []
    for model in sorted({c.info.get("model") for c in cells}):
        own = [c for c in cells if c.info.get("model") == model and c.has_items()]
        margins = plain_margins(own)
        for claim, cell, other, kind in claim_comparisons(own):
            difference, low, high = compare(cell, other, "forgetting_avg")
            kl, kl_low, kl_high = compare(cell, other, "kl_to_base")
            target, target_low, target_high = compare(cell, other, "target")
            margin, kl_margin = margins if kind == "approximates" else (None, None)
            rows.append(
                {
                    "model": model,
                    "claim": claim,
                    "comparison": f"{cell.label} - {other.label}",
                    "forgetting_avg_difference": difference,
                    "low": low,
                    "high": high,
                    "verdict": verdict(kind, low, high, margin),
                    "kl_to_base_difference": kl,
                    "kl_low": kl_low,
                    "kl_high": kl_high,
                    "kl_verdict": verdict(kind, -kl_high, -kl_low, kl_margin),
                    "target_difference": target,
                    "target_low": target_low,
                    "target_high": target_high,
                    "margin": margin,
                    "kl_margin": kl_margin,
                    "num_seeds": len(cell.records),
                }
            )
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def plain_margins(cells: list[Cell]) -> tuple[float | None, float | None]:
    """A third of plain fine-tuning's change from base: forgetting average, KL to base."""
    by_method = {c.info["method"]: c for c in cells if c.info["method"] in ("base", "plain")}
    if set(by_method) != {"base", "plain"}:
        return None, None
    forgetting = compare(by_method["plain"], by_method["base"], "forgetting_avg")[0]
    kl = by_method["plain"].metric("kl_to_base")[0]
    return abs(forgetting) / 3, abs(kl) / 3


def cell_card(eval_paths: list[Path]) -> dict:
    """One cell over its seeds, for results/{model}/{cell}/eval.json."""
    cells = read_cells(eval_paths)
    if len(cells) != 1:
        raise DataError(f"expected the seeds of one cell, got {[c.label for c in cells]}")
    cell = cells[0]
    metrics, intervals = {}, {}
    for name in ITEM_METRICS + SEED_METRICS:
        metrics[name], low, high = cell.metric(name)
        intervals[name] = [low, high]
    return {
        "cell": cell.info,
        "seeds": cell.seeds,
        "metrics": metrics,
        "interval": intervals,
        "confidence": CONFIDENCE,
        "base": cell.records[0].get("base"),
        "per_seed": [
            {"seed": seed, "eval": record["eval_path"], "metrics": record["metrics"]}
            for seed, record in zip(cell.seeds, cell.records, strict=True)
        ],
    }


def write_csv(table: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    log.info("%d rows -> %s", len(table), path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cell = commands.add_parser("cell", help="one cell's eval.json over its seeds")
    cell.add_argument("--evals", nargs="+", required=True, type=Path)
    cell.add_argument("--out", required=True, type=Path)
    table = commands.add_parser("table", help="summary, differences and verdict tables")
    table.add_argument("--evals", nargs="+", required=True, type=Path)
    table.add_argument("--out", required=True, type=Path)
    table.add_argument("--differences", type=Path)
    table.add_argument("--verdicts", type=Path)
    table.add_argument("--page", type=Path, help="the results as one Markdown page")
    table.add_argument("--study", default="default", help="the study's name, for the page")
    figures = commands.add_parser("figures", help="write PNG figures from summary.csv")
    figures.add_argument("--summary", required=True, type=Path)
    figures.add_argument("--differences", type=Path, help="differences.csv (paired)")
    figures.add_argument(
        "--curves", nargs="*", default=[], type=Path, help="fine-tuned model folders"
    )
    figures.add_argument("--out-dir", required=True, type=Path)
    figures.add_argument("--model", help="only this model's figures")
    args = parser.parse_args(argv)
    if args.command == "cell":
        write_json(args.out, cell_card(args.evals))
    elif args.command == "table":
        cells = read_cells(args.evals)
        write_csv(sort_rows(pd.DataFrame([summary_row(c) for c in cells])), args.out)
        summary = sort_rows(pd.DataFrame([summary_row(c) for c in cells]))
        differences, verdicts = build_differences(cells), build_verdicts(cells)
        if args.differences:
            write_csv(differences, args.differences)
        if args.verdicts:
            write_csv(verdicts, args.verdicts)
            for row in verdicts.itertuples():
                log.info("%s: %s (%s)", row.verdict, row.claim, row.comparison)
        if args.page:
            with atomic_path(args.page) as tmp:
                tmp.write_text(results_page(args.study, summary, differences, verdicts))
    else:
        summary = pd.read_csv(args.summary)
        differences = pd.read_csv(args.differences) if args.differences else None
        written = write_figures(
            summary,
            args.out_dir,
            args.model,
            differences=differences,
            curves=read_curves(args.curves, summary),
        )
        log.info("wrote %s", ", ".join(str(path) for path in written))


if __name__ == "__main__":
    run_stage(main)
