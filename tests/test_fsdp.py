"""Every fine-tuning method under FSDP2 in two gloo processes on CPU against one process,
plus the parts that do not need several processes.

torch runs FSDP2 (`fully_shard`) on CPU with gloo; accelerate 1.15 does not route CPU
processes to it, so the runs go through tests/fsdp_on_cpu.py, which switches accelerate's
state to FSDP and then runs the real cfs.train (accelerate's sharding, with
cpu_ram_efficient_loading, the Trainer's FSDP checkpoint and state-dict gathering). Each
run checks `summary.fsdp` to prove that the model was sharded.

Tolerance: every logged loss within 1e-4 relative of the one-process run (each
regulariser's value within 1e-3: KL to base, ~6e-4 here, is a small difference of
log-probabilities and agrees to ~1e-4 relative), every saved weight within 1e-4
(float32) or 1e-2 (bfloat16, whose resolution at these magnitudes is ~4e-3); on this
machine the float32 runs agree to 4e-6.

What stays unproven without a GPU: NCCL collectives, bf16 mixed precision under FSDP,
memory per GPU at 8B/8k, speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cfs.data import arithmetic_problems, render
from cfs.objectives import SyntheticBatches
from cfs.saving import lora_layers, merge_lora
from conftest import PACKAGE_DIR, TEMPLATE, model_weights, train_settings, write_jsonl

REPO = Path(__file__).resolve().parents[1]
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
    ("l2", {"name": "l2", "lambda": 1000.0}, {"save_precision": "bfloat16"}),
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
        [*launcher, str(REPO / "tests" / "fsdp_on_cpu.py"), "--runs", str(runs_file)],
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
    records = [
        {"kind": "task", "prompt": r["prompt"], "response": r["response"]}
        for r in render(arithmetic_problems(16, seed=3), TEMPLATE)
    ]
    data = write_jsonl(root / "train.jsonl", records)
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_fsdp_weights_are_read_once(fsdp_runs):
    """Rank 1 builds the model (and KL's base model) without reading the weights: rank 0
    reads them and accelerate broadcasts them into the shards."""
    output = fsdp_runs["two"]["output"]
    sharded_runs = sum(overrides.get("fsdp", True) for _, _, overrides in RUNS)
    assert output.count("process 1: the model without its weights") == sharded_runs + 1
    assert "process 0: the model without its weights" not in output


@pytest.mark.slow
def test_fsdp_l2_term_is_above_zero_after_a_step(fsdp_runs):
    values = [entry["l2"] for entry in curve(fsdp_runs["two"]["l2"])]
    assert values[0] == 0.0, "the reference is the base model"
    assert all(value > 0 for value in values[1:]), values


@pytest.mark.slow
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


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    "per_step, world, accumulation", [(2, 2, 2), (64, 8, 16), (6, 3, 4), (4, 1, 8), (8, 2, 1)]
)
def test_synthetic_batches_split_the_global_batch_disjointly(per_step, world, accumulation):
    pool = [{"id": i} for i in range(1000)]
    for step in range(3):
        drawn_by_rank = []
        for rank in range(world):
            batches = SyntheticBatches(pool, per_step, accumulation, 0, list, rank, world)
            indices = [i for m in range(accumulation) for i in batches.indices(step, m)]
            assert sum(batches.share(step, m) for m in range(accumulation)) == pytest.approx(1)
            drawn_by_rank.append(indices)
        everything = [i for indices in drawn_by_rank for i in indices]
        assert len(everything) == per_step, "the ratio holds for the global batch"
        assert len(set(everything)) == per_step, "processes draw disjoint samples"
        # every process has samples in the same micro-steps (no lone forward under FSDP)
        for m in range(accumulation):
            counts = {
                len(
                    SyntheticBatches(pool, per_step, accumulation, 0, list, r, world).indices(
                        step, m
                    )
                )
                for r in range(world)
            }
            assert len(counts) == 1


def test_synthetic_ratio_below_one_sample_per_micro_batch():
    """Ratio 0.5 with micro-batch 1 (the reasoning config): 64 samples per step of 128,
    not one per micro-batch (128)."""
    batches = SyntheticBatches([{"id": i} for i in range(500)], 64, 16, 0, list, 0, 8)
    per_process = [len(batches.indices(0, m)) for m in range(16)]
    assert sum(per_process) == 8 and set(per_process) == {0, 1}


def test_synthetic_batches_refuse_an_uneven_split():
    with pytest.raises(ValueError, match="evenly over 3 processes"):
        SyntheticBatches([{"id": 0}], 4, 1, 0, list, 0, 3)


def test_lora_merge_on_the_state_dict_equals_peft_merge(tiny_model_dir):
    """merge_lora (used on the gathered full weights) gives exactly peft's
    merge_and_unload, keys of the plain model included."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    )
    torch.manual_seed(1)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters something to merge
            torch.nn.init.normal_(parameter, std=0.1)
    state_dict = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    merged = merge_lora(state_dict, lora_layers(peft_model))
    expected = peft_model.merge_and_unload().state_dict()
    assert sorted(merged) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=0)


def test_no_device_sync_per_micro_step_for_the_term_log(tiny_model_dir, tmp_path, monkeypatch):
    """The regulariser's value is logged from an on-device running sum; no
    `.item()` (a device sync) inside compute_loss or training_step."""
    import inspect

    from cfs import train

    records = [
        {"kind": "task", "prompt": r["prompt"], "response": r["response"]}
        for r in render(arithmetic_problems(8, seed=3), TEMPLATE)
    ]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    real_item = torch.Tensor.item
    synced_in = []

    def item(self):
        caller = inspect.stack()[1]
        if caller.filename.endswith("train.py") and caller.function in (
            "compute_loss",
            "training_step",
        ):
            synced_in.append(caller.function)
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    settings = train_settings(
        **{**BASE, "fsdp": False, "logging_steps": 2, "micro_batch_size": 2},
        method={"name": "l2", "lambda": 1.0},
    )
    train.fine_tune(tiny_model_dir, data, settings, tmp_path / "c", tmp_path / "m")
    assert synced_in == []
    log = json.loads((tmp_path / "m" / "train_log.json").read_text())["log_history"]
    assert [entry["step"] for entry in log if "l2" in entry] == [2]


def test_saving_in_bf16_keeps_tied_weights_tied():
    from cfs.saving import cast_floating, save_dtype

    embedding = torch.randn(5, 3)
    state = {"embed.weight": embedding, "lm_head.weight": embedding, "step": torch.tensor(3)}
    cast = cast_floating(state, save_dtype("auto", trained_in_bf16=True))
    assert cast["embed.weight"].dtype == torch.bfloat16
    assert cast["embed.weight"] is cast["lm_head.weight"], "save_pretrained drops the tie"
    assert cast["step"].dtype == torch.int64
    assert save_dtype("auto", trained_in_bf16=False) == torch.float32
    assert save_dtype("bfloat16", trained_in_bf16=False) == torch.bfloat16
