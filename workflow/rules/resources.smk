# Cluster resources of each stage, sized per model from config (models.<name>.resources).
# A model stage (prepare, merge, generate, train, evaluate) reads `<method>.<key>` (a
# fine-tune: e.g. lora.gpus), then `<stage>.<key>`, then `<key>` of models.<name>.resources,
# then `resources.model_stages.<key>` (CPUs: the job's threads, `threads` where the model
# sets no cpus_per_task; a generate, train or evaluate job's threads are its CPUs); GPUs go
# to the GPU stages only. The other stages (data, mix, report) never ask for GPUs, take
# `resources.small_stages`, and run on the submitting host (localrules: they take seconds).
# Site values (partition, account) come from the Slurm profile (slurm/config.yaml); the
# GPU stages' partition and GPU type from CFS_SLURM_GPU_PARTITION and CFS_SLURM_GPU_MODEL.
import os

from cfs.study import STAGES, model_resource

GPU_STAGES = ("generate", "train", "evaluate")


def _stage_value(stage, key, wildcards, threads):
    if stage not in STAGES:
        sizes = config["resources"]["small_stages"]
        return 0 if key == "gpus" else sizes[key]
    if key == "gpus" and stage not in GPU_STAGES:
        return 0
    method = None
    if stage == "train" and hasattr(wildcards, "cell"):
        method = parse_cell(wildcards.cell)["method"]
    if key == "cpus_per_task":
        default = threads
    else:
        default = config["resources"]["model_stages"][key]
    model = getattr(wildcards, "model", None)
    return model_resource(config, model, stage, key, method, default)


def stage_threads(stage):
    """A model stage's CPU threads: its cpus_per_task where models.<name>.resources sets
    it (a cluster job's CPUs), else `threads` (a laptop's share of its cores)."""
    return lambda wildcards: _stage_value(
        stage, "cpus_per_task", wildcards, config["threads"]
    )


def stage_resources(stage):
    """The four resource lines of every rule: GPUs, CPUs, memory (MB) and runtime
    (minutes). A job killed at its runtime is retried and resumes from where it stopped
    (fine-tuning checkpoints, generation batches)."""
    config_keys = {"gpu": "gpus", "cpus_per_task": "cpus_per_task", "mem_mb": "mem_mb"}
    config_keys["runtime"] = "runtime"
    return {
        resource: (
            lambda wildcards, threads, attempt, key=key: _stage_value(
                stage, key, wildcards, threads
            )
        )
        for resource, key in config_keys.items()
    } | (gpu_stage_resources() if stage in GPU_STAGES else {})


def gpu_stage_resources():
    """One node for every GPU-stage job (the Slurm plugin passes --nodes only when a `nodes`
    resource exists: without it, 8 GPUs may come as 4 + 4 on two nodes, and
    `torchrun --standalone` sees 4), and the partition and GPU type where the site sets
    them."""
    site = {
        "slurm_partition": os.environ.get("CFS_SLURM_GPU_PARTITION"),
        "gpu_model": os.environ.get("CFS_SLURM_GPU_MODEL"),
    }
    return {"nodes": 1} | {key: value for key, value in site.items() if value}
