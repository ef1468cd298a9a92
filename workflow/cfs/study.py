"""The grammar of the study, once: each method's path below results/{model}/, its knobs,
the samples and training set it needs, how it trains (or that it does not), and the grid
of cells and seeds a config asks for. The Snakemake rules (workflow/rules/common.smk),
cfs.train, cfs.report and the cluster resources all derive from this module.

A cell is one point of the grid (a method and its knob values); each cell runs once per
seed of `study.seeds`, under `<cell>/seed<S>/`, and `<cell>/eval.json` stands for the
cell over its seeds. A trained cell may end in `/lr<rate>` (a learning rate of
`methods.<name>.learning_rates`, trained instead of train.learning_rate) and then in
`/at<fraction>` (its model after that fraction of the optimizer steps, train.evaluate_at:
a point along training, evaluated like a cell).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

import numpy as np

NUMBER = r"\d+(?:\.\d+)?"
NONZERO = r"(?!0+(?:\.0+)?(?![\d.]))\d+(?:\.\d+)?"  # a number that is not zero
INTEGER = r"[1-9]\d*"

# Each knob: the pattern of its values in paths, its config list (under methods.<name>,
# else under study) and how the report labels it.
KNOB_PATTERNS = {
    "temperature": NUMBER,
    "ratio": NONZERO,
    "rank": INTEGER,
    "lambda": NUMBER,
    "alpha": NUMBER,
    "learning_rate": NUMBER,
    "fraction": NUMBER,
}
KNOB_LABELS = {
    "temperature": "T",
    "ratio": "r",
    "rank": "rank",
    "lambda": "λ",
    "alpha": "α",
    "learning_rate": "lr",
    "fraction": "at",
}
# The optional suffixes of a trained cell, in path order: knob -> its path prefix.
TRAINING_SUFFIXES = {"learning_rate": "lr", "fraction": "at"}

# What each knob means, for the claims that ask whether it matters.
KNOB_MEANINGS = {"temperature": "the generation temperature", "ratio": "the data ratio"}


@dataclass(frozen=True)
class SampleKind:
    """Samples a method draws from the base model (or a corpus), once per (model, knobs,
    seed) and shared by every cell that uses them.

    path: below results/{model}/, with {knob} and {seed} fields.
    fields: what a record holds for its training example (cfs.mix keeps these).
    prompt: the record field with the tokens before the sample, never trained on: the
        context-free prompt token, or the task prompt a contextual sample answers.
    """

    name: str
    path: str
    fields: tuple[str, ...]
    prompt: str

    def prompt_ids(self, record: dict) -> list[int]:
        value = record[self.prompt]
        return list(value) if isinstance(value, list) else [value]


SAMPLE_KINDS = {
    kind.name: kind
    for kind in (
        SampleKind(
            "context_free",
            "temp{temperature}/seed{seed}/context_free.jsonl",
            ("prompt_token_id", "token_ids", "finish_reason"),
            prompt="prompt_token_id",
        ),
        SampleKind(
            "contextual",
            "contextual/temp{temperature}/seed{seed}/samples.jsonl",
            ("prompt", "prompt_token_ids", "token_ids", "finish_reason"),
            prompt="prompt_token_ids",
        ),
        SampleKind(
            "replay",
            "replay/seed{seed}/chunks.jsonl",
            ("prompt_token_id", "token_ids", "finish_reason"),
            prompt="prompt_token_id",
        ),
    )
}


@dataclass(frozen=True)
class Method:
    """One method of the study.

    path: the cell's folder below results/{model}/, with {knob} fields.
    samples: the samples it needs (a key of SAMPLE_KINDS), or None.
    mixes: the samples are mixed into the training set; otherwise the cell trains on the
        plain task set and the samples (if any) feed a separate loss term.
    trains: cfs.train's objective ("full", "lora", "l2", "weighted_synthetic",
        "kl_to_base"); None for a method that derives its model without training.
    stage: the resources stage of the job that makes the model (train or merge).
    claim: what the study claims of context-free data against this method, if anything;
        each context-free cell is compared with each of this method's cells that share
        its `paired_on` knobs (cfs.report's verdicts).
    claim_kind: "keeps_more" (context-free data keeps more of the base model) or
        "approximates" (context-free data does what this method does, within a margin).
    estimates: a method whose loss term this one's samples estimate without bias; each of
        its cells is compared with that method's cell at the same temperature, ratio
        (samples per step) and lambda ("approximates").
    """

    name: str
    path: str
    samples: str | None = None
    mixes: bool = False
    trains: str | None = "full"
    stage: str = "train"
    claim: str | None = None
    paired_on: tuple[str, ...] = ()
    claim_kind: str = "keeps_more"
    estimates: str | None = None

    @property
    def knobs(self) -> tuple[str, ...]:
        return tuple(field for _, field, _, _ in string.Formatter().parse(self.path) if field)

    @property
    def synthetic_term(self) -> bool:
        """Its samples feed a loss term of their own instead of the training set."""
        return self.samples is not None and not self.mixes

    def pattern(self, named: bool = True, suffixes=("learning_rate", "fraction")) -> str:
        """The cell path as a regular expression (named groups for the knobs), with the
        optional training suffixes of `suffixes` where the method trains."""
        parts = []
        for literal, field, _, _ in string.Formatter().parse(self.path):
            parts.append(re.escape(literal))
            if field:
                parts.append(knob_group(field, named))
        if self.trains:
            for knob in suffixes:
                group = knob_group(knob, named)
                parts.append(f"(?:/{TRAINING_SUFFIXES[knob]}{group})?")
        return "".join(parts)


def knob_group(knob: str, named: bool) -> str:
    value = KNOB_PATTERNS[knob]
    return f"(?P<{knob}>{value})" if named else f"(?:{value})"


# The method the study is about: every claim compares it with another cell.
PROPOSED = "context_free"
METHODS = {
    method.name: method
    for method in (
        Method(
            "plain",
            "ratio0",
            claim="context-free data forgets less than plain fine-tuning",
        ),
        Method("context_free", "temp{temperature}/ratio{ratio}", "context_free", mixes=True),
        Method(
            "contextual",
            "contextual/temp{temperature}/ratio{ratio}",
            "contextual",
            mixes=True,
            claim="contextual synthetic data keeps less than context-free data",
            paired_on=("temperature", "ratio"),
        ),
        Method(
            "replay",
            "replay/ratio{ratio}",
            "replay",
            mixes=True,
            claim="pretraining replay keeps less than context-free data",
            paired_on=("ratio",),
        ),
        # every baseline that runs gets a verdict, whatever its sign: "contradicted" says
        # the baseline keeps more than context-free data
        Method(
            "lora",
            "lora/rank{rank}",
            trains="lora",
            claim="context-free data keeps more than LoRA",
        ),
        Method(
            "l2",
            "l2/lambda{lambda}",
            trains="l2",
            claim="context-free data keeps more than L2 toward the original weights",
        ),
        Method(
            "wiseft",
            "wiseft/alpha{alpha}",
            trains=None,
            stage="merge",
            claim="context-free data keeps more than WiSE-FT",
        ),
        Method(
            "weighted_synthetic",
            "cf_weighted/temp{temperature}/ratio{ratio}/lambda{lambda}",
            "context_free",
            trains="weighted_synthetic",
            claim="mixing the samples in does what the same samples as a weighted term do",
            paired_on=("temperature", "ratio"),
            claim_kind="approximates",
            estimates="kl_to_base",
        ),
        Method(
            "kl_to_base",
            "kl_to_base/temp{temperature}/ratio{ratio}/lambda{lambda}",
            "context_free",
            trains="kl_to_base",
            claim="context-free data approximates the exact KL penalty",
            paired_on=("temperature", "ratio"),
            claim_kind="approximates",
        ),
    )
}
# Cluster resources (workflow/rules/resources.smk): models.<name>.resources holds KEYs, and
# sections of them for a STAGE or, for a fine-tune, a METHOD (a LoRA fine-tune may fit one
# GPU): {gpus: 1, train: {gpus: 8}, lora: {gpus: 1}}.
RESOURCE_KEYS = ("gpus", "cpus_per_task", "mem_mb", "runtime")
STAGES = ("prepare", "merge", "generate", "train", "evaluate")
PLAIN_CELL = METHODS["plain"].path


def report_order() -> list[str]:
    """The report's rows and legends: the base model, then the methods in table order."""
    return ["base", *METHODS]


def trainers() -> list[str]:
    return sorted({m.trains for m in METHODS.values() if m.trains})


def resource_sections() -> list[str]:
    """What models.<name>.resources may hold sections for: a stage, or a trained method."""
    return [*STAGES, *(name for name, m in METHODS.items() if m.trains)]


def model_resource(config: dict, model, stage: str, key: str, method=None, default=None):
    """models.<model>.resources for a job of `stage` (of `method`, a fine-tune): the first
    of resources.<method>.<key>, resources.<stage>.<key> and resources.<key> it sets, else
    `default`."""
    resources = config["models"].get(model, {}).get("resources", {})
    for section in (method, stage):
        if key in (resources.get(section) or {}):
            return resources[section][key]
    return resources.get(key, default)


def check_resources(model: str, resources: dict) -> None:
    """Each key a resource, or a stage's or trained method's section of resources."""
    sections = resource_sections()
    for key, value in resources.items():
        if key in RESOURCE_KEYS:
            continue
        if key not in sections or not isinstance(value, dict):
            raise ValueError(
                f"config key models.{model}.resources.{key}: not a resource "
                f"({', '.join(RESOURCE_KEYS)}) nor a section {{KEY: value}} of "
                f"{', '.join(sections)}"
            )
        for name in value:
            if name not in RESOURCE_KEYS:
                raise ValueError(
                    f"config key models.{model}.resources.{key}.{name}: not a resource "
                    f"(one of {', '.join(RESOURCE_KEYS)})"
                )


def alternatives(methods, suffixes=("learning_rate", "fraction")) -> str:
    """One regular expression matching the cells of any of `methods` (trained cells with
    the optional suffixes of `suffixes`)."""
    return "|".join(METHODS[name].pattern(False, suffixes) for name in methods)


def fmt(value) -> str:
    """A number as it appears in paths: 0.5 -> '0.5', 1.0 -> '1', 1e6 -> '1000000'."""
    return np.format_float_positional(float(value), trim="-")


def untrained_part(cell: str) -> str:
    """The cell without its training suffixes: 'temp1/ratio1/lr0.0002/at0.5' ->
    'temp1/ratio1', whose training set it shares."""
    return re.sub(r"(/(lr|at)\d+(?:\.\d+)?)+$", "", cell)


def parse_cell(cell: str) -> dict:
    """The method and knobs of a cell path: 'temp1/ratio0.5' -> context_free, T 1, r 0.5."""
    for method in METHODS.values():
        match = re.fullmatch(method.pattern(), cell)
        if match:
            knobs = {
                key: int(value) if key == "rank" else float(value)
                for key, value in match.groupdict().items()
                if value is not None
            }
            if method.name == "plain":
                knobs["ratio"] = 0.0
            return {"method": method.name, **knobs}
    raise ValueError(f"not a grid cell: {cell!r}")


# Where replay's documents come from: exactly one of these keys of methods.replay.corpus.
REPLAY_SOURCES = ("python_stdlib", "files", "hub_dataset")


def replay_sources(config: dict) -> list[str]:
    """The keys of methods.replay.corpus that name a source (set, not null)."""
    corpus = config.get("methods", {}).get("replay", {}).get("corpus") or {}
    return [key for key in REPLAY_SOURCES if corpus.get(key)]


class Study:
    """The grid a (validated) config asks for."""

    def __init__(self, config: dict):
        self.config = config
        self.study = config["study"]

    @property
    def name(self) -> str:
        """The study's name: its tables and figures go to results/studies/<name>/."""
        return self.study["name"]

    @property
    def methods(self) -> list[str]:
        return self.study["methods"]

    @property
    def seeds(self) -> list[int]:
        seeds = self.study["seeds"]
        return [seeds] if isinstance(seeds, int) else list(seeds)

    def learning_rates(self, method: str) -> list[float]:
        """methods.<method>.learning_rates: rates a trained method also runs at, each a
        cell of its own (`<cell>/lr<rate>`) beside the one at the configured rate."""
        return list(self.config.get("methods", {}).get(method, {}).get("learning_rates") or [])

    @property
    def evaluate_at(self) -> list[float]:
        """train.evaluate_at: the fractions of a fine-tune's steps its model is evaluated at."""
        return list(self.config["train"].get("evaluate_at") or [])

    def knob_values(self, method: str, knob: str) -> list:
        """methods.<method>.<knob>s, else study.<knob>s; ratios without 0."""
        plural = f"{knob}s"
        values = self.config.get("methods", {}).get(method, {}).get(plural)
        if not values:
            values = self.study.get(plural) or []
        return [value for value in values if knob != "ratio" or value > 0]

    def method_options(self, method: str) -> dict:
        """methods.<method> without its sweeps (the lists of knob values): what every cell
        of the method shares, so adding a value to a sweep changes no other cell's job."""
        section = self.config.get("methods", {}).get(method, {})
        sweeps = {f"{knob}s" for knob in KNOB_PATTERNS} | {"learning_rates"}
        return {key: value for key, value in section.items() if key not in sweeps}

    def method_cells(self, method: str) -> list[str]:
        """The method's cells, each trained one also at each of its extra learning rates."""
        spec = METHODS[method]
        if method == "plain":
            cells = [spec.path] if 0 in self.study["ratios"] else []
        else:
            grids = [[]]
            for knob in spec.knobs:
                values = self.knob_values(method, knob)
                grids = [g + [(knob, value)] for g in grids for value in values]
            cells = [spec.path.format(**{k: fmt(v) for k, v in grid}) for grid in grids]
        rates = self.learning_rates(method) if spec.trains else []
        return [*cells, *(f"{cell}/lr{fmt(rate)}" for cell in cells for rate in rates)]

    def cells(self) -> list[str]:
        """Every cell: plain fine-tuning (ratio 0) and each configured method's."""
        return [cell for name in ["plain", *self.methods] for cell in self.method_cells(name)]

    def point_cells(self) -> list[str]:
        """Every trained cell's points along training (`<cell>/at<fraction>`)."""
        return [
            f"{cell}/at{fmt(fraction)}"
            for cell in self.cells()
            if METHODS[parse_cell(cell)["method"]].trains
            for fraction in self.evaluate_at
        ]

    def seeded(self, path: str) -> list[str]:
        return [path.format(seed=seed) for seed in self.seeds]

    def check_primary_claim(self) -> None:
        """claims.primary, when set, names a context-free cell and a cell it is compared
        with (cfs.report's verdicts), both in the grid."""
        primary = self.config["claims"]["primary"]
        if primary is None:
            return
        cells = self.cells()
        for key in ("cell", "versus"):
            if primary[key] not in cells:
                raise ValueError(
                    f"config key claims.primary.{key}: {primary[key]!r} is not a cell of the "
                    f"study (its cells: {', '.join(cells)})"
                )
        cell, versus = parse_cell(primary["cell"]), parse_cell(primary["versus"])
        other = METHODS[versus["method"]]
        compared = cell["method"] == PROPOSED and (
            (other.claim and all(cell.get(k) == versus.get(k) for k in other.paired_on))
            or versus["method"] == PROPOSED
            and sum(cell[k] != versus[k] for k in METHODS[PROPOSED].knobs) == 1
        )
        if not compared:
            raise ValueError(
                f"config key claims.primary: {primary['cell']} versus {primary['versus']} is "
                "no comparison the study makes (a context-free cell against plain, a method "
                "with a claim at the same paired knobs, or another context-free cell)"
            )

    def check(self) -> None:
        """What the schema cannot say; the message names the config key."""
        for model in self.study["models"]:
            if model not in self.config["models"]:
                raise ValueError(
                    f"config key study.models: unknown model '{model}' "
                    f"(known under `models`: {', '.join(sorted(self.config['models']))})"
                )
        configurable = [name for name in METHODS if name != "plain"]  # plain: ratio 0
        for name in self.methods:
            if name not in configurable:
                raise ValueError(
                    f"config key study.methods: unknown method '{name}' "
                    f"(known: {', '.join(configurable)})"
                )
        for name, section in self.config.get("methods", {}).items():
            if name not in METHODS:
                raise ValueError(
                    f"config key methods.{name}: unknown method (known: {', '.join(METHODS)})"
                )
            if name == "plain" and set(section) - {"learning_rates"}:
                raise ValueError(
                    "config key methods.plain: plain fine-tuning takes only learning_rates "
                    "(its other settings are under `train`)"
                )
            if section.get("learning_rates") and not METHODS[name].trains:
                raise ValueError(f"config key methods.{name}.learning_rates: {name} does not train")
        for name in self.methods:
            spec = METHODS[name]
            if "ratio" in spec.knobs and "temperature" in spec.knobs:
                if self.knob_values(name, "ratio") and not self.knob_values(name, "temperature"):
                    raise ValueError(
                        "config key study.temperatures: empty, but study.ratios has non-zero "
                        f"ratios that need {name} samples"
                    )
            missing = [k for k in spec.knobs if not self.knob_values(name, k)]
            if missing and "ratio" not in spec.knobs:
                raise ValueError(
                    f"config key methods.{name}.{missing[0]}s: {name} needs at least one value"
                )
        if "wiseft" in self.methods and 0 not in self.study["ratios"]:
            raise ValueError(
                "config key study.ratios: WiSE-FT interpolates the plain fine-tune, so the "
                "ratios need 0"
            )
        if "replay" in self.methods:
            chosen = replay_sources(self.config)
            if len(chosen) != 1:
                raise ValueError(
                    f"config key methods.replay.corpus: set exactly one of "
                    f"{', '.join(REPLAY_SOURCES)} (set: {', '.join(chosen) or 'none'})"
                )
        for model, settings in self.config["models"].items():
            check_resources(model, settings.get("resources", {}))
        self.check_primary_claim()
        num_train = self.config["task"].get("num_train", 0)
        for name in self.methods:
            if METHODS[name].samples not in ("context_free", "contextual") or not num_train:
                continue
            ratios = self.knob_values(name, "ratio")
            needed = round(max(ratios, default=0) * num_train)
            if needed > self.config["generation"]["num_samples"]:
                raise ValueError(
                    f"config key generation.num_samples: "
                    f"{self.config['generation']['num_samples']} is fewer than ratio "
                    f"{max(ratios)} x task.num_train {num_train} = {needed} ({name})"
                )
