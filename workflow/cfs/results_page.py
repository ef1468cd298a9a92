"""The study's results on one Markdown page (results/studies/<name>/results.md): when and
where it ran, each cell's numbers with their 95% intervals, the paired differences from
plain fine-tuning, the verdicts and the figures.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import pandas as pd

from cfs.figures import FIGURES
from cfs.statistics import CONFIDENCE

PERCENT = ("target", "forgetting_avg")


def interval(row, column: str, scale: float) -> str:
    value, low, high = (row[column], row[f"{column}_low"], row[f"{column}_high"])
    if pd.isna(low) or pd.isna(high):
        return f"{value * scale:.3g}"
    return f"{value * scale:.3g} [{low * scale:.3g}, {high * scale:.3g}]"


def signed(value: float, low: float, high: float, scale: float) -> str:
    return f"{value * scale:+.2f} [{low * scale:+.2f}, {high * scale:+.2f}]"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def cpu_name() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores"


def precisions(summary: pd.DataFrame) -> list[str]:
    """What the fine-tunes and the evaluations computed in, as the evals recorded it."""
    lines = []
    for column, what in (
        ("training_precision", "Fine-tuned in"),
        ("evaluation_precision", "Evaluated in"),
    ):
        if column in summary:
            values = sorted({v for v in summary[column].dropna() for v in v.split(" / ")})
            if values:
                lines.append(f"{what}: {', '.join(values)}.")
    return [" ".join(lines), ""] if lines else []


def per_task(summary: pd.DataFrame) -> list[str]:
    """Each cell's mean of each forgetting task: the configured metric, then lm-eval's acc
    and acc_norm where the task reports them (percent, means over seeds)."""
    tasks = [c.partition(":")[2] for c in summary.columns if c.startswith("forgetting:")]
    if not tasks:
        return []
    lines = ["", "## Each forgetting task (configured metric / acc / acc_norm)", ""]
    rows = []
    for row in summary.to_dict("records"):  # itertuples would rename "acc:<task>"
        cells = [row["model"], row["label"]]
        for task in tasks:
            values = [row.get(f"{name}:{task}") for name in ("forgetting", "acc", "acc_norm")]
            cells.append(" / ".join("" if pd.isna(v) else f"{100 * v:.1f}" for v in values))
        rows.append(cells)
    return lines + markdown_table(["model", "cell", *tasks], rows)


def frontier_points(frontier: pd.DataFrame | None) -> list[str]:
    """Each method's path (cfs.frontier), point by point: change from base."""
    if frontier is None or frontier.empty:
        return []
    lines = ["", "## Frontiers: each method's path from the base model", ""]
    lines.append(
        "Position: the share of the fine-tune's steps (WiSE-FT: alpha). Changes from the "
        "base model in points; KL to base in nats per token."
    )
    lines.append("")
    rows = [
        [
            row["model"],
            row["path"],
            f"{row['position']:g}",
            signed(row["target_change"], row["target_change_low"], row["target_change_high"], 100),
            signed(
                row["forgetting_avg_change"],
                row["forgetting_avg_change_low"],
                row["forgetting_avg_change_high"],
                100,
            ),
            signed(row["kl_to_base"], row["kl_to_base_low"], row["kl_to_base_high"], 1),
        ]
        for row in frontier.to_dict("records")
        if row["position"] > 0
    ]
    header = ["model", "path", "position", "target gain", "forgetting avg change", "KL to base"]
    return lines + markdown_table(header, rows)


def results_page(
    name: str,
    summary: pd.DataFrame,
    differences: pd.DataFrame,
    verdicts: pd.DataFrame,
    left_out: pd.DataFrame | None = None,
    frontier: pd.DataFrame | None = None,
) -> str:
    level = f"{CONFIDENCE:.0%}"
    lines = [
        f"# Study `{name}`: results",
        "",
        f"Written {datetime.date.today().isoformat()} on {machine()}. Target and forgetting "
        f"average in percent; every interval is {level}, seeds paired by id (seed and "
        "test-item variance components; KL to base: Student t over seeds); the primary "
        "claim is tested at 5%, the other verdicts Holm-corrected.",
        "",
        *precisions(summary),
        "## Each cell",
        "",
    ]
    rows = []
    for row in summary.itertuples(index=False):
        row = row._asdict()
        rows.append(
            [
                row["model"],
                row["label"],
                row["num_seeds"],
                interval(row, "target", 100),
                interval(row, "forgetting_avg", 100),
                interval(row, "kl_to_base", 1),
                "" if pd.isna(row.get("effective_lambda")) else f"{row['effective_lambda']:.2f}",
            ]
        )
    header = ["model", "cell", "seeds", "target", "forgetting avg", "KL to base", "eff. λ"]
    lines += markdown_table(header, rows)
    lines += [
        "",
        "## Each cell minus plain fine-tuning (paired, at the end of training)",
        "",
        "Each cell at its own target gain: a cell that learned less of the target may also "
        "forget less. The matched comparisons below hold the target gain fixed.",
        "",
    ]
    rows = []
    against_plain = differences[differences["versus"] == "plain"]
    for (model, label), group in against_plain.groupby(["model", "label"], sort=False):
        by_metric = group.set_index("metric")
        cells = [model, label]
        for metric, scale in (("target", 100), ("forgetting_avg", 100), ("kl_to_base", 1)):
            item = by_metric.loc[metric]
            cells.append(signed(item["difference"], item["low"], item["high"], scale))
        rows.append(cells)
    lines += markdown_table(["model", "cell", "target", "forgetting avg", "KL to base"], rows)
    lines += ["", "## Verdicts", ""]
    rows = [
        [
            f"{row.claim} (primary)" if row.primary else row.claim,
            row.comparison,
            f"{row.verdict} ({signed(row.forgetting_avg_difference, row.low, row.high, 100)})",
            f"{row.kl_verdict} ({signed(row.kl_to_base_difference, row.kl_low, row.kl_high, 1)})",
        ]
        for row in verdicts.itertuples()
    ]
    lines += markdown_table(["claim", "comparison", "on forgetting avg", "on KL to base"], rows)
    lines += frontier_points(frontier)
    lines += per_task(summary)
    if left_out is not None and not left_out.empty:
        lines += ["", "## The primary claim without each forgetting task", ""]
        rows = [
            [
                row.comparison,
                row.left_out,
                f"{row.verdict} ({signed(row.difference, row.low, row.high, 100)})",
            ]
            for row in left_out.itertuples()
        ]
        lines += markdown_table(["comparison", "left out", "forgetting avg of the rest"], rows)
    lines += ["", "## Figures", ""]
    for model in summary["model"].unique():
        lines += [f"![{model} {figure}](figures/{model}_{figure}.png)" for figure in FIGURES]
    return "\n".join(lines) + "\n"
