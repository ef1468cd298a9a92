rule generate_context_free:
    input:
        model="results/models/{model}/base",
    output:
        samples="results/{model}/temp{temperature}/context_free.jsonl",
        provenance="results/{model}/temp{temperature}/context_free.provenance.json",
    log:
        "results/logs/generate_context_free/{model}_temp{temperature}.log",
    benchmark:
        "results/benchmarks/generate_context_free/{model}_temp{temperature}.tsv"
    conda:
        generation_env
    threads: config["threads"]
    resources:
        gpu=gpu_count("generate"),
        cpus_per_task=cpus("generate"),
        mem_mb=mem_mb("generate"),
        runtime=runtime("generate"),
    params:
        settings=lambda wildcards: as_arg(generation_settings(wildcards.model)),
    shell:
        "python -m cfs.generate --model {input.model} --temperature {wildcards.temperature}"
        " --settings {params.settings} --threads {threads} --out {output.samples} > {log} 2>&1"


# Held-out context-free samples of the base model, for the KL-to-base metric only:
# sampled at their own seed and never mixed into any fine-tuning set.
rule generate_heldout:
    input:
        model="results/models/{model}/base",
    output:
        samples="results/{model}/heldout/context_free.jsonl",
        provenance="results/{model}/heldout/context_free.provenance.json",
    log:
        "results/logs/generate_heldout/{model}.log",
    benchmark:
        "results/benchmarks/generate_heldout/{model}.tsv"
    conda:
        generation_env
    threads: config["threads"]
    resources:
        gpu=gpu_count("generate"),
        cpus_per_task=cpus("generate"),
        mem_mb=mem_mb("generate"),
        runtime=runtime("generate"),
    params:
        settings=lambda wildcards: as_arg(heldout_settings(wildcards.model)),
        temperature=config["evaluation"]["kl"]["temperature"],
    shell:
        "python -m cfs.generate --model {input.model} --temperature {params.temperature}"
        " --settings {params.settings} --threads {threads} --out {output.samples} > {log} 2>&1"


# Contextual synthetic data (a baseline): the base model's responses to the fine-tuning
# prompts, once per (model, temperature), shared by every ratio.
rule generate_contextual:
    input:
        model="results/models/{model}/base",
        prompts=task_train_path(),
    output:
        samples="results/{model}/contextual/temp{temperature}/samples.jsonl",
        provenance="results/{model}/contextual/temp{temperature}/samples.provenance.json",
    log:
        "results/logs/generate_contextual/{model}_temp{temperature}.log",
    benchmark:
        "results/benchmarks/generate_contextual/{model}_temp{temperature}.tsv"
    conda:
        generation_env
    threads: config["threads"]
    resources:
        gpu=gpu_count("generate"),
        cpus_per_task=cpus("generate"),
        mem_mb=mem_mb("generate"),
        runtime=runtime("generate"),
    params:
        settings=lambda wildcards: as_arg(contextual_settings(wildcards.model)),
    shell:
        "python -m cfs.generate --model {input.model} --temperature {wildcards.temperature}"
        " --prompts {input.prompts} --settings {params.settings} --threads {threads}"
        " --out {output.samples} > {log} 2>&1"
