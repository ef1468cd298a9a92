rule evaluate_base:
    input:
        model="results/models/{model}/base",
        target_data=f"results/data/{config['task']['name']}/test.jsonl",
    output:
        "results/{model}/base/eval.json",
    log:
        "results/logs/evaluate_base/{model}.log",
    benchmark:
        "results/benchmarks/evaluate_base/{model}.tsv"
    conda:
        evaluation_env
    threads: config["threads"]
    resources:
        gpu=gpu_count("evaluate"),
        cpus_per_task=cpus("evaluate"),
        mem_mb=mem_mb("evaluate"),
        runtime=runtime("evaluate"),
    params:
        settings=lambda wildcards: as_arg(eval_settings(wildcards.model, "base")),
    shell:
        "python -m cfs.evaluate --model {input.model} --settings {params.settings}"
        " --threads {threads} --out {output} > {log} 2>&1"


rule evaluate_finetuned:
    input:
        model="results/{model}/{cell}/model",
        base_model="results/models/{model}/base",
        base_eval="results/{model}/base/eval.json",
        heldout="results/{model}/heldout/context_free.jsonl",
        target_data=f"results/data/{config['task']['name']}/test.jsonl",
    output:
        "results/{model}/{cell}/eval.json",
    log:
        "results/logs/evaluate_finetuned/{model}/{cell}.log",
    benchmark:
        "results/benchmarks/evaluate_finetuned/{model}/{cell}.tsv"
    conda:
        evaluation_env
    threads: config["threads"]
    resources:
        gpu=gpu_count("evaluate"),
        cpus_per_task=cpus("evaluate"),
        mem_mb=mem_mb("evaluate"),
        runtime=runtime("evaluate"),
    params:
        settings=lambda wildcards: as_arg(
            eval_settings(wildcards.model, wildcards.cell)
        ),
    shell:
        "python -m cfs.evaluate --model {input.model} --base-model {input.base_model}"
        " --heldout {input.heldout} --base-eval {input.base_eval}"
        " --settings {params.settings} --threads {threads} --out {output} > {log} 2>&1"
