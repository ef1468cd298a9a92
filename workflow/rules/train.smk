rule fine_tune:
    input:
        unpack(train_inputs),
    output:
        model=directory("results/{model}/{cell}/model"),
    log:
        "results/logs/fine_tune/{model}/{cell}.log",
    benchmark:
        "results/benchmarks/fine_tune/{model}/{cell}.tsv"
    wildcard_constraints:
        cell=TRAINED_CELL,
    conda:
        "../../envs/cfs.yaml"
    threads: config["threads"]
    resources:
        gpu=gpu_count("train"),
        cpus_per_task=cpus("train"),
        mem_mb=mem_mb("train"),
        runtime=runtime("train"),
    params:
        settings=lambda wildcards: as_arg(
            train_settings(wildcards.model, wildcards.cell)
        ),
        synthetic=synthetic_flag,
        checkpoints="results/{model}/{cell}/checkpoints",
    shell:
        # several GPUs: one process per GPU (cfs.distributed); one or none: one process
        "if [ {resources.gpu} -gt 1 ]; then"
        " launch='torchrun --standalone --nproc-per-node {resources.gpu}'; else launch=python; fi;"
        " $launch -m cfs.train --model {input.model} --data {input.data}"
        " {params.synthetic} --settings {params.settings} --threads {threads}"
        " --checkpoints {params.checkpoints} --out {output.model} > {log} 2>&1"


# WiSE-FT (a baseline): no training, the plain fine-tune's weights interpolated with the
# base model's at each alpha.
rule interpolate_wiseft:
    input:
        base="results/models/{model}/base",
        finetuned="results/{model}/ratio0/model",
    output:
        model=directory("results/{model}/wiseft/alpha{alpha}/model"),
    log:
        "results/logs/interpolate_wiseft/{model}_alpha{alpha}.log",
    benchmark:
        "results/benchmarks/interpolate_wiseft/{model}_alpha{alpha}.tsv"
    conda:
        "../../envs/cfs.yaml"
    resources:
        gpu=gpu_count("merge"),
        cpus_per_task=cpus("merge"),
        mem_mb=mem_mb("merge"),
        runtime=runtime("merge"),
    shell:
        "python -m cfs.wiseft --base {input.base} --finetuned {input.finetuned}"
        " --alpha {wildcards.alpha} --out {output.model} > {log} 2>&1"
