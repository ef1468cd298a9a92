# The grid (config -> targets), path helpers and wildcard constraints.
# Every function the rules use lives here.
import json
import re
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from snakemake.settings.types import DeploymentMethod

# `python -m cfs.<stage>` must import this checkout's package whichever environment runs
# it, and `python` is the interpreter running Snakemake unless a conda env brings its own.
_package_dir = shlex.quote(str(Path(workflow.basedir) / "workflow"))
_prefix = f"export PYTHONPATH={_package_dir}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    _prefix += f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH; "
shell.prefix(_prefix)

NUMBER = r"\d+(?:\.\d+)?"
NONZERO = r"(?!0+(?:\.0+)?(?![\d.]))\d+(?:\.\d+)?"  # a number that is not zero


wildcard_constraints:
    model=r"[A-Za-z0-9_-]+",
    temperature=NUMBER,
    ratio=rf"{NONZERO}",
    cell=rf"ratio0|temp{NUMBER}/ratio{NONZERO}",


def fmt(value):
    """A number as it appears in paths: 0.5 -> '0.5', 1.0 -> '1'."""
    return f"{float(value):g}"


def check_config():
    study = config["study"]
    for model in study["models"]:
        if model not in config["models"]:
            raise WorkflowError(
                f"config key study.models: unknown model '{model}' "
                f"(known under `models`: {', '.join(sorted(config['models']))})"
            )
    nonzero = [ratio for ratio in study["ratios"] if ratio > 0]
    if nonzero and not study["temperatures"]:
        raise WorkflowError(
            "config key study.temperatures: empty, but study.ratios has non-zero ratios "
            "that need context-free samples"
        )
    needed = round(max(nonzero, default=0) * config["task"]["num_train"])
    if needed > config["generation"]["num_samples"]:
        raise WorkflowError(
            f"config key generation.num_samples: {config['generation']['num_samples']} is "
            f"fewer than ratio {max(nonzero)} x task.num_train "
            f"{config['task']['num_train']} = {needed}"
        )


check_config()


def cells():
    """Grid cells below results/{model}/: ratio0 (plain fine-tuning, no temperature)
    and temp{T}/ratio{R} for context-free mixing."""
    out = []
    for ratio in config["study"]["ratios"]:
        if ratio == 0:
            out.append("ratio0")
        else:
            out += [
                f"temp{fmt(temperature)}/ratio{fmt(ratio)}"
                for temperature in config["study"]["temperatures"]
            ]
    return out


def parse_cell(model, cell):
    if cell == "ratio0":
        return {"model": model, "method": "plain", "temperature": None, "ratio": 0.0}
    match = re.fullmatch(r"temp([\d.]+)/ratio([\d.]+)", cell)
    return {
        "model": model,
        "method": "context_free",
        "temperature": float(match[1]),
        "ratio": float(match[2]),
    }


def all_evals():
    return [
        f"results/{model}/{cell}/eval.json"
        for model in config["study"]["models"]
        for cell in ["base"] + cells()
    ]


FIGURE_NAMES = ["vs_temperature", "vs_ratio", "tradeoff"]


def figure_paths():
    return [
        f"results/figures/{model}_{name}.png"
        for model in config["study"]["models"]
        for name in FIGURE_NAMES
    ]


def final_outputs():
    return ["results/summary.csv"] + figure_paths()


def as_arg(settings):
    """Settings for a stage's --settings flag, quoted for the shell."""
    return shlex.quote(json.dumps(settings, sort_keys=True))


def model_settings(model):
    if model not in config["models"]:
        raise WorkflowError(f"config key models: no model '{model}'")
    return config["models"][model]


def generation_settings(model):
    return {
        **config["generation"],
        "seed": config["study"]["seed"],
        "dtype": model_settings(model).get("dtype", "auto"),
    }


def heldout_settings(model):
    kl = config["evaluation"]["kl"]
    return {
        "num_samples": kl["num_samples"],
        "max_new_tokens": kl["max_new_tokens"],
        "top_p": 1.0,
        "seed": kl["seed"],
        "batch_size": config["generation"]["batch_size"],
        "prompt_token_id": config["generation"]["prompt_token_id"],
        "dtype": model_settings(model).get("dtype", "auto"),
    }


def task_settings():
    return {**config["task"], "seed": config["study"]["seed"]}


def train_settings():
    return {**config["train"], "seed": config["study"]["seed"]}


def eval_settings(model, cell):
    evaluation = config["evaluation"]
    return {
        "cell": (
            parse_cell(model, cell)
            if cell != "base"
            else {"model": model, "method": "base"}
        ),
        "include_path": evaluation["include_path"],
        "target": evaluation["target"],
        "forgetting": evaluation["forgetting"],
        "batch_size": evaluation["batch_size"],
        "limit": evaluation["limit"],
        "kl_batch_size": evaluation["kl"]["batch_size"],
        "seed": config["study"]["seed"],
        "dtype": model_settings(model).get("dtype", "auto"),
    }
