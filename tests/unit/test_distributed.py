"""cfs.distributed: the Trainer's arguments for one process or several (gloo on CPU, FSDP
only where there are several processes; under FSDP sharded checkpoints unless the config
names another state-dict type, and each micro-batch's gradient reduced at once unless
train.fsdp_reduce_each_micro_batch is false), and the global batch shared by the processes.
Training in several processes is run for real in tests/end_to_end/test_ddp.py and
test_fsdp.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from cfs import distributed
from cfs.errors import SettingsError
from cfs.objectives import OBJECTIVES
from conftest import train_settings


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
    assert distributed.is_main_process() is True
    assert distributed.process_device() == torch.device("cpu")


def test_global_batch_is_shared_by_the_processes(world):
    world(2, rank=1)
    assert distributed.accumulation_steps(8, 2) == 2  # 2 per pass x 2 processes x 2 steps
    assert distributed.accumulation_steps(4, 2) == 1
    assert distributed.is_main_process() is False
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
    unsharded = distributed.distributed_arguments(train_settings(fsdp=False))
    assert "fsdp" not in unsharded, f"FSDP arguments with train.fsdp false: {unsharded}"
    world(1)  # the same config on one GPU or on CPU: no sharding
    assert distributed.distributed_arguments(settings) == {}


def test_fsdp_arguments_ask_for_sharded_checkpoints_and_reduction_each_micro_batch(
    monkeypatch,
):
    monkeypatch.setenv("WORLD_SIZE", "8")
    arguments = distributed.sharded_checkpoints(
        distributed.distributed_arguments(train_settings(fsdp=True, batch_size=128))
    )
    assert arguments["fsdp_config"]["state_dict_type"] == "SHARDED_STATE_DICT"
    kwargs = arguments["accelerator_config"]["gradient_accumulation_kwargs"]
    assert kwargs == {"sync_each_batch": True}
    own = train_settings(fsdp=True, fsdp_config={"state_dict_type": "FULL_STATE_DICT"})
    arguments = distributed.sharded_checkpoints(distributed.distributed_arguments(own))
    assert arguments["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"
    deferred = train_settings(fsdp=True, fsdp_reduce_each_micro_batch=False)
    assert "accelerator_config" not in distributed.distributed_arguments(deferred)


def test_weights_dtype_is_bf16_only_for_lora_on_a_gpu_without_fsdp():
    def args(bf16=True, fsdp=False):
        return SimpleNamespace(bf16=bf16, fsdp=fsdp)

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    lora, full = OBJECTIVES["lora"], OBJECTIVES["full"]
    assert distributed.weights_dtype(lora, args(), cuda) == "bfloat16"
    assert distributed.weights_dtype(lora, args(), cpu) == "float32"
    assert distributed.weights_dtype(lora, args(bf16=False), cuda) == "float32"
    assert distributed.weights_dtype(lora, args(fsdp=True), cuda) == "float32"
    assert distributed.weights_dtype(full, args(), cuda) == "float32"


def test_a_fine_tune_leaves_its_process_group_before_it_exits(tmp_path):
    """cfs.train ends by destroying the process group (after a barrier): one left alive at
    exit can abort a gloo process while another still writes the model."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    distributed.leave_process_group()
    assert not dist.is_initialized()
    distributed.leave_process_group()  # and nothing to leave outside torchrun
