# Checks that run before any other job: the highest priority among the first ready jobs.
# Only the jobs that use what a check checks wait on its output, so a changed evaluation
# setting reruns the check and the evaluations, not the models.


# The evaluation's lm-eval task names (built-in and under evaluation.include_path) and
# each metric's filter and name, from the task YAMLs only (no dataset download): a typo
# stops the study here, naming the config key and the nearest known task, instead of
# failing inside the first eval after the fine-tunes. One check file per set of tasks
# (TASK_CHECK): another study's tasks do not rerun this study's check or evaluations.
rule check_evaluation_tasks:
    output:
        TASK_CHECK,
    log:
        TASK_CHECK.replace("results/checks", "results/logs/checks").replace(
            ".json", ".log"
        ),
    priority: 100
    conda:
        "../../envs/cfs.yaml"
    params:
        settings=as_arg(task_check_settings()),
    shell:
        "python -m cfs.task_check --settings {params.settings} --out {output} > {log} 2>&1"
