# Every evaluation is under results/{model}/evals/EVAL_KEY/ (common.smk): a study with
# other evaluation settings evaluates the same models beside these, and a post eval is
# compared with the base eval of its own settings. The request cache stays beside the
# model's folder, shared by every evaluation of the model, and works in the job's
# resources.tmpdir (node-local on a cluster), copied back as it goes (cfs.request_cache).
rule evaluate_base:
    input:
        checks=ancient(TASK_CHECK),
        model="results/models/{model}/base",
        target_data=task_data("test"),
    output:
        evaluation_path("{model}", "base"),
    log:
        f"results/logs/evaluate_base/{{model}}/{EVAL_KEY}.log",
        timing=f"results/benchmarks/evaluate_base/{{model}}/{EVAL_KEY}.tsv",
    conda:
        backend_env("evaluation")
    threads: stage_threads("evaluate")
    resources:
        **stage_resources("evaluate"),
    params:
        # the base eval samples nothing per replicate: once per model, at the task's seed
        settings=lambda wildcards: as_arg(
            SETTINGS.evaluation(wildcards.model, "base", config["task"]["seed"])
        ),
        cache="results/{model}/base/eval_cache",
    shell:
        timed(
            backend_python("evaluation")
            + " -m cfs.evaluate --model {input.model} --settings {params.settings}"
            " --threads {threads} --gpus {resources.gpu} --cache {params.cache}"
            " --scratch {resources.tmpdir} --out {output} > {log[0]} 2>&1"
        )


rule evaluate_finetuned:
    input:
        checks=ancient(TASK_CHECK),
        model=evaluated_model,
        base_model="results/models/{model}/base",
        base_eval=evaluation_path("{model}", "base"),
        heldout="results/{model}/heldout/context_free.jsonl",
        target_data=task_data("test"),
    output:
        evaluation_path("{model}", "{cell}/seed{seed}"),
    log:
        f"results/logs/evaluate_finetuned/{{model}}/{EVAL_KEY}/{{cell}}/seed{{seed}}.log",
        timing=f"results/benchmarks/evaluate_finetuned/{{model}}/{EVAL_KEY}/{{cell}}/seed{{seed}}.tsv",
    conda:
        backend_env("evaluation")
    threads: stage_threads("evaluate")
    resources:
        **stage_resources("evaluate"),
    params:
        settings=lambda wildcards: as_arg(
            SETTINGS.evaluation(wildcards.model, wildcards.cell, wildcards.seed)
        ),
        cache="results/{model}/{cell}/seed{seed}/eval_cache",
    shell:
        timed(
            backend_python("evaluation")
            + " -m cfs.evaluate --model {input.model} --base-model {input.base_model}"
            " --heldout {input.heldout} --base-eval {input.base_eval}"
            " --settings {params.settings} --threads {threads} --gpus {resources.gpu}"
            " --cache {params.cache} --scratch {resources.tmpdir} --out {output} > {log[0]} 2>&1"
        )
