# A hub model is downloaded where the network is, as the fetch after the task check does.
if FETCH["models"]:

    localrules:
        prepare_model,


rule prepare_model:
    output:
        directory("results/models/{model}/base"),
    log:
        "results/logs/prepare_model/{model}.log",
        timing="results/benchmarks/prepare_model/{model}.tsv",
    conda:
        "../../envs/cfs.yaml"
    resources:
        **stage_resources("prepare"),
    params:
        settings=lambda wildcards: as_arg(SETTINGS.prepare(wildcards.model)),
    shell:
        timed(
            "python -m cfs.prepare_model --model {wildcards.model} --settings {params.settings}"
            " --out {output} > {log[0]} 2>&1"
        )
