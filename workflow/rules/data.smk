rule prepare_task_data:
    output:
        train="results/data/{task}/train.jsonl",
        test="results/data/{task}/test.jsonl",
        provenance="results/data/{task}/train.provenance.json",
    log:
        "results/logs/prepare_task_data/{task}.log",
    benchmark:
        "results/benchmarks/prepare_task_data/{task}.tsv"
    conda:
        "../../envs/cfs.yaml"
    resources:
        gpu=gpu_count("data"),
        cpus_per_task=cpus("data"),
        mem_mb=mem_mb("data"),
        runtime=runtime("data"),
    params:
        settings=lambda wildcards: as_arg(task_settings()),
    shell:
        "python -m cfs.data --settings {params.settings}"
        " --train {output.train} --test {output.test} > {log} 2>&1"
