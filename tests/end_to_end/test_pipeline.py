"""End to end through Snakemake itself: a tiny study with every method (and a toy method
with a loss term of its own, added to cfs.study and cfs.objectives by the test as a user
would add one) runs to completion on a tiny random model; then one value is added to
each sweep in turn and Snakemake plans exactly the jobs that value needs (an added
seed runs them); a second study shares the results/ folder without touching the first's
jobs (test_evaluation_settings.py: one with other evaluation settings evaluates the first's
fine-tunes beside its evaluations); an added forgetting task computes only its own
requests. Bad input stops
the study: a misspelt evaluation task before any model job, an uncached hub model
offline at once, with the message in the job's log."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
import time

import pandas as pd
import pytest
import yaml
from cfs.figures import FIGURES
from cfs.frontier import family_of
from cfs.report import cell_label
from cfs.study import METHODS, PROPOSED
from conftest import (
    FORGETTING,
    MODEL,
    SAMPLE_RULES,
    TOY_METHOD,
    TOY_OBJECTIVE,
    copy_repo,
    default_config,
    evaluation_path,
    failure_report,
    read_jsonl,
    run_snakemake,
    snakemake_env,
    tiny_config,
)
from studies import executed, outputs, run

pytestmark = pytest.mark.slow

CONFIGURABLE = [name for name in METHODS if name != "plain"]  # plain runs at ratio 0
ADDED_TASK = "cfs_animals"


def every_method_config(model_dir):
    """Every method (and the toy), one knob value each; the methods besides context-free
    data keep knob lists of their own, so a value added to a study-wide sweep adds
    context-free cells only."""
    config = tiny_config(model_dir)
    config["study"].update(temperatures=[1.0], methods=[*CONFIGURABLE, "toy"])
    synthetic = {"temperatures": [1.0], "ratios": [0.5]}
    config["methods"] = {
        "contextual": dict(synthetic),
        "replay": {"corpus": {"python_stdlib": "*.py"}, "ratios": [0.5]},
        "lora": {"ranks": [4], "target_modules": ["q_proj", "v_proj"], "learning_rate": 1e-2},
        "l2": {"lambdas": [1000]},
        "wiseft": {"alphas": [0.5]},
        "weighted_synthetic": {**synthetic, "lambdas": [0.5]},
        "kl_to_base": {**synthetic, "lambdas": [1.0]},
        "toy": {**synthetic, "lambdas": [2.0]},
    }
    config["methods"]["plain"] = {"learning_rates": []}
    config["train"]["logging_steps"] = 1  # each regulariser's term is in the log
    config["train"]["curve_every"] = 2
    config["train"]["evaluate_at"] = [0.5]  # every fine-tune also evaluated halfway
    config["claims"]["matched_target_gain"] = 0.25
    return config


def add_toy_method(repo):
    for name, text in (("study.py", TOY_METHOD), ("objectives.py", TOY_OBJECTIVE)):
        module = repo / "workflow" / "cfs" / name
        module.write_text(module.read_text() + "\n" + text + "\n")


@pytest.fixture(scope="module")
def study(tiny_model_dir, tokenizer, tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    add_toy_method(repo)
    config = every_method_config(tiny_model_dir)
    result = run(repo, config, timeout=1500)
    return {
        "repo": repo,
        "results": repo / "results",
        "config": config,
        "result": result,
        "bos": tokenizer.bos_token_id,
        "grammar": study_module(repo),
    }


def study_module(repo):
    """The repository copy's cfs.study, with the toy method the test added to it."""
    spec = importlib.util.spec_from_file_location(
        "copied_study", repo / "workflow" / "cfs" / "study.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def grid_jobs(config, grammar) -> dict[str, set[str]]:
    """The jobs of a study's cells and samples, from the grammar (a cfs.study module):
    what adding a value must add, rule by rule."""
    METHODS, SAMPLE_KINDS, parse_cell = grammar.METHODS, grammar.SAMPLE_KINDS, grammar.parse_cell
    fmt = grammar.fmt
    study = grammar.Study(config)
    jobs: dict[str, set[str]] = {}
    for cell in study.cells():
        knobs = parse_cell(cell)
        spec = METHODS[knobs["method"]]
        jobs.setdefault("summarise_seeds", set()).add(evaluation_path(config, MODEL, cell))
        for seed in study.seeds:
            folder = f"results/{MODEL}/{cell}/seed{seed}"
            if spec.mixes or spec.name == "plain":
                # a cell at another learning rate trains on its cell's set
                mixed = f"results/{MODEL}/{grammar.untrained_part(cell)}/seed{seed}"
                jobs.setdefault("mix_at_ratio", set()).add(f"{mixed}/train.jsonl")
            rule = "fine_tune" if spec.trains else "interpolate_wiseft"
            jobs.setdefault(rule, set()).add(f"{folder}/model")
            evaluated = evaluation_path(config, MODEL, f"{cell}/seed{seed}")
            jobs.setdefault("evaluate_finetuned", set()).add(evaluated)
            for fraction in study.evaluate_at if spec.trains else []:
                point = evaluation_path(config, MODEL, f"{cell}/at{fmt(fraction)}/seed{seed}")
                jobs["evaluate_finetuned"].add(point)
            if spec.samples:
                fields = {k: fmt(v) for k, v in knobs.items() if k != "method"}
                path = SAMPLE_KINDS[spec.samples].path.format(seed=seed, **fields)
                jobs.setdefault(SAMPLE_RULES[spec.samples], set()).add(f"results/{MODEL}/{path}")
    return jobs


def figure_paths(study="default") -> set[str]:
    """Every figure the report draws (cfs.figures.FIGURES) for the tiny model."""
    return {f"results/studies/{study}/figures/{MODEL}_{name}.png" for name in FIGURES}


def reporting(study="default") -> dict[str, set[str]]:
    """The jobs of a study's tables and figures (each run once after any change), by
    their first outputs: the summary table, the first of the figures."""
    return {
        "summary_table": {f"results/studies/{study}/summary.csv"},
        "figures": {f"results/studies/{study}/figures/{MODEL}_{FIGURES[0]}.png"},
    }


REPORTING = reporting()


def assert_executed(result, expected: dict[str, set[str]], study="default") -> None:
    """The run executed exactly the `expected` jobs, and its figures job drew every
    figure."""
    assert executed(result.stdout) == expected, result.stdout[-5000:]
    assert outputs(result.stdout, "figures") == figure_paths(study), result.stdout[-5000:]


def new_jobs(before, after, grammar) -> dict[str, set[str]]:
    old, new = grid_jobs(before, grammar), grid_jobs(after, grammar)
    added = {rule: new[rule] - old.get(rule, set()) for rule in new}
    # a cell with a new seed is summarised again over its seeds
    added["summarise_seeds"] = {
        path.rsplit("/seed", 1)[0] + "/eval.json"
        for path in added["evaluate_finetuned"]
        if not path.rsplit("/seed", 1)[0].rsplit("/", 1)[-1].startswith("at")  # a point
    }
    return {rule: paths for rule, paths in added.items() if paths} | reporting(
        after["study"].get("name", "default")
    )


def seed_eval(config, cell, seed=0):
    return evaluation_path(config, MODEL, cell if cell == "base" else f"{cell}/seed{seed}")


def cells(study) -> dict[str, str]:
    """{cell: method} of the study, from the grammar (the base model's eval included)."""
    grammar = study["grammar"]
    grid = grammar.Study(study["config"]).cells()
    return {"base": "base", **{cell: grammar.parse_cell(cell)["method"] for cell in grid}}


# --------------------------------------------------------------------------- one run


def test_every_method_runs_to_completion(study):
    assert study["result"].returncode == 0, failure_report(study["repo"], study["result"])
    jobs = executed(study["result"].stdout)
    grid = grid_jobs(study["config"], study["grammar"])
    ran = {rule: jobs.get(rule) for rule in grid}
    assert ran == grid, "the jobs of the grid's cells (rule: first outputs) that ran"
    assert len(jobs["generate_context_free"]) == 1  # shared by context-free, weighted, KL, toy
    # one cell of every method of the grammar, the toy included
    methods = sorted(cells(study).values())
    assert methods == sorted(["base", *study["grammar"].METHODS]), methods


def test_every_stage_job_wrote_its_timing_row(study):
    """Each job of a stage (not the checks or the tables) wrote results/benchmarks/<rule>/...
    beside its log, through cfs.timing: the kernel's count of its processes' CPU time and
    memory, and its exit status."""
    results = study["results"]
    timings = {path.relative_to(results / "benchmarks") for path in results.rglob("*.tsv")}
    stage_rules = {path.parts[0] for path in timings}
    assert {"prepare_model", "generate_context_free", "fine_tune", "evaluate_finetuned"} <= (
        stage_rules
    )
    logs = {
        path.relative_to(results / "logs").with_suffix(".tsv")
        for rule in stage_rules
        for path in (results / "logs" / rule).rglob("*.log")
    }
    assert logs == timings, "a stage job without a timing row, or a row without a job"
    for timing in timings:
        row = pd.read_csv(results / "benchmarks" / timing, sep="\t").iloc[0]
        assert row["exit_code"] == 0 and row["cpu_time"] > 0, (timing, dict(row))
        if timing.parts[0] in ("generate_context_free", "fine_tune", "evaluate_finetuned"):
            # these load the model with torch: over 100 MB
            assert row["max_rss"] > 100, (timing, dict(row))


def test_a_finished_study_ends_by_printing_its_verdicts_and_results_page(study):
    output = study["result"].stdout
    verdicts = pd.read_csv(study["results"] / "studies" / "default" / "verdicts.csv")
    answer = output[output.index("Study 'default': verdicts") :]
    for row in verdicts.itertuples():
        assert f"{row.verdict} / {row.kl_verdict}: {row.claim} ({row.comparison}" in answer
    assert "Every table and figure: results/studies/default/results.md" in answer


def test_summary_has_one_finite_row_per_cell(study):
    table = pd.read_csv(study["results"] / "studies" / "default" / "summary.csv")
    expected = cells(study)
    config = study["config"]
    assert sorted(table["eval_paths"]) == sorted(seed_eval(config, c) for c in expected)
    by_path = dict(zip(table["eval_paths"], table["method"], strict=True))
    assert {cell: by_path[seed_eval(config, cell)] for cell in expected} == expected
    for column in ("target", "forgetting_avg", "kl_to_base"):
        values = table[column].tolist()
        assert all(math.isfinite(v) for v in values), f"{column}: {values}"
    assert table.loc[table["method"] == "base", "kl_to_base"].tolist() == [0.0]
    kl = table.loc[table["method"] != "base", ["label", "kl_to_base"]]
    assert (kl["kl_to_base"] > 0).all(), f"a fine-tune with no KL to base:\n{kl}"
    knobs = table.set_index("method")
    assert (knobs.loc["lora", "rank"], knobs.loc["l2", "lambda"]) == (4, 1000)
    assert knobs.loc["wiseft", "alpha"] == 0.5
    assert knobs.loc["weighted_synthetic", "label"] == "weighted_synthetic T1 r0.5 λ0.5"
    assert knobs.loc["toy", "label"] == "toy T1 r0.5 λ2"
    missing = [task for task in FORGETTING if f"forgetting:{task}" not in table.columns]
    assert missing == [], f"no column for these forgetting tasks: {list(table.columns)}"


def test_verdicts_answer_the_claims_of_every_method_with_one(study):
    """Each method with a claim in the grammar (the toy's included) against the one
    context-free cell at the end of training: one verdict per pair. At the matched target
    gain: every method against plain fine-tuning's frontier, and context-free data against
    every other method."""
    grammar = study["grammar"]
    grid = {cell: grammar.parse_cell(cell) for cell in grammar.Study(study["config"]).cells()}
    (proposed,) = [cell_label(knobs) for knobs in grid.values() if knobs["method"] == PROPOSED]
    expected = {
        f"{proposed} - {cell_label(knobs)}": f"{grammar.METHODS[knobs['method']].claim} "
        "(at the end of training)"
        for knobs in grid.values()
        if grammar.METHODS[knobs["method"]].claim
    }
    # plain, contextual, replay, LoRA, L2, WiSE-FT, the weighted term, kl_to_base, the toy
    assert len(expected) == 9, expected
    verdicts = pd.read_csv(study["results"] / "studies" / "default" / "verdicts.csv")
    matched = verdicts["comparison"].str.endswith(" at matched target")
    at_end = verdicts[~matched]
    comparisons = dict(zip(at_end["comparison"], at_end["claim"], strict=True))
    assert comparisons == expected
    families = {
        family_of(knobs) for knobs in grid.values() if grammar.METHODS[knobs["method"]].trains
    } | {"wiseft"}
    others = families - {"plain", proposed}
    expected_matched = {f"{family} - plain" for family in families - {"plain"}} | {
        f"{proposed} - {other}" for other in others
    }
    found = {c.removesuffix(" at matched target") for c in verdicts.loc[matched, "comparison"]}
    assert found == expected_matched
    assert verdicts.loc[verdicts["primary"], "comparison"].tolist() == [
        f"{proposed} - plain at matched target"
    ]
    # one seed: no comparison is tested (its interval holds the items' variance only), and
    # a path that never reaches the matched gain says so (a tiny model learns little)
    answers = {"untested (one seed)", "target gain not reached"}
    for column in ("verdict", "kl_verdict"):
        assert set(verdicts[column]) <= answers, f"{column}: {sorted(set(verdicts[column]))}"
    approximates = verdicts[verdicts["claim"].str.contains("approximates")].iloc[0]
    margins = (approximates["margin"], approximates["kl_margin"])
    assert min(margins) > 0, f"(margin, kl_margin) {margins}, expected positive"
    differences = pd.read_csv(study["results"] / "studies" / "default" / "differences.csv")
    assert set(differences["method"]) == set(cells(study).values()) - {"base"}


def test_every_fine_tune_has_a_path_through_its_point_halfway(study):
    """frontier.csv: each fine-tune's path from the base model through its model after
    half its steps to its end; the end is the cell's own evaluation, and the model saved
    halfway is gone once it was evaluated."""
    frontier = pd.read_csv(study["results"] / "studies" / "default" / "frontier.csv")
    summary = pd.read_csv(study["results"] / "studies" / "default" / "summary.csv")
    methods = study["grammar"].METHODS
    trained = summary[[m in methods and bool(methods[m].trains) for m in summary["method"]]]
    ends = summary.set_index("label")
    base = ends.loc["base"]
    for label in trained["label"]:
        path = frontier[frontier["path"] == label]
        assert path["position"].tolist() == [0.0, 0.5, 1.0], label
        end = path.iloc[-1]
        assert end["target_change"] == pytest.approx(ends.loc[label, "target"] - base["target"])
        assert end["kl_to_base"] == pytest.approx(ends.loc[label, "kl_to_base"])
    halfway = list((study["results"] / MODEL).glob("**/at0.5/seed0/*"))
    assert "eval.json" in {p.name for p in halfway}
    assert [p for p in halfway if p.name == "snapshot"] == [], "a model kept after its eval"


def test_every_figure_is_drawn(study):
    folder = study["results"] / "studies" / "default" / "figures"
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        f"{MODEL}_{name}.png" for name in FIGURES
    )
    for name in FIGURES:
        content = (folder / f"{MODEL}_{name}.png").read_bytes()
        assert content.startswith(b"\x89PNG"), f"{name} is not a PNG"
        assert len(content) > 5000, f"{name}: {len(content)} bytes, an empty figure"


def test_every_fine_tune_logged_its_forgetting_curve(study):
    for cell, method in cells(study).items():
        if method == "base" or not study["grammar"].METHODS[method].trains:
            continue
        curves = pd.read_csv(study["results"] / MODEL / cell / "seed0" / "model" / "curves.csv")
        assert curves["step"].tolist()[:2] == [0, 2], cell
        first = curves["kl_to_base"].iloc[0]
        assert abs(first) <= 1e-6, f"{cell}: KL to base {first} at step 0, expected 0"


def test_eval_files_have_metrics_base_and_provenance(study):
    repo, config, bos = study["repo"], study["config"], study["bos"]
    base_metrics = json.loads((repo / seed_eval(config, "base")).read_text())["metrics"]
    for cell in cells(study):
        record = json.loads((repo / seed_eval(config, cell)).read_text())
        for key in ("target", "forgetting_avg", "kl_to_base"):
            value = record["metrics"][key]
            assert math.isfinite(value), f"{cell}: {key} {value}"
        prov = record["provenance"]
        assert (prov["seed"], prov["settings"]["limit"]) == (0, 4)
        for package in ("torch", "transformers", "lm_eval", "snakemake"):
            assert prov["packages"].get(package), f"{cell}: no {package} version"
        assert set(record["requests"]["per_task"]) == {"cfs_add_sub", *FORGETTING}
        if cell == "base":
            assert record["cell"] == {"model": MODEL, "method": "base"}
            continue
        assert record["base"] == base_metrics
        tokens = record["metrics"]["heldout_tokens"]
        assert tokens > 0, f"{cell}: {tokens} held-out tokens"
        assert prov["heldout_provenance"]["prompt_token_id"] == bos
        card = json.loads((repo / evaluation_path(config, MODEL, cell)).read_text())
        assert (card["seeds"], card["per_seed"][0]["eval"]) == ([0], seed_eval(config, cell))
        assert card["metrics"]["target"] == record["metrics"]["target"]


def test_each_method_trained_what_it_should(study):
    results = study["results"] / MODEL
    mixed = read_jsonl(results / "contextual" / "temp1" / "ratio0.5" / "seed0" / "train.jsonl")
    assert sum(r["kind"] == "contextual" for r in mixed) == 8
    replayed = read_jsonl(results / "replay" / "ratio0.5" / "seed0" / "train.jsonl")
    assert sum(r["kind"] == "replay" for r in replayed) == 8
    generated = read_jsonl(results / "temp1" / "seed0" / "context_free.jsonl")
    assert {s["prompt_token_id"] for s in generated} == {study["bos"]}
    cf_mixed = read_jsonl(results / "temp1" / "ratio0.5" / "seed0" / "train.jsonl")
    synthetic = [r["token_ids"] for r in cf_mixed if r["kind"] == "context_free"]
    assert sorted(synthetic) == sorted(s["token_ids"] for s in generated[:8])
    for cell, method, term in (
        ("l2/lambda1000", "l2", "l2"),
        ("cf_weighted/temp1/ratio0.5/lambda0.5", "weighted_synthetic", "synthetic_nll"),
        ("kl_to_base/temp1/ratio0.5/lambda1", "kl_to_base", "kl_to_base"),
        ("toy/temp1/ratio0.5/lambda2", "toy", "toy_loss"),
    ):
        log = json.loads((results / cell / "seed0" / "model" / "train_log.json").read_text())
        assert log["summary"]["method"] == method, cell
        logged = [entry for entry in log["log_history"] if term in entry]
        assert len(logged) > 0, f"{cell}: no {term} in the training log"
        checkpoints = results / cell / "seed0" / "checkpoints"
        assert not checkpoints.exists(), f"{checkpoints} left after the final save"
    prov = json.loads(
        (results / "lora" / "rank4" / "seed0" / "model" / "cfs_provenance.json").read_text()
    )
    assert prov["settings"]["method"]["name"] == "lora"
    assert prov["settings"]["learning_rate"] == 1e-2
    wise = json.loads((study["repo"] / seed_eval(study["config"], "wiseft/alpha0.5")).read_text())
    assert wise["provenance"]["model_provenance"]["stage"] == "wiseft"
    leftovers = [p for p in study["results"].rglob(".*") if p.name != ".snakemake_timestamp"]
    assert leftovers == [], leftovers


def test_every_job_wrote_a_log(study):
    logs = study["results"] / "logs"
    for rule in grid_jobs(study["config"], study["grammar"]) | REPORTING:
        found = list(logs.glob(f"{rule}*")) + list(logs.glob(f"{rule}/**/*"))
        assert len(found) > 0, f"no log of rule {rule} in {logs}"


# --------------------------------------------------------------------------- the DAG is the cache


def test_unchanged_config_executes_nothing(study):
    result = run(study["repo"], study["config"])
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Nothing to be done" in result.stdout, result.stdout[-3000:]


def add_value(key, value):
    """A change adding `value` to the sweep at `key` (a dotted path into the config)."""

    def change(config):
        *parents, last = key.split(".")
        section = config
        for part in parents:
            section = section[part]
        section[last] = [*section[last], value]

    return change


ADDITIONS = {
    "temperature": add_value("study.temperatures", 0.7),
    "ratio": add_value("study.ratios", 0.25),
    "lora_rank": add_value("methods.lora.ranks", 8),
    "l2_lambda": add_value("methods.l2.lambdas", 10),
    "weighted_synthetic_lambda": add_value("methods.weighted_synthetic.lambdas", 2.0),
    "wiseft_alpha": add_value("methods.wiseft.alphas", 0.25),
    "plain_learning_rate": add_value("methods.plain.learning_rates", 2e-3),
}


@pytest.mark.parametrize("value", list(ADDITIONS))
def test_one_added_value_plans_only_its_jobs(study, value):
    """Each plan adds one value to the study: exactly that value's generations, mixes,
    fine-tunes and evaluations would execute, with the table and figures; no job of an
    existing cell runs again. Snakemake's dry run is its plan (the workflow has no
    checkpoints); the rules themselves run in the study, and an added seed and an added
    task below run for real."""
    assert study["result"].returncode == 0, "the study's first run failed"
    config = copy.deepcopy(study["config"])
    ADDITIONS[value](config)
    result = run(study["repo"], config, f"plus_{value}.yaml", "--dry-run")
    assert result.returncode == 0, failure_report(study["repo"], result)
    assert_executed(result, new_jobs(study["config"], config, study["grammar"]))


def test_a_second_study_in_the_same_results_leaves_the_first_as_it_is(study, tiny_model_dir):
    """Another study (its own name, model key and evaluation settings) runs into the same
    results/ folder; the first study then has nothing to do, and its tables are its own."""
    settle = run(study["repo"], study["config"])  # back to the first study as it is
    assert settle.returncode == 0, failure_report(study["repo"], settle)
    tables = study["results"] / "studies" / "default"
    before = {path.name: path.read_bytes() for path in tables.glob("*.csv")}
    other = copy.deepcopy(study["config"])
    other["study"].update(name="other", models=["tiny_b"], ratios=[0], methods=[])
    other["claims"]["primary"] = None  # plain fine-tuning alone: no comparison
    other["models"] = {"tiny_b": {"local_path": str(tiny_model_dir)}}
    other["evaluation"]["forgetting"] = [{"task": "cfs_capitals", "metric": "acc,none"}]
    other["evaluation"]["limit"] = 3
    result = run(study["repo"], other, "other_study.yaml")
    assert result.returncode == 0, failure_report(study["repo"], result)
    other_table = study["results"] / "studies" / "other" / "summary.csv"
    assert other_table.is_file(), f"the second study wrote no {other_table}"
    again = run(study["repo"], study["config"])
    assert again.returncode == 0, again.stdout[-3000:]
    assert "Nothing to be done" in again.stdout, again.stdout[-3000:]
    assert {path.name: path.read_bytes() for path in tables.glob("*.csv")} == before


def small_study(study) -> dict:
    """Two cells of the study (plain fine-tuning and context-free data), under another
    name: its jobs are the study's own; run once, only its tables and figures execute."""
    config = copy.deepcopy(study["config"])
    config["study"].update(name="small", methods=["context_free"])
    # no points along training: an evaluation change then re-runs no fine-tune (a point's
    # model is kept only until it is evaluated)
    config["train"]["evaluate_at"] = []
    result = run(study["repo"], config, "small.yaml")
    assert result.returncode == 0, failure_report(study["repo"], result)
    assert_executed(result, reporting("small"), "small")
    return config


def test_an_added_seed_executes_only_its_jobs(study):
    """A second seed replicates each cell's samples, mixing, training and evaluation; the
    base eval, the held-out samples and the task split stay as they are."""
    before = small_study(study)
    config = copy.deepcopy(before)
    add_value("study.seeds", 1)(config)
    result = run(study["repo"], config, "small_plus_seed.yaml")
    assert result.returncode == 0, failure_report(study["repo"], result)
    expected = new_jobs(before, config, study["grammar"])
    assert set(expected["summarise_seeds"]) == {
        evaluation_path(config, MODEL, "ratio0"),
        evaluation_path(config, MODEL, "temp1/ratio0.5"),
    }
    assert_executed(result, expected, "small")
    study["small"] = config  # the next test goes on from here


def test_an_added_forgetting_task_computes_only_its_requests(study):
    """Every model is evaluated again (each eval.json must hold the new task), but each
    evaluation computes only the new task's requests: the others come from its cache."""
    config = copy.deepcopy(study.get("small") or small_study(study))
    config["evaluation"]["forgetting"].append({"task": ADDED_TASK, "metric": "p_correct,none"})
    result = run(study["repo"], config, "small_plus_task.yaml")
    assert result.returncode == 0, failure_report(study["repo"], result)
    grid = grid_jobs(config, study["grammar"])
    jobs = executed(result.stdout)
    checks = jobs.pop("check_evaluation_tasks", set())
    assert len(checks) == 1, f"the evaluation's tasks checked {len(checks)} times"
    assert jobs == {
        "evaluate_base": {seed_eval(config, "base")},
        "evaluate_finetuned": grid["evaluate_finetuned"],
        "summarise_seeds": grid["summarise_seeds"],
        **reporting("small"),
    }
    assert outputs(result.stdout, "figures") == figure_paths("small")
    evals = [seed_eval(config, "base")] + sorted(grid["evaluate_finetuned"])
    for path in evals:
        record = json.loads((study["repo"] / path).read_text())
        counts = record["requests"]["per_task"]
        assert set(counts) == {"cfs_add_sub", *FORGETTING, ADDED_TASK}
        assert counts[ADDED_TASK] > 0, f"{path}: no request of {ADDED_TASK}"
        assert record["requests"]["computed"] == counts[ADDED_TASK], path


# --------------------------------------------------------------------------- bad input


def test_a_misspelt_evaluation_task_stops_the_study_before_any_model_job(
    tiny_model_dir, tmp_path_factory
):
    """The task check is the first job (highest priority), though no model job waits on it."""
    repo = copy_repo(tmp_path_factory.mktemp("typo") / "repo")
    config = tiny_config(tiny_model_dir)
    config["evaluation"]["forgetting"][0]["task"] = "cfs_capitalz"
    (repo / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = run_snakemake(repo, "--cores", "1", timeout=300)
    assert result.returncode != 0, result.stdout[-3000:]
    (log,) = (repo / "results" / "logs" / "checks").rglob("*.log")
    text = log.read_text()
    for needle in ("evaluation.forgetting[0].task", "cfs_capitals"):
        assert needle in text, f"{needle!r} not in {log}:\n{text[-3000:]}"
    for folder in ("models", "data"):  # prepare_model, prepare_task_data
        path = repo / "results" / folder
        assert not path.exists(), f"{path}: a job ran before the task check stopped the study"


def test_an_uncached_hub_model_offline_stops_its_job_with_the_message_in_its_log(tmp_path):
    """What a user of the pipeline sees without network: the job fails at once and its log
    holds the message (and no traceback); Snakemake points at the log. HF_TOKEN is written
    nowhere."""
    secret = "hf_cfsTestSecretTokenNotToBeWritten0123"
    model_id = default_config()["models"]["olmo"]["hub_id"]
    repo = copy_repo(tmp_path / "repo")
    env = snakemake_env({"HF_HOME": str(tmp_path / "empty_hf_home"), "HF_TOKEN": secret})
    start = time.monotonic()
    result = run_snakemake(repo, "--cores", "1", "results/models/olmo/base", env=env)
    elapsed = time.monotonic() - start
    assert result.returncode != 0, result.stdout[-3000:]
    assert elapsed < 60, f"took {elapsed:.1f} s"
    assert "results/logs/prepare_model/olmo.log" in result.stdout, result.stdout[-3000:]
    log = (repo / "results" / "logs" / "prepare_model" / "olmo.log").read_text()
    for needle in (model_id, "HF_TOKEN", "HF_HOME", "local_path"):
        assert needle in log, f"{needle!r} not in the job's log:\n{log[-3000:]}"
    assert "Traceback" not in log, log[-3000:]
    assert not (repo / "results" / "models" / "olmo" / "base").exists(), "a model folder written"
    written = [p for p in repo.rglob("*") if p.is_file()]  # results/, .snakemake/ included
    leaked = [str(p) for p in written if secret in p.read_text(errors="ignore")]
    assert leaked == [], "files holding the token"
