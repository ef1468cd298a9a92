"""Intervals for the study's numbers.

A metric of a cell is a mean over seed replicates and over the test items of one or more
tasks (the forgetting average: the mean of each task's mean). Its 95% interval is a
two-level percentile bootstrap: each replicate draws the seeds with replacement and, for
every task, the items with replacement (the same items for every seed), so it holds both
the training noise between seeds and the sampling noise of a finite test set. A difference
between two cells is bootstrapped the same way on the per-(seed, item) differences, seeds
paired by position and items by id: that is the paired interval. scipy.stats.bootstrap
resamples one axis only, hence the few lines below; a metric with no per-item scores (KL to
base, held-out NLL) gets scipy's Student t interval over seeds.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_REPLICATES = 2000
BOOTSTRAP_SEED = 0


def two_level_bootstrap(
    tables: list[np.ndarray],
    replicates: int = BOOTSTRAP_REPLICATES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float, float]:
    """(estimate, low, high) of the mean over tasks of each task's (seeds x items) mean.

    Each table is one task's scores, shape (seeds, items); every table has the same seeds.
    Resampling is a multinomial weighting of rows and columns, so a replicate costs one
    weighted sum per task."""
    tables = [np.asarray(table, dtype=float) for table in tables]
    num_seeds = tables[0].shape[0]
    if any(table.ndim != 2 or table.shape[0] != num_seeds for table in tables):
        raise ValueError("every task's table needs shape (seeds, items) with the same seeds")
    estimate = float(np.mean([table.mean() for table in tables]))
    rng = np.random.default_rng(seed)
    seed_weights = rng.multinomial(num_seeds, np.full(num_seeds, 1 / num_seeds), replicates)
    totals = np.zeros(replicates)
    for table in tables:
        num_items = table.shape[1]
        item_weights = rng.multinomial(num_items, np.full(num_items, 1 / num_items), replicates)
        totals += np.einsum("bs,si,bi->b", seed_weights, table, item_weights) / (
            num_seeds * num_items
        )
    draws = totals / len(tables)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    # a constant table gives a constant statistic: keep the interval exact there
    return estimate, float(min(low, estimate)), float(max(high, estimate))


def seed_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): Student t interval over seeds; NaN bounds with one seed."""
    values = np.asarray([v for v in values if v is not None], dtype=float)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(values.mean())
    if values.size < 2:
        return mean, float("nan"), float("nan")
    if np.all(values == values[0]):
        return mean, mean, mean
    low, high = stats.t.interval(CONFIDENCE, values.size - 1, loc=mean, scale=stats.sem(values))
    return mean, float(low), float(high)


def aligned(items_a: dict, items_b: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Two cells' per-item scores of one task as (seeds, items) arrays over the same item
    ids (in sorted order). items_*: list over seeds of {item id: score}."""
    ids = sorted(items_a[0])
    for scores in [*items_a, *items_b]:
        if set(scores) != set(ids):
            raise ValueError(f"{where}: the evals scored different items; compare on one split")
    return (
        np.array([[scores[i] for i in ids] for scores in items_a]),
        np.array([[scores[i] for i in ids] for scores in items_b]),
    )


def paired_seed_count(seeds_a: list, seeds_b: list) -> int:
    """Seeds pair by position; a single replicate (the base model) pairs with every seed."""
    count = max(len(seeds_a), len(seeds_b))
    if len(seeds_a) not in (1, count) or len(seeds_b) not in (1, count):
        raise ValueError(f"cannot pair {len(seeds_a)} seeds with {len(seeds_b)}")
    return count


def paired_difference(
    cell_a: list[dict], cell_b: list[dict], tasks: list[str]
) -> tuple[float, float, float]:
    """Mean over `tasks` of cell_a minus cell_b, with its paired two-level interval.

    cell_*: per seed, {task: {item id: score}}. Seeds are paired by position; a cell with
    one replicate (the base model) is compared with every seed of the other."""
    count = paired_seed_count(cell_a, cell_b)
    tables = []
    for task in tasks:
        a, b = aligned([s[task] for s in cell_a], [s[task] for s in cell_b], task)
        tables.append(np.broadcast_to(a, (count, a.shape[1])) - b)
    return two_level_bootstrap(tables)


def paired_seed_difference(
    values_a: list[float], values_b: list[float]
) -> tuple[float, float, float]:
    """(mean, low, high) of a - b for a metric with one number per seed (KL to base), seeds
    paired by position (a single value, the base model's, pairs with every seed): the
    Student t interval of the per-seed differences."""
    count = paired_seed_count(values_a, values_b)
    a = np.broadcast_to(np.asarray(values_a, dtype=float), count)
    b = np.broadcast_to(np.asarray(values_b, dtype=float), count)
    return seed_interval(list(a - b))
