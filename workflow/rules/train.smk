rule fine_tune:
    input:
        unpack(train_inputs),
    output:
        model=directory("results/{model}/{cell}/seed{seed}/model"),
        # the model along training (train.evaluate_at), kept until evaluated
        snapshots=snapshot_models(),
    log:
        "results/logs/fine_tune/{model}/{cell}/seed{seed}.log",
        timing="results/benchmarks/fine_tune/{model}/{cell}/seed{seed}.tsv",
    wildcard_constraints:
        cell=TRAINED_CELL,
    conda:
        "../../envs/cfs.yaml"
    threads: stage_threads("train")
    resources:
        **stage_resources("train"),
    params:
        settings=lambda wildcards: as_arg(
            SETTINGS.train(wildcards.cell, wildcards.seed)
        ),
        flags=train_flags,
        checkpoints="results/{model}/{cell}/seed{seed}/checkpoints",
    shell:
        # several GPUs: one process per GPU (cfs.distributed); one or none: one process
        "if [ {resources.gpu} -gt 1 ]; then"
        " launch='torchrun --standalone --nproc-per-node {resources.gpu}'; else launch=python; fi; "
        + timed(
            "$launch -m cfs.train --model {input.model} --data {input.data}"
            " {params.flags} --settings {params.settings}"
            " --threads {threads} --gpus {resources.gpu}"
            " --checkpoints {params.checkpoints} --snapshots {output.snapshots}"
            " --out {output.model} > {log[0]} 2>&1"
        )


# WiSE-FT (a baseline): no training, the plain fine-tune's weights interpolated with the
# base model's at each alpha.
rule interpolate_wiseft:
    input:
        base="results/models/{model}/base",
        finetuned=method_model("plain"),
    output:
        model=directory(method_model("wiseft")),
    log:
        "results/logs/interpolate_wiseft/{model}_alpha{alpha}_seed{seed}.log",
        timing="results/benchmarks/interpolate_wiseft/{model}_alpha{alpha}_seed{seed}.tsv",
    conda:
        "../../envs/cfs.yaml"
    resources:
        **stage_resources("merge"),
    params:
        settings=lambda wildcards: as_arg(SETTINGS.wiseft(wildcards.alpha)),
    shell:
        timed(
            "python -m cfs.wiseft --base {input.base} --finetuned {input.finetuned}"
            " --settings {params.settings} --out {output.model} > {log[0]} 2>&1"
        )
