"""The jobs' cluster resources (workflow/rules/resources.smk), in dry runs: a fine-tune
with several GPUs starts one process per GPU, a method's resources override its stage's,
CPU stages ask for no GPU, and the Slurm site's GPU partition and GPU type reach the jobs
of the GPU stages, each one node, and no other job. In the dry runs of the paper's two
configs: every job's runtime within a 24-hour partition, and a LoRA fine-tune sized for
its one GPU."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import (
    DAY_MINUTES,
    MODEL_STAGE_RULES,
    PAPER_CONFIGS,
    copy_repo,
    default_config,
    jobs,
    run_snakemake,
    snakemake_env,
    tiny_config,
)

# the stages that run on GPUs where there are some: generation, fine-tuning, evaluation
GPU_STAGE_RULES = set(MODEL_STAGE_RULES)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("resources_repo") / "repo")


def test_fine_tune_rule_starts_one_process_per_gpu(tmp_path):
    """A dry run with train.gpus 2 prints a torchrun launch; with no GPUs, plain python."""
    repo = copy_repo(tmp_path / "repo")
    config = tiny_config(tmp_path / "no_model_needed")
    config["study"].update(temperatures=[1.0], ratios=[0])
    config["claims"]["primary"] = None  # plain fine-tuning alone: nothing to compare
    config["models"]["tiny"]["resources"] = {"train": {"gpus": 2}, "gpus": 1, "mem_mb": 16000}
    (repo / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = run_snakemake(repo, "-n", "-p", "results/tiny/ratio0/seed0/model")
    assert result.returncode == 0, result.stdout[-3000:]
    (fine_tune,) = [block for rule, block in jobs(result.stdout) if rule == "fine_tune"]
    for launch in ("if [ 2 -gt 1 ]", "torchrun --standalone --nproc-per-node 2"):
        assert launch in fine_tune, f"{launch!r} not in the fine-tune's job:\n{fine_tune}"
    for resource in (r"\bgpu=2\b", r"\bmem_mb=16000\b"):
        assert re.search(resource, fine_tune), f"no {resource} in the fine-tune's job:\n{fine_tune}"
    # CPU stages ask for no GPU whatever the model's GPUs
    cpu_jobs = [block for rule, block in jobs(result.stdout) if rule == "prepare_task_data"]
    assert len(cpu_jobs) == 1, f"{len(cpu_jobs)} prepare_task_data jobs, expected one"
    assert re.search(r"\bgpu=0\b", cpu_jobs[0]), f"a CPU stage's job asks for GPUs:\n{cpu_jobs[0]}"


def fine_tune_gpus(output: str) -> dict[str, int]:
    """cell -> gpu resource of each fine_tune job in a dry run's output."""
    gpus = {}
    for rule, block in jobs(output):
        if rule == "fine_tune":
            cell = re.search(r"cell=([^,\n]+)", block).group(1)
            gpus[cell] = int(re.search(r"\bgpu=(\d+)", block).group(1))
    return gpus


def test_resources_per_method_override_the_stage(repo):
    """An 8B LoRA fits one GPU where full fine-tuning is sharded over several:
    METHOD_KEY wins over STAGE_KEY for that method's fine-tunes only."""
    config = default_config()
    model = config["study"]["models"][0]
    config["models"][model]["resources"] = {"train": {"gpus": 4}, "lora": {"gpus": 1}}
    config["study"]["methods"] = sorted({*config["study"]["methods"], "lora"})
    (repo / "per_method.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = run_snakemake(repo, "-n", "--configfile", "per_method.yaml")
    assert result.returncode == 0, result.stdout[-3000:]
    gpus = fine_tune_gpus(result.stdout)
    lora = {cell: count for cell, count in gpus.items() if cell.startswith("lora/")}
    others = {count for cell, count in gpus.items() if cell not in lora}
    assert set(lora.values()) == {1}, f"LoRA fine-tunes' GPUs: {lora}"
    assert others == {4}, f"GPUs of every fine-tune: {gpus}"


def test_gpu_site_values_reach_every_gpu_stage_job_and_no_other(repo):
    """CFS_SLURM_GPU_PARTITION and CFS_SLURM_GPU_MODEL go to the jobs of the GPU stages
    (generation, fine-tuning, evaluation), whatever their rule: no list of rule names."""
    env = snakemake_env({"CFS_SLURM_GPU_PARTITION": "gpu", "CFS_SLURM_GPU_MODEL": "a100"})
    # the sweep has every generation rule (contextual samples are not in the default)
    result = run_snakemake(repo, "-n", "all", "--configfile", "config/sweep.yaml", env=env)
    assert result.returncode == 0, result.stdout[-3000:]
    seen = set()
    for rule, block in jobs(result.stdout):
        on_gpu_partition = "slurm_partition=gpu" in block and "gpu_model=a100" in block
        assert on_gpu_partition == (rule in GPU_STAGE_RULES), (rule, block)
        # a GPU stage's job is one node: its GPUs are never split over two
        assert ("nodes=1" in block) == (rule in GPU_STAGE_RULES), (rule, block)
        seen.add(rule)
    missing = GPU_STAGE_RULES - seen
    assert missing == set(), "GPU stages without a job in the sweep's dry run"


# --------------------------------------------------------------------------- the paper's configs


def resources(block: str) -> dict[str, str]:
    line = re.search(r"^\s*resources: (.*)$", block, re.M).group(1)
    return dict(item.split("=", 1) for item in line.split(", "))


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_every_job_fits_a_24_hour_partition(dry_runs, name):
    checked = set()
    for rule, block in dry_runs[name]:
        if "runtime=" not in block:
            continue  # the targets (all, the study's tables)
        runtime = int(resources(block)["runtime"])
        assert runtime <= DAY_MINUTES, (rule, runtime)
        checked.add(rule)
    assert GPU_STAGE_RULES - {"generate_contextual"} <= checked


def test_reasoning_lora_job_is_sized_for_its_one_gpu(dry_runs):
    """A LoRA fine-tune asks for one GPU and a one-GPU job's CPUs and memory, not the
    8-GPU fine-tunes' (lora_* keys over train_*)."""
    sizes = {}
    for rule, block in dry_runs["reasoning"]:
        if rule == "fine_tune":
            cell = re.search(r"cell=([^,\n]+)", block).group(1)
            sizes[cell] = resources(block)
    lora = [size for cell, size in sizes.items() if cell.startswith("lora/")]
    full = [size for cell, size in sizes.items() if not cell.startswith("lora/")]
    assert lora and full
    for size in lora:
        assert (size["gpu"], size["cpus_per_task"]) == ("1", "8"), size
        assert int(size["mem_mb"]) <= 128000, size
    for size in full:
        assert size["gpu"] == "8" and size["nodes"] == "1", size
        assert int(size["mem_mb"]) <= 256000 and int(size["cpus_per_task"]) <= 32, size
