# Context-free samples of the base model, once per (model, temperature, seed) and shared by
# every ratio and method that uses them.
rule generate_context_free:
    input:
        unpack(fetched_first),
        model="results/models/{model}/base",
    output:
        samples=samples_file("context_free"),
        provenance=samples_file("context_free", ".provenance.json"),
    log:
        "results/logs/generate_context_free/{model}_temp{temperature}_seed{seed}.log",
        timing="results/benchmarks/generate_context_free/{model}_temp{temperature}_seed{seed}.tsv",
    conda:
        backend_env("generation")
    threads: stage_threads("generate")
    resources:
        **stage_resources("generate"),
    params:
        settings=lambda wildcards: as_arg(
            SETTINGS.generation(wildcards.model, wildcards.seed, wildcards.temperature)
        ),
        prompts="",
    shell:
        timed(
            backend_python("generation") + " -m cfs.generate --model {input.model}"
            " {params.prompts} --settings {params.settings}"
            " --threads {threads} --gpus {resources.gpu}"
            " --out {output.samples} > {log[0]} 2>&1"
        )


# Held-out context-free samples of the base model, for the KL-to-base metric only:
# sampled once per model at their own seed and never mixed into any fine-tuning set.
use rule generate_context_free as generate_heldout with:
    output:
        samples="results/{model}/heldout/context_free.jsonl",
        provenance="results/{model}/heldout/context_free.provenance.json",
    log:
        "results/logs/generate_heldout/{model}.log",
        timing="results/benchmarks/generate_heldout/{model}.tsv",
    params:
        settings=lambda wildcards: as_arg(SETTINGS.heldout(wildcards.model)),
        prompts="",


# Contextual synthetic data (a baseline): the base model's responses to the fine-tuning
# prompts, once per (model, temperature, seed), shared by every ratio.
use rule generate_context_free as generate_contextual with:
    input:
        unpack(fetched_first),
        model="results/models/{model}/base",
        prompts=task_data("train"),
    output:
        samples=samples_file("contextual"),
        provenance=samples_file("contextual", ".provenance.json"),
    log:
        "results/logs/generate_contextual/{model}_temp{temperature}_seed{seed}.log",
        timing="results/benchmarks/generate_contextual/{model}_temp{temperature}_seed{seed}.tsv",
    params:
        settings=lambda wildcards: as_arg(
            SETTINGS.contextual(wildcards.model, wildcards.seed, wildcards.temperature)
        ),
        prompts=lambda wildcards, input: f"--prompts {input.prompts}",
