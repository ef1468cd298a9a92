"""A production check on one GPU: the stage commands the rules emit for the OLMo setting in
miniature, run one after another as Snakemake would run them, and a 2-process `torchrun`
FSDP fine-tune, reporting each stage's time, peak memory, and a fine-tune's tokens/s and
MFU.

    python benchmarks/gpu_check.py --quick                # tiny, on CPU (the test suite)
    python benchmarks/gpu_check.py --plan plan.json       # where Snakemake is: the commands
    python benchmarks/gpu_check.py --jobs plan.json       # on the GPU machine: run them
    python benchmarks/gpu_check.py                        # both, where both are at hand
    bash benchmarks/gpu_check.sh plan.json                # --jobs on a bare GPU machine

The commands come from `snakemake -n -p all` on config/olmo.yaml with
tests/miniatures/olmo.yaml and `overlay()` below merged over it, in a copy of the
repository, with the environment of a production run (no CFS_* variable set); nothing in
cfs is patched. The overlay keeps one seed and one value of each method's knob, adds a
model whose fine-tune runs on 2 GPUs (so the rule starts `torchrun`), and on the GPU sets
sizes for a few dozen steps. Every job that makes data runs, and every fine-tune but those
that run plain fine-tuning's code on other data (contextual, replay); of the evaluations,
the base model's and those of plain fine-tuning and context-free data (EVALUATED). The
model is a random OLMo (tests/miniatures/olmo_files.py; nothing is downloaded): OLMo-1B's
width and vocabulary with 8 of its 16 layers on the GPU, the miniature's 2 layers of
width 32 with --quick, and a byte-level tokenizer with OLMo's <|endoftext|> at 50279.
The GPU machine has no vLLM, so `generation.backend: auto` generates with HF there.

Figures: each stage's wall time; its peak GPU memory (nvidia-smi, sampled every 0.2 s, the
whole card) or, on CPU, the largest resident set of the processes started so far; for a
fine-tune, tokens/s = tokens of its training set (prompt + response, as tokenized, capped
at train.max_length) x epochs / the Trainer's train_runtime, and MFU = 6 x parameters x
tokens/s / (GPUs x the card's dense bf16 peak), attention not counted.

On CPU (--quick) the jobs run with CFS_GPUS_ON_CPU=1 (the GPUs are not real) and the
2-process fine-tune runs FSDP2 over gloo. NCCL does not run two ranks on one GPU, so on a
machine with one GPU the torchrun fine-tune is recorded as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "workflow"), str(REPO / "tests" / "miniatures")]
from olmo_files import OLMO_END_OF_DOC, OLMO_END_OF_DOC_ID, TINY, olmo_data, olmo_model  # noqa: E402

COPIED = ["Snakefile", "workflow", "config", "tasks", "envs"]  # what the stages read
CONFIGS = ["config/olmo.yaml", "miniature/olmo.yaml", "gpu_check.yaml"]
MODEL = "miniature/olmo/model"
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
FSDP_TARGET = "results/olmo_fsdp/ratio0/seed0/model"
# OLMo shapes (hidden, layers, heads, intermediate): 0.6 B parameters on the GPU
SHAPES = {"quick": TINY, "gpu": (2048, 8, 16, 8192)}
# the evaluations that run: plain fine-tuning's and context-free data's (and the base's)
EVALUATED = re.compile(r"/evals/\w+/(temp1/ratio1|ratio0)/seed0/eval\.json$")
SKIPPED_RULES = {"summarise_seeds", "summary_table", "figures"}  # over every evaluation
# the mixes and fine-tunes that are plain fine-tuning's code on other data (the jobs that
# make the data run)
PLAIN_ON_OTHER_DATA = re.compile(r"^results/olmo/(contextual|replay)/")


def overlay(quick: bool) -> dict:
    """What the check merges over config/olmo.yaml and miniature/olmo.yaml."""
    methods = {"l2": {"lambdas": [1.0e-2]}, "wiseft": {"alphas": [0.5]}}
    methods |= {key: {"lambdas": [1.0]} for key in ("weighted_synthetic", "kl_to_base")}
    resources = {"gpus": 1, "cpus_per_task": 1 if quick else 8}
    fsdp_model = {"local_path": MODEL, "dtype": "auto"}
    fsdp_model["resources"] = resources | {"train": {"gpus": 2}}
    config = {
        "study": {"name": "gpu_check", "seeds": [0]},
        "methods": methods,
        "models": {"olmo": {"resources": resources}, "olmo_fsdp": fsdp_model},
        # fsdp: the 2-process fine-tune's (one process ignores it); max_length: room for
        # an Alpaca-format example in bytes
        "train": {"fsdp": True, "max_length": 512},
    }
    if not quick:  # a few dozen steps a fine-tune
        config["task"] = {"num_train": 128, "num_test": 16}
        config["generation"] = {"num_samples": 128, "max_new_tokens": 128, "batch_size": 128}
        config["train"] |= {"batch_size": 32, "micro_batch_size": 16}
    return config


def work_copy(folder: Path, config: dict) -> None:
    """The repository's stage files, tests/miniatures as miniature/ with OLMo's data, and
    the overlay; the model is make_model's."""
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, folder / name)
    shutil.copytree(
        REPO / "tests" / "miniatures", folder / "miniature",
        ignore=shutil.ignore_patterns("__pycache__", "*.py"),
    )  # fmt: skip
    (folder / MODEL).mkdir(parents=True)
    task = yaml.safe_load((folder / "miniature" / "olmo.yaml").read_text())["task"]
    rows = (task | config.get("task", {}))["num_train"] + 16  # the test split's and spares
    texts = [line for path in sorted((REPO / "tasks").rglob("*.jsonl")) for line in
             path.read_text(encoding="utf-8").splitlines()][:64]  # fmt: skip
    olmo_data(folder / "miniature" / "olmo", dolma_texts=texts, num_rows=rows)
    (folder / "gpu_check.yaml").write_text(json.dumps(config))  # JSON is YAML


def plan(config: dict) -> list[dict]:
    """The jobs of `snakemake -n -p`, in its order: rule, shell command, outputs, log."""
    with tempfile.TemporaryDirectory() as tmp:
        work_copy(Path(tmp), config)
        command = ["snakemake", "-n", "-p", "--cores", "1", "all", FSDP_TARGET, "--configfile"]
        result = subprocess.run(
            [*command, *CONFIGS], cwd=tmp, env=production_env(), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
    if result.returncode != 0:
        sys.exit(f"snakemake -n -p failed:\n{result.stdout[-3000:]}")
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", result.stdout):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        if not (rule and shell and shell.group(1) != "None") or rule.group(1) in SKIPPED_RULES:
            continue
        paths = []
        for key in ("output", "log"):
            found = re.search(rf"^\s+{key}: (.*)$", block, re.M)
            paths += found.group(1).split(", ") if found else []
        if rule.group(1) == "evaluate_finetuned" and not any(map(EVALUATED.search, paths)):
            continue
        if rule.group(1) in ("mix_at_ratio", "fine_tune") and any(
            map(PLAIN_ON_OTHER_DATA.search, paths)
        ):
            continue
        jobs.append({"rule": rule.group(1), "command": shell.group(1), "paths": paths})
    return jobs


def production_env(quick: bool = False) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CFS_")}
    if quick:
        env["CFS_GPUS_ON_CPU"] = "1"
    return env


def make_model(folder: Path, quick: bool) -> int:
    """The random OLMo and a byte-level tokenizer with OLMo's <|endoftext|>, in `folder`;
    its parameter count."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab[OLMO_END_OF_DOC] = OLMO_END_OF_DOC_ID
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([OLMO_END_OF_DOC])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=OLMO_END_OF_DOC, pad_token=OLMO_END_OF_DOC,
        model_max_length=2048,
    )  # fmt: skip
    dtype = "float32" if quick else "bfloat16"
    return olmo_model(fast, folder, shape=SHAPES["quick" if quick else "gpu"], dtype=dtype)


class PeakMemory:
    """The largest GPU memory in use (nvidia-smi) while a stage runs, in MiB."""

    def __init__(self, gpu: bool):
        self.gpu, self.peak, self.done = gpu, 0.0, threading.Event()

    def sample(self):
        while not self.done.wait(0.2):
            query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
            try:
                used = subprocess.run(query, stdout=subprocess.PIPE, text=True).stdout.split()
            except OSError:  # no nvidia-smi: no figure
                return
            self.peak = max([self.peak, *map(float, used or [0])])

    def __enter__(self):
        if self.gpu:
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        if not self.gpu:  # kilobytes on Linux: the largest child so far
            self.peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def fine_tune_figures(work: Path, command: str, parameters: int, gpus: int, peak: float | None):
    """tokens/s and MFU of a finished fine-tune, from its training set and train_log.json."""
    from transformers import AutoTokenizer

    words = shlex.split(command.split("$launch", 1)[1])
    data, out = Path(work, words[words.index("--data") + 1]), words[words.index("--out") + 1]
    settings = json.loads(words[words.index("--settings") + 1])
    log = json.loads((work / out / "train_log.json").read_text())
    runtime = next(e["train_runtime"] for e in log["log_history"] if "train_runtime" in e)
    tokenizer = AutoTokenizer.from_pretrained(str(work / MODEL))
    records = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    tokens = 0
    for record in records:  # as cfs.examples tokenizes them: a sample's prompt is one token
        if "token_ids" in record:
            tokens += min(len(record["token_ids"]) + 1, settings["max_length"])
            continue
        texts = [record["prompt"], record["response"]]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        tokens += min(len(ids[0]) + len(ids[1]) + 1, settings["max_length"])  # + EOS
    tokens_per_s = tokens * settings["epochs"] / runtime
    summary = log["summary"]
    return {
        "tokens_per_s": tokens_per_s, "train_runtime_s": runtime, "steps": summary["global_steps"],
        "fsdp": summary["fsdp"], "precision": summary["precision"],
        "mfu": 6 * parameters * tokens_per_s / (gpus * peak) if peak else None,
    }  # fmt: skip


def run(jobs: list[dict], config: dict, quick: bool, folder: Path) -> dict:
    import torch

    gpu = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if gpu else "cpu"
    peak = next((flops for key, flops in PEAK_BF16.items() if key in name), None) if gpu else None
    work_copy(folder, config)
    bin_dir = folder / "bin"  # `python` and `torchrun` of the commands: this interpreter
    bin_dir.mkdir()
    for program, module in [("python", ""), ("torchrun", "-m torch.distributed.run ")]:
        (bin_dir / program).write_text(f'#!/bin/sh\nexec "{sys.executable}" {module}"$@"\n')
        (bin_dir / program).chmod(0o755)
    env = production_env(quick)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join([str(folder / "workflow"), env.get("PYTHONPATH", "")])
    started = time.time()
    parameters = make_model(folder / MODEL, quick)
    print(
        f"device: {name}; model: {parameters / 1e6:.1f} M parameters, {time.time() - started:.0f} s"
    )
    print("| rule | status | seconds | peak memory (MiB) | tokens/s | MFU |")
    print("| --- | --- | --- | --- | --- | --- |")
    results, failed = [], False
    for job in jobs:
        torchrun = "torchrun" in job["command"] and "if [ 2 -gt 1 ]" in job["command"]
        row = {"rule": job["rule"] + (" (torchrun, 2 processes)" if torchrun else "")}
        row["command"] = job["command"]
        if torchrun and gpu and torch.cuda.device_count() < 2:
            row["status"] = "skipped: one GPU (NCCL runs one rank per GPU)"
        elif failed:
            row["status"] = "skipped: an earlier stage failed"
        else:
            for path in job["paths"]:
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
            start = time.time()
            with PeakMemory(gpu) as memory:
                done = subprocess.run(["bash", "-c", job["command"]], cwd=folder, env=env)
            row |= {"seconds": time.time() - start, "peak_memory_mib": memory.peak}
            row["status"] = "ok" if done.returncode == 0 else f"exit {done.returncode}"
            if done.returncode == 0 and job["rule"] == "fine_tune":  # GPUs of the MFU
                gpus = 2 if torchrun else 1
                row |= fine_tune_figures(folder, job["command"], parameters, gpus, peak)
            elif done.returncode != 0:
                failed = True
                logs = [p for p in job["paths"] if p.endswith(".log")]
                print(
                    *(Path(folder, p).read_text()[-3000:] for p in logs if Path(folder, p).exists())
                )
        results.append(row)
        columns = [("seconds", 1), ("peak_memory_mib", 0), ("tokens_per_s", 0), ("mfu", 3)]
        figures = [f"{row[k]:.{d}f}" if row.get(k) is not None else "" for k, d in columns]
        print(f"| {row['rule']} | {row['status']} | " + " | ".join(figures) + " |", flush=True)
    return {"device": name, "parameters": parameters, "quick": quick, "jobs": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny, on CPU")
    parser.add_argument("--plan", type=Path, help="only write the jobs (needs snakemake)")
    parser.add_argument("--jobs", type=Path, help="run the jobs --plan wrote")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if args.jobs:
        planned = json.loads(args.jobs.read_text())
    else:
        config = overlay(args.quick)
        planned = {"config": config, "quick": args.quick, "jobs": plan(config)}
    if args.plan:
        args.plan.write_text(json.dumps(planned, indent=1))
        print(f"{len(planned['jobs'])} jobs written to {args.plan}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        figures = run(planned["jobs"], planned["config"], planned["quick"], Path(tmp))
    figures["benchmark"] = "gpu_check"
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    failed = [
        job["rule"]
        for job in figures["jobs"]
        if not job["status"].startswith(("ok", "skipped: one"))
    ]
    sys.exit(f"failed: {failed}" if failed else 0)


if __name__ == "__main__":
    main()
