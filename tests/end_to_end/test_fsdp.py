"""Every fine-tuning method under FSDP2 in two gloo processes on CPU against one process
(cfs.train, cfs.distributed, cfs.saving), and FSDP2's checkpoints and gradient reduction:
sharded checkpoints written by every process, a run killed right after one of them that
resumes to the weights of an uninterrupted run, and each micro-batch's gradient
reduce-scattered at once (no `no_sync` micro-steps), with the two-process run still
matching one process. The parts that need no second process: the unit tests of
cfs.objectives, cfs.saving, cfs.train, cfs.distributed and cfs.checkpoints.

torch runs FSDP2 (`fully_shard`) on CPU with gloo, and cfs.train switches accelerate to it
there (cfs.distributed.fsdp_on_cpu); the runs go through fsdp_on_cpu.py (beside this
file), which runs several of them in one pair of processes. Each run checks
`summary.fsdp` to prove that the model was sharded.

Tolerance: every logged loss within 1e-4 relative of the one-process run (each
regulariser's value within 1e-3: KL to base, ~6e-4 here, is a small difference of
log-probabilities and agrees to ~1e-4 relative), every saved weight within 1e-4
(float32) or 1e-2 (bfloat16, whose resolution at these magnitudes is ~4e-3); on this
machine the float32 runs agree to 4e-6.

What stays unproven without a GPU: NCCL collectives, bf16 mixed precision under FSDP,
memory per GPU at 8B/8k (and the memory an unsharded gradient would have taken), speed,
and the time a sharded checkpoint takes at 8B."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cfs.study import METHODS, trainers
from conftest import (
    PACKAGE_DIR,
    assert_same_weights,
    model_weights,
    task_records,
    train_settings,
    write_jsonl,
)

pytestmark = pytest.mark.slow

LAUNCHER = Path(__file__).resolve().parent / "fsdp_on_cpu.py"
LOSS_RTOL = 1e-4
TERM_RTOL = 1e-3  # KL to base is a small difference of log-probabilities (~6e-4)
WEIGHT_ATOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
LORA = {"rank": 4, "alpha": None, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
# (label, method, settings overrides): every trained method; activation checkpointing
# on where a second forward runs (and for LoRA, whose frozen inputs it trips on); one
# run saves in bfloat16.
RUNS = [
    ("full", {"name": "plain", "ratio": 0.0}, {}),
    ("lora", {"name": "lora", **LORA}, {"gradient_checkpointing": True}),
    ("l2", {"name": "l2", "lambda": 1000.0, "reduction": "mean"}, {"save_precision": "bfloat16"}),
    (
        "weighted_synthetic",
        {"name": "weighted_synthetic", "ratio": 0.5, "lambda": 1.0},
        {"gradient_checkpointing": True},
    ),
    (
        "kl_to_base",
        {"name": "kl_to_base", "ratio": 0.5, "lambda": 1.0},
        {"gradient_checkpointing": True},
    ),
    # the synthetic term's second forward and backward under DDP (train.fsdp false)
    (
        "weighted_synthetic_ddp",
        {"name": "weighted_synthetic", "ratio": 0.5, "lambda": 1.0},
        {"gradient_checkpointing": True, "fsdp": False},
    ),
]
# global batch 4 = micro-batch 1 x 2 processes x 2 accumulation steps (x 4 in one process)
BASE = {
    "learning_rate": 5e-3,
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.0,
    "epochs": 1,
    "batch_size": 4,
    "micro_batch_size": 1,
    "max_length": 64,
    "save_steps": 100,
    "logging_steps": 1,
    "fsdp": True,
    # float32, so that 2 processes match 1 to float32's tolerance whatever the CPU
    "precision": "float32",
}


def run_all(processes: int, model_dir: Path, data: Path, synthetic: Path, root: Path) -> dict:
    runs = []
    for label, method, overrides in RUNS:
        settings = train_settings(**{**BASE, **overrides}, method=method)
        runs.append(
            [
                *("--model", str(model_dir), "--data", str(data)),
                *("--synthetic", str(synthetic), "--settings", json.dumps(settings)),
                *("--threads", "1", "--checkpoints", str(root / label / "checkpoints")),
                *("--out", str(root / label / "model")),
            ]
        )
    runs_file = root / "runs.json"
    root.mkdir(parents=True, exist_ok=True)
    runs_file.write_text(json.dumps(runs))
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone"]
        launcher += ["--nproc-per-node", str(processes)]
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_DIR), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [*launcher, str(LAUNCHER), "--runs", str(runs_file)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:]
    logs = {
        label: json.loads((root / label / "model" / "train_log.json").read_text())
        for label, _, _ in RUNS
    }
    return {**logs, "output": result.stdout}


def curve(log: dict) -> list[dict]:
    keys = ("step", "loss", "l2", "synthetic_nll", "kl_to_base")
    return [
        {key: entry[key] for key in keys if key in entry}
        for entry in log["log_history"]
        if "loss" in entry
    ]


@pytest.fixture(scope="module")
def fsdp_runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    data = write_jsonl(root / "train.jsonl", task_records(16, seed=3))
    synthetic = write_jsonl(
        root / "synthetic.jsonl",
        [
            {
                "index": i,
                "prompt_token_id": 1,
                "token_ids": [30 + i, 31 + i, 40 + i, 2],
                "finish_reason": "eos",
            }
            for i in range(16)
        ],
    )
    one = run_all(1, tiny_model_dir, data, synthetic, root / "one")
    two = run_all(2, tiny_model_dir, data, synthetic, root / "two")
    return {"one": one, "two": two, "root": root, "base": tiny_model_dir}


def test_every_way_of_training_is_run():
    """The runs cover each of cfs.train's objectives that a method of cfs.study trains with."""
    run = {METHODS[method["name"]].trains for _, method, _ in RUNS}
    assert sorted(run) == trainers()


@pytest.mark.parametrize("label", [label for label, _, _ in RUNS])
def test_fsdp_two_processes_match_one(fsdp_runs, label):
    one, two = fsdp_runs["one"][label], fsdp_runs["two"][label]
    sharded = dict((name, overrides) for name, _, overrides in RUNS)[label].get("fsdp", True)
    assert two["summary"]["fsdp"] is sharded, "the two-process run was not sharded (FSDP)"
    assert one["summary"]["fsdp"] is False
    assert one["summary"]["global_steps"] == two["summary"]["global_steps"] == 4
    curves = curve(one), curve(two)
    assert [e["step"] for e in curves[0]] == [e["step"] for e in curves[1]] == [1, 2, 3, 4]
    for expected, actual in zip(*curves, strict=True):
        assert actual.keys() == expected.keys(), curves
        for key in expected:
            rel = LOSS_RTOL if key == "loss" else TERM_RTOL
            assert actual[key] == pytest.approx(expected[key], rel=rel, abs=1e-9), (
                label,
                key,
                curves,
            )
    # the saved folder is a plain model (no peft keys), equal to the one-process one
    from transformers import AutoModelForCausalLM

    folders = [fsdp_runs["root"] / run / label / "model" for run in ("one", "two")]
    AutoModelForCausalLM.from_pretrained(folders[1])  # loads as a plain model
    weights = [model_weights(folder) for folder in folders]
    base = model_weights(fsdp_runs["base"])
    assert sorted(weights[1]) == sorted(weights[0]) == sorted(base)
    dtype = torch.bfloat16 if label == "l2" else torch.float32
    config = json.loads((folders[1] / "config.json").read_text())
    assert config["dtype"] == str(dtype).removeprefix("torch.")
    for name, tensor in weights[0].items():
        assert weights[1][name].dtype == dtype, name
        torch.testing.assert_close(
            weights[1][name].float(), tensor.float(), atol=WEIGHT_ATOL[dtype], rtol=0
        )
    moved = max((weights[1][n].float() - base[n].float()).abs().max().item() for n in base)
    assert moved > 1e-4, "training changed the saved weights"


def test_fsdp_weights_are_read_once(fsdp_runs):
    """Rank 1 builds the model (and KL's base model) without reading the weights: rank 0
    reads them and accelerate broadcasts them into the shards."""
    output = fsdp_runs["two"]["output"]
    sharded_runs = sum(overrides.get("fsdp", True) for _, _, overrides in RUNS)
    assert output.count("process 1: the model without its weights") == sharded_runs + 1
    assert "process 0: the model without its weights" not in output, "rank 0 read no weights"


def test_the_training_set_is_tokenized_once_and_shared(fsdp_runs):
    """Rank 0 tokenizes the training set into Arrow files; rank 1 memory-maps them instead
    of reading, tokenizing and holding a copy of its own."""
    output = fsdp_runs["two"]["output"]
    assert output.count("tokenized the training set:") == len(RUNS)
    assert output.count("process 1: memory-mapping the tokenized training set") == len(RUNS)
    leftovers = list(fsdp_runs["root"].glob("two/*/checkpoints.tokenized"))
    assert leftovers == [], "the tokenized set is removed with the run's other scratch"


def test_fsdp_l2_term_is_above_zero_after_a_step(fsdp_runs):
    values = [entry["l2"] for entry in curve(fsdp_runs["two"]["l2"])]
    assert values[0] == 0.0, "the reference is the base model"
    assert len(values) == 4 and min(values[1:]) > 0, f"L2 terms {values}, expected positive"


@pytest.mark.parametrize("label", ["weighted_synthetic", "kl_to_base", "weighted_synthetic_ddp"])
def test_fsdp_synthetic_term_sees_the_configured_samples_per_step(fsdp_runs, label):
    # ratio 0.5 x global batch 4 = 2 distinct samples per optimizer step, in one process
    # (4 micro-steps) and in two (each process 1 sample over its 2 micro-steps)
    for run in ("one", "two"):
        drawn = fsdp_runs[run][label]["summary"]["synthetic_term"]
        assert drawn == {
            "samples_per_step": 2,
            "steps": 4,
            "drawn_per_step": [2],
            "distinct_per_step": [2],
        }, (run, drawn)


# --------------------------------------------------------------------------- sharded checkpoints

# 16 examples, global batch 4 = micro-batch 1 x 2 processes x 2 accumulation steps: 4
# steps an epoch, 8 in all; a checkpoint at steps 3 and 6 (none at the last step)
CHECKPOINT_SETTINGS = {
    "learning_rate": 5e-3,
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.0,
    "weight_decay": 0.01,
    "epochs": 2,
    "batch_size": 4,
    "micro_batch_size": 1,
    "max_length": 64,
    "save_steps": 3,
    "logging_steps": 1,
    "fsdp": True,
    "mixing": "augment",  # random batches: the resumed run must restore the sampler too
    "precision": "float32",  # 2 processes against 1 to float32's tolerance
}
KILL_AT = 3
RUNNER = """
import os, signal, sys
sys.path.insert(0, {launcher_dir!r})
import fsdp_on_cpu
import accelerate
import torch.distributed as dist
from transformers import Trainer

no_sync_calls = []
original_no_sync = accelerate.Accelerator.no_sync

def no_sync(self, model=None):
    no_sync_calls.append(1)
    return original_no_sync(self, model)

accelerate.Accelerator.no_sync = no_sync
kill_at = int(os.environ.get("CFS_TEST_KILL_AT", "0"))
original_save = Trainer._save_checkpoint

def _save_checkpoint(self, model, trial):
    original_save(self, model, trial)
    if self.state.global_step == kill_at:
        dist.barrier()  # every process has written its part: a kill, as Slurm's
        os.kill(os.getpid(), signal.SIGKILL)

Trainer._save_checkpoint = _save_checkpoint
try:
    fsdp_on_cpu.main(sys.argv[1:])
finally:
    print(f"NO_SYNC_CALLS rank {{os.environ.get('RANK', '0')}}: {{len(no_sync_calls)}}", flush=True)
"""


def train_command(runner: Path, processes: int, model_dir, data, root: Path, **overrides):
    settings = train_settings(**{**CHECKPOINT_SETTINGS, **overrides})
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone"]
        launcher += ["--nproc-per-node", str(processes)]
    return [
        *launcher,
        str(runner),
        *("--model", str(model_dir), "--data", str(data)),
        *("--settings", json.dumps(settings), "--threads", "1"),
        *("--checkpoints", str(root / "checkpoints"), "--out", str(root / "model")),
    ]


def run(command, kill_at: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_DIR), OMP_NUM_THREADS="1")
    env["CFS_TEST_KILL_AT"] = str(kill_at)
    return subprocess.run(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
    )


def summary(root: Path) -> dict:
    return json.loads((root / "model" / "train_log.json").read_text())["summary"]


def no_sync_calls(output: str) -> list[int]:
    return [int(count) for count in re.findall(r"NO_SYNC_CALLS rank \d+: (\d+)", output)]


@pytest.fixture(scope="module")
def checkpoint_runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_checkpoints")
    runner = root / "runner.py"
    runner.write_text(RUNNER.format(launcher_dir=str(LAUNCHER.parent)))
    data = write_jsonl(root / "train.jsonl", task_records(16, seed=3))

    def command(name, processes=2, **overrides):
        return train_command(runner, processes, tiny_model_dir, data, root / name, **overrides)

    outputs = {"reference": run(command("reference"))}
    outputs["killed"] = run(command("resumed"), kill_at=KILL_AT)
    checkpoints = sorted((root / "resumed" / "checkpoints").glob("checkpoint-*"))
    listing = {path.name: sorted(p.name for p in path.iterdir()) for path in checkpoints}
    outputs["resumed"] = run(command("resumed"))
    outputs["one"] = run(command("one", processes=1))
    outputs["no_sync"] = run(command("no_sync", fsdp_reduce_each_micro_batch=False))
    return {"root": root, "outputs": outputs, "listing": listing, "base": tiny_model_dir}


def test_checkpoint_runs_ran(checkpoint_runs):
    for name, result in checkpoint_runs["outputs"].items():
        if name == "killed":
            assert result.returncode != 0, "the run was not killed after its checkpoint"
            continue
        assert result.returncode == 0, (name, result.stdout[-6000:])


def test_a_checkpoint_is_sharded_not_gathered(checkpoint_runs):
    """Each process wrote its shard of the weights and of the optimizer state
    (torch.distributed.checkpoint folders); no full copy on rank 0 (pytorch_model_fsdp.bin,
    model.safetensors, optimizer.bin)."""
    listing = checkpoint_runs["listing"]
    assert list(listing) == [f"checkpoint-{KILL_AT}"], listing
    files = listing[f"checkpoint-{KILL_AT}"]
    assert {"pytorch_model_fsdp_0", "optimizer_0", "trainer_state.json"} <= set(files), files
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(files), files
    for whole in ("pytorch_model_fsdp.bin", "model.safetensors", "optimizer.bin"):
        assert whole not in files, files
    shards = checkpoint_runs["root"] / "resumed" / "checkpoints"  # removed once the model was saved
    assert not shards.exists()
    assert (
        summary(checkpoint_runs["root"] / "reference")["checkpoint_format"] == "SHARDED_STATE_DICT"
    )


def test_killed_run_resumes_from_the_sharded_checkpoint_to_the_same_weights(checkpoint_runs):
    resumed = summary(checkpoint_runs["root"] / "resumed")
    assert resumed["resumed_from"] and resumed["resumed_from"].endswith(f"checkpoint-{KILL_AT}")
    assert (
        resumed["global_steps"]
        == summary(checkpoint_runs["root"] / "reference")["global_steps"]
        == 8
    )
    root = checkpoint_runs["root"]
    assert_same_weights(root / "reference" / "model", root / "resumed" / "model")


def test_each_micro_batch_is_reduced_at_once(checkpoint_runs):
    """accelerate's sync_each_batch reached the Trainer's loop: no micro-step ran under
    no_sync (FSDP2's set_requires_gradient_sync(False), which keeps a whole unsharded
    gradient), while with train.fsdp_reduce_each_micro_batch false every other one did."""
    reference = checkpoint_runs["outputs"]["reference"].stdout
    assert no_sync_calls(reference) == [0, 0], reference[-3000:]
    assert summary(checkpoint_runs["root"] / "reference")["gradient_sync"] == "each_micro_batch"
    deferred = checkpoint_runs["outputs"]["no_sync"].stdout
    # 8 steps x 2 micro-steps, the first of each under no_sync, in each process
    assert no_sync_calls(deferred) == [8, 8], deferred[-3000:]
    assert summary(checkpoint_runs["root"] / "no_sync")["gradient_sync"] == "each_step"


def test_two_processes_still_match_one(checkpoint_runs):
    """Reduce-scattering each micro-batch and summing the shards gives the one-process
    gradient up to float32 rounding (WEIGHT_ATOL's float32 tolerance)."""
    assert summary(checkpoint_runs["root"] / "one")["fsdp"] is False
    one = model_weights(checkpoint_runs["root"] / "one" / "model")
    two = model_weights(checkpoint_runs["root"] / "reference" / "model")
    deferred = model_weights(checkpoint_runs["root"] / "no_sync" / "model")
    base = model_weights(checkpoint_runs["base"])
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, atol=1e-4, rtol=0)
        torch.testing.assert_close(deferred[name], tensor, atol=1e-4, rtol=0)
    moved = max((two[n] - base[n]).abs().max().item() for n in base)
    assert moved > 1e-4, "training changed the weights"
