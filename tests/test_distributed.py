"""Fine-tuning in several processes (cfs.distributed): the same code in one process and in
two gloo processes on CPU (`torchrun --nproc-per-node 2`, as the fine_tune rule starts it
for a job with 2 GPUs) gives the same loss curve at the same global batch.

Tolerance: every logged loss within 1e-5 relative, and every final weight within 1e-5;
on this machine the two runs agree exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cfs import distributed
from cfs.data import arithmetic_problems, render
from cfs.errors import SettingsError
from conftest import (
    PACKAGE_DIR,
    TEMPLATE,
    copy_repo,
    model_weights,
    run_snakemake,
    train_settings,
    write_jsonl,
)

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


# --------------------------------------------------------------------------- settings


@pytest.fixture
def world(monkeypatch):
    def set_world(size: int, rank: int = 0):
        monkeypatch.setenv("WORLD_SIZE", str(size))
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))

    return set_world


def test_one_process_needs_no_extra_arguments(world):
    world(1)
    assert distributed.distributed_arguments(train_settings(fsdp=True)) == {}
    assert distributed.accumulation_steps(8, 2) == 4
    assert distributed.is_main_process()
    assert distributed.process_device() == torch.device("cpu")


def test_global_batch_is_shared_by_the_processes(world):
    world(2, rank=1)
    assert distributed.accumulation_steps(8, 2) == 2  # 2 per pass x 2 processes x 2 steps
    assert distributed.accumulation_steps(4, 2) == 1
    assert not distributed.is_main_process()
    with pytest.raises(SettingsError, match=r"batch_size \(6\).*micro_batch_size \(2\).*2"):
        distributed.accumulation_steps(6, 2)


def test_several_cpu_processes_use_gloo(world):
    world(2)
    arguments = distributed.distributed_arguments(train_settings())
    assert arguments["ddp_backend"] == "gloo"
    assert arguments["ddp_find_unused_parameters"] is False


def test_fsdp_only_with_several_processes(world):
    settings = train_settings(fsdp=True, fsdp_config={"reshard_after_forward": False})
    world(4)
    arguments = distributed.distributed_arguments(settings)
    assert arguments["fsdp"] is True
    # weights read once and sharded unless fsdp_config says otherwise; activation
    # checkpointing is FSDP's own under FSDP (train.gradient_checkpointing)
    assert arguments["fsdp_config"] == {
        "cpu_ram_efficient_loading": True,
        "activation_checkpointing": False,
        "reshard_after_forward": False,
    }
    settings = train_settings(
        fsdp=True, gradient_checkpointing=True, fsdp_config={"cpu_ram_efficient_loading": False}
    )
    assert distributed.distributed_arguments(settings)["fsdp_config"] == {
        "cpu_ram_efficient_loading": False,
        "activation_checkpointing": True,
    }
    assert "fsdp" not in distributed.distributed_arguments(train_settings(fsdp=False))
    world(1)  # the same config on one GPU or on CPU: no sharding
    assert distributed.distributed_arguments(settings) == {}


# --------------------------------------------------------------------------- 1 vs 2 processes

SETTINGS = {
    **train_settings(),
    "learning_rate": 5e-3,
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.1,
    "epochs": 2,
    "batch_size": 4,  # global batch: 2 per process x 2 processes, or 2 x 2 accumulation steps
    "micro_batch_size": 2,
    "max_length": 64,
    "seed": 0,
    "save_steps": 100,
    "logging_steps": 1,
    "mixing": "augment",  # the mixed set's examples in random batches
}


def mixed_records(num_task: int, num_samples: int) -> list[dict]:
    """Task examples and short context-free samples that end with EOS."""
    records = [
        {"kind": "task", "prompt": r["prompt"], "response": r["response"]}
        for r in render(arithmetic_problems(num_task, seed=3), TEMPLATE)
    ]
    return records + [
        {
            "kind": "context_free",
            "prompt_token_id": 1,
            "token_ids": [30 + i, 31 + i, 2],
            "finish_reason": "eos",
        }
        for i in range(num_samples)
    ]


def fine_tune(launcher, model_dir: Path, data: Path, root: Path, settings=None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_DIR), OMP_NUM_THREADS="1")
    command = launcher + [
        "-m",
        "cfs.train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--settings",
        json.dumps(settings or SETTINGS),
        "--threads",
        "1",
        "--checkpoints",
        str(root / "checkpoints"),
        "--out",
        str(root / "model"),
    ]
    result = subprocess.run(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:]
    log = json.loads((root / "model" / "train_log.json").read_text())
    return {"log": log, "output": result.stdout, "model": root / "model"}


@pytest.mark.slow
def test_two_gloo_processes_give_the_one_process_loss_curve(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", mixed_records(14, 2))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    one = fine_tune([sys.executable], tiny_model_dir, data, tmp_path / "one")
    two = fine_tune(torchrun + ["--nproc-per-node", "2"], tiny_model_dir, data, tmp_path / "two")

    assert two["output"].count("cfs.train: done") == 2, "both processes ran to the end"
    # 16 examples x 2 epochs / global batch 4 = 8 steps, whatever the number of processes
    steps = (one["log"]["summary"]["global_steps"], two["log"]["summary"]["global_steps"])
    assert steps == (8, 8), (
        f"global steps (1 process, 2 processes) = {steps}: train.batch_size must be the global "
        "batch (cfs.distributed.accumulation_steps)"
    )
    curves = [
        [(entry["step"], entry["loss"]) for entry in run["log"]["log_history"] if "loss" in entry]
        for run in (one, two)
    ]
    assert [step for step, _ in curves[0]] == [step for step, _ in curves[1]] == list(range(1, 9))
    for (step, expected), (_, actual) in zip(*curves, strict=True):
        assert actual == pytest.approx(expected, rel=LOSS_RTOL), (step, curves)
    assert curves[0][-1][1] < curves[0][0][1], "the loss goes down"
    weights_one, weights_two = model_weights(one["model"]), model_weights(two["model"])
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, atol=WEIGHT_ATOL, rtol=0)


# --------------------------------------------------------------------------- the rule


@pytest.mark.slow
def test_fine_tune_rule_starts_one_process_per_gpu(tmp_path):
    """A dry run with train_gpus 2 prints a torchrun launch; with no GPUs, plain python."""
    from test_pipeline import tiny_config

    repo = copy_repo(tmp_path / "repo")
    config = tiny_config(tmp_path / "no_model_needed", repo)
    config["study"].update(temperatures=[1.0], ratios=[0])
    config["models"]["tiny"]["resources"] = {"train_gpus": 2, "gpus": 1, "mem_mb": 16000}
    (repo / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = run_snakemake(repo, "-n", "-p", "results/tiny/ratio0/seed0/model", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    shell = result.stdout[result.stdout.index("rule fine_tune:") :]
    assert "if [ 2 -gt 1 ]" in shell and "torchrun --standalone --nproc-per-node 2" in shell
    resources = [line for line in result.stdout.splitlines() if "resources:" in line]
    assert any("gpu=2" in line and "mem_mb=16000" in line for line in resources), resources
    # CPU stages ask for no GPU whatever the model's GPUs
    assert any("gpu=0" in line for line in resources), resources
    shutil.rmtree(repo)


@pytest.mark.slow
def test_equal_step_mixing_over_two_processes_keeps_the_step_composition(tiny_model_dir, tmp_path):
    """Two processes share each optimizer step's block: together they train its 4 task
    examples and 2 samples, step after step, as one process does."""
    data = write_jsonl(tmp_path / "train.jsonl", mixed_records(8, 4))
    settings = {**SETTINGS, "mixing": "equal_steps"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    one = fine_tune([sys.executable], tiny_model_dir, data, tmp_path / "one", settings)
    two = fine_tune(
        torchrun + ["--nproc-per-node", "2"], tiny_model_dir, data, tmp_path / "two", settings
    )
    for run in (one, two):
        # 8 task examples x 2 epochs in steps of 4, each with its 2 samples
        assert run["log"]["summary"]["examples_per_step"] == [[4, 6]] * 4
