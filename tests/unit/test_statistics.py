"""cfs.statistics: intervals on made-up tables whose answer is known, and their coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest
from cfs import statistics


def items(scores) -> dict:
    return {str(i): float(score) for i, score in enumerate(scores)}


def cell(seed_rows, task="t", seeds=None) -> dict:
    seeds = range(len(seed_rows)) if seeds is None else seeds
    return {seed: {task: items(row)} for seed, row in zip(seeds, seed_rows, strict=True)}


TASKS, ITEMS = 4, 135


def simulated_pair(rng, num_seeds: int, seed_effect: bool, effect: float = 0.02):
    """Two cells' scores, shape (seeds, tasks, items), on a 0-1 scale: cell a's mean is 0.52,
    cell b's 0.5. The seed effect matches the study's: one cell's per-seed forgetting
    average spreads by about 1.2 points (plain fine-tuning: 4.47, 2.58, 4.91) and the paired
    difference by about 0.8 points (a part shared by both cells of one seed, a part of each
    cell's own, a part of each task's own); items differ by 5 points, item x cell by 3 and
    the residual by 3."""
    scale = 1.0 if seed_effect else 0.0
    shared = rng.normal(0, 0.0106 * scale, (num_seeds, 1, 1))
    items_effect = rng.normal(0, 0.05, (1, TASKS, ITEMS))
    cells = []
    for mean in (0.5 + effect, 0.5):
        own = rng.normal(0, 0.0057 * scale, (num_seeds, 1, 1))
        per_task = rng.normal(0, 0.005 * scale, (num_seeds, TASKS, 1))
        item_by_cell = rng.normal(0, 0.03, (1, TASKS, ITEMS))
        residual = rng.normal(0, 0.03, (num_seeds, TASKS, ITEMS))
        cells.append(mean + shared + own + per_task + items_effect + item_by_cell + residual)
    return cells


@pytest.mark.parametrize("num_seeds", [5, 3])
@pytest.mark.parametrize("seed_effect", [True, False])
def test_intervals_cover_at_the_nominal_level(num_seeds, seed_effect):
    """Over 600 made-up studies the 95% interval holds the true forgetting average of one
    cell and the true paired difference of two cells in at least 93% of them (a percentile
    bootstrap over seeds and items held them in 83-92% with a seed effect)."""
    rng = np.random.default_rng(0)
    trials, held_one, held_difference = 600, 0, 0
    for _ in range(trials):
        a, b = simulated_pair(rng, num_seeds, seed_effect)
        one = statistics.crossed_interval([a[:, task] for task in range(TASKS)])
        held_one += one.low <= 0.52 <= one.high
        paired = statistics.crossed_interval([(a - b)[:, task] for task in range(TASKS)])
        held_difference += paired.low <= 0.02 <= paired.high
    assert held_one / trials >= 0.93, f"one cell: coverage {held_one / trials}"
    assert held_difference / trials >= 0.93, f"difference: coverage {held_difference / trials}"


def test_identical_cells_differ_by_exactly_zero():
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 2, size=(3, 200))
    interval = statistics.paired_difference(cell(rows), cell(rows), ["t"])
    assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0)
    assert interval.p_value == 1.0


def test_a_constant_shift_gives_exactly_the_shift():
    rng = np.random.default_rng(2)
    rows = rng.random((3, 100))
    interval = statistics.paired_difference(cell(rows + 0.25), cell(rows), ["t"])
    assert (interval.estimate, interval.low, interval.high) == pytest.approx((0.25,) * 3)
    assert interval.p_value < 1e-12


def test_a_noisy_shift_gives_an_interval_around_it():
    """Scores shifted by 0.1 plus item noise: the paired interval holds 0.1, excludes 0,
    and is narrower than the spread of either cell alone."""
    rng = np.random.default_rng(3)
    shared = rng.random((3, 400))
    shifted = shared + 0.1 + rng.normal(0, 0.05, size=shared.shape)
    interval = statistics.paired_difference(cell(shifted), cell(shared), ["t"])
    assert 0 < interval.low < 0.1 < interval.high, f"{interval}, expected to hold 0.1, not 0"
    assert interval.estimate == pytest.approx(0.1, abs=0.01)
    assert interval.p_value < 1e-3
    alone = statistics.crossed_interval([shared])
    assert interval.high - interval.low < alone.high - alone.low


def test_seeds_pair_by_id_not_by_position():
    """Cell a's seeds listed in another order pair with the same seeds of cell b: each
    seed's difference is exactly 0.1, so the interval is a point."""
    rng = np.random.default_rng(4)
    rows = rng.random((3, 50))
    a = cell(rows + np.array([[0.1]]), seeds=[0, 1, 2])
    b = cell(rows[::-1], seeds=[2, 1, 0])
    interval = statistics.paired_difference(a, b, ["t"])
    assert (interval.low, interval.high) == pytest.approx((0.1, 0.1))


def test_unmatched_seeds_are_refused_by_name():
    rows = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"\[2\] on one side only|\[1, 2\]"):
        statistics.paired_difference(cell(rows, seeds=[0, 1]), cell(rows, seeds=[0, 2]), ["t"])


def test_interval_widens_with_seed_noise():
    """Same items, but the seeds disagree: the seed term takes that in, with S - 1 df."""
    rng = np.random.default_rng(4)
    base = rng.integers(0, 2, size=(1, 300)).astype(float)
    calm = np.repeat(base, 3, axis=0)
    noisy = calm + np.array([[-0.2], [0.0], [0.2]])
    calm_interval = statistics.crossed_interval([calm])
    noisy_interval = statistics.crossed_interval([noisy])
    assert noisy_interval.half_width > 2 * calm_interval.half_width
    # the seed term dominates: about Student t with 2 df over the three seed means
    seed_only = statistics.seed_interval([-0.2, 0.0, 0.2])
    assert noisy_interval.half_width == pytest.approx(seed_only.half_width, rel=0.05)


def test_one_seed_is_the_item_term_alone():
    """The base model (one replicate): the standard error of a mean over items."""
    rng = np.random.default_rng(6)
    row = (rng.random(400) < 0.3).astype(float)
    interval = statistics.crossed_interval([row[None, :]])
    assert interval.standard_error == pytest.approx(row.std(ddof=1) / 20)
    assert interval.df == 399


def test_forgetting_average_is_the_mean_of_task_means():
    tables = [np.full((2, 10), 0.5), np.full((2, 40), 1.0)]
    interval = statistics.crossed_interval(tables)
    assert (interval.estimate, interval.low, interval.high) == pytest.approx((0.75,) * 3)


def test_base_with_one_replicate_pairs_with_every_seed():
    base = cell([[0, 1, 0, 1]], seeds=[None])
    tuned = cell([[1, 1, 0, 1], [1, 1, 1, 1]], seeds=[3, 7])
    interval = statistics.paired_difference(tuned, base, ["t"])
    assert interval.estimate == pytest.approx((0.25 + 0.5) / 2)


def test_different_items_are_refused():
    with pytest.raises(ValueError, match="different items"):
        statistics.paired_difference(cell([[1, 0]]), cell([[1, 0, 1]]), ["t"])


def test_seed_interval_is_student_t_and_nan_for_one_seed():
    interval = statistics.seed_interval([1.0, 2.0, 3.0])
    assert interval.estimate == 2.0
    # t(0.975, 2) = 4.303, sem = 1 / sqrt(3)
    assert interval.high - 2.0 == pytest.approx(4.3027 / math.sqrt(3), rel=1e-3)
    assert 2.0 - interval.low == pytest.approx(4.3027 / math.sqrt(3), rel=1e-3)
    assert interval.df == 2
    # the p-value of a one-term interval is Student t's: t = 2 sqrt(3) on 2 df
    assert interval.p_value == pytest.approx(0.0742, abs=1e-3)
    one_seed = statistics.seed_interval([1.0])
    assert math.isnan(one_seed.low) and math.isnan(one_seed.p_value)


def test_p_value_and_interval_agree_at_every_level():
    """The 1 - p interval just touches 0, for a one-term and a several-term interval."""
    rng = np.random.default_rng(7)
    for interval in (
        statistics.seed_interval([0.3, 0.1, 0.5, 0.2]),
        statistics.crossed_interval([rng.normal(0.05, 0.3, (3, 60)) for _ in range(2)]),
    ):
        at_p = interval.at(1 - interval.p_value)
        assert at_p.low == pytest.approx(0.0, abs=1e-9)
        assert interval.at(0.5).half_width < interval.half_width < interval.at(0.99).half_width


def test_holm_adjusts_step_down_and_keeps_order():
    adjusted = statistics.holm([0.01, 0.04, 0.03, 0.005, float("nan")])
    # sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 -> max(0.06, 0.04)
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(adjusted[4])
    assert statistics.holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])


def test_corrected_interval_excludes_zero_exactly_when_holm_rejects():
    interval = statistics.seed_interval([0.3, 0.1, 0.5, 0.2])
    p = interval.p_value
    assert statistics.corrected(interval, p, 0.049).low > 0
    assert statistics.corrected(interval, p, 0.051).low < 0


def test_equivalence_is_three_way():
    inside = statistics.seed_interval([0.01, -0.01, 0.02, 0.0, -0.02])
    verdict, p = statistics.equivalence(inside, margin=0.1)
    assert verdict == "equivalent" and p < 0.05
    beyond = statistics.seed_interval([0.5, 0.52, 0.48, 0.51, 0.49])
    verdict, p = statistics.equivalence(beyond, margin=0.1)
    assert verdict == "not equivalent" and p > 0.95
    # excludes 0 but reaches inside the margin: an equivalence test cannot contradict
    straddling = statistics.seed_interval([0.05, 0.15, 0.1, 0.12, 0.08])
    verdict, _ = statistics.equivalence(straddling, margin=0.1)
    assert verdict == "inconclusive"
    assert straddling.low > 0
    assert statistics.equivalence(inside, margin=0.0)[0] == "inconclusive"


def test_one_item_gives_no_interval():
    interval = statistics.crossed_interval([np.array([[0.5], [0.7]])])
    assert interval.estimate == pytest.approx(0.6)
    assert math.isnan(interval.low) and math.isnan(interval.p_value)
