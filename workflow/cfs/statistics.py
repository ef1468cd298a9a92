"""Intervals, p-values and multiplicity for the study's numbers.

The seed is the unit of replication. A metric scored per test item (the target, the
forgetting average: the mean over tasks of each task's seeds x items mean) has two sources
of noise, crossed: the training seed and the finite test set. Its interval is a
variance-components interval: the seed term (the spread of the per-seed means, S - 1 df)
plus each task's item term (the spread of the per-item means, less the residual that the
seed term already holds), each term's t half-width added in quadrature (`Interval`); the
Satterthwaite df of the summed variance is reported beside it. With one seed (the base
model) it is the item terms alone. A metric with one number per seed (KL to base) gets the
Student t interval over seeds. A percentile bootstrap over 3-5 seeds under-covers; these
intervals are checked by simulation in tests/unit/test_statistics.py.

A difference of two cells is the same interval on the per-(seed, item) differences, seeds
paired by seed id and items by item id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import optimize, stats

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE


@dataclass(frozen=True)
class Interval:
    """An estimate with its noise terms, each (variance, df). With one term the interval is
    Student t's; with several, each term's half-width is t(its df) x its standard error and
    the half-widths add in quadrature (a modified large-sample interval: Satterthwaite's
    single df under-covers when a few-df seed term dominates but is estimated small). NaN
    bounds when the data cannot give an interval (one seed of a per-seed metric)."""

    estimate: float
    terms: tuple[tuple[float, float], ...]
    confidence: float = CONFIDENCE

    @property
    def standard_error(self) -> float:
        return math.sqrt(max(sum(variance for variance, _ in self.terms), 0.0))

    @property
    def df(self) -> float:
        """Satterthwaite's degrees of freedom of the summed variance."""
        variance = sum(v for v, _ in self.terms)
        spread = sum(v**2 / df for v, df in self.terms if v > 0)
        return variance**2 / spread if spread > 0 else math.inf

    def half_width_at(self, confidence: float) -> float:
        quantile = 0.5 + confidence / 2
        return math.sqrt(sum(stats.t.ppf(quantile, df) ** 2 * v for v, df in self.terms if v))

    @property
    def half_width(self) -> float:
        return self.half_width_at(self.confidence)

    @property
    def low(self) -> float:
        return self.estimate - self.half_width

    @property
    def high(self) -> float:
        return self.estimate + self.half_width

    def two_sided_p(self, distance: float) -> float:
        """The alpha whose 1 - alpha interval has half-width |distance|."""
        distance = abs(distance)
        if math.isnan(self.standard_error) or math.isnan(distance):
            return float("nan")
        if self.standard_error == 0:
            return 1.0 if distance == 0 else 0.0
        if distance == 0:
            return 1.0
        smallest = 1e-15
        if self.half_width_at(1 - smallest) <= distance:
            return smallest
        return float(optimize.brentq(lambda a: self.half_width_at(1 - a) - distance, smallest, 1.0))

    def one_sided_p(self, distance: float) -> float:
        """p-value of "the true value lies `distance` below the estimate or further"."""
        p = self.two_sided_p(distance) / 2
        return p if distance > 0 else 1 - p

    @property
    def p_value(self) -> float:
        """Two-sided p-value of "the true value is 0"."""
        return self.two_sided_p(self.estimate)

    def at(self, confidence: float) -> Interval:
        """The same estimate at another confidence level (a multiplicity-corrected one)."""
        return replace(self, confidence=confidence)


def undefined(estimate: float) -> Interval:
    return Interval(estimate, ((float("nan"), float("nan")),))


def crossed_interval(tables: list[np.ndarray]) -> Interval:
    """The mean over tasks of each task's (seeds x items) mean, with its interval.

    Each table is one task's scores, shape (seeds, items), the same seeds in the same order
    for every task. Var(estimate) = Var(per-seed mean over tasks) / S + (1/T^2) sum over
    tasks of (MS_item - MS_residual) / (S I): the seed term already holds the residual once,
    so each item term leaves it out (an item term below 0 counts as 0)."""
    tables = [np.asarray(table, dtype=float) for table in tables]
    num_seeds = tables[0].shape[0]
    if any(table.ndim != 2 or table.shape[0] != num_seeds for table in tables):
        raise ValueError("every task's table needs shape (seeds, items) with the same seeds")
    num_tasks = len(tables)
    estimate = float(np.mean([table.mean() for table in tables]))
    if any(table.shape[1] < 2 for table in tables):
        return undefined(estimate)  # one item: no item term to estimate
    terms = []
    if num_seeds > 1:
        seed_means = np.mean([table.mean(axis=1) for table in tables], axis=0)
        terms.append((seed_means.var(ddof=1) / num_seeds, num_seeds - 1))
    for table in tables:
        num_items = table.shape[1]
        item_means = table.mean(axis=0)
        item_square = item_means.var(ddof=1)
        if num_seeds > 1:
            residual = table - table.mean(axis=1, keepdims=True) - item_means + table.mean()
            residual_df = (num_seeds - 1) * (num_items - 1)
            item_square -= (residual**2).sum() / residual_df / num_seeds
        terms.append((max(item_square, 0.0) / (num_tasks**2 * num_items), num_items - 1))
    return Interval(estimate, tuple(terms))


def seed_interval(values: list[float]) -> Interval:
    """Student t interval over seeds (S - 1 df); NaN bounds with one seed."""
    values = np.asarray([v for v in values if v is not None], dtype=float)
    if values.size == 0:
        return undefined(float("nan"))
    mean = float(values.mean())
    if values.size < 2:
        return undefined(mean)
    return Interval(mean, ((float(values.var(ddof=1)) / values.size, values.size - 1),))


def paired_seeds(seeds_a: list, seeds_b: list) -> list[tuple]:
    """The (seed of a, seed of b) pairs: the same seed id on both sides; a single replicate
    (the base model) pairs with every seed of the other side."""
    if len(seeds_a) == 1:
        return [(seeds_a[0], seed) for seed in seeds_b]
    if len(seeds_b) == 1:
        return [(seed, seeds_b[0]) for seed in seeds_a]
    if len(set(seeds_a)) != len(seeds_a) or len(set(seeds_b)) != len(seeds_b):
        raise ValueError(f"cannot pair seeds {seeds_a} with {seeds_b}: a seed id repeats")
    if set(seeds_a) != set(seeds_b):
        raise ValueError(
            f"cannot pair seeds {sorted(seeds_a, key=str)} with {sorted(seeds_b, key=str)}: "
            f"{sorted(set(seeds_a) ^ set(seeds_b), key=str)} on one side only"
        )
    return [(seed, seed) for seed in seeds_a]


def item_ids(scores_a: dict, scores_b: dict, where: str) -> list:
    """The item ids both per-item score maps share (sorted); they must be the same."""
    if set(scores_a) != set(scores_b):
        raise ValueError(f"{where}: the evals scored different items; compare on one split")
    return sorted(scores_a)


def paired_difference(cell_a: dict, cell_b: dict, tasks: list[str]) -> Interval:
    """Mean over `tasks` of cell_a minus cell_b, with its paired interval.

    cell_*: {seed id: {task: {item id: score}}}; seeds pair by id (`paired_seeds`), items
    by id."""
    pairs = paired_seeds(list(cell_a), list(cell_b))
    tables = []
    for task in tasks:
        ids = item_ids(cell_a[pairs[0][0]][task], cell_b[pairs[0][1]][task], task)
        rows = []
        for seed_a, seed_b in pairs:
            a, b = cell_a[seed_a][task], cell_b[seed_b][task]
            item_ids(a, b, f"{task} (seeds {seed_a}, {seed_b})")
            rows.append([a[i] - b[i] for i in ids])
        tables.append(np.array(rows))
    return crossed_interval(tables)


def paired_seed_difference(values_a: dict, values_b: dict) -> Interval:
    """a - b for a metric with one number per seed (KL to base): the Student t interval of
    the per-seed differences. values_*: {seed id: value}, paired as `paired_seeds`."""
    pairs = paired_seeds(list(values_a), list(values_b))
    return seed_interval([values_a[a] - values_b[b] for a, b in pairs])


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given (NaN stays NaN and does not
    count in the family)."""
    known = [(p, i) for i, p in enumerate(p_values) if not math.isnan(p)]
    adjusted = [float("nan")] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(known)):
        running = max(running, min(1.0, (len(known) - rank) * p))
        adjusted[i] = running
    return adjusted


def corrected(interval: Interval, p_value: float, adjusted: float) -> Interval:
    """The interval at the level a Holm-adjusted p-value tests: it excludes 0 exactly when
    the adjusted p-value is below ALPHA."""
    if math.isnan(adjusted) or adjusted == 0:
        return interval
    return interval.at(1 - ALPHA * min(1.0, p_value / adjusted))


def equivalence(interval: Interval, margin: float, alpha: float = ALPHA) -> tuple[str, float]:
    """(verdict, TOST p-value) of "|true value| < margin": "equivalent" when the whole
    1 - 2 alpha interval lies within +-margin, "not equivalent" when it lies wholly beyond
    the margin, "inconclusive" otherwise (and without a margin or an interval)."""
    if not margin > 0 or math.isnan(interval.standard_error):
        return "inconclusive", float("nan")
    below = interval.one_sided_p(interval.estimate + margin)
    above = interval.one_sided_p(margin - interval.estimate)
    return equivalence_verdict(interval.at(1 - 2 * alpha), margin), max(below, above)


def equivalence_verdict(interval: Interval, margin: float) -> str:
    if -margin < interval.low and interval.high < margin:
        return "equivalent"
    if interval.low > margin or interval.high < -margin:
        return "not equivalent"
    return "inconclusive"
