"""cfs.report: the summary (means and intervals over seeds), the paired differences, the
verdicts on the paper's claims and each cell's card, on a made-up study whose effects are
known. (The figures drawn from them: test_figures.py.)"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from cfs import report
from cfs.errors import DataError
from cfs.study import METHODS, parse_cell

TARGET, FORGETTING = "cfs_arith", ["cfs_capitals", "cfs_animals"]
NUM_ITEMS = 120


def eval_record(model, method, seed, scores: dict, base=None, kl=0.0, **knobs):
    """An eval.json as cfs.evaluate writes it; scores: {task: per-item 0/1 list}."""
    items = {task: {str(i): float(s) for i, s in enumerate(row)} for task, row in scores.items()}
    means = {task: float(np.mean(row)) for task, row in scores.items()}
    forgetting = {task: means[task] for task in FORGETTING}
    metrics = {
        "target": means[TARGET],
        "forgetting_avg": sum(forgetting.values()) / len(forgetting),
        "forgetting": forgetting,
        "kl_to_base": kl,
    }
    if method != "base":
        metrics["heldout_nll"] = 3.0 + kl
    record = {
        "cell": {"model": model, "method": method, **knobs},
        "metrics": metrics,
        "tasks": {"target": TARGET, "forgetting": FORGETTING},
        "items": items,
        "provenance": {"seed": seed},
    }
    if base is not None:
        record["base"] = base
    return record


def scores(rng, target_p, keep_p):
    return {
        TARGET: (rng.random(NUM_ITEMS) < target_p).astype(int).tolist(),
        **{task: (rng.random(NUM_ITEMS) < keep_p).astype(int).tolist() for task in FORGETTING},
    }


CELLS = {  # cell path (cfs.study's grammar): (method, knobs, target p, forgetting p, kl)
    "ratio0": ("plain", {"ratio": 0.0}, 0.6, 0.5, 0.6),
    "temp1/ratio1": ("context_free", {"temperature": 1.0, "ratio": 1.0}, 0.55, 0.85, 0.2),
    "temp0.7/ratio1": ("context_free", {"temperature": 0.7, "ratio": 1.0}, 0.55, 0.7, 0.3),
    "temp1/ratio0.5": ("context_free", {"temperature": 1.0, "ratio": 0.5}, 0.55, 0.8, 0.25),
    "contextual/temp1/ratio1": ("contextual", {"temperature": 1.0, "ratio": 1.0}, 0.6, 0.5, 0.5),
    "replay/ratio1": ("replay", {"ratio": 1.0}, 0.6, 0.9, 0.1),
}


def write_study(root, model="tiny", seeds=(0, 1, 2), cells=CELLS) -> dict[str, list]:
    """A made-up study on disk: base once, every cell once per seed, with known effects."""
    rng = np.random.default_rng(0)
    base = eval_record(model, "base", 0, scores(rng, 0.1, 0.9))
    paths = {"base": [root / model / "base" / "eval.json"]}
    records = {paths["base"][0]: base}
    for cell, (method, knobs, target_p, keep_p, kl) in cells.items():
        paths[cell] = []
        for seed in seeds:
            path = root / model / cell / f"seed{seed}" / "eval.json"
            records[path] = eval_record(
                model, method, seed, scores(rng, target_p, keep_p), base["metrics"], kl, **knobs
            )
            paths[cell].append(path)
    for path, record in records.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
    return paths


def all_paths(paths):
    return [path for group in paths.values() for path in group]


def test_the_made_up_cells_are_where_the_grammar_puts_them():
    for path, (method, knobs, *_) in CELLS.items():
        assert parse_cell(path) == {"method": method, **knobs}, path


def test_summary_one_row_per_cell_with_means_and_intervals(tmp_path):
    paths = write_study(tmp_path)
    table = report.build_summary(all_paths(paths)[::-1])  # in any order
    assert len(table) == 1 + len(CELLS)
    assert list(table["method"][:2]) == ["base", "plain"]
    for _, row in table.iterrows():
        records = [json.loads(open(p).read()) for p in row["eval_paths"].split()]
        assert row["num_seeds"] == len(records) == (1 if row["method"] == "base" else 3)
        for metric in ("target", "forgetting_avg"):
            mean = np.mean([r["metrics"][metric] for r in records])
            assert row[metric] == pytest.approx(mean)
            low, high = row[f"{metric}_low"], row[f"{metric}_high"]
            assert low < mean < high, f"{row['label']} {metric}: {mean} not in ({low}, {high})"
            assert high - low < 0.25, f"{row['label']} {metric}: interval ({low}, {high})"
        if row["method"] != "base":
            assert row["kl_to_base"] == pytest.approx(CELLS_BY_LABEL[row["label"]][4])
            assert row["base_target"] == records[0]["base"]["target"]


CELLS_BY_LABEL = {
    report.cell_label({"method": method, **knobs}): spec
    for method, knobs, *_ in CELLS.values()
    for spec in [next(s for s in CELLS.values() if s[0] == method and s[1] == knobs)]
}


def test_context_free_sorted_by_temperature_then_ratio(tmp_path):
    table = report.build_summary(all_paths(write_study(tmp_path)))
    cf = table[table["method"] == "context_free"]
    assert list(zip(cf["temperature"], cf["ratio"], strict=True)) == [
        (0.7, 1.0),
        (1.0, 0.5),
        (1.0, 1.0),
    ]


def test_differences_from_plain_and_base_find_the_made_up_effects(tmp_path):
    cells = report.read_cells(all_paths(write_study(tmp_path)))
    table = report.build_differences(cells)
    row = table[
        (table["label"] == "context_free T1 r1")
        & (table["versus"] == "plain")
        & (table["metric"] == "forgetting_avg")
    ].iloc[0]
    interval = (row["low"], row["difference"], row["high"])  # keeps 0.85 vs 0.5
    assert 0.2 < interval[0] < interval[1] < interval[2], f"(low, difference, high) {interval}"
    gain = table[
        (table["label"] == "plain") & (table["versus"] == "base") & (table["metric"] == "target")
    ].iloc[0]
    interval = (gain["low"], gain["difference"], gain["high"])  # p 0.6 vs 0.1
    assert 0.3 < interval[0] < interval[1] < interval[2], f"(low, difference, high) {interval}"
    assert interval[1] == pytest.approx(0.5, abs=0.1)


def test_verdicts_answer_each_claim(tmp_path):
    cells = report.read_cells(all_paths(write_study(tmp_path)))
    verdicts = report.build_verdicts(cells)
    by = {(row.claim, row.comparison): row.verdict for row in verdicts.itertuples()}
    claim = {name: spec.claim for name, spec in METHODS.items() if spec.claim}
    assert by[(claim["plain"], "context_free T1 r1 - plain")] == "supported"
    contextual = (claim["contextual"], "context_free T1 r1 - contextual T1 r1")
    assert by[contextual] == "supported"
    # replay keeps 0.9 against 0.85: not less effective here
    replay = by[(claim["replay"], "context_free T1 r1 - replay r1")]
    assert replay in ("contradicted", "inconclusive"), f"replay keeps more, yet: {replay}"
    temperature = (report.sweep_claim("temperature"), "context_free T1 r1 - context_free T0.7 r1")
    assert by[temperature] == "supported"
    ratio = (report.sweep_claim("ratio"), "context_free T1 r1 - context_free T1 r0.5")
    assert ratio in by, f"no verdict on the ratio; verdicts: {sorted(by)}"


def test_verdicts_carry_the_kl_to_base_difference_paired_by_seed(tmp_path):
    paths = write_study(tmp_path)
    # KL to base 0.2 (context-free T1 r1) against plain's 0.6, plus seed noise on plain
    for seed, (path, noise) in enumerate(zip(paths["ratio0"], (0.0, 0.1, -0.1), strict=True)):
        record = json.loads(path.read_text())
        record["metrics"]["kl_to_base"] = 0.6 + noise
        assert record["provenance"]["seed"] == seed
        path.write_text(json.dumps(record))
    verdicts = report.build_verdicts(report.read_cells(all_paths(paths)))
    row = verdicts.set_index("comparison").loc["context_free T1 r1 - plain"]
    differences = np.array([0.2 - 0.6, 0.2 - 0.7, 0.2 - 0.5])
    half = 4.302653 * differences.std(ddof=1) / np.sqrt(3)  # t(0.975, 2 df)
    assert row.kl_to_base_difference == pytest.approx(-0.4)
    assert (row.kl_low, row.kl_high) == pytest.approx((-0.4 - half, -0.4 + half), rel=1e-5)
    # a constant KL gap between cells: exactly that gap, no width
    replay = verdicts.set_index("comparison").loc["context_free T1 r1 - replay r1"]
    assert (replay.kl_to_base_difference, replay.kl_low, replay.kl_high) == pytest.approx(
        (0.1, 0.1, 0.1)
    )


def test_identical_cells_are_inconclusive(tmp_path):
    same = {
        "ratio0": ("plain", {"ratio": 0.0}, 0.5, 0.5, 0.1),
        "temp1/ratio1": ("context_free", {"temperature": 1.0, "ratio": 1.0}, 0.5, 0.5, 0.1),
    }
    paths = write_study(tmp_path, cells=same)
    # the context-free evals are the plain ones, item for item
    for plain, cf in zip(paths["ratio0"], paths["temp1/ratio1"], strict=True):
        record = json.loads(plain.read_text())
        record["cell"] = {"model": "tiny", "method": "context_free", "temperature": 1.0}
        record["cell"]["ratio"] = 1.0
        cf.write_text(json.dumps(record))
    verdicts = report.build_verdicts(report.read_cells(all_paths(paths)))
    row = verdicts.iloc[0]
    assert (row.forgetting_avg_difference, row.low, row.high) == (0.0, 0.0, 0.0)
    assert row.verdict == "inconclusive"


def test_table_cli_writes_the_three_tables(tmp_path):
    paths = write_study(tmp_path / "results")
    out = tmp_path / "results"
    report.main(
        [
            "table",
            "--evals",
            *map(str, all_paths(paths)),
            "--out",
            str(out / "summary.csv"),
            "--differences",
            str(out / "differences.csv"),
            "--verdicts",
            str(out / "verdicts.csv"),
        ]
    )
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 1 + len(CELLS)
    assert set(summary["seeds"].astype(str)) == {"0", "0 1 2"}
    differences = pd.read_csv(out / "differences.csv")
    assert set(differences["versus"]) == {"plain", "base"}
    verdicts = pd.read_csv(out / "verdicts.csv")
    assert len(verdicts) > 0, "verdicts.csv has no rows"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_cell_card_over_seeds(tmp_path):
    paths = write_study(tmp_path)
    out = tmp_path / "card.json"
    report.main(["cell", "--evals", *map(str, paths["temp1/ratio1"]), "--out", str(out)])
    card = json.loads(out.read_text())
    records = [json.loads(p.read_text()) for p in paths["temp1/ratio1"]]
    assert card["seeds"] == [0, 1, 2]
    mean = np.mean([r["metrics"]["target"] for r in records])
    assert card["metrics"]["target"] == pytest.approx(mean)
    low, high = card["interval"]["target"]
    assert low < mean < high, f"target mean {mean} outside its interval ({low}, {high})"
    assert [entry["metrics"] for entry in card["per_seed"]] == [r["metrics"] for r in records]
    with pytest.raises(DataError, match="one cell"):  # two cells are not one cell's seeds
        report.main(
            ["cell", "--evals", str(paths["ratio0"][0]), str(paths["temp1/ratio1"][0])]
            + ["--out", str(out)]
        )


def test_one_seed_gives_no_seed_interval(tmp_path):
    summary = report.build_summary(all_paths(write_study(tmp_path, seeds=(0,))))
    plain = summary[summary["method"] == "plain"].iloc[0]
    # a t interval over seeds needs two of them
    assert np.isnan(plain["kl_to_base_low"]), f"an interval from one seed: {plain.to_dict()}"


def test_missing_metrics_in_eval_json_is_an_error(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"cell": {"model": "m", "method": "base"}}))
    with pytest.raises(KeyError, match="metrics"):
        report.build_summary([path])
