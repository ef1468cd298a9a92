# A cell's training set, per seed: the task set plus its method's samples at its ratio
# (context-free, contextual or replay), shuffled with the seed. Ratio 0 is plain
# fine-tuning: the task set alone, one set whatever the temperatures.
rule mix_at_ratio:
    input:
        unpack(mix_inputs),
    output:
        mixed="results/{model}/{cell}/seed{seed}/train.jsonl",
        provenance="results/{model}/{cell}/seed{seed}/train.provenance.json",
    log:
        "results/logs/mix_at_ratio/{model}/{cell}/seed{seed}.log",
        timing="results/benchmarks/mix_at_ratio/{model}/{cell}/seed{seed}.tsv",
    wildcard_constraints:
        cell=MIXED_CELL,
    conda:
        "../../envs/cfs.yaml"
    resources:
        **stage_resources("mix"),
    params:
        settings=lambda wildcards: as_arg(SETTINGS.mix(wildcards.cell, wildcards.seed)),
        flags=mix_params,
    shell:
        timed(
            "python -m cfs.mix --task {input.task} {params.flags} --settings {params.settings}"
            " --out {output.mixed} > {log[0]} 2>&1"
        )
