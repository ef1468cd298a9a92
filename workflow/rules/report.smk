rule summary_table:
    input:
        all_evals(),
    output:
        report("results/summary.csv", caption="../report/summary.rst", category="Table"),
    log:
        "results/logs/summary_table.log",
    conda:
        "../../envs/cfs.yaml"
    resources:
        gpu=gpu_count("report"),
        cpus_per_task=cpus("report"),
        mem_mb=mem_mb("report"),
        runtime=runtime("report"),
    shell:
        "python -m cfs.report table --evals {input} --out {output} > {log} 2>&1"


rule figures:
    input:
        "results/summary.csv",
    output:
        vs_temperature=report(
            "results/figures/{model}_vs_temperature.png",
            caption="../report/figures.rst",
            category="Figures",
            subcategory="{model}",
        ),
        vs_ratio=report(
            "results/figures/{model}_vs_ratio.png",
            caption="../report/figures.rst",
            category="Figures",
            subcategory="{model}",
        ),
        tradeoff=report(
            "results/figures/{model}_tradeoff.png",
            caption="../report/figures.rst",
            category="Figures",
            subcategory="{model}",
        ),
        methods=report(
            "results/figures/{model}_methods.png",
            caption="../report/figures.rst",
            category="Figures",
            subcategory="{model}",
        ),
    log:
        "results/logs/figures/{model}.log",
    conda:
        "../../envs/cfs.yaml"
    resources:
        gpu=gpu_count("report"),
        cpus_per_task=cpus("report"),
        mem_mb=mem_mb("report"),
        runtime=runtime("report"),
    shell:
        "python -m cfs.report figures --summary {input} --model {wildcards.model}"
        " --out-dir results/figures > {log} 2>&1"
