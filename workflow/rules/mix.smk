rule mix_at_ratio:
    input:
        task=task_train_path(),
        generations="results/{model}/temp{temperature}/context_free.jsonl",
    output:
        mixed="results/{model}/temp{temperature}/ratio{ratio}/train.jsonl",
        provenance="results/{model}/temp{temperature}/ratio{ratio}/train.provenance.json",
    log:
        "results/logs/mix_at_ratio/{model}_temp{temperature}_ratio{ratio}.log",
    benchmark:
        "results/benchmarks/mix_at_ratio/{model}_temp{temperature}_ratio{ratio}.tsv"
    conda:
        "../../envs/cfs.yaml"
    resources:
        gpu=gpu_count("mix"),
        cpus_per_task=cpus("mix"),
        mem_mb=mem_mb("mix"),
        runtime=runtime("mix"),
    params:
        settings=lambda wildcards: as_arg({"seed": config["study"]["seed"]}),
    shell:
        "python -m cfs.mix --task {input.task} --generations {input.generations}"
        " --ratio {wildcards.ratio} --settings {params.settings} --out {output.mixed}"
        " > {log} 2>&1"


# Ratio 0 is plain fine-tuning: the task set alone, one job whatever the temperatures.
rule plain_task_set:
    input:
        task=task_train_path(),
    output:
        mixed="results/{model}/ratio0/train.jsonl",
        provenance="results/{model}/ratio0/train.provenance.json",
    log:
        "results/logs/plain_task_set/{model}.log",
    benchmark:
        "results/benchmarks/plain_task_set/{model}.tsv"
    conda:
        "../../envs/cfs.yaml"
    resources:
        gpu=gpu_count("mix"),
        cpus_per_task=cpus("mix"),
        mem_mb=mem_mb("mix"),
        runtime=runtime("mix"),
    params:
        settings=lambda wildcards: as_arg({"seed": config["study"]["seed"]}),
    shell:
        "python -m cfs.mix --task {input.task} --ratio 0 --settings {params.settings}"
        " --out {output.mixed} > {log} 2>&1"


rule mix_contextual:
    input:
        task=task_train_path(),
        generations="results/{model}/contextual/temp{temperature}/samples.jsonl",
    output:
        mixed="results/{model}/contextual/temp{temperature}/ratio{ratio}/train.jsonl",
        provenance="results/{model}/contextual/temp{temperature}/ratio{ratio}/train.provenance.json",
    log:
        "results/logs/mix_contextual/{model}_temp{temperature}_ratio{ratio}.log",
    benchmark:
        "results/benchmarks/mix_contextual/{model}_temp{temperature}_ratio{ratio}.tsv"
    conda:
        "../../envs/cfs.yaml"
    resources:
        gpu=gpu_count("mix"),
        cpus_per_task=cpus("mix"),
        mem_mb=mem_mb("mix"),
        runtime=runtime("mix"),
    params:
        settings=lambda wildcards: as_arg({"seed": config["study"]["seed"]}),
    shell:
        "python -m cfs.mix --task {input.task} --generations {input.generations}"
        " --kind contextual --ratio {wildcards.ratio} --settings {params.settings}"
        " --out {output.mixed} > {log} 2>&1"


rule mix_replay:
    input:
        task=task_train_path(),
        generations="results/{model}/replay/chunks.jsonl",
    output:
        mixed="results/{model}/replay/ratio{ratio}/train.jsonl",
        provenance="results/{model}/replay/ratio{ratio}/train.provenance.json",
    log:
        "results/logs/mix_replay/{model}_ratio{ratio}.log",
    benchmark:
        "results/benchmarks/mix_replay/{model}_ratio{ratio}.tsv"
    conda:
        "../../envs/cfs.yaml"
    resources:
        gpu=gpu_count("mix"),
        cpus_per_task=cpus("mix"),
        mem_mb=mem_mb("mix"),
        runtime=runtime("mix"),
    params:
        settings=lambda wildcards: as_arg({"seed": config["study"]["seed"]}),
    shell:
        "python -m cfs.mix --task {input.task} --generations {input.generations}"
        " --kind replay --ratio {wildcards.ratio} --settings {params.settings}"
        " --out {output.mixed} > {log} 2>&1"
