rule summary_table:
    input:
        all_evals(),
    output:
        report("results/summary.csv", caption="../report/summary.rst", category="Table"),
    log:
        "results/logs/summary_table.log",
    conda:
        "../../envs/cfs.yaml"
    shell:
        "python -m cfs.report table --evals {input} --out {output} > {log} 2>&1"


rule figures:
    input:
        "results/summary.csv",
    output:
        report(
            figure_paths(),
            caption="../report/figures.rst",
            category="Figures",
        ),
    log:
        "results/logs/figures.log",
    conda:
        "../../envs/cfs.yaml"
    shell:
        "python -m cfs.report figures --summary {input} --out-dir results/figures > {log} 2>&1"
