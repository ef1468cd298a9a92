"""Config validation (the schema and cfs.study's checks, in-process; once through Snakemake
itself), `snakemake --lint`, and the DAG the embedded default config schedules (dry runs)."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from cfs.study import METHODS
from conftest import REPO, copy_repo, default_config, job_stats, run_snakemake


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A copy of the workflow (no .venv, no results) shared by this module's dry runs;
    each test writes its own config file next to it."""
    return copy_repo(tmp_path_factory.mktemp("config_repo") / "repo")


def dry_run_with(repo, name, config):
    path = repo / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return run_snakemake(repo, "-n", "--configfile", name, timeout=300)


def assert_rejected(result, *needles):
    output = result.stdout
    assert result.returncode != 0, output[-3000:]
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output[-3000:]}"


def rejection(config) -> str:
    """The message a config is refused with, as the Snakefile refuses it: the schema
    (snakemake.utils.validate), then cfs.study's checks."""
    from cfs.study import Study
    from snakemake.utils import validate

    try:
        validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
        Study(config).check()
    except Exception as error:  # WorkflowError (schema) or ValueError (study)
        return str(error)
    raise AssertionError("the config was accepted")


def assert_refused(config, *needles):
    message = rejection(copy.deepcopy(config))
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message[-3000:]}"


def test_negative_ratio_is_rejected():
    config = default_config()
    config["study"]["ratios"] = [0.0, -0.5]
    assert_refused(config, "ratios", "-0.5")


def test_a_refused_config_stops_snakemake_naming_the_key(repo):
    config = default_config()
    config["study"]["ratios"] = [0.0, -0.5]
    assert_rejected(dry_run_with(repo, "neg_ratio.yaml", config), "ratios", "-0.5")


def test_string_temperature_is_rejected():
    config = default_config()
    config["study"]["temperatures"] = [0.7, "hot"]
    assert_refused(config, "temperatures", "hot")


def test_zero_temperature_is_rejected():
    config = default_config()
    config["study"]["temperatures"] = [0, 1.0]
    assert_refused(config, "temperatures")


def test_unknown_model_key_is_rejected():
    config = default_config()
    config["study"]["models"] = [*config["study"]["models"], "nosuchmodel"]
    assert_refused(config, "study.models", "nosuchmodel")


def test_misspelt_section_is_rejected():
    config = default_config()
    config["trian"] = {"epochs": 3}
    assert_refused(config, "trian")


def test_too_few_generated_samples_for_largest_ratio_is_rejected():
    config = default_config()
    config["study"]["ratios"] = [0.0, 1.0]
    config["task"]["num_train"] = 50
    config["generation"]["num_samples"] = 10
    assert_refused(config, "generation.num_samples")


def test_nonzero_ratio_without_temperatures_is_rejected():
    config = default_config()
    config["study"]["temperatures"] = []
    config["study"]["ratios"] = [0.0, 0.5]
    assert_refused(config, "study.temperatures")


def test_missing_required_section_is_rejected():
    config = default_config()
    del config["task"]
    assert_refused(config, "'task' is a required property")


def test_missing_required_nested_key_is_rejected():
    config = default_config()
    del config["evaluation"]["target"]
    assert_refused(config, "'target' is a required property")


def test_lint_is_clean():
    result = run_snakemake(REPO, "--lint", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]


def expected_default_jobs(config):
    """Per-rule job counts of a config's full grid, from the grid arithmetic: generation
    once per (model, temperature, seed), base eval and held-out samples once per model,
    ratio 0 once per seed, each cell once per seed and summarised over its seeds once."""
    study, knobs = config["study"], config.get("methods", {})
    methods = study.get("methods", ["context_free"])
    seeds = study.get("seeds", [0])
    num_seeds = 1 if isinstance(seeds, int) else len(seeds)

    def grid(method):
        method_knobs = knobs.get(method, {})
        temperatures = method_knobs.get("temperatures") or study["temperatures"]
        ratios = [r for r in (method_knobs.get("ratios") or study["ratios"]) if r > 0]
        return (temperatures if ratios else []), ratios

    def in_study(method):
        return method in methods

    cf_temps, cf_ratios = grid("context_free") if in_study("context_free") else ([], [])
    term = {m: grid(m) if in_study(m) else ([], []) for m in ("weighted_synthetic", "kl_to_base")}
    term_cells = sum(len(t) * len(r) * len(knobs[m]["lambdas"]) for m, (t, r) in term.items() if t)
    generated_temps = set(cf_temps) | {t for temps, _ in term.values() for t in temps}
    ctx_temps, ctx_ratios = grid("contextual") if in_study("contextual") else ([], [])
    replay_ratios = grid("replay")[1] if in_study("replay") else []
    lora = len(knobs["lora"]["ranks"]) if in_study("lora") else 0
    l2 = len(knobs["l2"]["lambdas"]) if in_study("l2") else 0
    wise = len(knobs["wiseft"]["alphas"]) if in_study("wiseft") else 0
    plain = 1 if 0 in study["ratios"] else 0
    uses_task_set = plain or lora or l2 or term_cells
    mixed = len(cf_temps) * len(cf_ratios) + len(ctx_temps) * len(ctx_ratios)
    mixed += len(replay_ratios)
    trained = plain + mixed + lora + l2 + term_cells
    per_seed = {
        "generate_context_free": len(generated_temps),
        "generate_contextual": len(ctx_temps),
        "replay_chunks": 1 if replay_ratios else 0,
        "mix_at_ratio": (1 if uses_task_set else 0) + mixed,
        "fine_tune": trained,
        "interpolate_wiseft": wise,
        "evaluate_finetuned": trained + wise,
    }
    per_model = {rule: count * num_seeds for rule, count in per_seed.items()}
    per_model.update(
        prepare_model=1, evaluate_base=1, generate_heldout=1, summarise_seeds=trained + wise
    )
    n_models = len(study["models"])
    jobs = {rule: count * n_models for rule, count in per_model.items()}
    jobs.update(check_evaluation_tasks=1, prepare_task_data=1, summary_table=1, all=1)
    return {rule: count for rule, count in jobs.items() if count}


def test_default_config_dry_run_schedules_the_whole_grid(repo):
    config = default_config()
    result = run_snakemake(repo, "-n", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    stats = job_stats(result.stdout)
    figures = stats.pop("figures")
    assert 1 <= figures <= len(config["study"]["models"])
    assert stats == expected_default_jobs(config)
    # paths read like the study
    model, temp = config["study"]["models"][0], config["study"]["temperatures"][0]
    ratio = next(r for r in config["study"]["ratios"] if r > 0)
    assert f"results/{model}/temp{temp:g}/ratio{ratio:g}/eval.json" in result.stdout
    assert f"results/{model}/temp{temp:g}/ratio{ratio:g}/seed0/eval.json" in result.stdout
    assert f"results/{model}/ratio0/eval.json" in result.stdout


def test_the_quick_overlay_runs_seed_zero_of_two_default_cells(repo):
    quick = yaml.safe_load((REPO / "config" / "quick.yaml").read_text())
    config = default_config()
    config["study"].update(quick["study"])  # what --configfile does with the overlay
    result = run_snakemake(repo, "-n", "--configfile", "config/quick.yaml", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    stats = job_stats(result.stdout)
    assert stats.pop("figures") == 1
    assert stats == expected_default_jobs(config)
    assert stats["fine_tune"] == 2 and stats["evaluate_finetuned"] == 2
    # the default's own seed-0 paths, so a later full run reuses these jobs
    for cell in ("ratio0", "temp1/ratio1"):
        assert f"results/smollm2/{cell}/seed0/eval.json" in result.stdout
    assert "seed1" not in result.stdout and "temp0.7" not in result.stdout


def test_three_seeds_replicate_every_cell(repo):
    config = copy.deepcopy(default_config())
    config["study"]["seeds"] = [0, 1, 2]
    result = dry_run_with(repo, "three_seeds.yaml", config)
    assert result.returncode == 0, result.stdout[-3000:]
    stats = job_stats(result.stdout)
    stats.pop("figures")
    assert stats == expected_default_jobs(config)
    single = copy.deepcopy(config)
    single["study"]["seeds"] = [0]
    one = expected_default_jobs(single)
    assert stats["fine_tune"] == 3 * one["fine_tune"]
    assert stats["evaluate_base"] == one["evaluate_base"] == 1  # samples nothing
    assert stats["generate_heldout"] == 1  # the KL yardstick stays the same
    for seed in (0, 1, 2):
        assert f"results/smollm2/temp1/seed{seed}/context_free.jsonl" in result.stdout
        assert f"results/smollm2/ratio0/seed{seed}/model" in result.stdout


def test_a_single_seed_number_is_a_list_of_one(repo):
    config = copy.deepcopy(default_config())
    config["study"]["seeds"] = 7
    result = dry_run_with(repo, "one_seed.yaml", config)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "results/smollm2/ratio0/seed7/eval.json" in result.stdout
    assert job_stats(result.stdout)["fine_tune"] == expected_default_jobs(config)["fine_tune"]


def test_the_old_single_seed_key_is_rejected_by_name():
    config = copy.deepcopy(default_config())
    del config["study"]["seeds"]
    config["study"]["seed"] = 0
    assert_refused(config, "seed")


def test_grid_with_two_models_shares_task_data(repo):
    config = copy.deepcopy(default_config())
    config["models"]["second"] = {"hub_id": "org/second-model"}
    config["study"]["models"] = [*config["study"]["models"], "second"]
    result = dry_run_with(repo, "two_models.yaml", config)
    assert result.returncode == 0, result.stdout[-3000:]
    stats = job_stats(result.stdout)
    stats.pop("figures")
    assert stats == expected_default_jobs(config)
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
    result = run_snakemake(repo, "-n", "-p", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    train_line = next(line for line in result.stdout.splitlines() if "cfs.train" in line)
    assert '"epochs": 2' in train_line and '"max_length": 128' in train_line
    evals = [line for line in result.stdout.splitlines() if "cfs.evaluate" in line]
    fine_tuned = next(line for line in evals if "--base-model" in line)
    assert '"limit": null' in fine_tuned and '"kl": {"batch_size": 8}' in fine_tuned


def test_ratio_zero_cell_cannot_be_requested_under_a_temperature(repo):
    """Ratio 0 is plain fine-tuning and lives at results/{model}/ratio0; the wildcard
    constraints mean to forbid a temperature-specific duplicate temp{T}/ratio0."""
    model = default_config()["study"]["models"][0]
    result = run_snakemake(repo, "-n", f"results/{model}/temp0.7/ratio0/eval.json", timeout=300)
    assert result.returncode != 0, job_stats(result.stdout)
    assert "No rule to produce results/" in result.stdout, result.stdout[-2000:]


def every_method_config():
    config = copy.deepcopy(default_config())
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
    return config


def test_grid_with_every_method_schedules_each_job_once(repo):
    config = every_method_config()
    result = dry_run_with(repo, "every_method.yaml", config)
    assert result.returncode == 0, result.stdout[-3000:]
    stats = job_stats(result.stdout)
    assert stats.pop("figures") == 1
    expected = expected_default_jobs(config)
    assert stats == expected
    # 2 context-free temperatures + 1.3 for the KL regulariser; 1.0 is shared
    assert stats["generate_context_free"] == 3
    assert stats["fine_tune"] == 1 + 4 + 4 + 2 + 2 + 2 + 2 + 1
    assert stats["evaluate_finetuned"] == stats["fine_tune"] + 3
    # each method's path carries its own knobs only
    for path in (
        "results/smollm2/contextual/temp0.5/ratio1/eval.json",
        "results/smollm2/replay/ratio0.5/eval.json",
        "results/smollm2/lora/rank8/eval.json",
        "results/smollm2/l2/lambda1000000/eval.json",
        "results/smollm2/wiseft/alpha0.25/eval.json",
        "results/smollm2/cf_weighted/temp1/ratio1/lambda0.5/eval.json",
        "results/smollm2/kl_to_base/temp1.3/ratio0.5/lambda1/eval.json",
    ):
        assert path in result.stdout, path


def test_unknown_method_is_rejected():
    config = default_config()
    config["study"]["methods"] = ["context_free", "dropout"]
    assert_refused(config, "methods", "dropout")


def test_wiseft_without_plain_fine_tuning_is_rejected():
    config = default_config()
    config["study"]["ratios"] = [1.0]
    assert_refused(config, "study.ratios", "WiSE-FT")


def fine_tune_gpus(output: str) -> dict[str, int]:
    """cell -> gpu resource of each fine_tune job in a dry run's output."""
    gpus = {}
    for block in re.split(r"^(?=(?:local)?rule \w+:)", output, flags=re.M):
        if re.search(r"^rule fine_tune:", block, re.M):
            cell = re.search(r"cell=([^,\n]+)", block).group(1)
            gpus[cell] = int(re.search(r"\bgpu=(\d+)", block).group(1))
    return gpus


def test_resources_per_method_override_the_stage(repo):
    """An 8B LoRA fits one GPU where full fine-tuning is sharded over several:
    METHOD_KEY wins over STAGE_KEY for that method's fine-tunes only."""
    config = copy.deepcopy(default_config())
    config["models"]["smollm2"]["resources"] = {"train_gpus": 4, "lora_gpus": 1}
    config["study"]["methods"] = sorted({*config["study"]["methods"], "lora"})
    result = dry_run_with(repo, "per_method.yaml", config)
    assert result.returncode == 0, result.stdout[-3000:]
    gpus = fine_tune_gpus(result.stdout)
    assert gpus.pop("lora/rank16") == 1
    assert gpus and set(gpus.values()) == {4}, gpus


def test_unknown_resource_prefix_is_rejected():
    config = copy.deepcopy(default_config())
    config["models"]["smollm2"]["resources"] = {"loar_gpus": 1}
    assert_refused(config, "resources.loar_gpus")
