"""The Snakemake DAG of the workflow (dry runs in a copy of the repository): the embedded
default config's whole grid with per-rule job counts from the grid arithmetic
(conftest.expected_jobs), the quick overlay, seeds, several models, every method, the
schema's defaults reaching the stages, the wildcard constraints; and `snakemake --lint`.
The hub fetch: in the paper's configs the first job (the task check, on the submitting
host) fetches the study's hub models and datasets and every GPU job waits on it; a study
on local files has no fetch; and a forgetting task whose hub dataset is not cached fails
that first job, by name, before any other job starts."""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections import Counter

import pytest
import yaml
from cfs.study import METHODS, SAMPLE_KINDS, parse_cell
from conftest import (
    PAPER_CONFIGS,
    REPO,
    SAMPLE_RULES,
    copy_repo,
    default_config,
    evaluation_path,
    expected_jobs,
    job_stats,
    jobs,
    run_snakemake,
    snakemake_env,
    stage_settings,
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A copy of the workflow (no .venv, no results) shared by this module's dry runs;
    each test writes its own config file next to it."""
    return copy_repo(tmp_path_factory.mktemp("dag_repo") / "repo")


def dry_run(repo, *args: str):
    result = run_snakemake(repo, "-n", *args, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout


def dry_run_with(repo, name: str, config: dict, *args: str) -> str:
    (repo / name).write_text(yaml.safe_dump(config, sort_keys=False))
    return dry_run(repo, "--configfile", name, *args)


def test_every_kind_of_samples_has_its_rule():
    assert sorted(SAMPLE_RULES) == sorted(SAMPLE_KINDS)


def test_lint_is_clean(repo):
    result = run_snakemake(repo, "--lint", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]


def test_default_config_dry_run_schedules_the_whole_grid(repo):
    config = default_config()
    output = dry_run(repo)
    stats = job_stats(output)
    figures = stats.pop("figures")
    assert figures == len(config["study"]["models"])
    assert stats == expected_jobs(config)
    # paths read like the study
    model, temp = config["study"]["models"][0], config["study"]["temperatures"][0]
    ratio = next(r for r in config["study"]["ratios"] if r > 0)
    cell = f"temp{temp:g}/ratio{ratio:g}"
    for evaluated in (cell, f"{cell}/seed0", "ratio0", "base"):
        path = evaluation_path(config, model, evaluated)
        assert path in output, f"{path} not in the dry run"


def test_the_quick_overlay_runs_seed_zero_of_two_default_cells(repo):
    quick = yaml.safe_load((REPO / "config" / "quick.yaml").read_text())
    config = default_config()
    config["study"].update(quick["study"])  # what --configfile does with the overlay
    output = dry_run(repo, "--configfile", "config/quick.yaml")
    stats = job_stats(output)
    assert stats.pop("figures") == 1
    assert stats == expected_jobs(config)
    # plain at its two learning rates and context-free data, each evaluated at its end and
    # at the default's two points along training
    assert (stats["fine_tune"], stats["evaluate_finetuned"]) == (3, 9)
    # the default's own seed-0 paths, so a later full run reuses these jobs
    model = config["study"]["models"][0]
    for cell in ("ratio0", "temp1/ratio1"):
        path = evaluation_path(config, model, f"{cell}/seed0")
        assert path in output, f"{path} not in the dry run"
    for other in ("seed1", "temp0.7"):
        assert other not in output, f"the quick overlay schedules {other}"


def test_three_seeds_replicate_every_cell(repo):
    config = default_config()
    config["study"]["seeds"] = [0, 1, 2]
    output = dry_run_with(repo, "three_seeds.yaml", config)
    stats = job_stats(output)
    stats.pop("figures")
    assert stats == expected_jobs(config)
    single = copy.deepcopy(config)
    single["study"]["seeds"] = [0]
    one = expected_jobs(single)
    assert stats["fine_tune"] == 3 * one["fine_tune"]
    assert stats["evaluate_base"] == one["evaluate_base"] == 1  # samples nothing
    assert stats["generate_heldout"] == 1  # the KL yardstick stays the same
    model = config["study"]["models"][0]
    for seed in (0, 1, 2):
        for path in (
            f"results/{model}/temp1/seed{seed}/context_free.jsonl",
            f"results/{model}/ratio0/seed{seed}/model",
        ):
            assert path in output, f"{path} not in the dry run"


def test_learning_rates_and_points_along_training_are_cells_of_their_own(repo):
    """A learning rate of plain fine-tuning's sweep is a cell of its own, trained at that
    rate on plain's training set; each fine-tune also saves its model at each fraction of
    train.evaluate_at, evaluated there like a cell."""
    config = default_config()
    config["study"]["seeds"] = [0]
    config["methods"]["plain"] = {"learning_rates": [2.0e-4]}
    config["train"]["evaluate_at"] = [0.5]
    output = dry_run_with(repo, "rates_and_points.yaml", config, "-p")
    stats = job_stats(output)
    stats.pop("figures")
    assert stats == expected_jobs(config)
    model = config["study"]["models"][0]
    cell = f"results/{model}/ratio0/lr0.0002"
    fine_tunes = [block for rule, block in jobs(output) if rule == "fine_tune"]
    (own,) = [block for block in fine_tunes if f"{cell}/seed0/model" in block]
    assert '"learning_rate": 0.0002' in own
    assert f"--data results/{model}/ratio0/seed0/train.jsonl" in own
    assert f"--snapshots {cell}/at0.5/seed0/snapshot" in own
    others = [block for block in fine_tunes if block is not own]
    assert all('"learning_rate": 0.0002' not in block for block in others)
    for point in ("ratio0/lr0.0002/at0.5/seed0", "ratio0/at0.5/seed0"):
        path = evaluation_path(config, model, point)
        assert path in output, f"{path} not in the dry run"


def test_a_single_seed_number_is_a_list_of_one(repo):
    config = default_config()
    config["study"]["seeds"] = 7
    output = dry_run_with(repo, "one_seed.yaml", config)
    path = evaluation_path(config, config["study"]["models"][0], "ratio0/seed7")
    assert path in output, f"{path} not in the dry run"
    assert job_stats(output)["fine_tune"] == expected_jobs(config)["fine_tune"]


def test_grid_with_two_models_shares_task_data(repo):
    config = default_config()
    config["models"]["second"] = {"hub_id": "org/second-model"}
    config["study"]["models"] = [*config["study"]["models"], "second"]
    stats = job_stats(dry_run_with(repo, "two_models.yaml", config))
    assert stats.pop("figures") == 2
    assert stats == expected_jobs(config)
    assert stats["prepare_task_data"] == 1


def test_optional_sections_fall_back_to_schema_defaults(tmp_path):
    """generation, train and evaluation.kl may be left out: the schema's defaults reach
    the stages' --settings (shown with -p)."""
    repo = copy_repo(tmp_path / "repo")
    config = default_config()
    for section in ("generation", "train"):
        config.pop(section, None)
    config["task"]["num_train"] = 100  # within the default generation.num_samples (200)
    config["evaluation"].pop("kl", None)
    config["evaluation"].pop("limit", None)
    (repo / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    lines = dry_run(repo, "-p").splitlines()
    train_line = next(line for line in lines if "cfs.train" in line)
    for setting in ('"epochs": 2', '"max_length": 128'):
        assert setting in train_line, f"{setting} not in: {train_line}"
    evals = [line for line in lines if "cfs.evaluate" in line]
    fine_tuned = next(line for line in evals if "--base-model" in line)
    for setting in ('"limit": null', '"kl": {"batch_size": 8}'):
        assert setting in fine_tuned, f"{setting} not in: {fine_tuned}"


def test_ratio_zero_cell_cannot_be_requested_under_a_temperature(repo):
    """Ratio 0 is plain fine-tuning and lives at results/{model}/ratio0; the wildcard
    constraints forbid a temperature-specific duplicate temp{T}/ratio0."""
    model = default_config()["study"]["models"][0]
    result = run_snakemake(repo, "-n", f"results/{model}/temp0.7/ratio0/eval.json", timeout=300)
    assert result.returncode != 0, job_stats(result.stdout)
    assert "No rule to produce results/" in result.stdout, result.stdout[-2000:]


def every_method_config():
    config = default_config()
    config["study"]["temperatures"] = [0.5, 1.0]
    config["study"]["ratios"] = [0.0, 0.5, 1.0]
    config["study"]["seeds"] = [0]
    config["study"]["methods"] = [name for name in METHODS if name != "plain"]
    config["methods"]["contextual"] = {"temperatures": [0.5, 1.0], "ratios": [0.5, 1.0]}
    config["methods"]["replay"] = {"corpus": {"python_stdlib": "*.py"}, "ratios": None}
    config["methods"]["lora"]["ranks"] = [4, 8]
    config["methods"]["l2"] = {"lambdas": [0.01, 1000000.0]}
    config["methods"]["wiseft"]["alphas"] = [0.25, 0.5, 0.75]
    # the synthetic-term methods use a temperature the context-free grid also has (shared
    # generation) and one it has not (its own generation)
    config["methods"]["weighted_synthetic"] = {
        "temperatures": [1.0],
        "ratios": [1.0],
        "lambdas": [0.5, 2.0],
    }
    config["methods"]["kl_to_base"] = {"temperatures": [1.3], "ratios": [0.5], "lambdas": [1.0]}
    # one learning rate and no points along training: a job per cell
    config["methods"]["plain"] = {"learning_rates": []}
    config["train"]["evaluate_at"] = []
    return config


def test_grid_with_every_method_schedules_each_job_once(repo):
    config = every_method_config()
    output = dry_run_with(repo, "every_method.yaml", config)
    stats = job_stats(output)
    assert stats.pop("figures") == 1
    assert stats == expected_jobs(config)
    # 2 context-free temperatures + 1.3 for the KL regulariser; 1.0 is shared
    assert stats["generate_context_free"] == 3
    assert stats["fine_tune"] == 1 + 4 + 4 + 2 + 2 + 2 + 2 + 1
    assert stats["evaluate_finetuned"] == stats["fine_tune"] + 3
    # each method's path carries its own knobs only
    model = config["study"]["models"][0]
    for cell in (
        "contextual/temp0.5/ratio1",
        "replay/ratio0.5",
        "lora/rank8",
        "l2/lambda1000000",
        "wiseft/alpha0.25",
        "cf_weighted/temp1/ratio1/lambda0.5",
        "kl_to_base/temp1.3/ratio0.5/lambda1",
    ):
        path = evaluation_path(config, model, cell)
        assert path in output, f"{path} not in the dry run"


def stage_commands(output: str) -> list[tuple[str, dict[str, str], dict]]:
    """(module, flags, settings) of each `python -m cfs.<module>` command a dry run -p
    printed (the stage's, after `python -m cfs.timing FILE --`)."""
    commands = []
    for line in output.splitlines():
        match = re.search(r"-m cfs\.(?!timing )(\w+) ", line)
        if not match or "--settings" not in line:
            continue
        words = shlex.split(line[match.start() :])
        flags = {
            word: value
            for word, value in zip(words, [*words[1:], ""], strict=True)
            if word.startswith("--")
        }
        commands.append((match.group(1), flags, json.loads(flags["--settings"])))
    return commands


def temperature_in(path: str) -> float:
    return float(re.search(r"/temp([\d.]+)/", path).group(1))


def test_every_stage_runs_with_the_settings_cfs_stage_settings_builds(repo):
    """The rules hand each stage exactly what cfs.stage_settings builds for its wildcards,
    every knob of the cell inside --settings (no --temperature, --ratio, --alpha flags): the
    tests and the benchmarks, which build settings there too, run the stages as the
    pipeline does."""
    config = every_method_config()
    config["study"]["seeds"] = [0, 1]
    config["methods"]["plain"] = {"learning_rates": [1e-4]}
    config["train"]["evaluate_at"] = [0.5]
    output = dry_run_with(repo, "every_method.yaml", config, "-p")
    stages = stage_settings(config)
    built = {
        "train": lambda model, cell, seed, out: stages.train(cell, seed),
        "evaluate": lambda model, cell, seed, out: stages.evaluation(model, cell, seed),
        "replay": lambda model, cell, seed, out: stages.replay(seed),
        "mix": lambda model, cell, seed, out: stages.mix(cell, seed),
        "wiseft": lambda model, cell, seed, out: stages.wiseft(parse_cell(cell)["alpha"]),
        "generate": lambda model, cell, seed, out: (
            stages.heldout(model)
            if "/heldout/" in out
            else stages.contextual(model, seed, temperature_in(out))
            if "contextual" in out
            else stages.generation(model, seed, temperature_in(out))
        ),
    }
    checked = Counter()
    for module, flags, settings in stage_commands(output):
        if module not in built:
            continue
        out = flags["--out"]
        model = out.split("/")[1]
        place = re.sub(r"^results/\w+/(evals/\w+/)?", "", out)
        cell = "base" if place.startswith("base/") else place.rsplit("/seed", 1)[0]
        seed = re.search(r"seed(\d+)", out)
        seed = int(seed.group(1)) if seed else stages.config["task"]["seed"]
        assert settings == built[module](model, cell, seed, out), f"{module} --out {out}"
        knob_flags = {"--temperature", "--ratio", "--alpha", "--kind"} & set(flags)
        assert not knob_flags, f"{module} --out {out}: a knob beside --settings: {knob_flags}"
        checked[module] += 1
    stats = job_stats(output)
    assert checked["train"] == stats["fine_tune"]
    assert checked["evaluate"] == stats["evaluate_base"] + stats["evaluate_finetuned"]
    generations = ("generate_context_free", "generate_contextual", "generate_heldout")
    assert checked["generate"] == sum(stats[rule] for rule in generations)
    assert checked["replay"] == stats["replay_chunks"] == 2  # one per seed
    assert checked["mix"] == stats["mix_at_ratio"]
    assert checked["wiseft"] == stats["interpolate_wiseft"]


# --------------------------------------------------------------------------- fetching


FETCH_GATED = {"prepare_task_data", "generate_context_free", "generate_heldout"}
FETCH_GATED |= {"generate_contextual"}


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_the_fetch_follows_the_check_and_every_gpu_job_waits_on_it(dry_runs, name):
    """After the task check, the fetch (a local job, on the submitting host) fetches the
    study's hub models, task data and evaluation datasets; the task's preparation and the
    generations wait on the fetch, the evaluations on the check, the fine-tunes on their
    training sets (and a hub model is prepared on the submitting host:
    workflow/rules/models.smk)."""
    blocks = dry_runs[name]
    (check,) = [block for rule, block in blocks if rule == "check_evaluation_tasks"]
    (fetch,) = [block for rule, block in blocks if rule == "fetch_from_hub"]
    checked = re.search(r"^\s*output: (\S+)", check, re.M).group(1)
    assert checked in re.search(r"^\s*input: (.*)$", fetch, re.M).group(1), fetch
    assert "results/checks/hub_fetch.json" in fetch
    seen = set()
    for rule, block in blocks:
        inputs = re.search(r"^\s*input: (.*)$", block, re.M)
        inputs = inputs.group(1) if inputs else ""
        if rule in FETCH_GATED:
            assert "results/checks/hub_fetch.json" in inputs, (rule, block)
            seen.add(rule)
        if rule.startswith("evaluate"):
            assert "results/checks/evaluation_tasks/" in inputs, (rule, block)
        if rule == "fine_tune":
            # the training set, mixed from the task's data (which waits on the fetch)
            assert "/train.jsonl" in inputs and "results/models/" in inputs, block
    assert seen == FETCH_GATED
    config = yaml.safe_load((REPO / PAPER_CONFIGS[name]).read_text())
    (model,) = config["study"]["models"]
    hub_id = config["models"][model]["hub_id"]
    assert f'"hub_id": "{hub_id}"' in fetch, fetch
    assert f'"dataset": "{config["task"]["dataset"]}"' in fetch, fetch


def test_a_study_on_local_files_waits_on_no_fetch(repo):
    """The embedded default reads nothing from the hub: its jobs are those of a DAG
    without the fetch."""
    result = run_snakemake(repo, "-n", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "hub_fetch.json" not in result.stdout


def test_a_missing_evaluation_dataset_stops_the_study_in_its_fetch(tmp_path):
    """A run of the default study with a forgetting task whose hub dataset is not cached
    (offline): the task check passes, the fetch after it fails naming the task and the
    dataset, and no other job starts, so no GPU job is ever queued."""
    repo = copy_repo(tmp_path / "repo")
    folder = repo / "tasks" / "cfs_test_hub"
    folder.mkdir()
    (folder / "cfs_test_hub.yaml").write_text(
        "task: cfs_test_hub\ndataset_path: cfs-test-org/never-cached-dataset\n"
        "output_type: generate_until\ntest_split: test\ndoc_to_text: '{{q}}'\n"
        "doc_to_target: '{{a}}'\nmetric_list:\n  - metric: exact_match\n"
    )
    overlay = {
        "evaluation": {
            "forgetting": [
                {"task": "cfs_capitals", "metric": "p_correct,none"},
                {"task": "cfs_test_hub", "metric": "exact_match,none"},
            ]
        }
    }
    (repo / "hub_task.yaml").write_text(yaml.safe_dump(overlay))
    env = snakemake_env({"HF_HOME": str(tmp_path / "empty_hf_home")})
    result = run_snakemake(
        repo, "--cores", "1", "all", "--configfile", "hub_task.yaml", env=env, timeout=300
    )
    assert result.returncode != 0, result.stdout[-3000:]
    fetch_log = repo / "results" / "logs" / "checks" / "hub_fetch.log"
    assert fetch_log.is_file(), result.stdout[-3000:]
    text = fetch_log.read_text()
    for name in ("evaluation.forgetting[1]", "cfs_test_hub", "cfs-test-org/never-cached-dataset"):
        assert name in text, f"{name!r} not in the fetch's log:\n{text[-3000:]}"
    assert "Traceback" not in text
    started = re.findall(r"^(?:local)?rule (\w+):", result.stdout, re.M)
    assert started == ["check_evaluation_tasks", "fetch_from_hub"], started
    assert not (repo / "results" / "models").exists()
    # the task's preparation and the generations wait on the fetch: a run with more
    # cores, or one that keeps going past the failure, starts no GPU job either
    result = run_snakemake(repo, "-n", "all", "--configfile", "hub_task.yaml", env=env, timeout=300)
    gated = [block for rule, block in jobs(result.stdout) if rule in FETCH_GATED]
    assert gated and all("results/checks/hub_fetch.json" in block for block in gated)


# --------------------------------------------------------------------------- a finished grid


def test_a_finished_paper_grid_reruns_nothing_and_a_new_temperature_only_its_jobs(tmp_path):
    """config/olmo.yaml's grid marked finished without running a model (every output of the
    dry run a placeholder, then `snakemake --touch` records them as a run leaves them):
    nothing is scheduled; adding one temperature schedules exactly the jobs that value
    needs (the grid arithmetic of the wider grid less the finished one's) and the tables,
    figures and `all` that read every cell."""
    from cfs.stage_settings import merged

    repo = copy_repo(tmp_path / "repo")
    files = ["--configfile", PAPER_CONFIGS["olmo"]]
    for _, block in jobs(dry_run(repo, *files)):
        outputs = re.search(r"^\s+output: (.*)$", block, re.M)
        for name in outputs.group(1).split(", ") if outputs else []:
            path = repo / name
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("placeholder\n")
            else:  # a directory output (a model folder)
                path.mkdir(parents=True, exist_ok=True)
    touched = run_snakemake(repo, "--touch", "-F", "--cores", "1", *files, timeout=300)
    assert touched.returncode == 0, touched.stdout[-3000:]
    assert job_stats(dry_run(repo, *files)) == {}

    config = merged(default_config(), yaml.safe_load((REPO / PAPER_CONFIGS["olmo"]).read_text()))
    temperatures = config["study"]["temperatures"]
    plus = {"study": {"temperatures": [*temperatures, 1.5]}}
    (repo / "plus.yaml").write_text(yaml.safe_dump(plus))
    scheduled = job_stats(dry_run(repo, *files, "plus.yaml"))
    wider, finished = expected_jobs(merged(config, plus)), expected_jobs(config)
    needed = {rule: wider[rule] - finished.get(rule, 0) for rule in wider}
    needed = {rule: count for rule, count in needed.items() if count}
    needed.update(summary_table=1, figures=1, all=1)
    assert scheduled == needed
