"""End to end through Snakemake itself: a tiny study with every method (and a toy method
added to cfs.study by the test, as a user would add one) runs to completion on a tiny
random model; then one value is added to each sweep in turn and Snakemake runs again,
executing exactly the jobs that value needs; a second study shares the results/ folder
without touching the first's jobs; an added forgetting task computes only its own
requests."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import sys

import pandas as pd
import pytest
import yaml
from cfs.study import METHODS
from conftest import copy_repo, default_config, read_jsonl, run_snakemake

pytestmark = pytest.mark.slow

MODEL = "tiny"
THREADED_RULES = (
    "generate_context_free",
    "generate_heldout",
    "generate_contextual",
    "fine_tune",
    "evaluate_base",
    "evaluate_finetuned",
)
TOY = (
    "METHODS['toy'] = Method('toy', 'toy/temp{temperature}/ratio{ratio}/lambda{lambda}', "
    "'context_free', trains='weighted_synthetic', claim='the toy keeps less than "
    "context-free data', paired_on=('temperature', 'ratio'))"
)
FORGETTING = ["cfs_capitals", "cfs_antonyms", "cfs_categories"]
CONFIGURABLE = [name for name in METHODS if name != "plain"]  # plain runs at ratio 0
ADDED_TASK = "cfs_animals"


def tiny_config(model_dir, repo=None):
    """A tiny study of plain fine-tuning and context-free data on the tiny model; `repo`
    is not read (the local forgetting tasks are in every copy of the repository)."""
    config = default_config()
    config["study"] = {
        "models": [MODEL],
        "temperatures": [0.7, 1.0],
        "ratios": [0, 0.5],
        "seeds": [0],
        "methods": ["context_free"],
    }
    config["methods"] = {}
    config["models"] = {MODEL: {"local_path": str(model_dir)}}
    config["task"].update(num_train=16, num_test=8)
    config["generation"].update(num_samples=8, max_new_tokens=12, batch_size=8)
    config["train"].update(epochs=1, batch_size=4, micro_batch_size=4, max_length=64)
    evaluation = config["evaluation"]
    evaluation.update(limit=4, batch_size=8)
    evaluation["forgetting"] = [{"task": t, "metric": "p_correct,none"} for t in FORGETTING]
    evaluation.setdefault("kl", {}).update(num_samples=4, max_new_tokens=12)
    return config


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
    config["train"]["logging_steps"] = 1  # each regulariser's term is in the log
    config["train"]["curve_every"] = 2
    return config


def add_toy_method(repo):
    study = repo / "workflow" / "cfs" / "study.py"
    study.write_text(study.read_text() + "\n" + TOY + "\n")


def run(repo, config, name="config/config.yaml", *args, timeout=900):
    (repo / name).write_text(yaml.safe_dump(config, sort_keys=False))
    threads = [f"{rule}=1" for rule in THREADED_RULES]
    extra = [] if name == "config/config.yaml" else ["--configfile", name]
    return run_snakemake(
        repo, "--cores", "2", "--set-threads", *threads, *extra, *args, timeout=timeout
    )


def failure_report(repo, result):
    logs = []
    for log in sorted((repo / "results" / "logs").rglob("*.log")):
        text = log.read_text(errors="replace")
        if "Error" in text or "Traceback" in text:
            logs.append(f"--- {log}\n{text[-2500:]}")
    return result.stdout[-4000:] + "\n" + "\n".join(logs)


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


def executed(output: str) -> dict[str, set[str]]:
    """{rule: first output of each job} of the jobs a Snakemake run executed."""
    jobs: dict[str, set[str]] = {}
    for rule, body in re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", output, re.M):
        found = re.search(r"^    output: ([^,\n]+)", body, re.M)
        jobs.setdefault(rule, set()).add(found.group(1) if found else "")
    jobs.pop("all", None)
    return jobs


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
    generator = {
        "context_free": "generate_context_free",
        "contextual": "generate_contextual",
        "replay": "replay_chunks",
    }
    jobs: dict[str, set[str]] = {}
    for cell in study.cells():
        knobs = parse_cell(cell)
        spec = METHODS[knobs["method"]]
        jobs.setdefault("summarise_seeds", set()).add(f"results/{MODEL}/{cell}/eval.json")
        for seed in study.seeds:
            folder = f"results/{MODEL}/{cell}/seed{seed}"
            if spec.mixes or spec.name == "plain":
                jobs.setdefault("mix_at_ratio", set()).add(f"{folder}/train.jsonl")
            rule = "fine_tune" if spec.trains else "interpolate_wiseft"
            jobs.setdefault(rule, set()).add(f"{folder}/model")
            jobs.setdefault("evaluate_finetuned", set()).add(f"{folder}/eval.json")
            if spec.samples:
                fields = {k: fmt(v) for k, v in knobs.items() if k != "method"}
                path = SAMPLE_KINDS[spec.samples].path.format(seed=seed, **fields)
                jobs.setdefault(generator[spec.samples], set()).add(f"results/{MODEL}/{path}")
    return jobs


def reporting(study="default") -> dict[str, set[str]]:
    """The jobs of a study's tables and figures (each run once after any change)."""
    return {
        "summary_table": {f"results/studies/{study}/summary.csv"},
        "figures": {f"results/studies/{study}/figures/{MODEL}_vs_temperature.png"},
    }


REPORTING = reporting()


def new_jobs(before, after, grammar) -> dict[str, set[str]]:
    old, new = grid_jobs(before, grammar), grid_jobs(after, grammar)
    added = {rule: new[rule] - old.get(rule, set()) for rule in new}
    # a cell with a new seed is summarised again over its seeds
    added["summarise_seeds"] = {
        path.rsplit("/seed", 1)[0] + "/eval.json" for path in added["evaluate_finetuned"]
    }
    return {rule: paths for rule, paths in added.items() if paths} | reporting(
        after["study"].get("name", "default")
    )


def seed_eval(cell, seed=0):
    if cell == "base":
        return f"results/{MODEL}/base/eval.json"
    return f"results/{MODEL}/{cell}/seed{seed}/eval.json"


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
    "toy/temp1/ratio0.5/lambda2": "toy",
}


# --------------------------------------------------------------------------- one run


def test_every_method_runs_to_completion(study):
    assert study["result"].returncode == 0, failure_report(study["repo"], study["result"])
    jobs = executed(study["result"].stdout)
    grid = grid_jobs(study["config"], study["grammar"])
    assert {rule: jobs.get(rule) for rule in grid} == grid
    assert len(jobs["generate_context_free"]) == 1  # shared by context-free, weighted, KL, toy


def test_summary_has_one_finite_row_per_cell(study):
    table = pd.read_csv(study["results"] / "studies" / "default" / "summary.csv")
    assert sorted(table["eval_paths"]) == sorted(seed_eval(c) for c in CELLS)
    by_path = dict(zip(table["eval_paths"], table["method"], strict=True))
    assert {cell: by_path[seed_eval(cell)] for cell in CELLS} == CELLS
    for column in ("target", "forgetting_avg", "kl_to_base"):
        assert all(math.isfinite(v) for v in table[column]), column
    assert table.loc[table["method"] == "base", "kl_to_base"].tolist() == [0.0]
    assert (table.loc[table["method"] != "base", "kl_to_base"] > 0).all()
    knobs = table.set_index("method")
    assert knobs.loc["lora", "rank"] == 4 and knobs.loc["l2", "lambda"] == 1000
    assert knobs.loc["wiseft", "alpha"] == 0.5
    assert knobs.loc["weighted_synthetic", "label"] == "weighted_synthetic T1 r0.5 λ0.5"
    assert knobs.loc["toy", "label"] == "toy T1 r0.5 λ2"
    for task in FORGETTING:
        assert f"forgetting:{task}" in table.columns


def test_verdicts_answer_the_claims_of_every_method_with_one(study):
    verdicts = pd.read_csv(study["results"] / "studies" / "default" / "verdicts.csv")
    comparisons = dict(zip(verdicts["comparison"], verdicts["claim"], strict=True))
    assert comparisons == {
        "context_free T1 r0.5 - plain": "context-free data forgets less than plain fine-tuning",
        "context_free T1 r0.5 - contextual T1 r0.5": (
            "contextual synthetic data keeps less than context-free data"
        ),
        "context_free T1 r0.5 - replay r0.5": (
            "pretraining replay keeps less than context-free data"
        ),
        "context_free T1 r0.5 - kl_to_base T1 r0.5 λ1": (
            "context-free data approximates the exact KL penalty"
        ),
        "context_free T1 r0.5 - toy T1 r0.5 λ2": "the toy keeps less than context-free data",
    }
    assert set(verdicts["kl_verdict"]) <= {"supported", "contradicted", "inconclusive"}
    approximates = verdicts[verdicts["claim"].str.contains("approximates")].iloc[0]
    assert approximates["margin"] > 0 and approximates["kl_margin"] > 0
    assert set(verdicts["verdict"]) <= {"supported", "contradicted", "inconclusive"}
    differences = pd.read_csv(study["results"] / "studies" / "default" / "differences.csv")
    assert set(differences["method"]) == set(CELLS.values()) - {"base"}


def test_every_figure_is_drawn(study):
    from cfs.study import FIGURES

    for name in FIGURES:
        path = study["results"] / "studies" / "default" / "figures" / f"{MODEL}_{name}.png"
        assert path.read_bytes().startswith(b"\x89PNG"), path
        assert path.stat().st_size > 5000, path


def test_every_fine_tune_logged_its_forgetting_curve(study):
    for cell, method in CELLS.items():
        if method in ("base", "wiseft"):
            continue
        curves = pd.read_csv(study["results"] / MODEL / cell / "seed0" / "model" / "curves.csv")
        assert curves["step"].tolist()[:2] == [0, 2], cell
        assert abs(curves["kl_to_base"].iloc[0]) <= 1e-6, cell


def test_eval_files_have_metrics_base_and_provenance(study):
    results, bos = study["results"], study["bos"]
    base_metrics = json.loads((results / MODEL / "base" / "eval.json").read_text())["metrics"]
    for cell in CELLS:
        record = json.loads((results.parent / seed_eval(cell)).read_text())
        for key in ("target", "forgetting_avg", "kl_to_base"):
            assert math.isfinite(record["metrics"][key]), (cell, key)
        prov = record["provenance"]
        assert prov["seed"] == 0 and prov["settings"]["limit"] == 4
        for package in ("torch", "transformers", "lm_eval", "snakemake"):
            assert prov["packages"].get(package), (cell, package)
        assert set(record["requests"]["per_task"]) == {"cfs_add_sub", *FORGETTING}
        if cell == "base":
            assert record["cell"] == {"model": MODEL, "method": "base"}
            continue
        assert record["base"] == base_metrics
        assert record["metrics"]["heldout_tokens"] > 0
        assert prov["heldout_provenance"]["prompt_token_id"] == bos
        card = json.loads((results / MODEL / cell / "eval.json").read_text())
        assert card["seeds"] == [0] and card["per_seed"][0]["eval"] == seed_eval(cell)
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
        ("toy/temp1/ratio0.5/lambda2", "toy", "synthetic_nll"),
    ):
        log = json.loads((results / cell / "seed0" / "model" / "train_log.json").read_text())
        assert log["summary"]["method"] == method, cell
        assert any(term in entry for entry in log["log_history"]), cell
        assert not (results / cell / "seed0" / "checkpoints").exists()
    prov = json.loads(
        (results / "lora" / "rank4" / "seed0" / "model" / "cfs_provenance.json").read_text()
    )
    assert prov["settings"]["method"]["name"] == "lora"
    assert prov["settings"]["learning_rate"] == 1e-2
    wise = json.loads((results / "wiseft" / "alpha0.5" / "seed0" / "eval.json").read_text())
    assert wise["provenance"]["model_provenance"]["stage"] == "wiseft"
    leftovers = [p for p in study["results"].rglob(".*") if p.name != ".snakemake_timestamp"]
    assert leftovers == [], leftovers


def test_every_job_wrote_a_log(study):
    logs = study["results"] / "logs"
    for rule in grid_jobs(study["config"], study["grammar"]) | REPORTING:
        assert list(logs.glob(f"{rule}*")) or list(logs.glob(f"{rule}/**/*")), rule


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
}


@pytest.mark.parametrize("value", list(ADDITIONS))
def test_one_added_value_executes_only_its_jobs(study, value):
    """Each run adds one value to the study (the values of earlier runs are not in it):
    exactly that value's generations, mixes, fine-tunes and evaluations execute, with the
    table and figures; no job of an existing cell runs again."""
    assert study["result"].returncode == 0
    config = copy.deepcopy(study["config"])
    ADDITIONS[value](config)
    result = run(study["repo"], config, f"plus_{value}.yaml")
    assert result.returncode == 0, failure_report(study["repo"], result)
    expected = new_jobs(study["config"], config, study["grammar"])
    assert executed(result.stdout) == expected, result.stdout[-5000:]


def test_a_second_study_in_the_same_results_leaves_the_first_as_it_is(study, tiny_model_dir):
    """Another study (its own name, model key and evaluation settings) runs into the same
    results/ folder; the first study then has nothing to do, and its tables are its own."""
    settle = run(study["repo"], study["config"])  # back to the first study as it is
    assert settle.returncode == 0, failure_report(study["repo"], settle)
    tables = study["results"] / "studies" / "default"
    before = {path.name: path.read_bytes() for path in tables.glob("*.csv")}
    other = copy.deepcopy(study["config"])
    other["study"].update(name="other", models=["tiny_b"], ratios=[0], methods=[])
    other["models"] = {"tiny_b": {"local_path": str(tiny_model_dir)}}
    other["evaluation"]["forgetting"] = [{"task": "cfs_capitals", "metric": "acc,none"}]
    other["evaluation"]["limit"] = 3
    result = run(study["repo"], other, "other_study.yaml")
    assert result.returncode == 0, failure_report(study["repo"], result)
    assert (study["results"] / "studies" / "other" / "summary.csv").is_file()
    again = run(study["repo"], study["config"])
    assert again.returncode == 0, again.stdout[-3000:]
    assert "Nothing to be done" in again.stdout, again.stdout[-3000:]
    assert {path.name: path.read_bytes() for path in tables.glob("*.csv")} == before


def small_study(study) -> dict:
    """Two cells of the study (plain fine-tuning and context-free data), under another
    name: its jobs are the study's own; run once, only its tables and figures execute."""
    config = copy.deepcopy(study["config"])
    config["study"].update(name="small", methods=["context_free"])
    result = run(study["repo"], config, "small.yaml")
    assert result.returncode == 0, failure_report(study["repo"], result)
    assert executed(result.stdout) == reporting("small"), result.stdout[-3000:]
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
        f"results/{MODEL}/ratio0/eval.json",
        f"results/{MODEL}/temp1/ratio0.5/eval.json",
    }
    assert executed(result.stdout) == expected, result.stdout[-5000:]
    study["small"] = config  # the next test goes on from here


def test_an_added_forgetting_task_computes_only_its_requests(study):
    """Every model is evaluated again (each eval.json must hold the new task), but each
    evaluation computes only the new task's requests: the others come from its cache."""
    config = copy.deepcopy(study.get("small") or small_study(study))
    config["evaluation"]["forgetting"].append({"task": ADDED_TASK, "metric": "p_correct,none"})
    result = run(study["repo"], config, "small_plus_task.yaml")
    assert result.returncode == 0, failure_report(study["repo"], result)
    jobs = executed(result.stdout)
    grid = grid_jobs(config, study["grammar"])
    assert jobs.pop("check_evaluation_tasks") and len(jobs.pop("evaluate_base")) == 1
    assert jobs == {
        "evaluate_finetuned": grid["evaluate_finetuned"],
        "summarise_seeds": grid["summarise_seeds"],
        **reporting("small"),
    }
    evals = [seed_eval("base")] + sorted(grid["evaluate_finetuned"])
    for path in evals:
        record = json.loads((study["repo"] / path).read_text())
        counts = record["requests"]["per_task"]
        assert set(counts) == {"cfs_add_sub", *FORGETTING, ADDED_TASK}
        assert record["requests"]["computed"] == counts[ADDED_TASK] > 0, path


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
    assert result.returncode != 0
    (log,) = (repo / "results" / "logs" / "checks").rglob("*.log")
    text = log.read_text()
    assert "evaluation.forgetting[0].task" in text and "cfs_capitals" in text
    assert not (repo / "results" / "models").exists()
    assert not (repo / "results" / "data").exists()
