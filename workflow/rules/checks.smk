# Checks that run before any other job, on the submitting host: the highest priority
# among the first ready jobs. The evaluations wait on the task check; in a study that
# reads from the hub, the fetch runs right after it, and the task's preparation and the
# generations (and through them every GPU job) wait on what it fetched. A changed set of
# evaluation tasks reruns the check, the fetch and the evaluations, not the models.


# The evaluation's lm-eval task names (built-in and under evaluation.include_path) and
# each metric's filter and name, from the task YAMLs: a typo stops the study here, naming
# the config key and the nearest known task, instead of failing inside the first eval
# after the fine-tunes. One check file per set of tasks (TASK_CHECK): another study's
# tasks do not rerun this study's check or evaluations.
rule check_evaluation_tasks:
    output:
        checks=TASK_CHECK,
    log:
        TASK_CHECK.replace("results/checks", "results/logs/checks").replace(
            ".json", ".log"
        ),
    priority: 100
    conda:
        "../../envs/cfs.yaml"
    params:
        settings=as_arg(SETTINGS.task_check()),
    shell:
        "python -m cfs.task_check --settings {params.settings} --out {output.checks}"
        " > {log} 2>&1"


# Then, once the tasks are known good, everything the study reads from the hub is
# fetched into HF_HOME here, where the network is (compute nodes may have none): the
# study's hub models, the task's hub dataset and every evaluation task's hub dataset
# (cfs.fetch); a missing or gated one fails here, by name. A study on local files only
# has nothing to fetch and never runs it (READS_THE_HUB).
rule fetch_from_hub:
    input:
        checks=TASK_CHECK,
    output:
        fetched=HUB_FETCH,
    log:
        HUB_FETCH.replace("results/checks", "results/logs/checks").replace(
            ".json", ".log"
        ),
    priority: 100
    conda:
        "../../envs/cfs.yaml"
    params:
        settings=as_arg(SETTINGS.task_check()),
        fetch=as_arg(FETCH),
    shell:
        "python -m cfs.fetch --settings {params.settings} --fetch {params.fetch}"
        " --out {output.fetched} > {log} 2>&1"
