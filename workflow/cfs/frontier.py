"""Frontiers: each method traced along its own trade-off between the target gain and
forgetting, and methods compared at a matched target gain.

A method's path starts at the base model and runs through its models in order of how far
they moved: a fine-tune's points along training (train.evaluate_at, `<cell>/at<f>`) and
its end; WiSE-FT's merges by alpha, ending at the plain fine-tune (alpha 1). A method
with several learning rates (`<cell>/lr<rate>`) has a path per rate, and its frontier at
a target gain is, seed by seed, the path that forgets least there.

At a matched target gain X (claims.matched_target_gain) each path is read where it first
reaches X: between the two points around X, linearly in the target gain, so each test
item's score there is the same mix of its scores at those points. The comparison of two
methods at X is then an ordinary paired interval over seeds and items (cfs.statistics),
the mixing weights fixed per seed; a seed whose path never reaches X drops out of that
comparison (num_seeds says how many were left).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pandas as pd

from cfs.statistics import Interval, paired_difference, paired_seed_difference
from cfs.study import KNOB_LABELS, METHODS, PROPOSED


@dataclass
class Path:
    """One method's path: (position, Cell) from the base model (position 0) on."""

    family: str
    label: str
    method: str
    points: list

    def seed_point(self, cell, seed):
        """(target, {task: {item: score}}, KL to base) of one seed at one point; the base
        model's single eval stands for every seed."""
        base = cell.info["method"] == "base"
        record = cell.records[0] if base else cell_record(cell, seed)
        if record is None:
            return None
        metrics = record["metrics"]
        return metrics["target"], record["items"], metrics.get("kl_to_base") or 0.0

    def at_gain(self, seed, gain: float) -> dict | None:
        """The path where it first reaches `gain` over the base model's target, for one
        seed: {"items", "kl_to_base", "position"}; None if it never does."""
        points = [(position, self.seed_point(cell, seed)) for position, cell in self.points]
        if any(point is None for _, point in points):
            return None
        base_target = points[0][1][0]
        for (pos_a, a), (pos_b, b) in zip(points, points[1:], strict=False):
            gain_a, gain_b = a[0] - base_target, b[0] - base_target
            if gain_b >= gain > gain_a:
                weight = (gain - gain_a) / (gain_b - gain_a)
                return {
                    "items": mix_items(a[1], b[1], weight),
                    "kl_to_base": (1 - weight) * a[2] + weight * b[2],
                    "position": pos_a + weight * (pos_b - pos_a),
                }
        return None


def cell_record(cell, seed):
    return next((r for r in cell.records if r.get("provenance", {}).get("seed") == seed), None)


def mix_items(a: dict, b: dict, weight: float) -> dict:
    """Each item's score (1 - weight) x a + weight x b, task by task."""
    return {
        task: {item: (1 - weight) * a[task][item] + weight * b[task][item] for item in b[task]}
        for task in b
    }


def forgetting_average(items: dict, tasks: list[str]) -> float:
    return sum(sum(items[t].values()) / len(items[t]) for t in tasks) / len(tasks)


def family_of(info: dict) -> str:
    """A method and its knobs but the learning rate ('context_free T1 r1', 'plain'): the
    paths one frontier takes the best of."""
    method = info["method"]
    knobs = [
        f"{label}{info[knob]:g}"
        for knob, label in KNOB_LABELS.items()
        if info.get(knob) is not None
        and knob not in ("learning_rate", "fraction")
        and not (method == "plain" and knob == "ratio")
    ]
    return " ".join([method, *knobs])


def build_paths(cells: list) -> list[Path]:
    """Every path of one model's cells: each fine-tune's (through its points along
    training) and WiSE-FT's (through its alphas to the plain fine-tune)."""
    base = next((c for c in cells if c.info["method"] == "base"), None)
    if base is None:
        return []
    ends = [c for c in cells if c.info.get("fraction") is None and c.info["method"] != "base"]
    points = defaultdict(list)
    for cell in cells:
        if cell.info.get("fraction") is not None:
            end = {k: v for k, v in cell.info.items() if k != "fraction"}
            points[tuple(sorted(end.items()))].append(cell)
    paths = []
    for end in ends:
        method = end.info["method"]
        if not METHODS[method].trains:
            continue
        along = sorted(points[tuple(sorted(end.info.items()))], key=lambda c: c.info["fraction"])
        route = [(0.0, base), *((c.info["fraction"], c) for c in along), (1.0, end)]
        paths.append(Path(family_of(end.info), end.label, method, route))
    plain = next(
        (c for c in ends if c.info["method"] == "plain" and c.info.get("learning_rate") is None),
        None,
    )
    merges = [c for c in ends if c.info["method"] == "wiseft"]
    merges.sort(key=lambda c: c.info["alpha"])
    if merges and plain is not None:
        route = [(0.0, base), *((c.info["alpha"], c) for c in merges), (1.0, plain)]
        paths.append(Path("wiseft", "wiseft (alpha 0 to 1)", "wiseft", route))
    return paths


def frontier_at(paths: list[Path], seeds, gain: float, tasks: list[str]) -> dict:
    """{seed: the point at `gain` of the path that forgets least there} over `paths` (one
    family); seeds where no path reaches the gain are left out."""
    best = {}
    for seed in seeds:
        reached = [p.at_gain(seed, gain) for p in paths]
        reached = [point for point in reached if point is not None]
        if reached:
            best[seed] = max(reached, key=lambda p: forgetting_average(p["items"], tasks))
    return best


@dataclass
class Matched:
    """One comparison at a matched target gain: a minus b over the seeds where both paths
    reach it (None, 0 seeds: in no seed)."""

    family_a: str
    family_b: str
    forgetting: Interval | None
    kl_to_base: Interval | None
    num_seeds: int


def compare_at(a: dict, b: dict, tasks: list[str]) -> tuple:
    """(forgetting, KL, seeds) of a minus b over the seeds where both reach the gain."""
    seeds = sorted(set(a) & set(b), key=str)
    if not seeds:
        return None, None, 0
    forgetting = paired_difference(
        {s: a[s]["items"] for s in seeds}, {s: b[s]["items"] for s in seeds}, tasks
    )
    kl = paired_seed_difference(
        {s: a[s]["kl_to_base"] for s in seeds}, {s: b[s]["kl_to_base"] for s in seeds}
    )
    return forgetting, kl, len(seeds)


def matched_comparisons(cells: list, gain: float, tasks: list[str] | None = None) -> list[Matched]:
    """At target gain `gain`, for one model: every family against plain fine-tuning's
    frontier (over its learning rates and steps), and context-free data against every
    other family; on the forgetting average over `tasks` (default: every forgetting task)."""
    paths = build_paths(cells)
    families = defaultdict(list)
    for path in paths:
        families[path.family].append(path)
    if "plain" not in families:
        return []
    trained = [c for c in cells if c.info["method"] not in ("base",)]
    seeds = sorted({s for c in trained for s in c.seeds if s is not None}, key=str)
    tasks = tasks or trained[0].task_names("forgetting_avg")
    fronts = {name: frontier_at(group, seeds, gain, tasks) for name, group in families.items()}
    pairs = [(name, "plain") for name in families if name != "plain"]
    proposed = [name for name in families if name.split()[0] == PROPOSED]
    pairs += [
        (cf, other)
        for cf in proposed
        for other in families
        if other != "plain" and other.split()[0] != PROPOSED
    ]
    return [Matched(a, b, *compare_at(fronts[a], fronts[b], tasks)) for a, b in pairs]


def frontier_table(cells: list) -> pd.DataFrame:
    """Every path's points, one row per (path, point): the target gain, the forgetting
    average's change and KL to base, means over seeds with their 95% intervals."""
    rows = []
    for model in sorted({c.info.get("model") for c in cells}):
        own = [c for c in cells if c.info.get("model") == model and c.has_items()]
        for path in build_paths(own):
            base = path.points[0][1]
            for position, cell in path.points:
                row = {"model": model, "family": path.family, "path": path.label}
                row.update(method=path.method, position=position, point=cell.label)
                row["num_seeds"] = len(cell.records)
                for metric in ("target", "forgetting_avg"):
                    shift = base.records[0]["metrics"][metric]
                    interval = cell.metric(metric) if cell is not base else None
                    for suffix, value in (("", "estimate"), ("_low", "low"), ("_high", "high")):
                        change = getattr(interval, value) - shift if interval else 0.0
                        row[f"{metric}_change{suffix}"] = change
                kl = cell.metric("kl_to_base") if cell is not base else None
                row["kl_to_base"] = kl.estimate if kl else 0.0
                row["kl_to_base_low"] = kl.low if kl else 0.0
                row["kl_to_base_high"] = kl.high if kl else 0.0
                rows.append(row)
    return pd.DataFrame(rows)
