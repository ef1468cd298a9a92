# The grid (config -> targets), path helpers and wildcard constraints.
# Every function the rules use lives here.
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np

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
INTEGER = r"[1-9]\d*"

# Grid cells below results/{model}/, one pattern per method; each path carries only
# its own method's knobs (plain fine-tuning is ratio0, context-free keeps the
# brief's temp{T}/ratio{R}).
CELL_PATTERNS = {
    "plain": r"ratio0",
    "context_free": rf"temp(?P<temperature>{NUMBER})/ratio(?P<ratio>{NONZERO})",
    "contextual": rf"contextual/temp(?P<temperature>{NUMBER})/ratio(?P<ratio>{NONZERO})",
    "replay": rf"replay/ratio(?P<ratio>{NONZERO})",
    "lora": rf"lora/rank(?P<rank>{INTEGER})",
    "l2": rf"l2/lambda(?P<lambda>{NUMBER})",
    "weighted_synthetic": (
        rf"cf_weighted/temp(?P<temperature>{NUMBER})/ratio(?P<ratio>{NONZERO})/"
        rf"lambda(?P<lambda>{NUMBER})"
    ),
    "kl_to_base": (
        rf"kl_to_base/temp(?P<temperature>{NUMBER})/ratio(?P<ratio>{NONZERO})/"
        rf"lambda(?P<lambda>{NUMBER})"
    ),
    "wiseft": rf"wiseft/alpha(?P<alpha>{NUMBER})",
}
TRAINED_METHODS = [method for method in CELL_PATTERNS if method != "wiseft"]


def _alternatives(methods):
    return "|".join(re.sub(r"\?P<\w+>", "", CELL_PATTERNS[m]) for m in methods)


TRAINED_CELL = _alternatives(TRAINED_METHODS)
EVAL_CELL = _alternatives(CELL_PATTERNS)


wildcard_constraints:
    model=r"[A-Za-z0-9_-]+",
    temperature=NUMBER,
    ratio=NONZERO,
    alpha=NUMBER,
    cell=EVAL_CELL,


def fmt(value):
    """A number as it appears in paths: 0.5 -> '0.5', 1.0 -> '1', 1e6 -> '1000000'."""
    return np.format_float_positional(float(value), trim="-")


def study_methods():
    return config["study"].get("methods", ["context_free"])


def method_config(method):
    return config.get("methods", {}).get(method, {})


def nonzero_ratios(method=None):
    ratios = method_config(method).get("ratios") if method else None
    return [r for r in (ratios or config["study"]["ratios"]) if r > 0]


def method_temperatures(method=None):
    temperatures = method_config(method).get("temperatures") if method else None
    return temperatures or config["study"]["temperatures"]


def check_config():
    study = config["study"]
    for model in study["models"]:
        if model not in config["models"]:
            raise WorkflowError(
                f"config key study.models: unknown model '{model}' "
                f"(known under `models`: {', '.join(sorted(config['models']))})"
            )
    for method in study_methods():
        if method not in CELL_PATTERNS or method == "plain":
            raise WorkflowError(
                f"config key study.methods: unknown method '{method}' (known: "
                f"{', '.join(m for m in CELL_PATTERNS if m != 'plain')})"
            )
    sampled = [m for m in ("context_free", "contextual") if m in study_methods()]
    sampled += [m for m in ("weighted_synthetic", "kl_to_base") if m in study_methods()]
    for method in sampled:
        if nonzero_ratios(method) and not method_temperatures(method):
            raise WorkflowError(
                "config key study.temperatures: empty, but study.ratios has non-zero ratios "
                f"that need {method} samples"
            )
    if "wiseft" in study_methods() and 0 not in study["ratios"]:
        raise WorkflowError(
            "config key study.ratios: WiSE-FT interpolates the plain fine-tune, so the "
            "ratios need 0"
        )
    if "replay" in study_methods():
        corpus = method_config("replay").get("corpus") or {}
        chosen = [
            key for key in ("python_stdlib", "files", "hub_dataset") if corpus.get(key)
        ]
        if len(chosen) != 1:
            raise WorkflowError(
                "config key methods.replay.corpus: set exactly one of python_stdlib, files, "
                f"hub_dataset (set: {', '.join(chosen) or 'none'})"
            )
    num_train = config["task"].get("num_train", 0)
    for method in ("context_free", "contextual", "weighted_synthetic", "kl_to_base"):
        if method not in study_methods() or not num_train:
            continue
        needed = round(max(nonzero_ratios(method), default=0) * num_train)
        if needed > config["generation"]["num_samples"]:
            raise WorkflowError(
                f"config key generation.num_samples: {config['generation']['num_samples']} "
                f"is fewer than ratio {max(nonzero_ratios(method))} x task.num_train "
                f"{num_train} = {needed} ({method})"
            )


check_config()


def method_cells(method):
    """The cells of one method for the configured grid, as paths below results/{model}/."""
    knobs = method_config(method)
    temperatures = [fmt(t) for t in method_temperatures(method)]
    ratios = [fmt(r) for r in nonzero_ratios(method)]
    if method == "context_free":
        return [f"temp{t}/ratio{r}" for r in ratios for t in temperatures]
    if method == "contextual":
        return [f"contextual/temp{t}/ratio{r}" for r in ratios for t in temperatures]
    if method == "replay":
        return [f"replay/ratio{r}" for r in ratios]
    if method == "lora":
        return [f"lora/rank{rank}" for rank in knobs["ranks"]]
    if method == "l2":
        return [f"l2/lambda{fmt(value)}" for value in knobs["lambdas"]]
    if method == "wiseft":
        return [f"wiseft/alpha{fmt(alpha)}" for alpha in knobs["alphas"]]
    prefix = {"weighted_synthetic": "cf_weighted", "kl_to_base": "kl_to_base"}[method]
    return [
        f"{prefix}/temp{t}/ratio{r}/lambda{fmt(value)}"
        for t in temperatures
        for r in ratios
        for value in knobs["lambdas"]
    ]


def cells():
    """Every grid cell of the study: plain fine-tuning (ratio 0) and each method's."""
    out = ["ratio0"] if 0 in config["study"]["ratios"] else []
    for method in study_methods():
        out += method_cells(method)
    return out


def parse_cell(model, cell):
    """The method and knobs of a cell path (the inverse of method_cells)."""
    for method, pattern in CELL_PATTERNS.items():
        match = re.fullmatch(pattern, cell)
        if match:
            knobs = {
                key: int(value) if key == "rank" else float(value)
                for key, value in match.groupdict().items()
            }
            if method == "plain":
                knobs["ratio"] = 0.0
            return {"model": model, "method": method, **knobs}
    raise WorkflowError(f"not a grid cell: results/{model}/{cell}")


def all_evals():
    return [
        f"results/{model}/{cell}/eval.json"
        for model in config["study"]["models"]
        for cell in ["base"] + cells()
    ]


FIGURE_NAMES = ["vs_temperature", "vs_ratio", "tradeoff", "methods"]


def figure_paths():
    return [
        f"results/figures/{model}_{name}.png"
        for model in config["study"]["models"]
        for name in FIGURE_NAMES
    ]


def final_outputs():
    return ["results/summary.csv"] + figure_paths()


def task_train_path():
    return f"results/data/{config['task']['name']}/train.jsonl"


def train_inputs(wildcards):
    """Base model, training set and (for a separate synthetic loss term) the samples."""
    cell = parse_cell(wildcards.model, wildcards.cell)
    method = cell["method"]
    inputs = {"model": f"results/models/{wildcards.model}/base"}
    if method in ("plain", "lora", "l2", "weighted_synthetic", "kl_to_base"):
        inputs["data"] = f"results/{wildcards.model}/ratio0/train.jsonl"
    else:
        inputs["data"] = f"results/{wildcards.model}/{wildcards.cell}/train.jsonl"
    if method in ("weighted_synthetic", "kl_to_base"):
        temperature = fmt(cell["temperature"])
        inputs["synthetic"] = (
            f"results/{wildcards.model}/temp{temperature}/context_free.jsonl"
        )
    return inputs


def synthetic_flag(wildcards, input):
    return f"--synthetic {input.synthetic}" if "synthetic" in input.keys() else ""


def generation_env(wildcards):
    """vLLM pins its own torch, so it has its own conda env (used with --sdm conda)."""
    backend = config["generation"]["backend"]
    return "../../envs/vllm.yaml" if backend == "vllm" else "../../envs/cfs.yaml"


def evaluation_env(wildcards):
    backend = config["evaluation"]["backend"]
    return "../../envs/vllm.yaml" if backend == "vllm" else "../../envs/cfs.yaml"


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
        "backend": config["generation"]["backend"],
        "tensor_parallel_size": config["generation"]["tensor_parallel_size"],
        "dtype": model_settings(model).get("dtype", "auto"),
    }


def contextual_settings(model):
    return {
        key: value
        for key, value in generation_settings(model).items()
        if key != "prompt_token_id"
    }


def replay_settings():
    replay = method_config("replay")
    return {
        "corpus": replay["corpus"],
        "num_chunks": replay.get("num_chunks") or config["generation"]["num_samples"],
        "chunk_tokens": replay.get("chunk_tokens")
        or config["generation"]["max_new_tokens"],
        "prompt_token_id": config["generation"]["prompt_token_id"],
        "seed": config["study"]["seed"],
    }


def task_settings():
    return {**config["task"], "seed": config["study"]["seed"]}


def train_settings(model, cell):
    """Training settings of one cell: config.train plus the cell's method and knobs."""
    knobs = parse_cell(model, cell)
    method = knobs["method"]
    settings = {**config["train"], "seed": config["study"]["seed"]}
    if method == "lora":
        lora = method_config("lora")
        settings["learning_rate"] = (
            lora.get("learning_rate") or settings["learning_rate"]
        )
        settings["method"] = {
            "name": "lora",
            "rank": knobs["rank"],
            "alpha": lora.get("alpha") or knobs["rank"],
            "dropout": lora.get("dropout", 0.0),
            "target_modules": lora["target_modules"],
        }
    elif method in ("l2", "weighted_synthetic", "kl_to_base"):
        settings["method"] = {
            "name": method,
            **{key: knobs[key] for key in ("lambda", "ratio") if key in knobs},
        }
    else:
        settings["method"] = {"name": "full"}
    return settings


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
        "backend": evaluation["backend"],
        "model_args": evaluation["model_args"],
        "apply_chat_template": evaluation["apply_chat_template"],
        "seed": config["study"]["seed"],
        "dtype": model_settings(model).get("dtype", "auto"),
    }
