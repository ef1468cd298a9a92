# The grid (config -> targets), input functions, settings and wildcard constraints, all
# derived from the study's grammar in cfs.study. Every function the rules use lives here.
import json
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))
from cfs.study import (
    FIGURES,
    INTEGER,
    METHODS,
    NONZERO,
    NUMBER,
    PLAIN_CELL,
    SAMPLES,
    Study,
    alternatives,
    fmt,
    parse_cell,
)

# `python -m cfs.<stage>` must import this checkout's package whichever environment runs
# it, and `python` is the interpreter running Snakemake unless a conda env brings its own.
_package_dir = shlex.quote(str(Path(workflow.basedir) / "workflow"))
_prefix = f"export PYTHONPATH={_package_dir}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    _prefix += f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH; "
shell.prefix(_prefix)

STUDY = Study(config)
try:
    STUDY.check()
except ValueError as error:
    raise WorkflowError(str(error)) from None

MIXED_CELL = alternatives(["plain"] + [m.name for m in METHODS.values() if m.mixes])
TRAINED_CELL = alternatives([m.name for m in METHODS.values() if m.trains])
EVAL_CELL = alternatives(METHODS)
REPORT_TABLES = {
    "summary": "results/summary.csv",
    "differences": "results/differences.csv",
    "verdicts": "results/verdicts.csv",
}


wildcard_constraints:
    model=r"[A-Za-z0-9_-]+",
    temperature=NUMBER,
    ratio=NONZERO,
    alpha=NUMBER,
    seed=r"\d+",
    cell=EVAL_CELL,


def seed_evals(model, cell):
    return STUDY.seeded(f"results/{model}/{cell}/seed{{seed}}/eval.json")


def all_evals():
    """Each model's base eval and, per cell, every seed's eval."""
    paths = []
    for model in STUDY.study["models"]:
        paths.append(f"results/{model}/base/eval.json")
        paths.extend(path for cell in STUDY.cells() for path in seed_evals(model, cell))
    return paths


def cell_cards():
    """results/{model}/{cell}/eval.json: each cell over its seeds."""
    return [
        f"results/{model}/{cell}/eval.json"
        for model in STUDY.study["models"]
        for cell in STUDY.cells()
    ]


def figure_paths():
    return [
        f"results/figures/{model}_{name}.png"
        for model in STUDY.study["models"]
        for name in FIGURES
    ]


def final_outputs():
    return list(REPORT_TABLES.values()) + cell_cards() + figure_paths()


def samples_file(kind, suffix=".jsonl"):
    """A sample set's path pattern (cfs.study.SAMPLES), or its provenance file's."""
    path = SAMPLES[kind].removesuffix(".jsonl") + suffix
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
    samples = SAMPLES[METHODS[method].samples].format(**fields)
    return f"results/{wildcards.model}/{samples}"


def mix_inputs(wildcards):
    """The task set and, unless the cell is plain fine-tuning, its samples."""
    method = parse_cell(wildcards.cell)["method"]
    inputs = {"task": task_data("train")}
    if METHODS[method].samples:
        inputs["generations"] = samples_path(wildcards, method)
    return inputs


def mix_params(wildcards, input):
    knobs = parse_cell(wildcards.cell)
    method = METHODS[knobs["method"]]
    flags = f"--ratio {knobs['ratio']:g}"
    if method.samples:
        flags += f" --generations {input.generations} --kind {method.samples}"
    return flags


def train_inputs(wildcards):
    """Base model, training set and (for a separate synthetic loss term) the samples."""
    method = METHODS[parse_cell(wildcards.cell)["method"]]
    set_cell = wildcards.cell if method.mixes else PLAIN_CELL
    inputs = {
        "model": f"results/models/{wildcards.model}/base",
        "data": f"results/{wildcards.model}/{set_cell}/seed{wildcards.seed}/train.jsonl",
    }
    if method.samples and not method.mixes:
        inputs["synthetic"] = samples_path(wildcards, method.name)
    return inputs


def synthetic_flag(wildcards, input):
    return f"--synthetic {input.synthetic}" if "synthetic" in input.keys() else ""


def backend_env(section):
    """vLLM pins its own torch, so it has its own conda env (used with --sdm conda)."""
    vllm = config[section]["backend"] == "vllm"
    return "../../envs/vllm.yaml" if vllm else "../../envs/cfs.yaml"


def as_arg(settings):
    """Settings for a stage's --settings flag, quoted for the shell."""
    return shlex.quote(json.dumps(settings, sort_keys=True))


def model_settings(model):
    if model not in config["models"]:
        raise WorkflowError(f"config key models: no model '{model}'")
    return config["models"][model]


def model_dtype(model):
    return model_settings(model)["dtype"]


def generation_settings(model, seed):
    return {**config["generation"], "seed": int(seed), "dtype": model_dtype(model)}


def heldout_settings(model):
    kl = config["evaluation"]["kl"]
    return {
        **config["generation"],
        "num_samples": kl["num_samples"],
        "max_new_tokens": kl["max_new_tokens"],
        "top_p": 1.0,
        "seed": kl["seed"],
        "dtype": model_dtype(model),
    }


def contextual_settings(model, seed):
    settings = generation_settings(model, seed)
    settings.pop("prompt_token_id")
    return settings


def replay_settings(seed):
    replay = config["methods"]["replay"]
    return {
        **replay,
        "num_chunks": replay["num_chunks"] or config["generation"]["num_samples"],
        "chunk_tokens": replay["chunk_tokens"]
        or config["generation"]["max_new_tokens"],
        "prompt_token_id": config["generation"]["prompt_token_id"],
        "seed": int(seed),
    }


def train_settings(cell, seed):
    """config.train plus the seed and the cell's method: its objective, its knobs and its
    config section (methods.<name>)."""
    knobs = parse_cell(cell)
    name = knobs.pop("method")
    section = config["methods"].get(name, {})
    settings = {**config["train"], "seed": int(seed)}
    if section.get("learning_rate"):
        settings["learning_rate"] = section["learning_rate"]
    settings["method"] = {**section, **knobs, "name": METHODS[name].trains}
    return settings


def eval_settings(model, cell, seed):
    """config.evaluation whole, plus the cell, the seed and the model's dtype."""
    return {
        **config["evaluation"],
        "cell": {
            "model": model,
            **(parse_cell(cell) if cell != "base" else {"method": "base"}),
        },
        "seed": int(seed),
        "dtype": model_dtype(model),
    }
