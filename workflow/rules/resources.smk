# Cluster resources of each stage, sized per model from config (models.<name>.resources).
# Each function returns a callable of (wildcards, threads, attempt), as Snakemake's
# `resources:` takes. The model stages (prepare, merge, generate, train, evaluate) read
# `<stage>_<key>` first, then `<key>`, then the defaults below; GPUs go to the GPU stages
# only. The other stages (data, mix, report) never ask for GPUs and take fixed small sizes.
# Site values (partition, account, GPU type) come from the Slurm profile (slurm/config.yaml).

GPU_STAGES = ("generate", "train", "evaluate")
MODEL_STAGES = ("prepare", "merge") + GPU_STAGES
MODEL_STAGE_DEFAULTS = {"mem_mb": 8000, "runtime": 60}
CPU_STAGE_DEFAULTS = {"cpus_per_task": 1, "mem_mb": 4000, "runtime": 30}


def _model_resources(wildcards):
    model = getattr(wildcards, "model", None)
    if model is None or model not in config["models"]:
        return {}
    return config["models"][model].get("resources", {})


def _stage_value(stage, key, wildcards, default):
    if stage not in MODEL_STAGES:
        return CPU_STAGE_DEFAULTS[key]
    resources = _model_resources(wildcards)
    return resources.get(f"{stage}_{key}", resources.get(key, default))


def gpu_count(stage):
    """GPUs of one job: `<stage>_gpus` or `gpus` of the model (GPU stages), else 0."""

    def count(wildcards, attempt):
        if stage not in GPU_STAGES:
            return 0
        return _stage_value(stage, "gpus", wildcards, 0)

    return count


def cpus(stage):
    """CPUs of one job; a model stage asks for its rule's threads unless sized in config."""
    return lambda wildcards, threads, attempt: _stage_value(
        stage, "cpus_per_task", wildcards, threads
    )


def mem_mb(stage):
    return lambda wildcards, attempt: _stage_value(
        stage, "mem_mb", wildcards, MODEL_STAGE_DEFAULTS["mem_mb"]
    )


def runtime(stage):
    """Minutes of wall time. A job killed at the limit is retried and resumes from where
    it stopped (fine-tuning checkpoints, generation batches)."""
    return lambda wildcards, attempt: _stage_value(
        stage, "runtime", wildcards, MODEL_STAGE_DEFAULTS["runtime"]
    )
