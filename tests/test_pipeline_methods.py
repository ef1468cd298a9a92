"""End to end with every method: the whole Snakemake DAG on a tiny random model, one knob
value per method, into one summary table and the method-comparison figure."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import yaml
from conftest import copy_repo, job_stats, read_jsonl, run_snakemake
from test_pipeline import MODEL, THREADED_RULES, failure_report, seed_eval, tiny_config

pytestmark = pytest.mark.slow

METHODS = [
    "context_free",
    "contextual",
    "replay",
    "lora",
    "l2",
    "wiseft",
    "weighted_synthetic",
    "kl_to_base",
]
CELLS = {
    "base": "base",
    "ratio0": "plain",
    "temp1/ratio0.5": "context_free",
    "contextual/temp1/ratio0.5": "contextual",
    "replay/ratio0.5": "replay",
    "lora/rank4": "lora",
    "l2/lambda1000": "l2",
    "wiseft/alpha0.5": "wiseft",
    "cf_weighted/temp1/ratio0.5/lambda0.5": "weighted_synthetic",
    "kl_to_base/temp1/ratio0.5/lambda1": "kl_to_base",
}


@pytest.fixture(scope="module")
def study(tiny_model_dir, tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("methods_pipeline") / "repo")
    config = tiny_config(tiny_model_dir, repo)
    config["study"].update(temperatures=[1.0], ratios=[0, 0.5], methods=METHODS)
    config["train"]["logging_steps"] = 1  # so each regulariser's term is in the log
    config["methods"] = {
        "contextual": {},
        "replay": {"corpus": {"python_stdlib": "*.py"}},
        "lora": {"ranks": [4], "target_modules": ["q_proj", "v_proj"], "learning_rate": 1e-2},
        "l2": {"lambdas": [1000]},
        "wiseft": {"alphas": [0.5]},
        "weighted_synthetic": {"lambdas": [0.5]},
        "kl_to_base": {"lambdas": [1.0]},
    }
    (repo / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    threads = [f"{rule}=1" for rule in (*THREADED_RULES, "generate_contextual")]
    result = run_snakemake(repo, "--cores", "2", "--set-threads", *threads, timeout=1500)
    return {"repo": repo, "results": repo / "results", "result": result, "config": config}


def test_every_method_runs_to_completion(study):
    assert study["result"].returncode == 0, failure_report(study["repo"], study["result"])
    stats = job_stats(study["result"].stdout)
    assert stats["fine_tune"] == 8 and stats["interpolate_wiseft"] == 1
    assert stats["generate_context_free"] == 1  # shared by context-free, weighted and KL


def test_summary_has_one_row_per_method(study):
    table = pd.read_csv(study["results"] / "summary.csv")
    assert sorted(table["eval_paths"]) == sorted(seed_eval(c) for c in CELLS)
    by_path = dict(zip(table["eval_paths"], table["method"], strict=True))
    for cell, method in CELLS.items():
        assert by_path[seed_eval(cell)] == method
    differences = pd.read_csv(study["results"] / "differences.csv")
    assert set(differences["method"]) == set(METHODS) | {"plain"}
    verdicts = pd.read_csv(study["results"] / "verdicts.csv")
    assert set(verdicts["verdict"]) <= {"supported", "contradicted", "inconclusive"}
    assert len(verdicts) == 3  # forgets less, contextual and replay, each vs T1 r0.5
    for column in ("target", "forgetting_avg", "kl_to_base"):
        assert all(math.isfinite(v) for v in table[column]), column
    knobs = table.set_index("method")
    assert knobs.loc["lora", "rank"] == 4
    assert knobs.loc["l2", "lambda"] == 1000
    assert knobs.loc["wiseft", "alpha"] == 0.5
    assert knobs.loc["kl_to_base", "temperature"] == 1.0
    assert knobs.loc["weighted_synthetic", "label"] == "weighted_synthetic T1 r0.5 λ0.5"
    figure = study["results"] / "figures" / f"{MODEL}_methods.png"
    assert figure.read_bytes().startswith(b"\x89PNG") and figure.stat().st_size > 5000


def test_each_method_trained_what_it_should(study):
    results = study["results"] / MODEL
    mixed = read_jsonl(results / "contextual" / "temp1" / "ratio0.5" / "seed0" / "train.jsonl")
    assert sum(r["kind"] == "contextual" for r in mixed) == 8
    assert all("prompt_token_ids" in r for r in mixed if r["kind"] == "contextual")
    replayed = read_jsonl(results / "replay" / "ratio0.5" / "seed0" / "train.jsonl")
    assert sum(r["kind"] == "replay" for r in replayed) == 8
    for cell, method, term in (
        ("l2/lambda1000", "l2", "l2"),
        ("cf_weighted/temp1/ratio0.5/lambda0.5", "weighted_synthetic", "synthetic_nll"),
        ("kl_to_base/temp1/ratio0.5/lambda1", "kl_to_base", "kl_to_base"),
    ):
        log = json.loads((results / cell / "seed0" / "model" / "train_log.json").read_text())
        assert log["summary"]["method"] == method
        assert any(term in entry for entry in log["log_history"]), cell
    lora = results / "lora" / "rank4" / "seed0" / "model"
    prov = json.loads((lora / "cfs_provenance.json").read_text())
    assert prov["settings"]["method"]["name"] == "lora"
    assert prov["settings"]["learning_rate"] == 1e-2
    wise = json.loads((results / "wiseft" / "alpha0.5" / "seed0" / "eval.json").read_text())
    assert wise["provenance"]["model_provenance"]["stage"] == "wiseft"
