"""Fine-tuning in several processes: one per GPU (DDP; FSDP for models that do not fit one
GPU), or gloo processes on CPU. The same code runs in one process, on one GPU or on CPU.

The fine_tune rule starts `torchrun --standalone --nproc-per-node N -m cfs.train ...` when
its job has N > 1 GPUs and plain `python -m cfs.train ...` otherwise. torchrun sets
WORLD_SIZE, RANK and LOCAL_RANK; the Trainer (through accelerate) joins the process group
from them. `train.batch_size` stays the global batch: examples per optimizer step summed
over all processes, so a run on 2 GPUs takes the same steps as a run on one.
"""

from __future__ import annotations

import os

import torch

from cfs.cli import SettingsError


def world_size() -> int:
    """Processes taking part in this run (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def process_device() -> torch.device:
    """This process's device: its own GPU (cuda:LOCAL_RANK) when there are GPUs, else CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def accumulation_steps(batch_size: int, micro_batch: int) -> int:
    """Gradient-accumulation steps that make `batch_size` the global batch:
    batch_size = micro_batch x processes x accumulation steps."""
    per_pass = micro_batch * world_size()
    if batch_size % per_pass:
        raise SettingsError(
            f"train.batch_size ({batch_size}) must be a multiple of train.micro_batch_size "
            f"({micro_batch}) x processes ({world_size()})"
        )
    return batch_size // per_pass


def distributed_arguments(settings: dict) -> dict:
    """Extra TrainingArguments for a multi-process run; nothing extra for one process.

    `train.fsdp: true` shards parameters, gradients and optimizer state over the processes
    (FSDP, for models that do not fit one GPU), with `train.fsdp_config` passed through to
    the Trainer (e.g. {"cpu_ram_efficient_loading": true}). In one process it is ignored, so
    the same config also runs on one GPU or on CPU; on CPU, accelerate runs DDP instead."""
    arguments: dict = {}
    if world_size() > 1:
        arguments["ddp_backend"] = "nccl" if torch.cuda.is_available() else "gloo"
        # every parameter gets a gradient in a causal LM: skip DDP's unused-parameter search
        arguments["ddp_find_unused_parameters"] = False
        if settings.get("fsdp"):
            arguments["fsdp"] = True
            arguments["fsdp_config"] = settings.get("fsdp_config") or {}
    return arguments
