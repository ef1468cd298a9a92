"""The study's tables, verdicts and figures, with their uncertainty.

- `cell`: one cell's eval.json over its seeds (means, 95% intervals, every seed's metrics).
- `table`: summary.csv (each cell's mean over seeds and 95% interval, cfs.statistics),
  differences.csv (each cell minus plain fine-tuning and minus base, paired intervals, also
  per forgetting task) and verdicts.csv (the paper's claims, answered by those intervals:
  the primary claim at 0.05, the rest Holm-corrected).
- `figures`: target and forgetting average against temperature and against ratio (plain
  fine-tuning is ratio 0, the first point of each ratio curve), and the trade-off of target
  gain against forgetting and KL, for context-free data and for every method; error bars
  are the 95% intervals.

    python -m cfs.report cell --evals results/m/temp1/ratio1/seed*/eval.json --out .../eval.json
    python -m cfs.report table --evals results/*/.../eval.json --out results/summary.csv \
        --differences results/differences.csv --verdicts results/verdicts.csv \
        --claims '{"primary": {"cell": "temp1/ratio1", "versus": "ratio0"}, ...}'
    python -m cfs.report figures --summary results/summary.csv --out-dir results/figures
"""

from __future__ import annotations

import argparse
import logging
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from cfs.artifacts import atomic_path, read_json, write_json
from cfs.cli import parse_settings, run_as_process
from cfs.errors import DataError
from cfs.figures import read_curves, write_figures
from cfs.frontier import family_of, frontier_table, matched_comparisons
from cfs.results_page import results_page
from cfs.statistics import (
    CONFIDENCE,
    Interval,
    corrected,
    crossed_interval,
    equivalence,
    holm,
    paired_difference,
    paired_seed_difference,
    seed_interval,
)
from cfs.study import (
    KNOB_LABELS,
    KNOB_MEANINGS,
    METHODS,
    PROPOSED,
    parse_cell,
    report_order,
)

log = logging.getLogger("cfs.report")
KNOBS = tuple(KNOB_LABELS)
ACCURACIES = ("acc,none", "acc_norm,none")  # lm-eval's multiple-choice accuracies
ITEM_METRICS = ("target", "forgetting_avg")  # scored per test item: seeds x items
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
        if len(set(self.seeds)) != len(self.seeds):
            raise DataError(f"{self.label}: two evals of one seed among seeds {self.seeds}")

    @property
    def seeds(self) -> list:
        return [record.get("provenance", {}).get("seed") for record in self.records]

    def task_names(self, metric: str) -> list[str]:
        tasks = self.records[0]["tasks"]
        return [tasks["target"]] if metric == "target" else list(tasks["forgetting"])

    def items(self) -> dict:
        """{seed id: {task: {item id: score}}}."""
        return dict(zip(self.seeds, (record["items"] for record in self.records), strict=True))

    def seed_values(self, name: str) -> dict:
        """{seed id: the metric's value}."""
        values = (record["metrics"].get(name) for record in self.records)
        return dict(zip(self.seeds, values, strict=True))

    def has_items(self) -> bool:
        return all("items" in record and "tasks" in record for record in self.records)

    def metric(self, name: str) -> Interval:
        """The mean over seeds (and items) with its interval (cfs.statistics)."""
        if name in ITEM_METRICS and self.has_items():
            tables = [
                [
                    [scores[i] for i in sorted(scores)]
                    for scores in (r["items"][task] for r in self.records)
                ]
                for task in self.task_names(name)
            ]
            return crossed_interval(tables)
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
        interval = cell.metric(name)
        row[name], row[f"{name}_low"], row[f"{name}_high"] = (
            interval.estimate,
            interval.low,
            interval.high,
        )
        row[f"{name}_se"], row[f"{name}_df"] = interval.standard_error, interval.df
    forgetting = [record["metrics"]["forgetting"] for record in cell.records]
    for task in forgetting[0]:
        row[f"forgetting:{task}"] = sum(f[task] for f in forgetting) / len(forgetting)
        # lm-eval's accuracies beside the configured metric, where the task reports them
        for name in ACCURACIES:
            values = [record.get("lm_eval", {}).get(task, {}).get(name) for record in cell.records]
            if all(isinstance(value, int | float) for value in values):
                row[f"{name.partition(',')[0]}:{task}"] = sum(values) / len(values)
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


def compare(a: Cell, b: Cell, metric: str) -> Interval:
    """a - b with its paired interval, seeds paired by id: over seeds and items for the
    scores, over seeds (Student t) for a metric with one number per seed (KL to base).
    `forgetting:<task>` is one forgetting task alone."""
    if metric in SEED_METRICS:
        return paired_seed_difference(a.seed_values(metric), b.seed_values(metric))
    tasks = [metric.partition(":")[2]] if ":" in metric else a.task_names(metric)
    return paired_difference(a.items(), b.items(), tasks)


DIFFERENCE_COLUMNS = [
    "model",
    "method",
    "label",
    "versus",
    "metric",
    "difference",
    "low",
    "high",
    "standard_error",
    "df",
    "p_value",
    "num_seeds",
]


def build_differences(cells: list[Cell]) -> pd.DataFrame:
    """Each cell minus plain fine-tuning and minus base, per model, on the target, the
    forgetting average, each forgetting task (`forgetting:<task>`) and KL to base, with
    paired 95% intervals."""
    rows = []
    for model in sorted({c.info.get("model") for c in cells}):
        own = [c for c in cells if c.info.get("model") == model and c.has_items()]
        references = {
            c.info["method"]: c
            for c in own
            if c.info["method"] in ("base", "plain") and c.info.get("learning_rate") is None
        }
        for cell in own:
            if cell.info["method"] == "base":
                continue
            tasks = [f"forgetting:{task}" for task in cell.task_names("forgetting_avg")]
            for versus, reference in references.items():
                if reference is cell:
                    continue
                for metric in (*ITEM_METRICS, "kl_to_base", *tasks):
                    interval = compare(cell, reference, metric)
                    rows.append(
                        {
                            "model": model,
                            "method": cell.info["method"],
                            "label": cell.label,
                            "versus": versus,
                            "metric": metric,
                            "difference": interval.estimate,
                            "low": interval.low,
                            "high": interval.high,
                            "standard_error": interval.standard_error,
                            "df": interval.df,
                            "p_value": interval.p_value,
                            "num_seeds": len(cell.records),
                        }
                    )
    return pd.DataFrame(rows, columns=DIFFERENCE_COLUMNS)


def sweep_claim(knob: str) -> str:
    """The claim that a knob of context-free data matters, e.g. the temperature."""
    return f"{KNOB_MEANINGS.get(knob, 'the ' + knob)} changes what context-free data keeps"


def verdict(kind: str, low: float, high: float) -> str:
    """A claim's answer from a (multiplicity-corrected) interval of (context-free data -
    the other):
    - keeps_more: supported above 0, contradicted below 0, inconclusive otherwise;
    - matters (a knob): supported when the interval excludes 0, inconclusive otherwise.
    An "approximates" claim is an equivalence test (cfs.statistics.equivalence)."""
    if kind == "keeps_more":
        return "supported" if low > 0 else "contradicted" if high < 0 else "inconclusive"
    if kind == "matters":
        return "supported" if low > 0 or high < 0 else "inconclusive"
    raise ValueError(f"not a superiority claim: {kind!r}")


ESTIMATE_PAIRED_ON = ("temperature", "ratio", "lambda")


def claim_comparisons(cells: list[Cell]):
    """(claim, context-free cell, other cell, kind of claim: `verdict`). Each method with
    a claim in cfs.study.METHODS is compared with every context-free cell that shares its
    `paired_on` knobs; a method that `estimates` another's term with that method's cell
    at the same temperature, ratio and lambda; within context-free data, each knob's
    largest value is compared with its smallest at the same other knobs."""
    by_method = defaultdict(list)
    for cell in cells:
        if cell.info.get("learning_rate") is None:  # the other rates: frontiers only
            by_method[cell.info["method"]].append(cell)
    proposed = by_method[PROPOSED]
    for name, spec in METHODS.items():
        if spec.claim is None:
            continue
        for other in by_method[name]:
            for cell in proposed:
                if all(cell.info.get(k) == other.info.get(k) for k in spec.paired_on):
                    yield spec.claim, cell, other, spec.claim_kind
    for name, spec in METHODS.items():
        if spec.estimates is None:
            continue
        claim = (
            f"{name}'s sampled term approximates {spec.estimates} at equal λ and samples per step"
        )
        for cell in by_method[name]:
            for other in by_method[spec.estimates]:
                if all(cell.info.get(k) == other.info.get(k) for k in ESTIMATE_PAIRED_ON):
                    yield claim, cell, other, "approximates"
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
    "primary",
    "forgetting_avg_difference",
    "low",
    "high",
    "p_value",
    "holm_p_value",
    "corrected_low",
    "corrected_high",
    "verdict",
    "kl_to_base_difference",
    "kl_low",
    "kl_high",
    "kl_p_value",
    "kl_holm_p_value",
    "kl_corrected_low",
    "kl_corrected_high",
    "kl_verdict",
    "target_difference",
    "target_low",
    "target_high",
    "margin",
    "kl_margin",
    "num_seeds",
]


def matches(cell: Cell, path: str) -> bool:
    """Whether a cell is the one a config's cell path names ('temp1/ratio0.5')."""
    return all(cell.info.get(key) == value for key, value in parse_cell(path).items())


class Test(NamedTuple):
    """One verdict's test: the paired interval, the claimed direction (+1: higher, -1:
    lower), the equivalence margin (approximates claims) and the p-value."""

    interval: Interval
    sign: int
    margin: float | None
    p_value: float


def claim_tests(cell: Cell, other: Cell, kind: str, plain: Cell | None, share: float) -> dict:
    """{metric: Test} on the forgetting average and KL to base."""
    tests = {}
    for metric, sign in (("forgetting_avg", 1), ("kl_to_base", -1)):
        interval = compare(cell, other, metric)
        margin = None
        if kind == "approximates":
            if plain is not None:
                margin = share * abs(compare(other, plain, metric).estimate)
            p = equivalence(interval, margin or 0.0)[1]
        else:
            p = interval.p_value
        tests[metric] = Test(interval, sign, margin, p)
    return tests


NOT_REACHED = "target gain not reached"
# One seed's interval holds the test items' variance only, not the seeds': no verdict.
ONE_SEED = "untested (one seed)"


class Row(NamedTuple):
    """One verdict's comparison before its family is corrected."""

    claim: str
    comparison: str
    kind: str
    primary: bool
    tests: dict
    target: Interval | None
    num_seeds: int


def at_end_rows(own: list[Cell], claims: dict) -> list[Row]:
    """The per-cell comparisons, at the end of training (each cell at its own target
    gain: not matched, and so labelled where the study also compares at a matched gain);
    primary when claims.primary names them and no matched gain is set."""
    plain = next(
        (c for c in own if c.info["method"] == "plain" and c.info.get("learning_rate") is None),
        None,
    )
    matched = claims["matched_target_gain"] is not None
    chosen = None if matched else claims["primary"]
    suffix = " (at the end of training)" if matched else ""
    rows = []
    for claim, cell, other, kind in claim_comparisons(own):
        primary = (
            chosen is not None
            and matches(cell, chosen["cell"])
            and matches(other, chosen["versus"])
        )
        tests = claim_tests(cell, other, kind, plain, claims["equivalence_margin"])
        rows.append(
            Row(
                f"{claim}{suffix}",
                f"{cell.label} - {other.label}",
                kind,
                primary,
                tests,
                compare(cell, other, "target"),
                len(cell.records),
            )
        )
    return rows


def matched_rows(cells: list[Cell], claims: dict) -> list[Row]:
    """The comparisons at claims.matched_target_gain along the frontiers (cfs.frontier)."""
    gain = claims["matched_target_gain"]
    if gain is None:
        return []
    chosen = claims["primary"]
    primary_pair = None
    if chosen is not None:
        primary_pair = (
            family_of(parse_cell(chosen["cell"])),
            family_of(parse_cell(chosen["versus"])),
        )
    rows = []
    for matched in matched_comparisons(cells, gain):
        versus = (
            "plain fine-tuning's frontier (learning rates and steps)"
            if matched.family_b == "plain"
            else matched.family_b
        )
        claim = (
            f"at a target gain of {100 * gain:g} points, {matched.family_a} keeps more than "
            f"{versus}"
        )
        tests = {}
        if matched.num_seeds:
            tests = {
                "forgetting_avg": Test(matched.forgetting, 1, None, matched.forgetting.p_value),
                "kl_to_base": Test(matched.kl_to_base, -1, None, matched.kl_to_base.p_value),
            }
        rows.append(
            Row(
                claim,
                f"{matched.family_a} - {matched.family_b} at matched target",
                "keeps_more",
                (matched.family_a, matched.family_b) == primary_pair,
                tests,
                None,
                matched.num_seeds,
            )
        )
    return rows


def build_verdicts(cells: list[Cell], claims: dict) -> pd.DataFrame:
    """The paper's claims, one row per comparison, each answered on the forgetting average
    (higher keeps more) and on KL to base (lower is nearer the base model: its verdict is
    given on the negation, so that "supported" means the same), with the target's change
    beside them: a score can rise because the model sharpens, and KL to base tells whether
    the model also stayed near base. All three are the same kind of interval (seeds paired
    by id, cfs.statistics).

    Two kinds of comparison: each cell against the cells it is paired with at the end of
    training (each at its own target gain), and, with claims.matched_target_gain, each
    method against plain fine-tuning's frontier and context-free data against each other
    method at that target gain (cfs.frontier).

    claims (the config's `claims`): the primary comparison's forgetting verdict is tested at
    ALPHA (the matched comparison of claims.primary when a matched gain is set); every other
    test of the model (each row's forgetting and KL) forms one family, Holm-corrected, and
    its verdict is read off the interval at the corrected level. An "approximates" claim is
    an equivalence test with a margin of claims.equivalence_margin x |plain - the exact
    penalty's cell| on that metric."""
    rows = []
    for model in sorted({c.info.get("model") for c in cells}):
        with_points = [c for c in cells if c.info.get("model") == model and c.has_items()]
        own = [c for c in with_points if c.info.get("fraction") is None]
        model_rows = at_end_rows(own, claims) + matched_rows(with_points, claims)
        if claims["primary"] is not None and not any(row.primary for row in model_rows):
            made = [row.comparison for row in model_rows]
            raise ValueError(
                f"config key claims.primary: {claims['primary']['cell']} versus "
                f"{claims['primary']['versus']} is no comparison the study makes for {model} "
                f"(it makes: {'; '.join(made) or 'none'})"
            )
        family = [
            (index, metric)
            for index, row in enumerate(model_rows)
            for metric in row.tests
            if not (row.primary and metric == "forgetting_avg")
        ]
        p_values = [model_rows[index].tests[metric].p_value for index, metric in family]
        adjusted = dict(zip(family, holm(p_values), strict=True))
        for index, row in enumerate(model_rows):
            target = row.target
            record = {
                "model": model,
                "claim": row.claim,
                "comparison": row.comparison,
                "primary": row.primary,
                "target_difference": target.estimate if target else None,
                "target_low": target.low if target else None,
                "target_high": target.high if target else None,
                "num_seeds": row.num_seeds,
            }
            for metric, prefix, column in (
                ("forgetting_avg", "", "forgetting_avg_difference"),
                ("kl_to_base", "kl_", "kl_to_base_difference"),
            ):
                if metric not in row.tests:  # a path that never reaches the matched gain
                    record[f"{prefix}verdict"] = NOT_REACHED
                    continue
                interval, sign, margin, p = row.tests[metric]
                holm_p = adjusted.get((index, metric), p)
                level = corrected(interval, p, holm_p)
                if row.kind == "approximates":  # TOST at alpha reads the 1 - 2 alpha interval
                    alpha = 1 - level.confidence
                    answer = equivalence(interval, margin or 0.0, alpha)[0]
                    level = interval.at(1 - 2 * alpha)
                else:
                    answer = verdict(row.kind, *sorted((sign * level.low, sign * level.high)))
                if row.num_seeds < 2:
                    answer = ONE_SEED
                record.update(
                    {
                        column: interval.estimate,
                        f"{prefix}low": interval.low,
                        f"{prefix}high": interval.high,
                        f"{prefix}p_value": p,
                        f"{prefix}holm_p_value": holm_p,
                        f"{prefix}corrected_low": level.low,
                        f"{prefix}corrected_high": level.high,
                        f"{prefix}verdict": answer,
                        f"{prefix}margin": margin,
                    }
                )
            rows.append(record)
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def leave_one_task_out(cells: list[Cell], verdicts: pd.DataFrame, claims: dict) -> pd.DataFrame:
    """The primary comparison's forgetting average with each forgetting task left out in
    turn (paired interval, uncorrected, as the primary's own): whether the claim rests on
    one task. A matched comparison is redone on the tasks kept (each seed's frontier
    chosen on them too)."""
    rows = []
    for verdict_row in verdicts[verdicts["primary"].astype(bool)].itertuples():
        model_cells = [c for c in cells if c.info.get("model") == verdict_row.model]
        own = {c.label: c for c in model_cells if c.info.get("fraction") is None}
        cell_label, other_label = verdict_row.comparison.split(" - ")
        other_label = other_label.removesuffix(" at matched target")
        matched = verdict_row.comparison.endswith(" at matched target")
        tasks = next(c for c in model_cells if c.has_items()).task_names("forgetting_avg")
        for left_out in tasks:
            kept = [task for task in tasks if task != left_out]
            if matched:
                found = [
                    m.forgetting
                    for m in matched_comparisons(model_cells, claims["matched_target_gain"], kept)
                    if (m.family_a, m.family_b) == (cell_label, other_label) and m.num_seeds
                ]
                if not found:
                    continue
                interval = found[0]
            else:
                cell, other = own[cell_label], own[other_label]
                interval = paired_difference(cell.items(), other.items(), kept)
            rows.append(
                {
                    "model": verdict_row.model,
                    "comparison": verdict_row.comparison,
                    "left_out": left_out,
                    "difference": interval.estimate,
                    "low": interval.low,
                    "high": interval.high,
                    "verdict": verdict("keeps_more", interval.low, interval.high),
                }
            )
    columns = ["model", "comparison", "left_out", "difference", "low", "high", "verdict"]
    return pd.DataFrame(rows, columns=columns)


def cell_card(eval_paths: list[Path]) -> dict:
    """One cell over its seeds, for results/{model}/{cell}/eval.json."""
    cells = read_cells(eval_paths)
    if len(cells) != 1:
        raise DataError(f"expected the seeds of one cell, got {[c.label for c in cells]}")
    cell = cells[0]
    metrics, intervals = {}, {}
    for name in ITEM_METRICS + SEED_METRICS:
        interval = cell.metric(name)
        metrics[name], intervals[name] = interval.estimate, [interval.low, interval.high]
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
    table.add_argument("--frontier", type=Path, help="every method's path, point by point")
    table.add_argument(
        "--claims",
        required=True,
        type=parse_settings,
        help="the config's `claims` as JSON: the primary comparison and the equivalence margin",
    )
    table.add_argument("--page", type=Path, help="the results as one Markdown page")
    table.add_argument("--study", default="default", help="the study's name, for the page")
    figures = commands.add_parser("figures", help="write PNG figures from summary.csv")
    figures.add_argument("--summary", required=True, type=Path)
    figures.add_argument("--differences", type=Path, help="differences.csv (paired)")
    figures.add_argument(
        "--curves", nargs="*", default=[], type=Path, help="fine-tuned model folders"
    )
    figures.add_argument("--frontier", type=Path, help="frontier.csv (cfs.frontier)")
    figures.add_argument("--out-dir", required=True, type=Path)
    figures.add_argument("--model", help="only this model's figures")
    args = parser.parse_args(argv)
    if args.command == "cell":
        write_json(args.out, cell_card(args.evals))
    elif args.command == "table":
        cells = read_cells(args.evals)
        ends = [c for c in cells if c.info.get("fraction") is None]  # not points along
        summary = sort_rows(pd.DataFrame([summary_row(c) for c in ends]))
        write_csv(summary, args.out)
        differences, verdicts = build_differences(ends), build_verdicts(cells, args.claims)
        frontier = frontier_table(cells)
        if args.frontier:
            write_csv(frontier, args.frontier)
        if args.differences:
            write_csv(differences, args.differences)
        if args.verdicts:
            write_csv(verdicts, args.verdicts)
            for row in verdicts.itertuples():
                log.info("%s: %s (%s)", row.verdict, row.claim, row.comparison)
        if args.page:
            with atomic_path(args.page) as tmp:
                robustness = leave_one_task_out(cells, verdicts, args.claims)
                tmp.write_text(
                    results_page(args.study, summary, differences, verdicts, robustness, frontier)
                )
    else:
        summary = pd.read_csv(args.summary)
        differences = pd.read_csv(args.differences) if args.differences else None
        written = write_figures(
            summary,
            args.out_dir,
            args.model,
            differences=differences,
            curves=read_curves(args.curves, summary),
            frontier=pd.read_csv(args.frontier) if args.frontier else None,
        )
        log.info("wrote %s", ", ".join(str(path) for path in written))


if __name__ == "__main__":
    run_as_process(main)
