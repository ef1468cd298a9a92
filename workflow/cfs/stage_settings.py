"""What each stage's `--settings` holds, built from the config as the Snakefile sees it (the
default config, any `--configfile` merged over it, the schema's defaults filled in).

The rules (workflow/rules/common.smk), the budget, the tests and the benchmarks all build a
stage's settings here, so none of them keeps a copy that could drift. Every knob of a cell
(temperature, ratio, alpha, ...) reaches a stage in its settings, never as a flag of its
own; the flags name files.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import yaml

from cfs.errors import SettingsError
from cfs.study import METHODS, Study, parse_cell

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = REPO / "config" / "config.yaml"


def merged(base: dict, over: dict) -> dict:
    """`over` merged over a copy of `base` as `--configfile` does: key by key, lists
    replaced."""
    from snakemake.utils import update_config

    config = copy.deepcopy(base)
    update_config(config, copy.deepcopy(over))
    return config


def load_config(*overlays: Path | str | dict) -> dict:
    """config/config.yaml with each overlay (a YAML file or a dict) merged over it, the
    schema's defaults filled in."""
    from snakemake.utils import validate

    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for overlay in overlays:
        if not isinstance(overlay, dict):
            if Path(overlay).resolve() == DEFAULT_CONFIG.resolve():
                continue
            overlay = yaml.safe_load(Path(overlay).read_text()) or {}
        config = merged(config, overlay)
    validate(config, str(SCHEMA))
    return config


def digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


class StageSettings:
    """Each stage's settings for a validated config."""

    def __init__(self, config: dict, study: Study | None = None):
        self.config = config
        self.study = study or Study(config)

    def model(self, model: str) -> dict:
        if model not in self.config["models"]:
            raise SettingsError(f"config key models: no model '{model}'")
        return self.config["models"][model]

    def dtype(self, model: str) -> str:
        return self.model(model)["dtype"]

    def prepare(self, model: str) -> dict:
        """Where the model's weights come from: models.<name> without its cluster sizes
        and the dtype the stages load it in."""
        ignored = ("resources", "dtype")
        entry = self.model(model)
        if "hub_id" in entry and entry["hub_id"] is None:  # an overlay's swap to local_path
            ignored += ("hub_id",)
        return {k: v for k, v in entry.items() if k not in ignored}

    def generation(self, model: str, seed, temperature) -> dict:
        return {
            **self.config["generation"],
            "temperature": float(temperature),
            "seed": int(seed),
            "dtype": self.dtype(model),
        }

    def heldout(self, model: str) -> dict:
        """The held-out context-free samples of KL to base: evaluation.kl's count, length,
        temperature, seed and batch size, full-support sampling, in one vLLM call. Of
        generation's settings only the backend and the prompt token: its batch sizes,
        which decide how the samples are seeded, are the context-free samples' own, so a
        change there resamples no evaluation's held-out set."""
        kl, generation = self.config["evaluation"]["kl"], self.config["generation"]
        return {
            "backend": generation["backend"],
            "tensor_parallel_size": generation["tensor_parallel_size"],
            "prompt_token_id": generation["prompt_token_id"],
            "temperature": kl["temperature"],
            "num_samples": kl["num_samples"],
            "max_new_tokens": kl["max_new_tokens"],
            "top_p": 1.0,
            "seed": kl["seed"],
            "batch_size": kl["batch_size"],
            "vllm_chunk_size": kl["num_samples"],
            "dtype": self.dtype(model),
        }

    def contextual(self, model: str, seed, temperature) -> dict:
        settings = self.generation(model, seed, temperature)
        settings.pop("prompt_token_id")
        return settings

    def replay(self, seed) -> dict:
        """methods.replay without its ratios; the chunk count and length default to the
        context-free samples'."""
        replay, generation = self.study.method_options("replay"), self.config["generation"]
        return {
            **replay,
            "num_chunks": replay["num_chunks"] or generation["num_samples"],
            "chunk_tokens": replay["chunk_tokens"] or generation["max_new_tokens"],
            "prompt_token_id": generation["prompt_token_id"],
            "seed": int(seed),
        }

    def mix(self, cell: str, seed) -> dict:
        """A cell's training set: its ratio, the kind of samples its method mixes in (None
        for plain fine-tuning) and the seed that draws and shuffles them."""
        knobs = parse_cell(cell)
        kind = METHODS[knobs["method"]].samples
        return {"ratio": knobs["ratio"], "kind": kind, "seed": int(seed)}

    def wiseft(self, alpha) -> dict:
        """WiSE-FT's interpolation: alpha, the fine-tune's share of the weights."""
        return {"alpha": float(alpha)}

    def train(self, cell: str, seed) -> dict:
        """config.train, the seed and the cell's method: its name, its knobs and the
        options every cell of the method shares (methods.<name> without its sweeps)."""
        knobs = parse_cell(cell)
        name = knobs.pop("method")
        options = self.study.method_options(name)
        # without train.evaluate_at: the points along training are outputs of the job (a
        # new one is a missing output), not settings of the fine-tune
        train = {k: v for k, v in self.config["train"].items() if k != "evaluate_at"}
        settings = {**train, "seed": int(seed)}
        # the cell's own rate (a sweep's /lr suffix), else the method's, else train's
        learning_rate = knobs.pop("learning_rate", None) or options.pop("learning_rate", None)
        options.pop("learning_rate", None)
        if learning_rate:
            settings["learning_rate"] = learning_rate
        settings["method"] = {**options, **knobs, "name": name}
        return settings

    def evaluation(self, model: str, cell: str, seed) -> dict:
        """config.evaluation without the held-out samples' settings (their file is an
        input), plus the cell, the seed, the model's dtype and, for a fine-tuned model,
        the KL-to-base batch size."""
        evaluation = {k: v for k, v in self.config["evaluation"].items() if k != "kl"}
        knobs = parse_cell(cell) if cell != "base" else {"method": "base"}
        settings = {
            **evaluation,
            "cell": {"model": model, **knobs},
            "seed": int(seed),
            "dtype": self.dtype(model),
        }
        if cell != "base":
            settings["kl"] = {"batch_size": self.config["evaluation"]["kl"]["batch_size"]}
        return settings

    def environment(self, section: str) -> str:
        """The conda environment (envs/<name>.yaml) of the stage that config.<section>'s
        backend runs: vLLM pins its own torch, so it has its own. A generation backend of
        `auto` gets vLLM's, where cfs.generate picks vLLM if it can run and HF otherwise."""
        return "vllm" if self.config[section]["backend"] in ("vllm", "auto") else "cfs"

    def evaluation_key(self) -> str:
        """What names a study's evaluations: config.evaluation (tasks, metrics, harness,
        KL), hashed. Studies with the same evaluation settings share their evaluations;
        studies with others keep their own beside them, over the same fine-tunes."""
        return digest(self.config["evaluation"])

    def evaluation_path(self, model: str, evaluated: str) -> str:
        """The evaluation of `evaluated` (base, a cell, or a cell's seed<S>) under this
        study's evaluation settings, e.g. results/smollm2/evals/<key>/ratio0/seed0/eval.json.
        """
        return f"results/{model}/evals/{self.evaluation_key()}/{evaluated}/eval.json"

    def task_check(self) -> dict:
        """What the task check reads: the task folder and each task's name and metric."""
        evaluation = self.config["evaluation"]
        entries = [evaluation["target"], *evaluation["forgetting"]]
        named = [{"task": entry["task"], "metric": entry["metric"]} for entry in entries]
        return {
            "include_path": evaluation["include_path"],
            "target": named[0],
            "forgetting": named[1:],
        }

    def fetch(self) -> dict:
        """What the fetch job puts into the Hugging Face cache besides the evaluation
        datasets (cfs.fetch): the study's hub models and the task's hub dataset."""
        models = [
            {"model": model, "hub_id": settings["hub_id"], "revision": settings["revision"]}
            for model, settings in self.config["models"].items()
            if model in self.study.study["models"] and "hub_id" in settings and settings["hub_id"]
        ]
        task = None
        if self.config["task"]["source"] == "hub":
            keys = ("source", "dataset", "dataset_config", "revision", "split", "test_split")
            task = {key: self.config["task"][key] for key in keys}
        return {"models": models, "task": task}
