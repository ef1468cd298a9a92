"""cfs.figures: every figure the report draws (cfs.figures.FIGURES), from the tables and the
forgetting curves of a made-up study (test_report.py's), through `python -m cfs.report
figures`; the sweeps' curves start at plain fine-tuning with error bars, and an axis with one
value draws points, not lines."""

from __future__ import annotations

import json

import matplotlib
import pandas as pd
import pytest
from cfs import figures, report
from cfs.figures import FIGURES
from test_report import CELLS, CLAIMS, all_paths, write_study

NO_PRIMARY = {**CLAIMS, "primary": None}  # the figures do not read the verdicts

matplotlib.use("Agg")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_curves(paths) -> list:
    """A curves.csv in each fine-tune's model folder (beside its eval.json's seed folder),
    as cfs.curves writes it: the model's folders, for `--curves`."""
    folders = []
    for cell, evals in paths.items():
        if cell == "base":
            continue
        for number, eval_path in enumerate(evals):
            folder = eval_path.parent / "model"
            folder.mkdir()
            steps = [0, 2, 4]
            pd.DataFrame(
                {
                    "step": steps,
                    "kl_to_base": [0.0, 0.1 + 0.01 * number, 0.2],
                    "heldout_nll": [3.0, 3.1, 3.2 + 0.01 * number],
                    "target_loss": [2.0, 1.5, 1.0],
                }
            ).to_csv(folder / "curves.csv", index=False)
            folders.append(folder)
    return folders


def draw(root, paths, curves=()) -> dict:
    """The report's `figures` command on the made-up study: {figure name: PNG bytes}."""
    summary, differences = root / "summary.csv", root / "differences.csv"
    verdicts = root / "verdicts.csv"
    report.main(
        ["table", "--evals", *map(str, all_paths(paths)), "--out", str(summary)]
        + ["--differences", str(differences), "--verdicts", str(verdicts)]
        + ["--claims", json.dumps(NO_PRIMARY)]
    )
    out = root / "figures"
    report.main(
        ["figures", "--summary", str(summary), "--differences", str(differences)]
        + ["--curves", *map(str, curves), "--out-dir", str(out)]
    )
    return {path.name: path.read_bytes() for path in out.iterdir()}


def test_every_figure_is_drawn_with_several_values_per_axis_and_curves(tmp_path):
    paths = write_study(tmp_path / "results")
    written = draw(tmp_path, paths, write_curves(paths))
    assert sorted(written) == sorted(f"tiny_{name}.png" for name in FIGURES)
    for name, content in written.items():
        assert content.startswith(PNG_MAGIC), f"{name} is not a PNG"
        assert len(content) > 5000, f"{name}: {len(content)} bytes, an empty figure"


def test_the_curves_are_labelled_with_their_cells(tmp_path):
    paths = write_study(tmp_path)
    folders = write_curves(paths)
    summary = report.build_summary(all_paths(paths))
    curves = figures.read_curves(folders, summary)
    non_base = summary[summary["method"] != "base"]
    assert sorted(set(curves["label"])) == sorted(non_base["label"])
    assert len(curves) == 3 * len(folders)  # 3 steps of each fine-tune


def test_ratio_curves_start_at_plain_fine_tuning_with_error_bars(tmp_path):
    summary = report.build_summary(all_paths(write_study(tmp_path)))
    figure = figures._sweep_figure(summary, "ratio", "temperature", "t")
    axis = figure.axes[1]  # forgetting average
    plain = summary[summary["method"] == "plain"].iloc[0]
    curves = [c for c in axis.containers if c.get_label().startswith("temperature")]
    assert len(curves) == 2
    for container in curves:  # errorbar containers: the data line, then the bars
        line = container.lines[0]
        assert line.get_xdata()[0] == 0.0
        assert line.get_ydata()[0] == pytest.approx(plain["forgetting_avg"])
        assert container.has_yerr, f"no error bars on {container.get_label()}"


def test_an_axis_with_one_value_draws_no_line(tmp_path):
    one = {"temp1/ratio1": CELLS["temp1/ratio1"]}  # no plain: one point per curve
    summary = report.build_summary(all_paths(write_study(tmp_path, cells=one)))
    figure = figures._sweep_figure(summary, "temperature", "ratio", "t")
    curves = [c for c in figure.axes[0].containers if c.get_label().startswith("ratio")]
    assert len(curves) == 1, f"{len(curves)} ratio curves, expected one"
    assert [c.lines[0].get_linestyle() for c in curves] == ["None"]


def test_every_figure_is_drawn_with_one_seed_of_plain_fine_tuning_only(tmp_path):
    plain = {"ratio0": CELLS["ratio0"]}
    written = draw(tmp_path, write_study(tmp_path / "results", seeds=(0,), cells=plain))
    assert sorted(written) == sorted(f"tiny_{name}.png" for name in FIGURES)
    not_png = [name for name, content in written.items() if not content.startswith(PNG_MAGIC)]
    assert not_png == []
