"""The study's table and figures: one row per grid cell in summary.csv, and plots of the
target metric and the forgetting average against temperature, against ratio, of the
context-free trade-off (target gain against retained average and against KL to base), and
the same trade-off for every method side by side.

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
FIGURES = ("vs_temperature", "vs_ratio", "tradeoff", "methods")
METHOD_ORDER = [
    "base",
    "plain",
    "context_free",
    "contextual",
    "replay",
    "lora",
    "l2",
    "wiseft",
    "weighted_synthetic",
    "kl_to_base",
]
KNOBS = ("temperature", "ratio", "rank", "lambda", "alpha")
KNOB_LABELS = {"temperature": "T", "ratio": "r", "rank": "rank", "lambda": "λ", "alpha": "α"}


def cell_label(cell: dict) -> str:
    """'context_free T1 r0.5', 'l2 λ1e+06', 'base'."""
    knobs = [
        f"{KNOB_LABELS[knob]}{cell[knob]:g}"
        for knob in KNOBS
        if cell.get(knob) is not None and not (cell["method"] == "plain" and knob == "ratio")
    ]
    return " ".join([cell.get("method") or "?"] + knobs)


def row_for(eval_path: Path) -> dict:
    record = read_json(eval_path)
    cell, metrics = record.get("cell", {}), record["metrics"]
    row = {
        "model": cell.get("model"),
        "method": cell.get("method"),
        "label": cell_label(cell),
        **{knob: cell.get(knob) for knob in KNOBS},
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
    order = {method: position for position, method in enumerate(METHOD_ORDER)}
    table["_order"] = table["method"].map(order).fillna(len(order))
    table = table.sort_values(["model", "_order", *KNOBS], na_position="first")
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


def _tradeoff_figure(group: pd.DataFrame, title: str, methods: list[str] | None = None):
    """Target gain over base against the forgetting average and against KL to base, one
    marker per method and a label per knob value."""
    import matplotlib.pyplot as plt

    base = group[group["method"] == "base"]
    base_target = base["target"].iloc[0] if not base.empty else 0.0
    if methods is not None:
        group = group[group["method"].isin(methods)]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    markers = dict(zip(METHOD_ORDER, "*sopDv^<>P", strict=True))
    for method in [m for m in METHOD_ORDER if m in set(group["method"])]:
        rows = group[group["method"] == method]
        gain = rows["target"] - base_target
        for axis, x in ((axes[0], rows["forgetting_avg"]), (axes[1], rows["kl_to_base"])):
            axis.scatter(x, gain, marker=markers.get(method, "x"), s=70, label=method)
            for xi, yi, text in zip(x, gain, rows["label"], strict=True):
                if text != method:
                    knobs = text.removeprefix(method + " ")
                    axis.annotate(
                        knobs, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points"
                    )
    axes[0].set_xlabel("forgetting-task average (higher = less forgetting)")
    axes[1].set_xlabel("KL(base || model) per token (lower = closer to base)")
    for axis in axes:
        axis.set_ylabel("target gain over base")
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
