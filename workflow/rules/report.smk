localrules:
    check_evaluation_tasks,
    fetch_from_hub,
    mix_at_ratio,
    summarise_seeds,
    current_eval,
    summary_table,
    figures,


# A cell over its seeds: each metric's mean and 95% interval, and every seed's eval.
rule summarise_seeds:
    input:
        lambda wildcards: seed_evals(wildcards.model, wildcards.cell),
    output:
        evaluation_path("{model}", "{cell}"),
    log:
        f"results/logs/summarise_seeds/{{model}}/{EVAL_KEY}/{{cell}}.log",
    conda:
        "../../envs/cfs.yaml"
    resources:
        **stage_resources("report"),
    shell:
        "python -m cfs.report cell --evals {input} --out {output} > {log} 2>&1"


# The path a user types, results/{model}/{base, cell or cell/seed<S>}/eval.json: a copy of
# this study's evaluation. No study asks for it, so another study's run leaves it be.
rule current_eval:
    input:
        lambda wildcards: evaluation_path(wildcards.model, wildcards.evaluated),
    output:
        "results/{model}/{evaluated}/eval.json",
    log:
        "results/logs/current_eval/{model}/{evaluated}.log",
    wildcard_constraints:
        evaluated=rf"base|(?:{EVAL_CELL})(?:/seed\d+)?",
    conda:
        "../../envs/cfs.yaml"
    resources:
        **stage_resources("report"),
    shell:
        "cp {input} {output} > {log} 2>&1"


# The study's tables: each cell's means and intervals over seeds and items, each method's
# paired difference from plain fine-tuning and from base, and the paper's claims.
rule summary_table:
    input:
        all_evals(),
    output:
        summary=report(
            REPORT_TABLES["summary"], caption="../report/summary.rst", category="Table"
        ),
        differences=report(
            REPORT_TABLES["differences"],
            caption="../report/differences.rst",
            category="Table",
        ),
        verdicts=report(
            REPORT_TABLES["verdicts"],
            caption="../report/verdicts.rst",
            category="Table",
        ),
        frontier=report(
            REPORT_TABLES["frontier"],
            caption="../report/frontier.rst",
            category="Table",
        ),
        page=RESULTS_PAGE,
    log:
        f"results/logs/summary_table/{STUDY.name}.log",
    conda:
        "../../envs/cfs.yaml"
    resources:
        **stage_resources("report"),
    params:
        study=STUDY.name,
        claims=as_arg(config["claims"]),
    shell:
        "python -m cfs.report table --evals {input} --out {output.summary}"
        " --differences {output.differences} --verdicts {output.verdicts}"
        " --frontier {output.frontier}"
        " --claims {params.claims}"
        " --page {output.page} --study {params.study} > {log} 2>&1"


rule figures:
    input:
        summary=REPORT_TABLES["summary"],
        differences=REPORT_TABLES["differences"],
        frontier=REPORT_TABLES["frontier"],
        curves=lambda wildcards: trained_models(wildcards.model),
    output:
        **{
            name: report(
                figure_path("{model}", name),
                caption="../report/figures.rst",
                category="Figures",
                subcategory="{model}",
            )
            for name in FIGURES
        },
    log:
        f"results/logs/figures/{STUDY.name}/{{model}}.log",
    conda:
        "../../envs/cfs.yaml"
    resources:
        **stage_resources("report"),
    params:
        out_dir=lambda wildcards, output: Path(output[0]).parent,
    shell:
        "python -m cfs.report figures --summary {input.summary}"
        " --differences {input.differences} --frontier {input.frontier}"
        " --curves {input.curves}"
        " --model {wildcards.model} --out-dir {params.out_dir} > {log} 2>&1"
