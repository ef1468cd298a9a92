"""cfs.statistics: intervals on small made-up tables whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from cfs import statistics


def items(scores) -> dict:
    return {str(i): float(score) for i, score in enumerate(scores)}


def cell(seed_rows, task="t") -> list[dict]:
    return [{task: items(row)} for row in seed_rows]


def test_identical_cells_differ_by_exactly_zero():
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 2, size=(3, 200))
    difference, low, high = statistics.paired_difference(cell(rows), cell(rows), ["t"])
    assert (difference, low, high) == (0.0, 0.0, 0.0)


def test_a_constant_shift_gives_exactly_the_shift():
    rng = np.random.default_rng(2)
    rows = rng.random((3, 100))
    difference, low, high = statistics.paired_difference(cell(rows + 0.25), cell(rows), ["t"])
    assert (difference, low, high) == pytest.approx((0.25, 0.25, 0.25))


def test_a_noisy_shift_gives_an_interval_around_it():
    """Scores shifted by 0.1 plus item noise: the paired interval holds 0.1, excludes 0,
    and is narrower than the unpaired spread of either cell."""
    rng = np.random.default_rng(3)
    shared = rng.random((3, 400))
    shifted = shared + 0.1 + rng.normal(0, 0.05, size=shared.shape)
    difference, low, high = statistics.paired_difference(cell(shifted), cell(shared), ["t"])
    assert 0 < low < 0.1 < high, f"interval ({low}, {high}), expected to hold 0.1, not 0"
    assert difference == pytest.approx(0.1, abs=0.01)
    _, alone_low, alone_high = statistics.two_level_bootstrap([shared])
    paired, unpaired = high - low, alone_high - alone_low
    assert paired < unpaired, f"paired width {paired}, not narrower than one cell's {unpaired}"


def test_interval_widens_with_seed_noise():
    """Same items, but the seeds disagree: the two-level interval takes that in."""
    rng = np.random.default_rng(4)
    base = rng.integers(0, 2, size=(1, 300)).astype(float)
    calm = np.repeat(base, 3, axis=0)
    noisy = calm + np.array([[-0.2], [0.0], [0.2]])
    _, calm_low, calm_high = statistics.two_level_bootstrap([calm])
    _, noisy_low, noisy_high = statistics.two_level_bootstrap([noisy])
    noisy_width, calm_width = noisy_high - noisy_low, calm_high - calm_low
    assert noisy_width > 2 * calm_width, (
        f"width {noisy_width} with seed noise, {calm_width} without"
    )


def test_bootstrap_coverage_of_a_known_mean():
    """Binary items with p = 0.3: over 200 made-up studies the 95% interval holds 0.3 in
    about 95% of them (a loose band: 200 draws)."""
    rng = np.random.default_rng(5)
    held = 0
    for trial in range(200):
        table = (rng.random((2, 150)) < 0.3).astype(float)
        _, low, high = statistics.two_level_bootstrap([table], replicates=400, seed=trial)
        held += low <= 0.3 <= high
    assert 0.85 <= held / 200 <= 0.995, f"coverage {held / 200}, expected about 0.95"


def test_forgetting_average_is_the_mean_of_task_means():
    tables = [np.full((2, 10), 0.5), np.full((2, 40), 1.0)]
    estimate, low, high = statistics.two_level_bootstrap(tables)
    assert (estimate, low, high) == pytest.approx((0.75, 0.75, 0.75))


def test_base_with_one_replicate_pairs_with_every_seed():
    base = cell([[0, 1, 0, 1]])
    tuned = cell([[1, 1, 0, 1], [1, 1, 1, 1]])
    difference, _, _ = statistics.paired_difference(tuned, base, ["t"])
    assert difference == pytest.approx((0.25 + 0.5) / 2)


def test_different_items_are_refused():
    with pytest.raises(ValueError, match="different items"):
        statistics.paired_difference(cell([[1, 0]]), cell([[1, 0, 1]]), ["t"])


def test_seed_interval_is_student_t_and_nan_for_one_seed():
    mean, low, high = statistics.seed_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    # t(0.975, 2) = 4.303, sem = 1 / sqrt(3)
    assert high - mean == pytest.approx(4.3027 / math.sqrt(3), rel=1e-3)
    assert mean - low == pytest.approx(4.3027 / math.sqrt(3), rel=1e-3)
    one_seed = statistics.seed_interval([1.0])
    assert math.isnan(one_seed[1]), f"an interval from one seed: {one_seed}"
