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
from cfs.statistics import (
    CONFIDENCE,
    paired_difference,
    paired_seed_difference,
    seed_interval,
    two_level_bootstrap,
)
from cfs.study import FIGURES, KNOB_LABELS, REPORT_ORDER

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
    row["eval_paths"] = " ".join(record["eval_path"] for record in cell.records)
    return row


def sort_rows(table: pd.DataFrame) -> pd.DataFrame:
    order = {method: position for position, method in enumerate(REPORT_ORDER)}
    table = table.assign(_order=table["method"].map(order).fillna(len(order)))
    table = table.sort_values(["model", "_order", *KNOBS], na_position="first")
    return table.drop(columns="_order").reset_index(drop=True)


def build_summary(eval_paths: list[Path]) -> pd.DataFrame:
    return sort_rows(pd.DataFrame([summary_row(cell) for cell in read_cells(eval_paths)]))


def compare(a: Cell, b: Cell, metric: str) -> tuple[float, float, float]:
    return paired_difference(a.items(), b.items(), a.task_names(metric))


def compare_per_seed(a: Cell, b: Cell, metric: str) -> tuple[float, float, float]:
    values = [[record["metrics"].get(metric) for record in cell.records] for cell in (a, b)]
    return paired_seed_difference(*values)


def build_differences(cells: list[Cell]) -> pd.DataFrame:
    """Each cell minus plain fine-tuning and minus base, per model and item metric."""
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
                for metric in ITEM_METRICS:
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


CLAIMS = {
    "forgets_less": "context-free data forgets less than plain fine-tuning",
    "contextual_less_effective": "contextual synthetic data keeps less than context-free data",
    "replay_less_effective": "pretraining replay keeps less than context-free data",
    "temperature_matters": "the generation temperature changes what context-free data keeps",
    "ratio_matters": "the data ratio changes what context-free data keeps",
}


def _verdict(low: float, high: float, directional: bool) -> str:
    if low > 0:
        return "supported"
    if high < 0:
        return "contradicted" if directional else "supported"
    return "inconclusive"


def claim_comparisons(cells: list[Cell]):
    """(claim, better, worse) pairs: `better` is expected to keep more (forgetting avg)."""
    by_method = defaultdict(list)
    for cell in cells:
        by_method[cell.info["method"]].append(cell)
    context_free = by_method["context_free"]
    for plain in by_method["plain"]:
        for cell in context_free:
            yield "forgets_less", cell, plain
    for contextual in by_method["contextual"]:
        for cell in context_free:
            same = (cell.info["temperature"], cell.info["ratio"])
            if same == (contextual.info["temperature"], contextual.info["ratio"]):
                yield "contextual_less_effective", cell, contextual
    for replay in by_method["replay"]:
        for cell in context_free:
            if cell.info["ratio"] == replay.info["ratio"]:
                yield "replay_less_effective", cell, replay
    for knob, other, claim in (
        ("temperature", "ratio", "temperature_matters"),
        ("ratio", "temperature", "ratio_matters"),
    ):
        lines = defaultdict(list)
        for cell in context_free:
            lines[cell.info[other]].append(cell)
        for line in lines.values():
            if len(line) > 1:
                line.sort(key=lambda c: c.info[knob])
                yield claim, line[-1], line[0]


def build_verdicts(cells: list[Cell]) -> pd.DataFrame:
    """The paper's claims, one row per comparison, on the forgetting average (higher keeps
    more) with the target's and KL to base's changes beside it: a score can rise because the
    model sharpens, and KL to base tells whether the model also stayed near base."""
    rows = []
    for model in sorted({c.info.get("model") for c in cells}):
        own = [c for c in cells if c.info.get("model") == model and c.has_items()]
        for claim, better, worse in claim_comparisons(own):
            difference, low, high = compare(better, worse, "forgetting_avg")
            target, target_low, target_high = compare(better, worse, "target")
            kl, kl_low, kl_high = compare_per_seed(better, worse, "kl_to_base")
            directional = claim not in ("temperature_matters", "ratio_matters")
            rows.append(
                {
                    "model": model,
                    "claim": CLAIMS[claim],
                    "comparison": f"{better.label} - {worse.label}",
                    "forgetting_avg_difference": difference,
                    "low": low,
                    "high": high,
                    "verdict": _verdict(low, high, directional),
                    "target_difference": target,
                    "target_low": target_low,
                    "target_high": target_high,
                    "kl_to_base_difference": kl,
                    "kl_low": kl_low,
                    "kl_high": kl_high,
                    "num_seeds": len(better.records),
                }
            )
    columns = ["model", "claim", "comparison", "forgetting_avg_difference", "low", "high"]
    columns += ["verdict", "target_difference", "target_low", "target_high"]
    columns += ["kl_to_base_difference", "kl_low", "kl_high", "num_seeds"]
    return pd.DataFrame(rows, columns=columns)


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


def _errorbar(axis, x, rows: pd.DataFrame, column: str, **style) -> None:
    """Points with 95% intervals; joined by a line only when there are several x values."""
    low = (rows[column] - rows[f"{column}_low"]).clip(lower=0).fillna(0)
    high = (rows[f"{column}_high"] - rows[column]).clip(lower=0).fillna(0)
    linestyle = "-" if len(rows) > 1 else "none"
    axis.errorbar(x, rows[column], yerr=[low, high], capsize=3, linestyle=linestyle, **style)


def _sweep_figure(group: pd.DataFrame, x: str, series: str, title: str):
    """Context-free cells against `x`, one curve per value of `series`. Against the ratio,
    plain fine-tuning (ratio 0) opens every curve; against the temperature it is a band."""
    import matplotlib.pyplot as plt

    context_free = group[group["method"] == "context_free"]
    plain = group[group["method"] == "plain"]
    base = group[group["method"] == "base"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, column, label in (
        (axes[0], "target", "target metric"),
        (axes[1], "forgetting_avg", "forgetting-task average"),
    ):
        for value, line in context_free.groupby(series):
            if x == "ratio" and not plain.empty:
                line = pd.concat([plain.assign(ratio=0.0), line])
            line = line.sort_values(x)
            _errorbar(axis, line[x], line, column, marker="o", label=f"{series} {value:g}")
        if not plain.empty and (x != "ratio" or context_free.empty):
            row = plain.iloc[0]
            axis.axhline(row[column], color="grey", linestyle="--", label="plain (ratio 0)")
            axis.axhspan(row[f"{column}_low"], row[f"{column}_high"], color="grey", alpha=0.15)
        if not base.empty:
            axis.axhline(base[column].iloc[0], color="grey", linestyle=":", label="base")
        axis.set_xlabel(x)
        axis.set_ylabel(f"{label} ({CONFIDENCE:.0%} interval)")
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _tradeoff_figure(group: pd.DataFrame, title: str, methods: list[str] | None = None):
    """Target gain over base against the forgetting average and against KL to base, one
    marker per method, a label per knob value, and 95% intervals on both axes."""
    import matplotlib.pyplot as plt

    base = group[group["method"] == "base"]
    base_target = base["target"].iloc[0] if not base.empty else 0.0
    if methods is not None:
        group = group[group["method"].isin(methods)]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    markers = dict(zip(REPORT_ORDER, "*sopDv^<>P", strict=True))
    for method in [m for m in REPORT_ORDER if m in set(group["method"])]:
        rows = group[group["method"] == method]
        gain = rows.assign(
            target=rows["target"] - base_target,
            target_low=rows["target_low"] - base_target,
            target_high=rows["target_high"] - base_target,
        )
        for axis, x in ((axes[0], "forgetting_avg"), (axes[1], "kl_to_base")):
            xerr = [
                (rows[x] - rows[f"{x}_low"]).clip(lower=0).fillna(0),
                (rows[f"{x}_high"] - rows[x]).clip(lower=0).fillna(0),
            ]
            yerr = [
                (gain["target"] - gain["target_low"]).clip(lower=0).fillna(0),
                (gain["target_high"] - gain["target"]).clip(lower=0).fillna(0),
            ]
            axis.errorbar(
                rows[x],
                gain["target"],
                xerr=xerr,
                yerr=yerr,
                marker=markers.get(method, "x"),
                markersize=8,
                linestyle="none",
                capsize=2,
                label=method,
            )
            for xi, yi, text in zip(rows[x], gain["target"], rows["label"], strict=True):
                if text != method:
                    knobs = text.removeprefix(method + " ")
                    axis.annotate(
                        knobs, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points"
                    )
    axes[0].set_xlabel("forgetting-task average (higher = less forgetting)")
    axes[1].set_xlabel("KL(base || model) per token (lower = closer to base)")
    for axis in axes:
        axis.set_ylabel(f"target gain over base ({CONFIDENCE:.0%} interval)")
        axis.axhline(0.0, color="grey", linewidth=0.5)
        axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def write_figures(summary: pd.DataFrame, out_dir: Path, model: str | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if model is not None:
        if model not in set(summary["model"]):
            raise DataError(f"summary has no rows for model '{model}'")
        summary = summary[summary["model"] == model]
    for model, group in summary.groupby("model"):
        figures = {
            "vs_temperature": _sweep_figure(
                group, "temperature", "ratio", f"{model}: against generation temperature"
            ),
            "vs_ratio": _sweep_figure(
                group, "ratio", "temperature", f"{model}: against data ratio"
            ),
            "tradeoff": _tradeoff_figure(
                group,
                f"{model}: context-free target gain against forgetting",
                ["base", "plain", "context_free"],
            ),
            "methods": _tradeoff_figure(group, f"{model}: every method, gain against forgetting"),
        }
        assert set(figures) == set(FIGURES)
        for name, figure in figures.items():
            path = out_dir / f"{model}_{name}.png"
            with atomic_path(path) as tmp:
                figure.savefig(tmp, dpi=120, format="png")
            plt.close(figure)
            written.append(path)
    return written


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
    figures = commands.add_parser("figures", help="write PNG figures from summary.csv")
    figures.add_argument("--summary", required=True, type=Path)
    figures.add_argument("--out-dir", required=True, type=Path)
    figures.add_argument("--model", help="only this model's figures")
    args = parser.parse_args(argv)
    if args.command == "cell":
        write_json(args.out, cell_card(args.evals))
    elif args.command == "table":
        cells = read_cells(args.evals)
        write_csv(sort_rows(pd.DataFrame([summary_row(c) for c in cells])), args.out)
        if args.differences:
            write_csv(build_differences(cells), args.differences)
        if args.verdicts:
            verdicts = build_verdicts(cells)
            write_csv(verdicts, args.verdicts)
            for row in verdicts.itertuples():
                log.info("%s: %s (%s)", row.verdict, row.claim, row.comparison)
    else:
        written = write_figures(pd.read_csv(args.summary), args.out_dir, args.model)
        log.info("wrote %s", ", ".join(str(path) for path in written))


if __name__ == "__main__":
    run_stage(main)
