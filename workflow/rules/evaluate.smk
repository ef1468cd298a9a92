rule evaluate_base:
    input:
        checks=ancient(TASK_CHECK),
        model="results/models/{model}/base",
        target_data=task_data("test"),
    output:
        "results/{model}/base/eval.json",
    log:
        "results/logs/evaluate_base/{model}.log",
    benchmark:
        "results/benchmarks/evaluate_base/{model}.tsv"
    conda:
        backend_env("evaluation")
    threads: stage_threads("evaluate")
    resources:
        **stage_resources("evaluate"),
    params:
        # the base eval samples nothing per replicate: once per model, at the task's seed
        settings=lambda wildcards: as_arg(
            eval_settings(wildcards.model, "base", config["task"]["seed"])
        ),
    shell:
        "python -m cfs.evaluate --model {input.model} --settings {params.settings}"
        " --threads {threads} --gpus {resources.gpu} --out {output} > {log} 2>&1"


rule evaluate_finetuned:
    input:
        checks=ancient(TASK_CHECK),
        model=evaluated_model,
        base_model="results/models/{model}/base",
        base_eval="results/{model}/base/eval.json",
        heldout="results/{model}/heldout/context_free.jsonl",
        target_data=task_data("test"),
    output:
        "results/{model}/{cell}/seed{seed}/eval.json",
    log:
        "results/logs/evaluate_finetuned/{model}/{cell}/seed{seed}.log",
    benchmark:
        "results/benchmarks/evaluate_finetuned/{model}/{cell}/seed{seed}.tsv"
    conda:
        backend_env("evaluation")
    threads: stage_threads("evaluate")
    resources:
        **stage_resources("evaluate"),
    params:
        settings=lambda wildcards: as_arg(
            eval_settings(wildcards.model, wildcards.cell, wildcards.seed)
        ),
    shell:
        "python -m cfs.evaluate --model {input.model} --base-model {input.base_model}"
        " --heldout {input.heldout} --base-eval {input.base_eval}"
        " --settings {params.settings} --threads {threads} --gpus {resources.gpu}"
        " --out {output} > {log} 2>&1"
