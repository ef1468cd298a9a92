"""Fine-tuning in several processes for real (cfs.distributed, cfs.train): the same code in
one process and in two gloo processes on CPU (`torchrun --standalone --nproc-per-node 2`,
as the fine_tune rule starts it for a job with 2 GPUs, on a free port of its own) gives the
same loss curve at the same global batch, and the same task examples and samples at each
step under equal-step mixing.

Tolerance: every logged loss within 1e-5 relative, and every final weight within 1e-5;
on this machine the two runs agree exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PACKAGE_DIR, model_weights, task_records, train_settings, write_jsonl

pytestmark = pytest.mark.slow

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

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
    return task_records(num_task, seed=3) + [
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


def test_two_gloo_processes_give_the_one_process_loss_curve(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", mixed_records(14, 2))
    one = fine_tune([sys.executable], tiny_model_dir, data, tmp_path / "one")
    two = fine_tune(TORCHRUN, tiny_model_dir, data, tmp_path / "two")

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
    assert sorted(weights_two) == sorted(weights_one), "the two runs saved other tensors"
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, atol=WEIGHT_ATOL, rtol=0)


def test_equal_step_mixing_over_two_processes_keeps_the_step_composition(tiny_model_dir, tmp_path):
    """Two processes share each optimizer step's block: together they train its 4 task
    examples and 2 samples, step after step, as one process does."""
    data = write_jsonl(tmp_path / "train.jsonl", mixed_records(8, 4))
    settings = {**SETTINGS, "mixing": "equal_steps"}
    one = fine_tune([sys.executable], tiny_model_dir, data, tmp_path / "one", settings)
    two = fine_tune(TORCHRUN, tiny_model_dir, data, tmp_path / "two", settings)
    # 8 task examples x 2 epochs in steps of 4, each with its 2 samples
    assert one["log"]["summary"]["examples_per_step"] == [[4, 6]] * 4
    assert two["log"]["summary"]["examples_per_step"] == [[4, 6]] * 4
