"""Shared fixtures of tests/unit, tests/workflow and tests/end_to_end: a tiny byte-level BPE
tokenizer trained here, tiny random-weight Llama models saved to disk (and one wrapped in
LoRA adapters), the stages' settings as the rules hand them, helpers to run Snakemake in a
throw-away copy of the repository, and the paper's two configs' dry runs, job by job.

Everything is offline and built in seconds; nothing is downloaded.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# Offline before anything imports huggingface_hub / transformers / datasets.
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_key] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine spinning
# OpenMP threads slow them down by an order of magnitude. Stages run by Snakemake still
# set their own thread count from --threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import yaml  # noqa: E402

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PACKAGE_DIR = REPO / "workflow"
if str(PACKAGE_DIR) not in sys.path:
    sys.path.insert(0, str(PACKAGE_DIR))

from cfs.artifacts import read_jsonl, write_jsonl  # noqa: E402, F401 - for the tests too
from olmo_files import OLMO_END_OF_DOC, OLMO_END_OF_DOC_ID  # noqa: E402 - gpu_check.py's too

BOS, EOS, END_OF_DOC = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [END_OF_DOC, BOS, EOS]  # ids 0, 1, 2 (as in SmolLM2)
TEMPLATE = "### Instruction:\n{query}\n\n### Response:\n"
VOCAB_SIZE = 500
# A method with a loss term of its own, as a user adds one: a Method of the table in
# cfs.study and its objective in cfs.objectives (the squared NLL of the synthetic samples).
TOY_METHOD = (
    "METHODS['toy'] = Method('toy', 'toy/temp{temperature}/ratio{ratio}/lambda{lambda}', "
    "'context_free', trains='toy_loss', claim='the toy keeps less than "
    "context-free data', paired_on=('temperature', 'ratio'))"
)
TOY_OBJECTIVE = """
@objective("toy_loss")
class SquaredSyntheticLoss(WeightedSyntheticLoss):
    name = "toy_loss"

    def __call__(self, model, step, micro_step):
        term, share = super().__call__(model, step, micro_step)
        return (None, share) if term is None else (term**2, share)
"""


# The longest modules, longest first: `make test` runs the suite in two processes, a module
# to one process (pytest-xdist's --dist loadfile, in collection order), and a process that
# finishes a module takes the next; short modules last keep the two finishing together.
LONGEST_FIRST = (
    "end_to_end/test_pipeline.py",
    "end_to_end/test_slurm.py",
    "end_to_end/test_evaluation_settings.py",
    "end_to_end/test_fsdp.py",
    "end_to_end/test_vllm_cpu.py",
    "end_to_end/test_resume.py",
    "end_to_end/test_ddp.py",
    "workflow/test_dag.py",
    "end_to_end/test_benchmarks.py",
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: end-to-end Snakemake runs (run by default; deselect with -m 'not slow')"
    )
    config.addinivalue_line(
        "markers",
        "miniature: a paper setting in miniature (`make miniatures`, after `make test` in CI)",
    )


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        try:
            module = item.path.relative_to(TESTS).as_posix()
        except ValueError:
            return len(LONGEST_FIRST)
        return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: every other module keeps its place


def pytest_collection_finish(session):
    """The collected modules' objects (torch's, transformers', lm-eval's, ...) out of the
    garbage collector's full collections, which would each walk all of them again: 14 s
    of the unit tests' 72 s in one process, 4 s with them frozen. They live as long as
    the process anyway."""
    gc.freeze()


# --------------------------------------------------------------------------- corpus


def json_leaves(value):
    """Every value of a JSON document that is no object or array, in document order."""
    if isinstance(value, dict):
        for item in value.values():
            yield from json_leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from json_leaves(item)
    else:
        yield value


def forgetting_task_texts() -> list[str]:
    """Every string in the JSONL files of the local lm-eval tasks, if any exist yet."""
    texts = []
    for path in sorted((REPO / "tasks").rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                texts.extend(v for v in json_leaves(json.loads(line)) if isinstance(v, str))
            except json.JSONDecodeError:
                continue
    return texts


def training_corpus() -> list[str]:
    from cfs.arithmetic import arithmetic_problems

    texts = []
    for record in arithmetic_problems(300, seed=0):
        texts.append(TEMPLATE.format(query=record["query"]) + record["response"])
    # The arithmetic text is weighted up so the merges keep its prompts short (< 64 tokens)
    # however much forgetting-task text there is.
    texts = texts * 3 + forgetting_task_texts()[:3000]
    texts += [
        "The capital of France is Paris. Question: Answer: True False yes no",
        "A B C D 0 1 2 3 4 5 6 7 8 9 + - * / = $ . , ? ! ( ) : ;",
    ]
    return texts


# --------------------------------------------------------------------------- tokenizers


def train_bpe_tokenizer():
    """A raw `tokenizers.Tokenizer`: byte-level BPE trained on the task text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    special_ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    assert special_ids == [0, 1, 2], f"special tokens at ids {special_ids}, expected 0, 1, 2"
    return tokenizer


@pytest.fixture(scope="session")
def bpe_tokenizer_object():
    return train_bpe_tokenizer()


def wrap_tokenizer(tokenizer_object, with_bos: bool):
    from transformers import PreTrainedTokenizerFast

    if with_bos:  # SmolLM2-like
        names = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": END_OF_DOC}
    else:  # OLMo-like: no BOS, documents end with <|endoftext|>
        names = {"eos_token": END_OF_DOC, "pad_token": END_OF_DOC, "unk_token": END_OF_DOC}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=copy.deepcopy(tokenizer_object), model_max_length=512, **names
    )
    if not with_bos:
        tokenizer.bos_token = None
    return tokenizer


@pytest.fixture(scope="session")
def tokenizer(bpe_tokenizer_object):
    """Tokenizer with BOS <|im_start|> (1), EOS and pad <|im_end|> (2), unk <|endoftext|>."""
    tok = wrap_tokenizer(bpe_tokenizer_object, with_bos=True)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    return tok


@pytest.fixture(scope="session")
def tokenizer_no_bos(bpe_tokenizer_object):
    """OLMo-like tokenizer: no BOS; EOS (= end of document) <|endoftext|> (0)."""
    tok = wrap_tokenizer(bpe_tokenizer_object, with_bos=False)
    assert (tok.bos_token_id, tok.eos_token_id) == (None, 0)
    return tok


# --------------------------------------------------------------------------- models


def build_tiny_model(tokenizer, out_dir: Path, seed: int = 0, edit=None, **shape) -> Path:
    """A random-weight 2-layer Llama with the tokenizer's special ids, saved with it;
    `shape` overrides its sizes, and `edit(model)` changes its weights before the save."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    sizes = {"hidden_size": 32, "intermediate_size": 64, **shape}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **sizes,
    )
    model = LlamaForCausalLM(config)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    return build_tiny_model(tokenizer, tmp_path_factory.mktemp("tiny_model") / "model")


@pytest.fixture(scope="session")
def tiny_model_no_bos_dir(tmp_path_factory, tokenizer_no_bos) -> Path:
    return build_tiny_model(tokenizer_no_bos, tmp_path_factory.mktemp("tiny_olmo") / "model")


@pytest.fixture(scope="session")
def perturbed_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with every weight moved by seeded noise (std 0.05): another model of
    the same shape, as a fine-tune would leave it."""
    import torch
    from cfs.modeling import load_model, load_tokenizer

    out = tmp_path_factory.mktemp("perturbed") / "model"
    model = load_model(tiny_model_dir, "float32")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(out)
    load_tokenizer(tiny_model_dir).save_pretrained(out)
    return out


# --------------------------------------------------------------------------- records


def task_records(count: int, seed: int) -> list[dict]:
    """`count` arithmetic problems (cfs.arithmetic, `seed`) as task records of a training set."""
    from cfs.arithmetic import arithmetic_problems, render

    return [
        {"kind": "task", "prompt": r["prompt"], "response": r["response"]}
        for r in render(arithmetic_problems(count, seed=seed), TEMPLATE)
    ]


def context_free_samples(
    count: int, tokens=(60, 70, 80, 90, 100), kind: bool = True, index: bool = True
) -> list[dict]:
    """`count` context-free samples after prompt token 1, cut at the length limit: the i-th
    holds t + i for each t in `tokens`. With `kind` each names its kind, as the records of
    a training set do (cfs.mix); with `index`, its number, as cfs.generate writes it."""
    return [
        {
            **({"kind": "context_free"} if kind else {}),
            **({"index": i} if index else {}),
            "prompt_token_id": 1,
            "token_ids": [token + i for token in tokens],
            "finish_reason": "length",
        }
        for i in range(count)
    ]


# --------------------------------------------------------------------------- helpers


def model_weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    weights = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        weights.update(load_file(shard))
    assert weights, f"no safetensors weights in {model_dir}"
    return weights


def assert_same_weights(expected_dir: Path, actual_dir: Path) -> None:
    """Every tensor of the two model folders bit for bit equal."""
    import torch

    expected, actual = model_weights(expected_dir), model_weights(actual_dir)
    assert sorted(actual) == sorted(expected), "the two folders hold different tensors"
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert different == [], f"tensors of {actual_dir} differ from {expected_dir}: {different}"


def assert_weights_differ(first_dir: Path, second_dir: Path) -> None:
    """At least one tensor of the two model folders differs."""
    import torch

    first, second = model_weights(first_dir), model_weights(second_dir)
    same = all(torch.equal(first[name], second[name]) for name in first)
    assert not same, f"every tensor of {second_dir} equals {first_dir}'s"


def lora_model(model_dir, dtype=None):
    """The model in `model_dir` (float32 unless `dtype`) with LoRA adapters on q_proj and
    down_proj as cfs.train adds them, their B matrices non-zero so that a merge changes
    the weights."""
    import torch
    from cfs import objectives
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    method = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "down_proj"]}
    peft_model = objectives.add_lora(model, method, seed=0)
    torch.manual_seed(1)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters something to merge
            torch.nn.init.normal_(parameter, std=0.1)
    return peft_model


def copy_repo(dest: Path) -> Path:
    """The files Snakemake needs (Snakefile, workflow/, config/, tasks/), nothing built."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "Snakefile", dest / "Snakefile")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("workflow", "config", "tasks"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    for name in ("envs",):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dest / name, ignore=ignore)
    return dest


def default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def validated_config(config: dict | None = None) -> dict:
    """A config (the default one unless given) with the schema's defaults filled in, as
    the Snakefile sees it."""
    from snakemake.utils import validate

    config = default_config() if config is None else config
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    return config


def stage_settings(config: dict | None = None):
    """The stages' settings as the rules hand them (cfs.stage_settings) for a config (the
    default one unless given), with the schema's defaults filled in."""
    from cfs.stage_settings import StageSettings

    return StageSettings(validated_config(copy.deepcopy(config) if config else None))


def evaluation_path(config: dict, model: str, evaluated: str) -> str:
    """Where a config's evaluation of `evaluated` (base, a cell, a cell's seed<S>) goes."""
    return stage_settings(config).evaluation_path(model, evaluated)


STAGE_KEYS = ("seed", "dtype", "cell", "kl")  # what the rules add to config.evaluation


def evaluation_settings(**overrides) -> dict:
    """cfs.evaluate's settings for the tiny model's base evaluation: the default
    config.evaluation with `overrides` merged in, and any of STAGE_KEYS given replacing
    what the rules add."""
    stage = {key: overrides.pop(key) for key in STAGE_KEYS if key in overrides}
    config = default_config()
    config["evaluation"].update(overrides)
    config["models"]["tiny"] = {"local_path": "tiny"}
    return {**stage_settings(config).evaluation("tiny", "base", 0), **stage}


def task_entry(**entry) -> dict:
    """An evaluation task entry with the schema's defaults for its options."""
    return evaluation_settings(target=entry)["target"]


def task_settings(**task) -> dict:
    """cfs.data's settings: `task` with the schema's defaults (the rule hands config.task)."""
    config = default_config()
    config["task"] = task
    return validated_config(config)["task"]


def model_settings(**model) -> dict:
    """cfs.prepare_model's settings for a model entry `model`."""
    config = default_config()
    config["models"] = {"tiny": model}
    return stage_settings(config).prepare("tiny")


def generation_settings(**overrides) -> dict:
    """cfs.generate's settings for the default model's seed 0, `overrides` on top."""
    return {**stage_settings().generation("smollm2", 0, 1.0), **overrides}


def train_settings(**overrides) -> dict:
    """cfs.train's settings for plain fine-tuning's seed 0 at train.learning_rate,
    `overrides` on top, and no forgetting curves unless a test asks (they need held-out
    data)."""
    config = default_config()
    config["methods"]["plain"] = {"learning_rates": []}
    settings = stage_settings(config).train("ratio0", 0)
    return {**settings, "curve_every": 0, **overrides}


def quick_train_settings(**overrides) -> dict:
    """train_settings for a few quick steps on the tiny model: a learning rate of 5e-3 held
    constant from the first step, one epoch in steps of 4 examples (micro-batches of 2) of
    at most 64 tokens, the loss logged at every step; `overrides` on top."""
    quick = dict(
        learning_rate=5e-3,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        epochs=1,
        batch_size=4,
        micro_batch_size=2,
        max_length=64,
        logging_steps=1,
    )
    return train_settings(**{**quick, **overrides})


def fine_tune_into(folder: Path, model_dir, data, settings: dict, **inputs) -> tuple[Path, dict]:
    """cfs.train.fine_tune of the model in `model_dir` on `data` with `settings`, its
    checkpoints in folder/checkpoints and the model in folder/model; `inputs`: the other
    arguments (synthetic, heldout, target_test). The model's folder and the run's summary."""
    from cfs import train

    checkpoints, model = Path(folder) / "checkpoints", Path(folder) / "model"
    return model, train.fine_tune(model_dir, data, settings, checkpoints, model, **inputs)


def is_complete(checkpoint: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint whose state file reads whole
    is complete (read while the Trainer writes or rotates checkpoints)."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def complete_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints in `folder`, by step."""
    if not folder.is_dir():
        return []
    return sorted(
        (path for path in folder.glob("checkpoint-*") if is_complete(path)),
        key=lambda path: int(path.name.split("-")[1]),
    )


def train_log(model_dir: Path) -> dict:
    """The train_log.json cfs.train writes beside a fine-tuned model."""
    return json.loads((Path(model_dir) / "train_log.json").read_text())


def method_options(name: str, section: dict) -> dict:
    """methods.<name> as the schema fills it in from `section`, without its sweeps: what
    every cell of the method shares (cfs.study.Study.method_options)."""
    config = default_config()
    config.setdefault("methods", {})[name] = section
    return stage_settings(config).study.method_options(name)


def replay_settings(corpus: dict, **overrides) -> dict:
    """cfs.replay's settings for seed 0 with `corpus`, 8 chunks of 16 tokens unless
    overridden."""
    config = default_config()
    config["methods"]["replay"] = {"corpus": corpus}
    settings = stage_settings(config).replay(0)
    return {**settings, "num_chunks": 8, "chunk_tokens": 16, **overrides}


def snakemake_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        MPLBACKEND="Agg",
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
    )
    env.pop("HF_TOKEN", None)
    env.update(extra or {})
    return env


def run_snakemake(cwd: Path, *args: str, timeout: int = 600, env: dict | None = None):
    """`python -m snakemake ARGS` in `cwd`; returns the CompletedProcess (text, merged)."""
    return subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=cwd,
        env=env or snakemake_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def failure_report(repo: Path, result) -> str:
    """The end of a Snakemake run's output and of every job log that shows an error."""
    logs = []
    for log in sorted((repo / "results" / "logs").rglob("*.log")):
        text = log.read_text(errors="replace")
        if "Error" in text or "Traceback" in text:
            logs.append(f"--- {log}\n{text[-2500:]}")
    return result.stdout[-4000:] + "\n" + "\n".join(logs)


def job_stats(output: str) -> dict[str, int]:
    """Parse Snakemake's "Job stats" table into {rule: count} (without the total)."""
    if "Nothing to be done" in output:
        return {}
    match = re.search(r"Job stats:\n(.*?)\n\s*\n", output + "\n\n", re.S)
    assert match, f"no 'Job stats' table in Snakemake output:\n{output[-3000:]}"
    counts = {}
    for line in match.group(1).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    counts.pop("total", None)
    return counts


# --------------------------------------------------------------------------- the rules

# The rule that makes each kind of samples (cfs.study.SAMPLE_KINDS), once per model, knob
# values and seed.
SAMPLE_RULES = {
    "context_free": "generate_context_free",
    "contextual": "generate_contextual",
    "replay": "replay_chunks",
}
# The rules of the model stages (generation, fine-tuning, evaluation): each runs on
# config.threads threads, and on GPUs where there are some.
MODEL_STAGE_RULES = (
    "generate_context_free",
    "generate_heldout",
    "generate_contextual",
    "fine_tune",
    "evaluate_base",
    "evaluate_finetuned",
)


def expected_jobs(config: dict) -> dict[str, int]:
    """Per-rule job counts of a (validated) config's full grid, from the grid arithmetic
    on cfs.study's methods: each method's cells are the product of its knobs' values
    (methods.<name>.<knob>s, else study.<knob>s; ratio 0 is plain fine-tuning's). Per model
    and seed: each kind of samples once per temperature its cells use (replay once), one
    mix per mixing cell plus one of the task set if any cell trains on it, a fine-tune per
    trained cell, a WiSE-FT merge per other cell, an eval per cell; per model the base eval,
    the held-out samples and a summary over seeds per cell; the task's data, the task check,
    the fetch (where the study reads from the hub), the tables and `all` once. (The
    figures, once per model, are not counted.)"""
    from cfs.fetch import reads_the_hub
    from cfs.study import METHODS

    config = validated_config(copy.deepcopy(config))
    study, sections = config["study"], config.get("methods", {})
    seeds = study["seeds"]
    num_seeds = 1 if isinstance(seeds, int) else len(seeds)

    def values(method: str, knob: str) -> list:
        listed = sections.get(method, {}).get(f"{knob}s") or study.get(f"{knob}s") or []
        return [value for value in listed if knob != "ratio" or value > 0]

    cells = {"plain": 1 if 0 in study["ratios"] else 0}
    for name in study["methods"]:
        count = 1
        for knob in METHODS[name].knobs:
            count *= len(values(name, knob))
        cells[name] = count
    for name in cells:  # a trained cell again at each of its extra learning rates
        if METHODS[name].trains:
            cells[name] *= 1 + len(sections.get(name, {}).get("learning_rates") or [])
    used = [name for name, count in cells.items() if count]
    temperatures = {kind: set() for kind in SAMPLE_RULES}
    for name in used:
        spec = METHODS[name]
        if spec.samples is not None:
            knob = "temperature" in spec.knobs
            temperatures[spec.samples] |= set(values(name, "temperature")) if knob else {None}
    trained = sum(cells[name] for name in used if METHODS[name].trains)
    mixed = sum(cells[name] for name in used if METHODS[name].mixes)
    on_task_set = any(METHODS[name].trains and not METHODS[name].mixes for name in used)
    per_seed = {SAMPLE_RULES[kind]: len(temps) for kind, temps in temperatures.items()}
    per_seed.update(
        mix_at_ratio=mixed + (1 if on_task_set else 0),
        fine_tune=trained,
        interpolate_wiseft=sum(cells[name] for name in used if not METHODS[name].trains),
        # each cell's eval, and each fine-tune's at every point along training
        evaluate_finetuned=sum(cells.values()) + trained * len(config["train"]["evaluate_at"]),
    )
    per_model = {rule: count * num_seeds for rule, count in per_seed.items()}
    per_model.update(
        prepare_model=1, evaluate_base=1, generate_heldout=1, summarise_seeds=sum(cells.values())
    )
    jobs = {rule: count * len(study["models"]) for rule, count in per_model.items()}
    jobs.update(check_evaluation_tasks=1, prepare_task_data=1, summary_table=1, all=1)
    hub_models = [model for model in study["models"] if config["models"][model].get("hub_id")]
    include = config["evaluation"]["include_path"]
    folders = [include] if isinstance(include, str) else list(include or [])
    evaluation = {**config["evaluation"], "include_path": [str(REPO / f) for f in folders]}
    fetch = {"models": hub_models, "task": config["task"]["source"] == "hub"}
    jobs["fetch_from_hub"] = int(reads_the_hub(fetch, evaluation))
    return {rule: count for rule, count in jobs.items() if count}


# --------------------------------------------------------------------------- the paper's configs

PAPER_CONFIGS = {"olmo": "config/olmo.yaml", "reasoning": "config/reasoning.yaml"}
DAY_MINUTES = 24 * 60  # a 24-hour Slurm partition's time limit


def jobs(output: str) -> list[tuple[str, str]]:
    """(rule, block) of each job in a dry run's output."""
    blocks = re.split(r"^(?=(?:local)?rule \w+:)", output, flags=re.M)
    return [(re.match(r"(?:local)?rule (\w+):", block).group(1), block) for block in blocks[1:]]


@pytest.fixture(scope="session")
def dry_runs(tmp_path_factory):
    """{config name: jobs(...)} of a dry run (-n -p all) of each of PAPER_CONFIGS."""
    repo = copy_repo(tmp_path_factory.mktemp("paper_dry_runs") / "repo")
    runs = {}
    for name, path in PAPER_CONFIGS.items():
        result = run_snakemake(repo, "-n", "-p", "all", "--configfile", path, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:]
        runs[name] = jobs(result.stdout)
    return runs


# --------------------------------------------------------------------------- a tiny study

MODEL = "tiny"  # the model key of the tiny studies
FORGETTING = ["cfs_capitals", "cfs_antonyms", "cfs_categories"]


def tiny_config(model_dir) -> dict:
    """A tiny study of plain fine-tuning and context-free data on the tiny model in
    `model_dir`, evaluated on 4 items of the target and of 3 local forgetting tasks."""
    config = default_config()
    config["study"] = {
        "models": [MODEL],
        "temperatures": [0.7, 1.0],
        "ratios": [0, 0.5],
        "seeds": [0],
        "methods": ["context_free"],
    }
    config["methods"] = {"plain": {"learning_rates": []}}  # the default's second rate: off
    config["claims"] = {
        "primary": {"cell": "temp1/ratio0.5", "versus": "ratio0"},
        "matched_target_gain": None,
    }
    config["models"] = {MODEL: {"local_path": str(model_dir)}}
    config["task"].update(num_train=16, num_test=8)
    config["generation"].update(num_samples=8, max_new_tokens=12, batch_size=8)
    # one evaluation per fine-tune, at its end; no matched-gain claims (a test sets them)
    config["train"].update(
        epochs=1, batch_size=4, micro_batch_size=4, max_length=64, evaluate_at=[]
    )
    evaluation = config["evaluation"]
    evaluation.update(limit=4, batch_size=8)
    evaluation["forgetting"] = [{"task": t, "metric": "p_correct,none"} for t in FORGETTING]
    evaluation.setdefault("kl", {}).update(num_samples=4, max_new_tokens=12)
    return config


# --------------------------------------------------------------------------- real-model ids

LLAMA_BOS, LLAMA_BOS_ID = "<｜begin▁of▁sentence｜>", 128000
LLAMA_EOS, LLAMA_EOS_ID = "<｜end▁of▁sentence｜>", 128001


def tokenizer_with_ids(special: dict[str, int], **names):
    """A word-level tokenizer whose special tokens sit at the given (real-model) ids, with a
    few ordinary words at the free small ids; built locally in milliseconds."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "Hello", "world", "The", "answer", "is", ":", "4", "<think>", "</think>"]
    free_ids = (
        index for index in range(len(words) + len(special)) if index not in special.values()
    )
    vocab = {**dict(zip(words, free_ids, strict=False)), **special}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.add_special_tokens([AddedToken(token, special=True) for token in special])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", **names)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in special}
    assert ids == special, f"special tokens at {ids}, expected {special}"
    return tokenizer


@pytest.fixture(scope="session")
def olmo_like_tokenizer():
    """OLMo-1B's special tokens: no BOS; documents end with <|endoftext|> = 50279 (EOS)."""
    tokenizer = tokenizer_with_ids(
        {OLMO_END_OF_DOC: OLMO_END_OF_DOC_ID, "<|padding|>": 1},
        eos_token=OLMO_END_OF_DOC,
        pad_token="<|padding|>",
    )
    assert tokenizer.bos_token_id is None, f"BOS id {tokenizer.bos_token_id}, expected none"
    return tokenizer


@pytest.fixture(scope="session")
def llama_like_tokenizer():
    """DeepSeek-R1-Distill-Llama-8B's: BOS 128000, EOS 128001, and its chat markers."""
    tokenizer = tokenizer_with_ids(
        {
            LLAMA_BOS: LLAMA_BOS_ID,
            LLAMA_EOS: LLAMA_EOS_ID,
            "<｜User｜>": 128011,
            "<｜Assistant｜>": 128012,
        },
        bos_token=LLAMA_BOS,
        eos_token=LLAMA_EOS,
    )
    return tokenizer
