"""cfs.frontier: each method's path from the base model, read at a matched target gain,
and the intervals of the comparisons there, on made-up evals whose truth is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from cfs import frontier, report
from cfs.report import Cell

TARGET, TASKS = "cfs_add_sub", ["cfs_capitals", "cfs_antonyms"]
CLAIMS = {
    "primary": {"cell": "temp1/ratio1", "versus": "ratio0"},
    "equivalence_margin": 0.25,
    "matched_target_gain": 0.4,
}


def record(method, seed, target, forgetting: dict, kl=0.0, **knobs):
    """An eval.json as cfs.evaluate writes it; forgetting: {task: per-item scores}."""
    items = {
        task: {str(i): float(s) for i, s in enumerate(row)} for task, row in forgetting.items()
    }
    means = {task: float(np.mean(row)) for task, row in forgetting.items()}
    items[TARGET] = {str(i): float(target) for i in range(4)}
    return {
        "cell": {"model": "m", "method": method, **knobs},
        "metrics": {
            "target": target,
            "forgetting_avg": float(np.mean(list(means.values()))),
            "forgetting": means,
            "kl_to_base": kl,
            "heldout_nll": 3.0,
        },
        "tasks": {"target": TARGET, "forgetting": TASKS},
        "items": items,
        "provenance": {"seed": seed},
    }


def point(method, target, level, kl, seeds=(0,), **knobs):
    """A cell whose every seed has target `target`, every forgetting item `level`."""
    scores = {task: [level] * 4 for task in TASKS}
    return Cell([record(method, seed, target, scores, kl, **knobs) for seed in seeds])


def test_a_path_is_read_between_the_two_points_around_the_gain():
    """Base target 0.1; plain reaches 0.3 at half its steps and 0.7 at the end: a gain of
    0.4 lies halfway between, so each item's score is the mean of the two points'."""
    cells = [
        point("base", 0.1, 0.9, 0.0),
        point("plain", 0.3, 0.8, 0.2, ratio=0.0, fraction=0.5),
        point("plain", 0.7, 0.6, 0.6, ratio=0.0),
    ]
    (path,) = frontier.build_paths(cells)
    assert [position for position, _ in path.points] == [0.0, 0.5, 1.0]
    reached = path.at_gain(0, 0.4)
    assert reached["position"] == pytest.approx(0.75)
    assert reached["kl_to_base"] == pytest.approx(0.4)
    assert all(score == pytest.approx(0.7) for t in TASKS for score in reached["items"][t].values())
    assert path.at_gain(0, 0.61) is None  # beyond the end: not reached


def test_wiseft_runs_from_base_through_its_alphas_to_the_plain_fine_tune():
    cells = [
        point("base", 0.0, 0.9, 0.0),
        point("plain", 0.5, 0.6, 0.5, ratio=0.0),
        point("wiseft", 0.6, 0.85, 0.1, alpha=0.5),
    ]
    paths = {p.family: p for p in frontier.build_paths(cells)}
    assert [pos for pos, _ in paths["wiseft"].points] == [0.0, 0.5, 1.0]
    # the merge reaches 0.4 between base and alpha 0.5: two thirds of the way
    assert paths["wiseft"].at_gain(0, 0.4)["position"] == pytest.approx(1 / 3)


def test_plain_frontier_takes_per_seed_the_learning_rate_that_forgets_least():
    cells = [
        point("base", 0.0, 0.9, 0.0),
        point("plain", 0.8, 0.5, 0.6, ratio=0.0),
        point("plain", 0.8, 0.7, 0.3, ratio=0.0, learning_rate=2e-4),
        point("context_free", 0.8, 0.8, 0.2, temperature=1.0, ratio=1.0),
    ]
    compared = {(m.family_a, m.family_b): m for m in frontier.matched_comparisons(cells, 0.4)}
    against_plain = compared[("context_free T1 r1", "plain")]
    # at gain 0.4, halfway from base: cf 0.85, plain's better rate 0.8 (not 0.7)
    assert against_plain.forgetting.estimate == pytest.approx(0.05)
    assert against_plain.kl_to_base.estimate == pytest.approx(0.1 - 0.15)


def verdict_cells(reach: float):
    seeds = (0, 1, 2)
    return [
        point("base", 0.0, 0.9, 0.0),
        point("plain", reach, 0.5, 0.6, seeds, ratio=0.0),
        point("context_free", reach, 0.8, 0.2, seeds, temperature=1.0, ratio=1.0),
    ]


def test_the_matched_comparison_is_primary_and_the_end_of_training_rows_say_so():
    verdicts = report.build_verdicts(verdict_cells(0.8), CLAIMS)
    primary = verdicts[verdicts["primary"]]
    assert primary["comparison"].tolist() == ["context_free T1 r1 - plain at matched target"]
    at_end = verdicts[verdicts["comparison"] == "context_free T1 r1 - plain"]
    assert at_end["claim"].str.endswith("(at the end of training)").all()
    assert not at_end["primary"].any()


def test_a_gain_no_path_reaches_is_said_not_guessed():
    verdicts = report.build_verdicts(verdict_cells(0.3), CLAIMS)
    primary = verdicts[verdicts["primary"]].iloc[0]
    assert primary["verdict"] == report.NOT_REACHED
    assert primary["num_seeds"] == 0
    assert pd.isna(primary["low"])


def simulated_cells(rng, effect, seeds=5, items=60, seed_sd=0.01, item_sd=0.05, noise=0.03):
    """A plain and a context-free path (base, half, end) per seed. Each seed learns the
    target at its own speed; along the path each item's forgetting score falls linearly
    with the target gain, context-free data `effect` less at the gain 0.4, with a seed
    effect (as large as the default's spread over seeds), a method x item effect and
    noise at each point."""
    base_level = rng.uniform(0.6, 0.9, size=(len(TASKS), items))
    cells = [Cell([record("base", 0, 0.0, dict(zip(TASKS, base_level.tolist(), strict=True)))])]
    for method, knobs, drop in (
        ("plain", {"ratio": 0.0}, 0.2),
        ("context_free", {"temperature": 1.0, "ratio": 1.0}, 0.2 - effect / 0.4),
    ):
        item_effect = rng.normal(0, item_sd, size=base_level.shape)
        by_fraction = {0.5: [], 1.0: []}
        for seed in range(seeds):
            speed = rng.uniform(0.6, 1.0)
            seed_effect = rng.normal(0, seed_sd)
            for fraction in by_fraction:
                gain = speed * fraction
                level = base_level - drop * gain + (item_effect + seed_effect) * gain / 0.4
                level = level + rng.normal(0, noise, size=level.shape)
                scores = dict(zip(TASKS, level.tolist(), strict=True))
                extra = {} if fraction == 1.0 else {"fraction": fraction}
                kl = gain + rng.normal(0, 0.01)
                by_fraction[fraction].append(
                    record(method, seed, gain, scores, kl, **knobs, **extra)
                )
        cells += [Cell(records) for records in by_fraction.values()]
    return cells


def test_the_matched_comparison_covers_at_nominal_95():
    """The interval of context-free data minus plain at the matched gain holds the true
    difference at least 93% of the time."""
    rng = np.random.default_rng(7)
    effect, runs, covered = 0.02, 300, 0
    for _ in range(runs):
        comparisons = frontier.matched_comparisons(simulated_cells(rng, effect), 0.4)
        (matched,) = [m for m in comparisons if m.family_b == "plain"]
        covered += matched.forgetting.low <= effect <= matched.forgetting.high
    assert covered / runs >= 0.93, f"coverage {covered / runs:.3f}"
