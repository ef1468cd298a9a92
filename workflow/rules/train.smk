rule fine_tune:
    input:
        model="results/models/{model}/base",
        data="results/{model}/{cell}/train.jsonl",
    output:
        model=directory("results/{model}/{cell}/model"),
    log:
        "results/logs/fine_tune/{model}/{cell}.log",
    benchmark:
        "results/benchmarks/fine_tune/{model}/{cell}.tsv"
    conda:
        "../../envs/cfs.yaml"
    threads: config["threads"]
    resources:
        gpu=gpu_count("train"),
        cpus_per_task=cpus("train"),
        mem_mb=mem_mb("train"),
        runtime=runtime("train"),
    params:
        settings=lambda wildcards: as_arg(train_settings()),
        checkpoints="results/{model}/{cell}/checkpoints",
    shell:
        "python -m cfs.train --model {input.model} --data {input.data}"
        " --settings {params.settings} --threads {threads}"
        " --checkpoints {params.checkpoints} --out {output.model} > {log} 2>&1"
