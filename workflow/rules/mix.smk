rule mix_at_ratio:
    input:
        task=f"results/data/{config['task']['name']}/train.jsonl",
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
        task=f"results/data/{config['task']['name']}/train.jsonl",
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
