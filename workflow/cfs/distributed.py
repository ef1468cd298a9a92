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

from cfs.errors import SettingsError


def world_size() -> int:
    """Processes taking part in this run (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def process_rank() -> int:
    """This process's global rank (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def process_device() -> torch.device:
    """This process's device: its own GPU (cuda:LOCAL_RANK) when there are GPUs, else CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def join_process_group(device: torch.device):
    """accelerate's state of this process. Under torchrun it joins the process group (gloo
    on CPU, NCCL on GPUs) as the Trainer's arguments do later, so that the processes can
    share work before those exist; the arguments then reuse the group."""
    from datetime import timedelta

    from accelerate import PartialState

    # the Trainer's own default (TrainingArguments.ddp_timeout)
    return PartialState(cpu=device.type == "cpu", timeout=timedelta(seconds=1800))


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


def leave_process_group() -> None:
    """Every process waits for the others, then the process group is destroyed: a process
    that exits with it alive can be aborted by gloo's threads ("terminate called without an
    active exception") while another still writes its part of the model."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def fsdp_on_cpu() -> None:
    """Let accelerate run FSDP2 on CPU processes. torch's `fully_shard` runs there with
    gloo, but accelerate routes several CPU processes to DDP even when the Trainer hands
    it an FSDP plugin (its FSDP branch covers GPU-like devices only): switch its state to
    FSDP before the Trainer builds its Accelerator, so that everything after is the GPU
    run's code path (sharded DTensors, cpu_ram_efficient_loading's broadcast, sharded
    checkpoints)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "fsdp_on_cpu", False):
        return

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        fresh = not AcceleratorState._shared_state
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fresh and fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    __init__.fsdp_on_cpu = True
    AcceleratorState.__init__ = __init__


def distributed_arguments(settings: dict) -> dict:
    """Extra TrainingArguments for a multi-process run; nothing extra for one process.

    `train.fsdp: true` shards parameters, gradients and optimizer state over the processes
    (FSDP2, for models that do not fit one GPU), with `train.fsdp_config` passed through to
    the Trainer. Under FSDP:
    - the weights are read once and sharded: `cpu_ram_efficient_loading` is on unless
      `train.fsdp_config` turns it off (rank 0 reads the weights, the other processes build
      the model on the meta device, `reads_weights`, and accelerate broadcasts rank 0's
      weights into every process's shards; the model stays on the CPU until then,
      `fsdp_load_device`);
    - `train.gradient_checkpointing` is FSDP's own activation checkpointing (the Trainer's
      would add an all-gather per layer in the backward pass);
    - checkpoints are sharded (`sharded_checkpoints`);
    - with `train.fsdp_reduce_each_micro_batch` (the default), every micro-batch's
      gradient is reduce-scattered at once and accumulated in the float32 shards
      (accelerate's `sync_each_batch`): with FSDP2's `no_sync` instead, each process keeps
      the whole unsharded gradient across the accumulation steps (8B: 16 GB, accumulated in
      bf16, the reduce dtype of bf16 mixed precision). The cost is one reduce-scatter per
      micro-batch instead of per optimizer step (a third more collective traffic per
      micro-batch than the two all-gathers alone), overlapped with the backward pass.
    In one process `fsdp` is ignored, so the same config also runs on one GPU or on CPU;
    several CPU processes run FSDP2 over gloo (fsdp_on_cpu)."""
    arguments: dict = {}
    if world_size() > 1:
        if settings["fsdp"] and not torch.cuda.is_available():
            fsdp_on_cpu()
        arguments["ddp_backend"] = "nccl" if torch.cuda.is_available() else "gloo"
        # every parameter gets a gradient in a causal LM: skip DDP's unused-parameter search
        arguments["ddp_find_unused_parameters"] = False
        if settings["fsdp"]:
            fsdp_config = {
                "cpu_ram_efficient_loading": True,
                "activation_checkpointing": settings["gradient_checkpointing"],
                **settings["fsdp_config"],
            }
            arguments["fsdp"] = True
            arguments["fsdp_config"] = fsdp_config
            if settings["fsdp_reduce_each_micro_batch"]:
                arguments["accelerator_config"] = {
                    "gradient_accumulation_kwargs": {"sync_each_batch": True}
                }
    return arguments


def sharded_checkpoints(arguments: dict) -> dict:
    """`arguments` (distributed_arguments') with sharded checkpoints under FSDP, unless
    `train.fsdp_config` names a `state_dict_type`: each process writes its own shard of the
    weights and of the optimizer state (torch.distributed.checkpoint, through accelerate's
    save_fsdp_model / save_fsdp_optimizer) and reads it back on resume. accelerate's
    default, FULL_STATE_DICT, gathers everything on rank 0, which writes the float32 weights
    twice (model.safetensors and pytorch_model_fsdp.bin) and the whole optimizer state: at
    8B about 128 GB per checkpoint through one process while the others wait. The final
    model is still saved whole (cfs.saving)."""
    if not arguments.get("fsdp"):
        return arguments
    fsdp_config = {"state_dict_type": "SHARDED_STATE_DICT", **arguments["fsdp_config"]}
    return {**arguments, "fsdp_config": fsdp_config}


def training_record(trainer) -> dict:
    """How the run synchronised gradients and wrote checkpoints, from the accelerator
    itself: `gradient_sync` each micro-batch (reduce-scatter at once) or per optimizer step,
    and the checkpoint format (full or sharded) under FSDP."""
    sync_each_batch = trainer.accelerator.gradient_state.plugin_kwargs.get("sync_each_batch")
    record = {"gradient_sync": "each_micro_batch" if sync_each_batch else "each_step"}
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if trainer.is_fsdp_enabled and plugin is not None:
        record["checkpoint_format"] = str(plugin.state_dict_type).rpartition(".")[2]
    return record


def fsdp_load_device(args, device: torch.device) -> torch.device:
    """Where the model to train is loaded: on the CPU under FSDP (accelerate moves each
    shard to its GPU; loading onto the GPU first would put the whole model on every GPU),
    on the process's device otherwise."""
    return torch.device("cpu") if args.fsdp else device


def reads_weights(args) -> bool:
    """Whether this process reads the model's weights from disk: under FSDP with
    cpu_ram_efficient_loading only rank 0 does (accelerate broadcasts them into every
    process's shards); otherwise every process."""
    if args.fsdp and str(args.fsdp_config.get("cpu_ram_efficient_loading")).lower() == "true":
        return process_rank() == 0
    return True


def gather(value) -> list:
    """`value` of every process, in rank order (a collective: every process calls it); a
    list of one outside a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def weights_dtype(objective, args, device: torch.device) -> str:
    """The dtype the model to train is loaded in (`objective`: its cfs.objectives class):
    float32 master weights, except for an objective whose base weights stay frozen (LoRA)
    in bf16 on a GPU without FSDP: its frozen base stays in bfloat16 (8B: 16 GB instead of
    32; nothing of it trains) while peft keeps the adapters in float32."""
    frozen = not objective.trains_base_weights
    if frozen and device.type == "cuda" and args.bf16 and not args.fsdp:
        return "bfloat16"
    return "float32"
