# cfs: context-free synthetic data against forgetting (arXiv 2505.13811), as one DAG:
# prepare model -> base eval -> context-free generation -> mix -> fine-tune -> eval
# (per seed) -> each cell over its seeds -> tables, verdicts and figures.
import time

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/resources.smk"
include: "workflow/rules/checks.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/mix.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


STARTED = time.time()


rule all:
    default_target: True
    input:
        final_outputs(),


# A run that wrote the study's tables ends with its answer, not with the last job's log.
onsuccess:
    answer = study_answer(STARTED)
    if answer:
        print(answer)
