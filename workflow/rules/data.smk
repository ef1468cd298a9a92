rule prepare_task_data:
    input:
        unpack(fetched_first),
    output:
        train="results/data/{task}/train.jsonl",
        test="results/data/{task}/test.jsonl",
        provenance="results/data/{task}/train.provenance.json",
    log:
        "results/logs/prepare_task_data/{task}.log",
        timing="results/benchmarks/prepare_task_data/{task}.tsv",
    conda:
        "../../envs/cfs.yaml"
    resources:
        **stage_resources("data"),
    params:
        settings=lambda wildcards: as_arg(config["task"]),
    shell:
        timed(
            "python -m cfs.data --settings {params.settings}"
            " --train {output.train} --test {output.test} > {log[0]} 2>&1"
        )


# A hub corpus is streamed, so it needs the network: on the submitting host.
if replay_from_hub():

    localrules:
        replay_chunks,


# Pretraining-data replay (a baseline): corpus documents cut like context-free samples.
rule replay_chunks:
    input:
        model="results/models/{model}/base",
    output:
        chunks=samples_file("replay"),
        provenance=samples_file("replay", ".provenance.json"),
    log:
        "results/logs/replay_chunks/{model}_seed{seed}.log",
        timing="results/benchmarks/replay_chunks/{model}_seed{seed}.tsv",
    conda:
        "../../envs/cfs.yaml"
    resources:
        **stage_resources("data"),
    params:
        settings=lambda wildcards: as_arg(SETTINGS.replay(wildcards.seed)),
    shell:
        timed(
            "python -m cfs.replay --model {input.model} --settings {params.settings}"
            " --out {output.chunks} > {log[0]} 2>&1"
        )
