# The grid (config -> targets), input functions, settings and wildcard constraints, all
# derived from the study's grammar in cfs.study. Every function the rules use lives here.
import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))
from cfs.fetch import reads_the_hub
from cfs.stage_settings import StageSettings, digest
from cfs.figures import FIGURES
from cfs.study import (
    INTEGER,
    METHODS,
    NONZERO,
    NUMBER,
    PLAIN_CELL,
    SAMPLE_KINDS,
    Study,
    alternatives,
    fmt,
    parse_cell,
    replay_sources,
    untrained_part,
)

# `python -m cfs.<stage>` must import this checkout's package whichever environment runs
# it, and `python` is the interpreter running Snakemake unless a conda env brings its own.
_package_dir = shlex.quote(str(Path(workflow.basedir) / "workflow"))
_prefix = f"export PYTHONPATH={_package_dir}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    _prefix += f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH; "
shell.prefix(_prefix)


def timed(command):
    """A job's command through cfs.timing, which writes the rule's `timing` log
    (results/benchmarks/...) from the kernel's accounting of the job's processes.
    Snakemake's `benchmark:` would poll them through /proc twice a second instead."""
    return f"python -m cfs.timing {{log.timing}} -- {command}"


STUDY = Study(config)
try:
    STUDY.check()
except ValueError as error:
    raise WorkflowError(str(error)) from None
# each stage's --settings (cfs.stage_settings)
SETTINGS = StageSettings(config, STUDY)

MIXED_CELL = alternatives(
    ["plain"] + [m.name for m in METHODS.values() if m.mixes], suffixes=()
)
# a fine-tune's cell: a learning rate of its own, never a point along training
TRAINED_CELL = alternatives(
    [m.name for m in METHODS.values() if m.trains], suffixes=("learning_rate",)
)
EVAL_CELL = alternatives(METHODS)
# The study's tables and figures, under its name: studies sharing one results/ folder
# share their cells' jobs but never overwrite each other's tables.
REPORT_DIR = f"results/studies/{STUDY.name}"
RESULTS_PAGE = f"{REPORT_DIR}/results.md"
REPORT_TABLES = {
    name: f"{REPORT_DIR}/{name}.csv"
    for name in ("summary", "differences", "verdicts", "frontier")
}


wildcard_constraints:
    model=r"[A-Za-z0-9_-]+",
    temperature=NUMBER,
    ratio=NONZERO,
    alpha=NUMBER,
    seed=r"\d+",
    cell=EVAL_CELL,


def study_answer(started):
    """The study's answer, when this run wrote its tables: each verdict (the primary claim
    first where the table marks one) and where the results page is."""
    verdicts = Path(REPORT_TABLES["verdicts"])
    if not verdicts.is_file() or verdicts.stat().st_mtime < started:
        return None
    import pandas as pd

    table = pd.read_csv(verdicts)
    if "primary" in table:
        table = table.sort_values("primary", ascending=False, kind="stable")
    lines = [f"Study {STUDY.name!r}: verdicts (forgetting average, points; KL to base)"]
    for row in table.itertuples():
        lines.append(
            f"  {row.verdict} / {row.kl_verdict}: {row.claim} ({row.comparison}: "
            f"{100 * row.forgetting_avg_difference:+.2f} [{100 * row.low:+.2f}, "
            f"{100 * row.high:+.2f}])"
        )
    lines.append(f"Every table and figure: {RESULTS_PAGE}")
    return "\n".join(lines)


def seed_evals(model, cell):
    return STUDY.seeded(evaluation_path(model, f"{cell}/seed{{seed}}"))


def all_evals():
    """Each model's base eval and, per cell and per point along training, every seed's
    eval."""
    paths = []
    for model in STUDY.study["models"]:
        paths.append(evaluation_path(model, "base"))
        cells = STUDY.cells() + STUDY.point_cells()
        paths.extend(path for cell in cells for path in seed_evals(model, cell))
    return paths


def snapshot_models():
    """A fine-tune's models at the fractions of its steps of train.evaluate_at, kept
    until their evaluations are done."""
    return [
        temp(
            directory(
                f"results/{{model}}/{{cell}}/at{fmt(fraction)}/seed{{seed}}/snapshot"
            )
        )
        for fraction in STUDY.evaluate_at
    ]


def evaluated_model(wildcards):
    """The model folder an eval reads: a fine-tune's (or merge's) model, or its snapshot
    at a point along training (its own name: no other job's output looks like it)."""
    folder = f"results/{wildcards.model}/{wildcards.cell}/seed{wildcards.seed}"
    point = parse_cell(wildcards.cell).get("fraction") is not None
    return f"{folder}/snapshot" if point else f"{folder}/model"


def cell_cards():
    """Each cell over its seeds, under the study's evaluation settings."""
    return [
        evaluation_path(model, cell)
        for model in STUDY.study["models"]
        for cell in STUDY.cells()
    ]


def trained_models(model):
    """The fine-tuned model folders of a model's trained cells (their forgetting curves)."""
    return [
        path
        for cell in STUDY.cells()
        if METHODS[parse_cell(cell)["method"]].trains
        for path in STUDY.seeded(f"results/{model}/{cell}/seed{{seed}}/model")
    ]


def figure_path(model, name):
    return f"{REPORT_DIR}/figures/{model}_{name}.png"


def figure_paths():
    return [
        figure_path(model, name) for model in STUDY.study["models"] for name in FIGURES
    ]


def final_outputs():
    return list(REPORT_TABLES.values()) + [RESULTS_PAGE] + cell_cards() + figure_paths()


def samples_file(kind, suffix=".jsonl"):
    """A sample set's path pattern (cfs.study.SAMPLE_KINDS), or its provenance file's."""
    path = SAMPLE_KINDS[kind].path.removesuffix(".jsonl") + suffix
    return f"results/{{model}}/{path}"


def method_model(name):
    """The model path pattern of a method's cells, e.g. WiSE-FT's."""
    return f"results/{{model}}/{METHODS[name].path}/seed{{seed}}/model"


def task_data(split):
    return f"results/data/{config['task']['name']}/{split}.jsonl"


def samples_path(wildcards, method):
    """The samples a cell's method draws, for this seed."""
    knobs = parse_cell(wildcards.cell)
    fields = {
        "seed": wildcards.seed,
        **{k: fmt(v) for k, v in knobs.items() if k != "method"},
    }
    samples = SAMPLE_KINDS[METHODS[method].samples].path.format(**fields)
    return f"results/{wildcards.model}/{samples}"


def mix_inputs(wildcards):
    """The task set and, unless the cell is plain fine-tuning, its samples."""
    method = parse_cell(wildcards.cell)["method"]
    inputs = {"task": task_data("train")}
    if METHODS[method].samples:
        inputs["generations"] = samples_path(wildcards, method)
    return inputs


def mix_params(wildcards, input):
    """The samples a mixing cell draws from (its ratio and kind are settings)."""
    if METHODS[parse_cell(wildcards.cell)["method"]].samples:
        return f"--generations {input.generations}"
    return ""


def train_inputs(wildcards):
    """Base model, training set and (for a separate synthetic loss term) the samples."""
    method = METHODS[parse_cell(wildcards.cell)["method"]]
    set_cell = untrained_part(wildcards.cell) if method.mixes else PLAIN_CELL
    inputs = {
        "model": f"results/models/{wildcards.model}/base",
        "data": f"results/{wildcards.model}/{set_cell}/seed{wildcards.seed}/train.jsonl",
    }
    if method.synthetic_term:
        inputs["synthetic"] = samples_path(wildcards, method.name)
    if config["train"]["curve_every"]:
        inputs["heldout"] = f"results/{wildcards.model}/heldout/context_free.jsonl"
        inputs["target_test"] = task_data("test")
    return inputs


def train_flags(wildcards, input):
    """The synthetic term's samples and the forgetting curves' held-out data, if any."""
    names = {
        "synthetic": "--synthetic",
        "heldout": "--heldout",
        "target_test": "--target-test",
    }
    return " ".join(
        f"{flag} {input[key]}" for key, flag in names.items() if key in input.keys()
    )


def backend_env(section):
    """The stage's conda env (used with --sdm conda)."""
    return f"../../envs/{SETTINGS.environment(section)}.yaml"


def backend_python(section):
    """The interpreter of the stage's environment. Under --sdm conda, the conda env's
    own; without conda, a virtual environment named by CFS_ENV_<NAME> (CFS_ENV_VLLM for
    envs/vllm.yaml) stands in for it where set, and Snakemake's own otherwise."""
    name = SETTINGS.environment(section)
    venv = os.environ.get(f"CFS_ENV_{name.upper()}")
    if (
        not venv
        or DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
    ):
        return "python"
    python = Path(venv) / "bin" / "python"
    if not python.is_file():
        raise WorkflowError(
            f"CFS_ENV_{name.upper()}={venv}: no bin/python there (a virtual environment "
            f"with what envs/{name}.yaml lists)"
        )
    return shlex.quote(str(python))


def as_arg(settings):
    """Settings for a stage's --settings flag, quoted for the shell."""
    return shlex.quote(json.dumps(settings, sort_keys=True))


def replay_from_hub():
    """The study's replay corpus is a hub dataset, streamed (no cache to fetch into)."""
    return "replay" in STUDY.methods and "hub_dataset" in replay_sources(config)


# Every evaluation of the study is under results/{model}/evals/EVAL_KEY/ (evaluation_path).
EVAL_KEY = SETTINGS.evaluation_key()
evaluation_path = SETTINGS.evaluation_path
# One check file per set of evaluation tasks: studies with other tasks have their own.
TASK_CHECK = f"results/checks/evaluation_tasks/{digest(SETTINGS.task_check())}.json"
# What the fetch after the check fetched, for a study that reads from the hub: the task's
# preparation and the generations, and through them every GPU job, wait on it (ancient:
# a later fetch, e.g. for another study, does not make them run again); the evaluations
# wait on the check itself. A study on local files only fetches nothing and waits on
# nothing.
HUB_FETCH = "results/checks/hub_fetch.json"
FETCH = SETTINGS.fetch()
READS_THE_HUB = reads_the_hub(FETCH, config["evaluation"])


def fetched_first(wildcards):
    """The fetch after the task check, where the study reads from the hub."""
    return {"fetched": ancient(HUB_FETCH)} if READS_THE_HUB else {}


def held_out_target_rows():
    """How many target problems the task holds out, where the DAG build can tell: its
    prepared test set, else the fetched split's row count less task.num_train (a task
    without test_split holds out the rest of its split); None where it cannot."""
    test_set = Path(task_data("test"))
    if test_set.is_file():
        return sum(1 for line in test_set.open() if line.strip())
    task = config["task"]
    if task["source"] != "hub" or task["test_split"] or not Path(HUB_FETCH).is_file():
        return None
    fetched = json.loads(Path(HUB_FETCH).read_text()).get("task") or {}
    if fetched.get("dataset") != task["dataset"]:
        return None
    rows = fetched.get("rows", {}).get(task["split"])
    return None if rows is None else max(rows - task["num_train"], 0)


# The forgetting curves follow the loss of held-out target problems: refuse a study with
# none before any job runs, not in each fine-tune after its model is loaded.
if config["train"]["curve_every"] and held_out_target_rows() == 0:
    raise WorkflowError(
        f"train.curve_every is {config['train']['curve_every']} but the task holds out no "
        f"target problems: task.num_train ({config['task']['num_train']}) takes every row "
        f"of task.split '{config['task']['split']}'. Set train.curve_every to 0, set "
        "task.test_split, or lower task.num_train"
    )
