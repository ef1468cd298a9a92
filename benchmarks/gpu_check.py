"""A production check on one GPU: the stage commands the rules emit for a miniature study,
run one after another as Snakemake would run them, and a 2-process `torchrun` FSDP
fine-tune, reporting each stage's time, peak memory, and a fine-tune's tokens/s and MFU.

    python benchmarks/gpu_check.py --quick                # tiny, on CPU (the test suite)
    python benchmarks/gpu_check.py --plan plan.json       # where Snakemake is: the commands
    python benchmarks/gpu_check.py --jobs plan.json       # on the GPU machine: run them
    python benchmarks/gpu_check.py                        # both, where both are at hand
    bash benchmarks/gpu_check.sh plan.json                # --jobs on a bare GPU machine

The commands come from `snakemake -n -p` on the miniature config below (the `all` target
and a plain fine-tune of `mini_fsdp`, whose 2 GPUs make the rule start `torchrun`), in a
copy of the repository, with the environment of a production run (no CFS_* variable
set); nothing in cfs is patched. The model is random-weight (nothing is downloaded): a
Llama shape, about 0.6 B parameters on the GPU (a few layers of width 64 with --quick),
with a byte-level tokenizer. The GPU has no vLLM here, so generation is HF's.

Figures: each stage's wall time; its peak GPU memory (nvidia-smi, sampled every 0.2 s, the
whole card) or, on CPU, the largest resident set of the processes started so far; for a
fine-tune, tokens/s = tokens of its training set (prompt + response, as tokenized, capped
at train.max_length) x epochs / the Trainer's train_runtime, and MFU = 6 x parameters x
tokens/s / (GPUs x the card's dense bf16 peak), attention not counted.

On CPU (--quick) the jobs run with CFS_GPUS_ON_CPU=1 (the GPUs of `mini_fsdp` are not
real) and accelerate runs the 2 gloo processes as DDP, not FSDP: the fine-tune's `fsdp`
figure says which ran. NCCL does not run two ranks on one GPU, so on a machine with one
GPU the torchrun fine-tune is recorded as skipped.
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

REPO = Path(__file__).resolve().parents[1]
COPIED = ["Snakefile", "workflow", "config", "tasks", "envs"]  # what the stages read
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
FSDP_TARGET = "results/mini_fsdp/ratio0/seed0/model"
# Llama shapes: (hidden, layers, heads, intermediate)
SHAPES = {"quick": (64, 2, 4, 128), "gpu": (2048, 12, 16, 5632)}


def miniature(quick: bool) -> dict:
    """The miniature study: the default's task, context-free data at T 1 and ratio 1."""
    gpus = 0 if quick else 1
    model = {"local_path": "mini_model", "resources": {"gpus": gpus}}
    num_train, length = (32, 32) if quick else (512, 128)
    return {
        "study": {"name": "gpu_check", "models": ["mini"], "temperatures": [1.0]}
        | {"ratios": [0.0, 1.0], "methods": ["context_free"], "seeds": [0]},
        # none of the default's frontier: one learning rate, no points along training
        "claims": {"primary": None, "matched_target_gain": None},
        "methods": {"plain": {"learning_rates": []}},
        "models": {
            "mini": model,
            "mini_fsdp": model | {"resources": {"gpus": gpus, "train": {"gpus": 2}}},
        },
        "task": {"num_train": num_train, "num_test": 16 if quick else 64},
        "generation": {"num_samples": num_train, "max_new_tokens": length}
        | {"batch_size": num_train if quick else 128},
        "train": {
            "epochs": 1,
            "batch_size": 16 if quick else 32,
            "micro_batch_size": 8 if quick else 16,
        }
        | {"max_length": 256, "fsdp": True, "save_steps": None, "evaluate_at": []},
        "evaluation": {"limit": 4 if quick else 50, "batch_size": 32}
        | {"kl": {"num_samples": 8 if quick else 32, "max_new_tokens": length}},
    }


def work_copy(folder: Path, config: dict) -> None:
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, folder / name)
    (folder / "gpu_check.yaml").write_text(json.dumps(config))  # JSON is YAML
    (folder / "mini_model").mkdir(exist_ok=True)


def plan(config: dict) -> list[dict]:
    """The jobs of `snakemake -n -p`, in its order: rule, shell command, outputs, log."""
    with tempfile.TemporaryDirectory() as tmp:
        work_copy(Path(tmp), config)
        targets = ["all", FSDP_TARGET]
        command = ["snakemake", "-n", "-p", "--cores", "1", *targets, "--configfile"]
        result = subprocess.run(
            [*command, "gpu_check.yaml"], cwd=tmp, env=production_env(), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
    if result.returncode != 0:
        sys.exit(f"snakemake -n -p failed:\n{result.stdout[-3000:]}")
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", result.stdout):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        if rule and shell and shell.group(1) != "None":
            paths = []
            for key in ("output", "log"):
                found = re.search(rf"^\s+{key}: (.*)$", block, re.M)
                paths += found.group(1).split(", ") if found else []
            jobs.append({"rule": rule.group(1), "command": shell.group(1), "paths": paths})
    return jobs


def production_env(quick: bool = False) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CFS_")}
    if quick:
        env["CFS_GPUS_ON_CPU"] = "1"
    return env


def make_model(folder: Path, quick: bool) -> int:
    """A random-weight Llama and a byte-level tokenizer in `folder`; its parameter count."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>"]
    vocab = {char: i for i, char in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab |= {token: len(vocab) + i for i, token in enumerate(specials)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    hidden, layers, heads, intermediate = SHAPES["quick" if quick else "gpu"]
    shape = LlamaConfig(
        vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate,
        max_position_embeddings=4096, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"], tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(shape).to(torch.float32 if quick else torch.bfloat16)
    model.save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    return sum(parameter.numel() for parameter in model.parameters())


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
    tokenizer = AutoTokenizer.from_pretrained(str(work / "mini_model"))
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
    parameters = make_model(folder / "mini_model", quick)
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
        config = miniature(args.quick)
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
