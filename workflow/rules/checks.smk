# Checks that run before any other job: the highest priority among the first ready jobs.
# Only the jobs that use what a check checks wait on its output, so a changed evaluation
# setting reruns the check and the evaluations, not the models.


# The evaluation's lm-eval task names (built-in and under evaluation.include_path) and
# each metric's filter and name, from the task YAMLs only (no dataset download): a typo
# stops the study here, naming the config key and the nearest known task, instead of
# failing inside the first eval after the fine-tunes. Reruns when config.evaluation
# changes (params).
rule check_evaluation_tasks:
    output:
        "results/checks/evaluation_tasks.json",
    log:
        "results/logs/check_evaluation_tasks.log",
    priority: 100
    conda:
        "../../envs/cfs.yaml"
    params:
        settings=lambda wildcards: as_arg(config["evaluation"]),
    shell:
        "python -m cfs.task_check --settings {params.settings} --out {output} > {log} 2>&1"
