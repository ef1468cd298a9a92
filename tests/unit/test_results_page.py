"""cfs.results_page: the study's results as one Markdown page (`python -m cfs.report table
--page`): a row for each cell, for each cell's difference from plain fine-tuning and for
each verdict, and a link to every figure the report draws, on test_report.py's made-up
study."""

from __future__ import annotations

import json

import pandas as pd
from cfs import report
from cfs.figures import FIGURES
from test_report import CLAIMS, all_paths, write_study


def test_the_page_has_every_cell_verdict_and_figure(tmp_path):
    paths = write_study(tmp_path / "results")
    out = tmp_path / "results" / "studies" / "made_up"
    report.main(
        ["table", "--evals", *map(str, all_paths(paths)), "--out", str(out / "summary.csv")]
        + ["--differences", str(out / "differences.csv"), "--verdicts", str(out / "verdicts.csv")]
        + ["--page", str(out / "results.md"), "--study", "made_up"]
        + ["--frontier", str(out / "frontier.csv")]
        + ["--claims", json.dumps(CLAIMS)]
    )
    page = (out / "results.md").read_text()
    assert page.startswith("# Study `made_up`: results\n"), page[:200]
    rows = [line for line in page.splitlines() if line.startswith("| tiny | ")]
    summary = pd.read_csv(out / "summary.csv")
    against_plain = pd.read_csv(out / "differences.csv").query("versus == 'plain'")
    frontier = pd.read_csv(out / "frontier.csv").query("position > 0")
    # each cell's row, its row of differences from plain, its row of forgetting tasks, and
    # each point of each method's path from base
    expected = 2 * len(summary) + against_plain["label"].nunique() + len(frontier)
    assert len(frontier) == 6  # each trained cell's end: no points along training here
    assert len(rows) == expected, f"{len(rows)} rows of cells, expected {expected}:\n{page}"
    for label in summary["label"]:
        assert f"| tiny | {label} |" in page, f"no row for {label}:\n{page}"
    for comparison in pd.read_csv(out / "verdicts.csv")["comparison"]:
        assert f"| {comparison} |" in page, f"no verdict row for {comparison}:\n{page}"
    assert "less than plain fine-tuning (primary) | context_free T1 r1 - plain |" in page
    links = [f"(figures/tiny_{name}.png)" for name in FIGURES]
    missing = [link for link in links if link not in page]
    assert missing == [], f"figures without a link on the page:\n{page}"
