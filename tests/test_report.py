"""cfs.report: summary.csv from eval.json files, and the figures."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from cfs import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def eval_record(
    model,
    method,
    temperature=None,
    ratio=None,
    target=0.1,
    kl=0.0,
    base=None,
    forgetting=None,
    seed=0,
):
    forgetting = forgetting or {"cfs_capitals": 0.5, "cfs_animals": 0.7}
    metrics = {
        "target": target,
        "forgetting_avg": sum(forgetting.values()) / len(forgetting),
        "forgetting": forgetting,
        "kl_to_base": kl,
    }
    if method != "base":
        metrics["heldout_nll"] = 3.0 + kl
    cell = {"model": model, "method": method}
    if method != "base":
        cell.update(temperature=temperature, ratio=ratio)
    record = {"cell": cell, "metrics": metrics, "provenance": {"seed": seed}}
    if base is not None:
        record["base"] = base
    return record


def write_evals(root, model="tiny", seed=0):
    base = eval_record(model, "base", target=0.05, seed=seed)
    cells = {
        "base": base,
        "ratio0": eval_record(
            model,
            "plain",
            None,
            0.0,
            0.4,
            0.3,
            base["metrics"],
            seed=seed,
            forgetting={"cfs_capitals": 0.3, "cfs_animals": 0.5},
        ),
        "temp1/ratio0.5": eval_record(
            model, "context_free", 1.0, 0.5, 0.35, 0.1, base["metrics"], seed=seed
        ),
        "temp0.7/ratio0.5": eval_record(
            model, "context_free", 0.7, 0.5, 0.38, 0.2, base["metrics"], seed=seed
        ),
        "temp0.7/ratio1": eval_record(
            model, "context_free", 0.7, 1.0, 0.33, 0.05, base["metrics"], seed=seed
        ),
    }
    paths = {}
    for cell, record in cells.items():
        path = root / model / cell / "eval.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
        paths[cell] = path
    return paths, cells


def test_build_summary_one_row_per_file_with_columns(tmp_path):
    paths, cells = write_evals(tmp_path)
    # handed over in an arbitrary order
    order = ["temp1/ratio0.5", "base", "temp0.7/ratio1", "ratio0", "temp0.7/ratio0.5"]
    table = report.build_summary([paths[cell] for cell in order])
    assert len(table) == 5
    for column in (
        "model",
        "method",
        "temperature",
        "ratio",
        "target",
        "forgetting_avg",
        "kl_to_base",
        "heldout_nll",
        "forgetting:cfs_capitals",
        "forgetting:cfs_animals",
        "base_target",
        "base_forgetting_avg",
        "seed",
        "eval_path",
    ):
        assert column in table.columns, column
    assert list(table["method"]) == ["base", "plain"] + ["context_free"] * 3
    for _, row in table.iterrows():
        record = json.loads(open(row["eval_path"]).read())
        assert row["target"] == record["metrics"]["target"]
        assert row["forgetting_avg"] == pytest.approx(record["metrics"]["forgetting_avg"])
        assert row["kl_to_base"] == record["metrics"]["kl_to_base"]
        assert row["forgetting:cfs_capitals"] == record["metrics"]["forgetting"]["cfs_capitals"]
        if record["cell"]["method"] == "base":
            assert math.isnan(row["base_target"])
        else:
            assert row["base_target"] == cells["base"]["metrics"]["target"]
            assert row["ratio"] == record["cell"]["ratio"]
            if record["cell"]["temperature"] is None:  # plain fine-tuning
                assert math.isnan(row["temperature"])
            else:
                assert row["temperature"] == record["cell"]["temperature"]


def test_build_summary_sorts_context_free_by_temperature_then_ratio(tmp_path):
    paths, _ = write_evals(tmp_path)
    table = report.build_summary(list(paths.values()))
    cf = table[table["method"] == "context_free"]
    assert list(zip(cf["temperature"], cf["ratio"], strict=True)) == [
        (0.7, 0.5),
        (0.7, 1.0),
        (1.0, 0.5),
    ]


def test_table_cli_writes_csv(tmp_path):
    paths, _ = write_evals(tmp_path / "results")
    out = tmp_path / "results" / "summary.csv"
    report.main(["table", "--evals", *map(str, paths.values()), "--out", str(out)])
    table = pd.read_csv(out)
    assert len(table) == len(paths)
    assert set(table["eval_path"]) == {str(p) for p in paths.values()}
    assert table["seed"].tolist() == [0] * len(paths)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_write_figures_writes_non_empty_pngs_per_model(tmp_path):
    paths, _ = write_evals(tmp_path / "r")
    other, _ = write_evals(tmp_path / "r", model="other")
    summary = report.build_summary(list(paths.values()) + list(other.values()))
    written = report.write_figures(summary, tmp_path / "figures")
    expected = {f"{model}_{name}.png" for model in ("tiny", "other") for name in report.FIGURES}
    assert {p.name for p in written} == expected
    for path in written:
        content = path.read_bytes()
        assert content.startswith(PNG_MAGIC)
        assert len(content) > 5000, path  # an actual plot, not an empty canvas header
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(expected)


def test_figures_cli_from_summary_csv(tmp_path):
    paths, _ = write_evals(tmp_path / "results")
    summary = tmp_path / "results" / "summary.csv"
    report.main(["table", "--evals", *map(str, paths.values()), "--out", str(summary)])
    out_dir = tmp_path / "results" / "figures"
    report.main(["figures", "--summary", str(summary), "--out-dir", str(out_dir)])
    for name in report.FIGURES:
        path = out_dir / f"tiny_{name}.png"
        assert path.read_bytes().startswith(PNG_MAGIC)


def test_figures_with_plain_fine_tuning_only(tmp_path):
    """A grid with ratios [0] only has no context-free rows; figures must still be drawn."""
    paths, _ = write_evals(tmp_path / "results")
    summary = report.build_summary([paths["base"], paths["ratio0"]])
    written = report.write_figures(summary, tmp_path / "figures")
    assert len(written) == len(report.FIGURES)
    assert all(path.stat().st_size > 0 for path in written)


def test_missing_metrics_in_eval_json_is_an_error(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"cell": {"model": "m", "method": "base"}}))
    with pytest.raises(KeyError, match="metrics"):
        report.build_summary([path])
