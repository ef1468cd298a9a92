"""The study's table and figures: one row per grid cell in summary.csv, and plots of the
target metric and the forgetting average against temperature, against ratio, and of the
trade-off (target gain against retained average and against KL to base).

    python -m cfs.report table --evals results/*/...eval.json --out results/summary.csv
    python -m cfs.report figures --summary results/summary.csv --out-dir results/figures
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from cfs.artifacts import DataError, atomic_path, read_json
from cfs.cli import run_stage

log = logging.getLogger("cfs.report")
FIGURES = ("vs_temperature", "vs_ratio", "tradeoff")


def row_for(eval_path: Path) -> dict:
    record = read_json(eval_path)
    cell, metrics = record.get("cell", {}), record["metrics"]
    row = {
        "model": cell.get("model"),
        "method": cell.get("method"),
        "temperature": cell.get("temperature"),
        "ratio": cell.get("ratio"),
        "target": metrics["target"],
        "forgetting_avg": metrics["forgetting_avg"],
        "kl_to_base": metrics.get("kl_to_base"),
        "heldout_nll": metrics.get("heldout_nll"),
    }
    row.update({f"forgetting:{task}": value for task, value in metrics["forgetting"].items()})
    base = record.get("base")
    if base:
        row["base_target"] = base["target"]
        row["base_forgetting_avg"] = base["forgetting_avg"]
    row["seed"] = record.get("provenance", {}).get("seed")
    row["eval_path"] = str(eval_path)
    return row


def build_summary(eval_paths: list[Path]) -> pd.DataFrame:
    table = pd.DataFrame([row_for(path) for path in eval_paths])
    order = {"base": 0, "plain": 1, "context_free": 2}
    table["_order"] = table["method"].map(order).fillna(9)
    table = table.sort_values(["model", "_order", "temperature", "ratio"], na_position="first")
    return table.drop(columns="_order").reset_index(drop=True)


def _reference_lines(axis, group: pd.DataFrame, column: str) -> None:
    """Base and plain fine-tuning as horizontal lines."""
    for method, style in (("base", ":"), ("plain", "--")):
        rows = group[group["method"] == method]
        if not rows.empty:
            axis.axhline(rows[column].iloc[0], color="grey", linestyle=style, label=method)


def _sweep_figure(group: pd.DataFrame, x: str, series: str, title: str):
    import matplotlib.pyplot as plt

    context_free = group[group["method"] == "context_free"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, column, label in (
        (axes[0], "target", "target metric"),
        (axes[1], "forgetting_avg", "forgetting-task average"),
    ):
        for value, line in context_free.groupby(series):
            line = line.sort_values(x)
            axis.plot(line[x], line[column], marker="o", label=f"{series} {value:g}")
        _reference_lines(axis, group, column)
        axis.set_xlabel(x)
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _tradeoff_figure(group: pd.DataFrame, title: str):
    import matplotlib.pyplot as plt

    base = group[group["method"] == "base"]
    base_target = base["target"].iloc[0] if not base.empty else 0.0
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    markers = {"base": "*", "plain": "s", "context_free": "o"}
    for method, rows in group.groupby("method"):
        labels = [
            f"T{t:g} r{r:g}" if method == "context_free" else method
            for t, r in zip(rows["temperature"], rows["ratio"], strict=True)
        ]
        gain = rows["target"] - base_target
        for axis, x in ((axes[0], rows["forgetting_avg"]), (axes[1], rows["kl_to_base"])):
            axis.scatter(x, gain, marker=markers.get(method, "x"), s=60, label=method)
            for xi, yi, text in zip(x, gain, labels, strict=True):
                axis.annotate(text, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set_xlabel("forgetting-task average (higher = less forgetting)")
    axes[1].set_xlabel("KL(base || model) per token (lower = closer to base)")
    for axis in axes:
        axis.set_ylabel("target gain over base")
        axis.legend(fontsize=8)
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
            "tradeoff": _tradeoff_figure(group, f"{model}: target gain against forgetting"),
        }
        for name, figure in figures.items():
            path = out_dir / f"{model}_{name}.png"
            with atomic_path(path) as tmp:
                figure.savefig(tmp, dpi=120, format="png")
            plt.close(figure)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    table = commands.add_parser("table", help="write summary.csv from eval.json files")
    table.add_argument("--evals", nargs="+", required=True, type=Path)
    table.add_argument("--out", required=True, type=Path)
    figures = commands.add_parser("figures", help="write PNG figures from summary.csv")
    figures.add_argument("--summary", required=True, type=Path)
    figures.add_argument("--out-dir", required=True, type=Path)
    figures.add_argument("--model", help="only this model's figures")
    args = parser.parse_args(argv)
    if args.command == "table":
        summary = build_summary(args.evals)
        with atomic_path(args.out) as tmp:
            summary.to_csv(tmp, index=False)
        log.info("%d rows -> %s", len(summary), args.out)
    else:
        written = write_figures(pd.read_csv(args.summary), args.out_dir, args.model)
        log.info("wrote %s", ", ".join(str(path) for path in written))


if __name__ == "__main__":
    run_stage(main)
