# Checks that run before any other job (every other job waits on their outputs).


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
    conda:
        "../../envs/cfs.yaml"
    params:
        settings=lambda wildcards: as_arg(config["evaluation"]),
    shell:
        "python -m cfs.task_check --settings {params.settings} --out {output} > {log} 2>&1"
