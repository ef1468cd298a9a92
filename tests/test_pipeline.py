"""End to end: the whole Snakemake DAG on a tiny random model and a tiny grid, in a copy of
the repository; then dry runs that check the DAG is the cache (adding a grid value
schedules only the jobs it needs; an unchanged config schedules nothing)."""

from __future__ import annotations

import copy
import json
import math
import re

import pandas as pd
import pytest
import yaml
from conftest import copy_repo, default_config, job_stats, read_jsonl, run_snakemake, write_jsonl

pytestmark = pytest.mark.slow

MODEL = "tiny"
FALLBACK_TASK = "cfs_test_mc"
THREADED_RULES = (
    "generate_context_free",
    "generate_heldout",
    "fine_tune",
    "evaluate_base",
    "evaluate_finetuned",
)


def local_task_names(tasks_dir):
    names = set()
    for path in tasks_dir.rglob("*.yaml"):
        match = re.search(r"^task:\s*(\S+)\s*$", path.read_text(), re.M)
        if match:
            names.add(match.group(1))
    return names


def write_fallback_task(tasks_dir):
    folder = tasks_dir / FALLBACK_TASK
    rows = [
        {"question": f"Is {n} even?", "choices": ["yes", "no"], "label": n % 2} for n in range(8)
    ]
    write_jsonl(folder / "test.jsonl", rows)
    (folder / f"{FALLBACK_TASK}.yaml").write_text(
        f"task: {FALLBACK_TASK}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: tasks/{FALLBACK_TASK}/test.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return [{"task": FALLBACK_TASK, "metric": "acc,none"}]


def tiny_config(model_dir, repo):
    config = default_config()
    config["study"] = {
        "models": [MODEL],
        "temperatures": [0.7, 1.0],
        "ratios": [0, 0.5],
        "seeds": [0],
    }
    config["models"] = {MODEL: {"local_path": str(model_dir)}}
    config["task"].update(num_train=16, num_test=8)
    config["generation"].update(num_samples=8, max_new_tokens=12, batch_size=8)
    config["train"].update(epochs=1, batch_size=4, micro_batch_size=4, max_length=64)
    evaluation = config["evaluation"]
    evaluation["limit"] = 4
    evaluation["batch_size"] = 8
    evaluation.setdefault("kl", {}).update(num_samples=4, max_new_tokens=12)
    # keep the configured forgetting tasks that exist in tasks/; a local stand-in otherwise
    present = local_task_names(repo / "tasks")
    forgetting = [entry for entry in evaluation["forgetting"] if entry["task"] in present]
    evaluation["forgetting"] = forgetting or write_fallback_task(repo / "tasks")
    return config


def failure_report(repo, result):
    logs = []
    for log in sorted((repo / "results" / "logs").rglob("*.log")):
        text = log.read_text(errors="replace")
        if "Error" in text or "Traceback" in text:
            logs.append(f"--- {log}\n{text[-2500:]}")
    return result.stdout[-4000:] + "\n" + "\n".join(logs)


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir, tokenizer, tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    config = tiny_config(tiny_model_dir, repo)
    (repo / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # every task prompt must leave room for response tokens within train.max_length
    from cfs.data import arithmetic_problems

    longest = max(
        len(tokenizer(config["task"]["prompt_template"].format(query=p["query"]))["input_ids"])
        for p in arithmetic_problems(24, seed=0)
    )
    assert longest < config["train"]["max_length"], "fixture tokenizer too coarse"
    # One thread per job, so two single-threaded jobs (most of their time is imports and
    # lm-eval's task index) share the 2 cores instead of queueing behind each other.
    one_thread = [f"{rule}=1" for rule in THREADED_RULES]
    result = run_snakemake(repo, "--cores", "2", "--set-threads", *one_thread, timeout=1200)
    return {
        "repo": repo,
        "results": repo / "results",
        "config": config,
        "result": result,
        "bos": tokenizer.bos_token_id,
    }


CELLS = ["base", "ratio0", "temp0.7/ratio0.5", "temp1/ratio0.5"]


def seed_eval(cell, seed=0):
    return (
        f"results/{MODEL}/{cell}/eval.json"
        if cell == "base"
        else (f"results/{MODEL}/{cell}/seed{seed}/eval.json")
    )


def test_pipeline_runs_to_completion(pipeline):
    result = pipeline["result"]
    assert result.returncode == 0, failure_report(pipeline["repo"], result)


def test_summary_has_one_finite_row_per_cell(pipeline):
    results = pipeline["results"]
    table = pd.read_csv(results / "summary.csv")
    assert len(table) == 4
    assert sorted(table["method"]) == ["base", "context_free", "context_free", "plain"]
    assert set(table["model"]) == {MODEL}
    cf = table[table["method"] == "context_free"]
    assert sorted(cf["temperature"]) == [0.7, 1.0]
    assert set(cf["ratio"]) == {0.5}
    assert table.loc[table["method"] == "plain", "ratio"].tolist() == [0.0]
    for column in ("target", "forgetting_avg", "kl_to_base"):
        assert all(math.isfinite(v) for v in table[column]), column
    assert table.loc[table["method"] == "base", "kl_to_base"].tolist() == [0.0]
    assert (table.loc[table["method"] != "base", "kl_to_base"] > 0).all()
    assert sorted(table["eval_paths"]) == sorted(seed_eval(c) for c in CELLS)
    assert set(table["num_seeds"]) == {1}
    for entry in pipeline["config"]["evaluation"]["forgetting"]:
        assert f"forgetting:{entry['task']}" in table.columns


def test_eval_files_have_metrics_base_and_provenance(pipeline):
    results, bos = pipeline["results"], pipeline["bos"]
    base_metrics = json.loads((results / MODEL / "base" / "eval.json").read_text())["metrics"]
    for cell in CELLS:
        record = json.loads((results.parent / seed_eval(cell)).read_text())
        metrics = record["metrics"]
        for key in ("target", "forgetting_avg", "kl_to_base"):
            assert math.isfinite(metrics[key]), (cell, key)
        prov = record["provenance"]
        assert prov["seed"] == 0
        for package in ("torch", "transformers", "lm_eval", "snakemake"):
            assert prov["packages"].get(package), (cell, package)
        assert prov["settings"]["limit"] == 4
        if cell == "base":
            assert record["cell"] == {"model": MODEL, "method": "base"}
            continue
        assert record["base"] == base_metrics
        assert math.isfinite(metrics["heldout_nll"])
        assert metrics["heldout_tokens"] > 0
        assert prov["heldout_provenance"]["prompt_token_id"] == bos
        assert prov["model_provenance"]["stage"] == "fine_tune"
        # the cell's card: its seeds' mean and interval, and each seed's eval
        card = json.loads((results / MODEL / cell / "eval.json").read_text())
        assert card["seeds"] == [0]
        assert card["metrics"]["target"] == metrics["target"]
        assert card["per_seed"][0]["eval"] == seed_eval(cell)
        assert set(record["items"]) == {record["tasks"]["target"], *record["tasks"]["forgetting"]}


def test_figures_exist(pipeline):
    for name in ("vs_temperature", "vs_ratio", "tradeoff"):
        path = pipeline["results"] / "figures" / f"{MODEL}_{name}.png"
        assert path.is_file(), path
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 5000


def test_generations_record_the_prompt_token(pipeline):
    results, bos = pipeline["results"], pipeline["bos"]
    for temperature in ("0.7", "1"):
        folder = results / MODEL / f"temp{temperature}" / "seed0"
        samples = read_jsonl(folder / "context_free.jsonl")
        prov = json.loads((folder / "context_free.provenance.json").read_text())
        assert len(samples) == 8
        assert {s["prompt_token_id"] for s in samples} == {bos}
        assert prov["prompt_token_id"] == bos
        assert prov["temperature"] == float(temperature)
        assert all(len(s["token_ids"]) <= 12 for s in samples)
    heldout = read_jsonl(results / MODEL / "heldout" / "context_free.jsonl")
    heldout_prov = json.loads(
        (results / MODEL / "heldout" / "context_free.provenance.json").read_text()
    )
    assert len(heldout) == 4
    assert heldout_prov["prompt_token_id"] == bos
    assert heldout_prov["seed"] != 0  # its own seed, not the training generations'


def test_mixed_sets_hold_the_first_generated_samples(pipeline):
    results = pipeline["results"]
    assert len(read_jsonl(results / MODEL / "ratio0" / "seed0" / "train.jsonl")) == 16
    for temperature in ("0.7", "1"):
        cell = results / MODEL / f"temp{temperature}"
        mixed = read_jsonl(cell / "ratio0.5" / "seed0" / "train.jsonl")
        generated = read_jsonl(cell / "seed0" / "context_free.jsonl")
        synthetic = [r["token_ids"] for r in mixed if r["kind"] == "context_free"]
        assert len(mixed) == 24 and len(synthetic) == 8
        assert sorted(synthetic) == sorted(s["token_ids"] for s in generated[:8])


def test_fine_tuned_models_are_complete_and_checkpoints_gone(pipeline):
    results = pipeline["results"]
    for cell in CELLS[1:]:
        model_dir = results / MODEL / cell / "seed0" / "model"
        log = json.loads((model_dir / "train_log.json").read_text())
        assert math.isfinite(log["summary"]["train_loss"])
        assert (model_dir / "cfs_provenance.json").is_file()
        assert not (results / MODEL / cell / "seed0" / "checkpoints").exists()
    leftovers = [p for p in results.rglob(".*") if p.name != ".snakemake_timestamp"]
    assert leftovers == [], leftovers


def test_every_job_wrote_a_log(pipeline):
    logs = pipeline["results"] / "logs"
    for rule in (
        "prepare_model",
        "prepare_task_data",
        "generate_context_free",
        "generate_heldout",
        "mix_at_ratio",
        "fine_tune",
        "evaluate_base",
        "evaluate_finetuned",
        "summarise_seeds",
        "summary_table",
    ):
        assert list(logs.glob(f"{rule}*")) or list(logs.glob(f"{rule}/**/*")), rule


# --------------------------------------------------------------------------- DAG as cache


def dry_run(pipeline, name=None, config=None):
    args = ["-n"]
    if config is not None:
        path = pipeline["repo"] / name
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        args += ["--configfile", name]
    result = run_snakemake(pipeline["repo"], *args, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    return job_stats(result.stdout), result.stdout


def test_unchanged_config_schedules_nothing(pipeline):
    assert pipeline["result"].returncode == 0
    stats, output = dry_run(pipeline)
    assert stats == {}, output[-3000:]


# summary_table, figures and `all` run again after any change that reruns a cell
REPORTING = {"summary_table": 1, "figures": 1, "all": 1}


def scheduled_after(pipeline, name, change):
    """Job counts of a dry run after `change(config)` on a copy of the pipeline's config."""
    assert pipeline["result"].returncode == 0
    config = copy.deepcopy(pipeline["config"])
    change(config)
    return dry_run(pipeline, name, config)


def test_new_temperature_schedules_only_its_jobs(pipeline):
    stats, output = scheduled_after(
        pipeline,
        "plus_temperature.yaml",
        lambda config: config["study"].update(temperatures=[0.7, 1.0, 1.3]),
    )
    once = ("generate_context_free", "mix_at_ratio", "fine_tune", "evaluate_finetuned")
    assert stats == {**dict.fromkeys(once, 1), "summarise_seeds": 1, **REPORTING}, output[-3000:]
    assert f"results/{MODEL}/temp1.3/ratio0.5/seed0/eval.json" in output


def test_new_seed_schedules_only_its_jobs(pipeline):
    """A second seed replicates every cell's generation, mixing, training and eval; the
    base eval, the held-out samples and the task split stay as they are."""
    stats, output = scheduled_after(
        pipeline, "plus_seed.yaml", lambda config: config["study"].update(seeds=[0, 1])
    )
    per_cell = ("mix_at_ratio", "fine_tune", "evaluate_finetuned", "summarise_seeds")
    assert stats == {
        "generate_context_free": 2,
        **dict.fromkeys(per_cell, 3),
        **REPORTING,
    }, output[-3000:]
    assert f"results/{MODEL}/temp1/ratio0.5/seed1/eval.json" in output


def test_new_ratio_reuses_the_generations(pipeline):
    stats, output = scheduled_after(
        pipeline, "plus_ratio.yaml", lambda config: config["study"].update(ratios=[0, 0.25, 0.5])
    )
    per_cell = ("mix_at_ratio", "fine_tune", "evaluate_finetuned", "summarise_seeds")
    assert stats == {**dict.fromkeys(per_cell, 2), **REPORTING}, output[-3000:]


def test_changed_training_setting_reruns_training_and_evaluation_only(pipeline):
    stats, output = scheduled_after(
        pipeline, "new_lr.yaml", lambda config: config["train"].update(learning_rate=1e-3)
    )
    per_cell = ("fine_tune", "evaluate_finetuned", "summarise_seeds")
    assert stats == {**dict.fromkeys(per_cell, 3), **REPORTING}, output[-3000:]


def acc_norm_everywhere(config):
    for entry in config["evaluation"]["forgetting"]:
        entry["metric"] = "acc_norm,none"


def test_changed_evaluation_metric_reruns_the_evaluations_only(pipeline):
    """The task check reruns on its new settings; no model is rebuilt or fine-tuned again."""
    stats, output = scheduled_after(pipeline, "new_metric.yaml", acc_norm_everywhere)
    assert stats == {
        "check_evaluation_tasks": 1,
        "evaluate_base": 1,
        **dict.fromkeys(("evaluate_finetuned", "summarise_seeds"), 3),
        **REPORTING,
    }, output[-3000:]


def test_a_misspelt_evaluation_task_stops_the_study_before_any_model_job(
    tiny_model_dir, tmp_path_factory
):
    """The task check is the first job (highest priority), though no model job waits on it."""
    repo = copy_repo(tmp_path_factory.mktemp("typo") / "repo")
    config = tiny_config(tiny_model_dir, repo)
    config["evaluation"]["forgetting"][0]["task"] = "cfs_capitalz"
    (repo / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = run_snakemake(repo, "--cores", "1", timeout=300)
    assert result.returncode != 0
    log = (repo / "results" / "logs" / "check_evaluation_tasks.log").read_text()
    assert "evaluation.forgetting[0].task" in log and "cfs_capitals" in log
    assert not (repo / "results" / "models").exists()
    assert not (repo / "results" / "data").exists()
