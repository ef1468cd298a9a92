"""The study's figures, per model, from the tables cfs.report writes and the fine-tunes'
forgetting curves (cfs.curves); every error bar and band is a 95% interval.

- vs_temperature, vs_ratio: target and forgetting average of context-free data against the
  generation temperature and the data ratio (plain fine-tuning is ratio 0);
- tradeoff, methods: target gain against forgetting and against KL to base (context-free
  data; every method);
- differences: each cell minus plain fine-tuning and minus base on the forgetting average,
  KL to base and the target, with the paired intervals the verdicts use, and a line at 0;
- curves: KL to base and held-out NLL against the optimizer step, one line per cell, the
  band over seeds;
- target_vs_kl: the held-out target loss against KL to base along training;
- frontier: each method's path from the base model (cfs.frontier: its points along
  training, WiSE-FT's alphas), the forgetting average's change and KL to base against the
  target gain, in points, with the intervals over seeds and items at each point.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from cfs.artifacts import atomic_path
from cfs.errors import DataError
from cfs.statistics import CONFIDENCE
from cfs.study import report_order

# The figures of each model (the Snakemake rule lists them; write_figures draws them).
FIGURES = (
    "vs_temperature",
    "vs_ratio",
    "tradeoff",
    "methods",
    "differences",
    "curves",
    "target_vs_kl",
    "frontier",
)
# A marker per method, in the report's order (repeating past the last).
MARKERS = "*sopDv^<>PXhd"


def markers() -> dict[str, str]:
    order = report_order()
    return {name: MARKERS[index % len(MARKERS)] for index, name in enumerate(order)}


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
    scores = [f"{m}{s}" for m in ("target", "forgetting_avg") for s in ("", "_low", "_high")]
    group = group.assign(**{column: group[column] * 100 for column in scores})  # points
    base_target *= 100
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    marker = markers()
    for method in [m for m in report_order() if m in set(group["method"])]:
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
                marker=marker[method],
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
    axes[0].set_xlabel("forgetting-task average, points (higher = less forgetting)")
    axes[1].set_xlabel("KL(base || model) per token (lower = closer to base)")
    for axis in axes:
        axis.set_ylabel(f"target gain over base, points ({CONFIDENCE:.0%} interval)")
        axis.axhline(0.0, color="grey", linewidth=0.5)
        axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _forest_figure(differences: pd.DataFrame, title: str):
    """Each cell minus plain fine-tuning (and minus base): a row per cell, a panel per
    metric, the paired 95% interval of each difference."""
    import matplotlib.pyplot as plt

    metrics = [  # scores in points, as the tables give them
        ("forgetting_avg", "forgetting average (points)", 100),
        ("kl_to_base", "KL(base || model) per token", 1),
        ("target", "target metric (points)", 100),
    ]
    labels = list(dict.fromkeys(differences["label"]))
    figure, axes = plt.subplots(
        1, len(metrics), figsize=(13, 1.2 + 0.35 * max(len(labels), 2)), sharey=True
    )
    for axis, (metric, name, scale) in zip(axes, metrics, strict=True):
        for offset, versus, color in ((-0.15, "plain", "C0"), (0.15, "base", "C1")):
            rows = differences[
                (differences["metric"] == metric) & (differences["versus"] == versus)
            ]
            rows = rows.set_index("label").reindex(labels).dropna(subset=["difference"])
            rows = rows[["difference", "low", "high"]] * scale
            y = [labels.index(label) + offset for label in rows.index]
            error = [
                (rows["difference"] - rows["low"]).clip(lower=0).fillna(0),
                (rows["high"] - rows["difference"]).clip(lower=0).fillna(0),
            ]
            axis.errorbar(
                rows["difference"],
                y,
                xerr=error,
                fmt="o",
                color=color,
                capsize=2,
                label=f"minus {versus}",
            )
        axis.axvline(0.0, color="grey", linewidth=0.8)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel(f"difference ({CONFIDENCE:.0%} paired interval)")
        axis.legend(fontsize=7)
    axes[0].set_yticks(range(len(labels)))
    axes[0].set_yticklabels(labels, fontsize=8)
    axes[0].invert_yaxis()
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _band(values: pd.DataFrame) -> pd.DataFrame:
    """Per step: the mean over seeds and its Student t 95% interval (none with one seed)."""
    rows = []
    for step, group in values.groupby("step"):
        mean, count = group["value"].mean(), len(group)
        half = (
            stats.t.ppf(0.5 + CONFIDENCE / 2, count - 1)
            * group["value"].std(ddof=1)
            / np.sqrt(count)
            if count > 1
            else 0.0
        )
        rows.append({"step": step, "mean": mean, "low": mean - half, "high": mean + half})
    return pd.DataFrame(rows)


def _curves_figure(curves: pd.DataFrame, title: str):
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for axis, column, name in (
        (axes[0], "kl_to_base", "KL(base || model) per token"),
        (axes[1], "heldout_nll", "NLL of held-out context-free samples"),
    ):
        for label, cell in curves.groupby("label", sort=False):
            band = _band(cell.rename(columns={column: "value"}))
            (line,) = axis.plot(band["step"], band["mean"], label=label)
            axis.fill_between(
                band["step"], band["low"], band["high"], alpha=0.2, color=line.get_color()
            )
        axis.set_xlabel("optimizer step")
        axis.set_title(name, fontsize=10)
        axis.set_ylabel(f"mean over seeds, {CONFIDENCE:.0%} band")
        axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _target_vs_kl_figure(curves: pd.DataFrame, title: str):
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for label, cell in curves.groupby("label", sort=False):
        mean = cell.groupby("step")[["kl_to_base", "target_loss"]].mean()
        axis.plot(mean["kl_to_base"], mean["target_loss"], marker=".", label=label)
    axis.set_xlabel("KL(base || model) per token (mean over seeds)")
    axis.set_ylabel("held-out target loss (mean over seeds)")
    axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def read_curves(paths: list[Path], summary: pd.DataFrame) -> pd.DataFrame:
    """The curves.csv of each fine-tune (given as its model folder or the file), labelled
    with its cell from summary.csv (matched on the cell's folder)."""
    frames = []
    labels = {}
    for row in summary.itertuples():
        for eval_path in str(row.eval_paths).split():
            labels[str(Path(eval_path).parent)] = (row.model, row.label)
    for path in paths:
        path = Path(path)
        table = path / "curves.csv" if path.is_dir() else path
        if not table.is_file():
            continue
        seed_folder = str(table.parent.parent)
        if seed_folder not in labels:
            continue
        model, label = labels[seed_folder]
        frames.append(pd.read_csv(table).assign(model=model, label=label, seed=seed_folder))
    columns = ["step", "kl_to_base", "heldout_nll", "target_loss", "model", "label", "seed"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _frontier_figure(frontier: pd.DataFrame, title: str):
    """Per path: forgetting change and KL to base against the target gain, in points."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = {}
    gain = frontier["target_change"] * 100
    gain_err = [
        (gain - frontier["target_change_low"] * 100).clip(lower=0),
        (frontier["target_change_high"] * 100 - gain).clip(lower=0),
    ]
    for axis, column, scale, name in (
        (axes[0], "forgetting_avg_change", 100, "forgetting average change (points)"),
        (axes[1], "kl_to_base", 1, "KL(base || model) per token"),
    ):
        for path, rows in frontier.groupby("path", sort=False):
            family = rows["family"].iloc[0]
            index = rows.index
            value = rows[column] * scale
            colour = colours.setdefault(family, f"C{len(colours) % 10}")
            axis.errorbar(
                gain[index],
                value,
                xerr=[gain_err[0][index], gain_err[1][index]],
                yerr=[
                    (value - rows[f"{column}_low"] * scale).clip(lower=0),
                    (rows[f"{column}_high"] * scale - value).clip(lower=0),
                ],
                marker="o",
                markersize=4,
                capsize=2,
                color=colour,
                linestyle="--" if " lr" in path else "-",  # another learning rate
                label=path,
            )
        axis.set_xlabel("target gain over base (points)")
        axis.set_ylabel(f"{name}, {CONFIDENCE:.0%} intervals")
        axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _empty_figure(title: str, text: str):
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 2))
    axis.axis("off")
    axis.text(0.5, 0.5, text, ha="center", va="center")
    figure.suptitle(title)
    return figure


def write_figures(
    summary: pd.DataFrame,
    out_dir: Path,
    model: str | None = None,
    differences: pd.DataFrame | None = None,
    curves: pd.DataFrame | None = None,
    frontier: pd.DataFrame | None = None,
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if model is not None:
        if model not in set(summary["model"]):
            raise DataError(f"summary has no rows for model '{model}'")
        summary = summary[summary["model"] == model]
    for model, group in summary.groupby("model"):
        own_differences = (
            differences[differences["model"] == model] if differences is not None else None
        )
        own_curves = curves[curves["model"] == model] if curves is not None else pd.DataFrame()
        no_curves = "no forgetting curves (train.curve_every: 0)"
        own_frontier = (
            frontier[frontier["model"] == model] if frontier is not None else pd.DataFrame()
        )
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
            "differences": (
                _forest_figure(own_differences, f"{model}: each cell minus plain and minus base")
                if own_differences is not None and not own_differences.empty
                else _empty_figure(model, "no paired differences")
            ),
            "curves": (
                _curves_figure(own_curves, f"{model}: distance from base along training")
                if not own_curves.empty
                else _empty_figure(model, no_curves)
            ),
            "target_vs_kl": (
                _target_vs_kl_figure(own_curves, f"{model}: target loss against KL along training")
                if not own_curves.empty
                else _empty_figure(model, no_curves)
            ),
            "frontier": (
                _frontier_figure(own_frontier, f"{model}: each method's path from base")
                if not own_frontier.empty
                else _empty_figure(model, "no frontier (no base model evaluation)")
            ),
        }
        assert set(figures) == set(FIGURES)
        for name, figure in figures.items():
            path = out_dir / f"{model}_{name}.png"
            with atomic_path(path) as tmp:
                figure.savefig(tmp, dpi=120, format="png")
            plt.close(figure)
            written.append(path)
    return written
