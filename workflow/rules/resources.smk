# Cluster resources of each stage, sized per model from config (models.<name>.resources).
# Each function returns a callable of (wildcards, attempt), as Snakemake's `resources:` takes.

GPU_STAGES = ("generate", "train", "evaluate")


def _model_resources(wildcards):
    model = getattr(wildcards, "model", None)
    if model is None or model not in config["models"]:
        return {}
    return config["models"][model].get("resources", {})


def gpu_count(stage):
    def count(wildcards, attempt):
        if stage not in GPU_STAGES:
            return 0
        resources = _model_resources(wildcards)
        return resources.get(f"{stage}_gpus", resources.get("gpus", 0))

    return count


def cpus(stage):
    return lambda wildcards, attempt: _model_resources(wildcards).get(
        "cpus_per_task", 1
    )


def mem_mb(stage):
    return lambda wildcards, attempt: _model_resources(wildcards).get("mem_mb", 8000)


def runtime(stage):
    return lambda wildcards, attempt: _model_resources(wildcards).get("runtime", 60)
