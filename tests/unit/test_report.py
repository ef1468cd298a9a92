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


CLAIMS = {
    "primary": {"cell": "temp1/ratio1", "versus": "ratio0"},
    "equivalence_margin": 0.25,
    "matched_target_gain": None,
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
            # 3 seeds: the seed term's t has 2 df
            assert high - low < 0.5, f"{row['label']} {metric}: interval ({low}, {high})"
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
    verdicts = report.build_verdicts(cells, CLAIMS)
    by = {(row.claim, row.comparison): row.verdict for row in verdicts.itertuples()}
    claim = {name: spec.claim for name, spec in METHODS.items() if spec.claim}
    assert by[(claim["plain"], "context_free T1 r1 - plain")] == "supported"
    contextual = (claim["contextual"], "context_free T1 r1 - contextual T1 r1")
    assert by[contextual] == "supported"
    # replay keeps 0.9 against 0.85: not less effective here
    replay = by[(claim["replay"], "context_free T1 r1 - replay r1")]
    assert replay in ("contradicted", "inconclusive"), f"replay keeps more, yet: {replay}"
    # keeps 0.85 against 0.7: p below 0.05 alone, but not once Holm-corrected in the family
    temperature = (report.sweep_claim("temperature"), "context_free T1 r1 - context_free T0.7 r1")
    row = verdicts.set_index(["claim", "comparison"]).loc[temperature]
    assert row.p_value < 0.05 < row.holm_p_value
    assert by[temperature] == "inconclusive"
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
    verdicts = report.build_verdicts(report.read_cells(all_paths(paths)), CLAIMS)
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
    verdicts = report.build_verdicts(report.read_cells(all_paths(paths)), CLAIMS)
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
            "--claims",
            json.dumps(CLAIMS),
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


def test_one_seed_gives_no_verdict(tmp_path):
    """One seed's interval is the test items' alone: a seed-to-seed spread as large as the
    effect would go unseen, so no comparison of one seed is called supported."""
    cells = report.read_cells(all_paths(write_study(tmp_path, seeds=(0,))))
    verdicts = report.build_verdicts(cells, CLAIMS)
    assert set(verdicts["verdict"]) == {report.ONE_SEED}, verdicts[["comparison", "verdict"]]
    assert set(verdicts["kl_verdict"]) == {report.ONE_SEED}


def test_missing_metrics_in_eval_json_is_an_error(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"cell": {"model": "m", "method": "base"}}))
    with pytest.raises(KeyError, match="metrics"):
        report.build_summary([path])


def test_verdicts_mark_the_primary_and_holm_correct_the_rest(tmp_path):
    verdicts = report.build_verdicts(report.read_cells(all_paths(write_study(tmp_path))), CLAIMS)
    primary = verdicts[verdicts["primary"]]
    assert list(primary["comparison"]) == ["context_free T1 r1 - plain"]
    # the primary is tested alone; the family (every other forgetting and KL test) is not
    assert primary["holm_p_value"].iloc[0] == primary["p_value"].iloc[0]
    rest = verdicts[~verdicts["primary"]]
    assert (rest["holm_p_value"] >= rest["p_value"]).all()
    assert (rest["holm_p_value"] > rest["p_value"]).any()
    # a verdict is read off the corrected interval, which excludes 0 iff Holm rejects
    for row in verdicts.itertuples():
        excludes = row.corrected_low > 0 or row.corrected_high < 0
        assert excludes == (row.holm_p_value < 0.05), row.comparison
        assert row.corrected_low <= row.low and row.high <= row.corrected_high


def test_a_primary_the_study_does_not_make_is_refused_by_its_key(tmp_path):
    cells = report.read_cells(all_paths(write_study(tmp_path)))
    other = "contextual/temp1/ratio1"  # contextual data pairs on temperature and ratio
    claims = {**CLAIMS, "primary": {"cell": "temp0.7/ratio1", "versus": other}}
    with pytest.raises(ValueError, match="claims.primary"):
        report.build_verdicts(cells, claims)


def shifted_copy(paths, source, cell, knobs, shift, kl, noise=0.0):
    """A cell whose evals are `source`'s with every forgetting score moved by `shift` (plus
    normal noise of sd `noise`, if any)."""
    rng = np.random.default_rng(9)
    method = parse_cell(cell)["method"]
    paths[cell] = []
    for path in paths[source]:
        record = json.loads(path.read_text())
        record["cell"] = {"model": "tiny", "method": method, **knobs}
        for task in FORGETTING:
            scores = record["items"][task]
            record["items"][task] = {i: v + shift + rng.normal(0, noise) for i, v in scores.items()}
        record["metrics"]["kl_to_base"] = kl
        out = path.parents[1].parent / cell / path.parent.name / "eval.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record))
        paths[cell].append(out)


@pytest.mark.parametrize(
    ("shift", "noise", "expected"),
    [(0.01, 0, "equivalent"), (-0.2, 0, "not equivalent"), (-0.08, 0.3, "inconclusive")],
)
def test_approximating_the_exact_penalty_is_an_equivalence_test(tmp_path, shift, noise, expected):
    """Context-free data (keeps 0.85) against the exact KL penalty: the margin is a quarter
    of the penalty's own effect on the forgetting average (against plain, keeps 0.5). A
    difference that excludes 0 but reaches inside the margin is inconclusive, not a
    contradiction."""
    paths = write_study(tmp_path)
    knobs = {"temperature": 1.0, "ratio": 1.0, "lambda": 1.0}
    cell = "kl_to_base/temp1/ratio1/lambda1"
    shifted_copy(paths, "temp1/ratio1", cell, knobs, shift, 0.2, noise)
    verdicts = report.build_verdicts(report.read_cells(all_paths(paths)), CLAIMS)
    row = verdicts.set_index("comparison").loc["context_free T1 r1 - kl_to_base T1 r1 λ1"]
    effect = 0.35 + shift  # the penalty's cell keeps 0.85 + shift, plain 0.5
    assert row.margin == pytest.approx(0.25 * effect, abs=0.015)
    assert row.forgetting_avg_difference == pytest.approx(-shift, abs=0.02)
    assert row.verdict == expected
    if expected == "inconclusive":
        assert row.low > 0, "the case of a difference that excludes 0 inside the margin"


def test_the_sampled_term_is_compared_with_the_exact_penalty_it_estimates(tmp_path):
    """weighted_synthetic's term is an unbiased estimate of kl_to_base's at the same
    lambda and samples per step: one equivalence row per such pair, none across lambdas."""
    paths = write_study(tmp_path)
    for lam in (1.0, 2.0):
        knobs = {"temperature": 1.0, "ratio": 1.0, "lambda": lam}
        shifted_copy(
            paths, "temp1/ratio1", f"kl_to_base/temp1/ratio1/lambda{lam:g}", knobs, 0.0, 0.2
        )
    weighted = {"temperature": 1.0, "ratio": 1.0, "lambda": 1.0}
    shifted_copy(paths, "temp1/ratio1", "cf_weighted/temp1/ratio1/lambda1", weighted, -0.2, 0.5)
    verdicts = report.build_verdicts(report.read_cells(all_paths(paths)), CLAIMS)
    rows = verdicts[verdicts["claim"].str.startswith("weighted_synthetic's sampled term")]
    assert rows["comparison"].tolist() == ["weighted_synthetic T1 r1 λ1 - kl_to_base T1 r1 λ1"]
    row = rows.iloc[0]
    assert row.forgetting_avg_difference == pytest.approx(-0.2, abs=0.02)
    assert row.verdict == "not equivalent"  # 0.2 apart, against a margin of 0.25 x 0.35
    assert row.kl_to_base_difference == pytest.approx(0.3)


def test_seeds_pair_by_id_and_a_missing_seed_is_named(tmp_path):
    paths = write_study(tmp_path)
    record = json.loads(paths["replay/ratio1"][2].read_text())
    record["provenance"]["seed"] = 5
    paths["replay/ratio1"][2].write_text(json.dumps(record))
    cells = report.read_cells(all_paths(paths))
    with pytest.raises(ValueError, match=r"\[2, 5\] on one side only"):
        report.build_verdicts(cells, CLAIMS)


def test_differences_carry_each_forgetting_task(tmp_path):
    cells = report.read_cells(all_paths(write_study(tmp_path)))
    table = report.build_differences(cells)
    rows = table[(table["label"] == "context_free T1 r1") & (table["versus"] == "plain")]
    by_metric = rows.set_index("metric")
    assert {f"forgetting:{task}" for task in FORGETTING} <= set(by_metric.index)
    tasks = [by_metric.loc[f"forgetting:{task}", "difference"] for task in FORGETTING]
    assert np.mean(tasks) == pytest.approx(by_metric.loc["forgetting_avg", "difference"])
    assert (rows["p_value"].between(0, 1)).all()


def test_every_baseline_that_runs_gets_a_verdict_whatever_its_sign(tmp_path):
    """A WiSE-FT cell that keeps more than context-free data is answered, "contradicted";
    the same samples as a weighted term are compared with mixing them in (approximates)."""
    paths = write_study(tmp_path)
    shifted_copy(paths, "temp1/ratio1", "wiseft/alpha0.5", {"alpha": 0.5}, 0.1, 0.1)
    weighted = {"temperature": 1.0, "ratio": 1.0, "lambda": 1.0}
    shifted_copy(paths, "temp1/ratio1", "cf_weighted/temp1/ratio1/lambda1", weighted, 0.0, 0.2)
    verdicts = report.build_verdicts(report.read_cells(all_paths(paths)), CLAIMS)
    rows = verdicts.set_index("comparison")
    wiseft = rows.loc["context_free T1 r1 - wiseft α0.5"]
    assert wiseft.claim == METHODS["wiseft"].claim
    assert wiseft.verdict == "contradicted", wiseft
    same = rows.loc["context_free T1 r1 - weighted_synthetic T1 r1 λ1"]
    assert same.claim == METHODS["weighted_synthetic"].claim
    assert same.verdict in ("equivalent", "inconclusive"), same


def test_the_primary_claim_is_checked_with_each_forgetting_task_left_out(tmp_path):
    """Context-free data keeps more than plain on cfs_animals only: with it left out, the
    claim is inconclusive."""
    paths = write_study(tmp_path)
    for path, plain_path in zip(paths["temp1/ratio1"], paths["ratio0"], strict=True):
        record, plain = json.loads(path.read_text()), json.loads(plain_path.read_text())
        record["items"]["cfs_capitals"] = plain["items"]["cfs_capitals"]  # no gain there
        path.write_text(json.dumps(record))
    cells = report.read_cells(all_paths(paths))
    left_out = report.leave_one_task_out(cells, report.build_verdicts(cells, CLAIMS), CLAIMS)
    by_task = left_out.set_index("left_out")
    assert list(by_task.index) == FORGETTING
    assert by_task.loc["cfs_capitals", "verdict"] == "supported"
    assert by_task.loc["cfs_animals", "verdict"] == "inconclusive"
    assert by_task.loc["cfs_animals", "difference"] == pytest.approx(0.0, abs=1e-12)
    page = report.results_page(
        "s",
        report.build_summary(all_paths(paths)),
        pd.DataFrame(columns=["model", "label", "versus", "metric", "difference", "low", "high"]),
        report.build_verdicts(cells, CLAIMS),
        left_out,
    )
    assert "## The primary claim without each forgetting task" in page


def test_summary_and_page_carry_each_tasks_acc_and_acc_norm(tmp_path):
    paths = write_study(tmp_path)
    for path in all_paths(paths):
        record = json.loads(path.read_text())
        record["lm_eval"] = {
            task: {"acc,none": 0.25, "acc_norm,none": 0.75, "p_correct,none": 0.5}
            for task in FORGETTING
        }
        path.write_text(json.dumps(record))
    summary = report.build_summary(all_paths(paths))
    assert (summary["acc:cfs_animals"] == 0.25).all()
    assert (summary["acc_norm:cfs_capitals"] == 0.75).all()
    page = report.results_page(
        "s",
        summary,
        pd.DataFrame(columns=["model", "label", "versus", "metric", "difference", "low", "high"]),
        pd.DataFrame(columns=report.VERDICT_COLUMNS),
    )
    section = page[page.index("## Each forgetting task") :].splitlines()
    row = next(line for line in section if line.startswith("| tiny | plain |"))
    assert row.count(" / 25.0 / 75.0 |") == len(FORGETTING), row
