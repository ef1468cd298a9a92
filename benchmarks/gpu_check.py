"""One check of the pipeline on one GPU, in one call of at most 8 minutes.

    bash benchmarks/gpu_check.sh                # on the GPU machine: $OUT/gpu_check.{json,log}
    bash benchmarks/gpu_check.sh --cpu-smoke    # every part on tiny models on CPU (CI)

benchmarks/gpu_check.sh unpacks the carried wheels (benchmarks/wheels: cfs's pinned
transformers, accelerate, peft, lm-eval and what they import) into a temporary folder on
PYTHONPATH and runs this script. Where `datasets` (or lxml) cannot be imported,
benchmarks/shim stands in for it. Hub kernels are off (USE_HUB_KERNELS=NO): they are
downloaded at run time, and the GPU machine has no network.

The models are random-weight (nothing is downloaded): OLMo-1B's shape (about 1.18 B
parameters, config/olmo.yaml's model) with a word-level tokenizer of its vocabulary, a
small model of the same kind for the resume check, and a few layers of
DeepSeek-R1-Distill-Llama-8B's shape. Settings are config/olmo.yaml's, as the rules hand
them to the stages (the schema's defaults filled in). Each part has its own time limit; a
part that fails or runs out of time is recorded as such and the next one runs:

- train (a): `cfs.train.fine_tune` for a cell of every training objective (cfs.study.METHODS:
  plain, lora, l2, weighted_synthetic, kl_to_base) and of context-free mixing (plain
  training on a mixed set, as contextual and replay mixing are), under FSDP2 in one
  process (the fsdp arguments of a multi-GPU run, cfs.distributed), activation
  checkpointing off and on; 4 optimizer steps of 32 examples (config/olmo.yaml's micro-batch
  of 16 and length 1024; 2 micro-batches a step instead of 8), the first step not timed. The
  final model is gathered and written by the first run only. tokens/s counts every
  token through the trained model (task batches and a synthetic term's); MFU = 6 x
  parameters x tokens/s / the card's dense bf16 peak (the frozen base model's forward and
  attention FLOPs not counted); peak memory = torch.cuda.max_memory_allocated. Goal: MFU
  >= 40% for plain.
- resume (c): a fine-tune killed (SIGKILL) right after its first checkpoint, then run
  again with the same command, against an uninterrupted run: the final weights must agree
  within RESUME_TOLERANCE of the update (|W_resumed - W_whole| / |W_whole - W_base|).
- terms (b): the KL-to-base and L2 terms (cfs.objectives, as the trainer calls them) in
  bf16 autocast against float32 on the same batch: finite, the value within TERM_RTOL,
  the KL gradient's cosine with the float32 one >= GRAD_COSINE.
- generation (d): context-free sampling through cfs.generate's sampler (backend hf, the
  config's batch and length); tokens/s of the second batch (the first warms up).
- lm_eval (e): cfs.evaluate.run_lm_eval on tasks/cfs_capitals with lm-eval's HF model and
  with cfs-hf, and how far their per-item scores differ.
- memory (f): peak memory of forward + backward at 8,192 tokens for 1 and 2 layers of the
  8B shape (plain and the KL-to-base term, checkpointing off and on); the per-layer
  difference is scaled to 32 layers (one GPU, nothing sharded) and set beside
  config/README.md's table.

--cpu-smoke runs every part on tiny models on CPU (float32 training, gloo, FSDP switched on
for CPU processes as tests/end_to_end/fsdp_on_cpu.py does), writing the same JSON with
"device": "cpu"; it hides datasets and lxml, which the GPU machine lacks, so that the stand-ins run.
"""

from __future__ import annotations

import argparse
import gc
import importlib.abc
import importlib.machinery
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIM = HERE / "shim"
sys.path.append(str(SHIM))  # last: only where datasets / lxml are missing


class Hidden(importlib.abc.MetaPathFinder):
    """The packages named in $CFS_GPU_CHECK_HIDE as the GPU machine has them: from
    benchmarks/shim (--cpu-smoke hides datasets and lxml)."""

    def find_spec(self, name, path=None, target=None):
        if path is not None or name not in os.environ.get("CFS_GPU_CHECK_HIDE", "").split(","):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, [str(SHIM)])
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)
        return spec


sys.meta_path.insert(0, Hidden())
# transformers 5.25 swaps in hub kernels (the `kernels` package, downloads) by default; the
# GPU machine has neither the package nor a network
os.environ.setdefault("USE_HUB_KERNELS", "NO")

from _common import (  # noqa: E402
    REPO,
    SCHEMA,
    Timer,
    fill_defaults,
    first_cell,
    load_config,
    quiet,
    table,
    train_settings,
)

# tests/end_to_end/fsdp_on_cpu.py: accelerate routes CPU processes to DDP even when the
# Trainer asks for FSDP, and the CPU smoke switches its state to FSDP as the tests do, so
# that it runs FSDP2's code path (run_accelerate_fsdp_on_cpu); each fine-tune of a worker
# runs as in a process of its own (reset_accelerate)
sys.path.append(str(REPO / "tests" / "end_to_end"))
from fsdp_on_cpu import reset_accelerate, run_accelerate_fsdp_on_cpu  # noqa: E402

OLMO_CONFIG = REPO / "config" / "olmo.yaml"
# dense bf16 peak FLOP/s (no sparsity), by the name torch reports
PEAK_BF16 = {
    "H100 PCIe": 756.0e12,
    "H100 NVL": 835.0e12,
    "H100": 989.4e12,
    "H200": 989.4e12,
    "GH200": 989.4e12,
    "A100": 312.0e12,
    "L40S": 362.1e12,
    "L4": 121.0e12,
}
GOAL_MFU = 0.40
TERM_RTOL = 5e-2  # bf16 logits carry a relative error of 2^-8; KL is a difference of them
L2_RTOL = 1e-6  # L2 is elementwise on float32 master weights: autocast leaves it alone
GRAD_COSINE = 0.99
RESUME_TOLERANCE = {"cuda": 1e-2, "cpu": 1e-4}  # of the update's norm; bf16 kernels vary
OLMO_1B = dict(
    vocab_size=50304,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    eos_token_id=50279,
    pad_token_id=1,
    bos_token_id=None,
)
LLAMA_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
# (GPU, CPU smoke) sizes of everything
SIZES = {
    "gpu": {
        "olmo": OLMO_1B,
        "small": dict(
            OLMO_1B,
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
        ),
        "llama": LLAMA_8B,
        "tokens": 8192,
        # config/olmo.yaml's micro-batch and length; 2 micro-batches per step, not 8
        "train": dict(batch_size=32, micro_batch_size=16, steps=4),
        "resume": dict(batch_size=8, micro_batch_size=4, max_length=256, steps=4),
        "generation": {},
        "lm_eval_limit": None,
        "terms_batch": 8,
    },
    "cpu": {
        "olmo": dict(
            OLMO_1B,
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            eos_token_id=500,
        ),
        "llama": dict(
            LLAMA_8B,
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=224,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        "tokens": 256,
        "train": dict(
            batch_size=8, micro_batch_size=4, steps=3, max_length=48, precision="float32"
        ),
        "resume": dict(
            batch_size=4, micro_batch_size=2, max_length=48, steps=4, precision="float32"
        ),
        "generation": dict(batch_size=4, max_new_tokens=8),
        "lm_eval_limit": 8,
        "terms_batch": 2,
    },
}
SIZES["cpu"]["small"] = SIZES["cpu"]["olmo"]
# seconds each part may take on the GPU (the whole check: at most 8 minutes)
BUDGETS = {"train": 160, "resume": 60, "terms": 30, "generation": 40, "lm_eval": 45, "memory": 40}
DEADLINE = 420.0  # seconds after start: no part starts (or runs) past it


# --------------------------------------------------------------------------- set-up


def device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sizes_of(context: dict) -> dict:
    """The sizes of this run: the GPU's, or the CPU smoke's."""
    return SIZES["cpu" if context["smoke"] else "gpu"]


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gib(value) -> float | None:
    return None if value is None else value / 2**30


def task_words() -> list[str]:
    """The words of the local lm-eval tasks, so a word-level tokenizer reads them."""
    words = set()
    for path in sorted((REPO / "tasks").rglob("*.jsonl")):
        words.update(re.findall(r"\w+|[^\w\s]+", path.read_text(encoding="utf-8")))
    return sorted(words)


def word_tokenizer(shape: dict):
    """A word-level tokenizer of the model's vocabulary: OLMo's specials (<|endoftext|> at
    its EOS id, <|padding|> 1, no BOS), the task words, then t<i> for the other ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    size, eos, pad = shape["vocab_size"], shape["eos_token_id"], shape["pad_token_id"]
    vocab = {"<unk>": 0, "<|padding|>": pad, "<|endoftext|>": eos}
    free = (i for i in range(size) if i not in vocab.values())
    words = task_words()[: size // 4]
    for index, word in zip(free, words + [f"t{i}" for i in range(size)], strict=False):
        vocab[word] = index
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|padding|>", unk_token="<unk>"
    )


def build_olmo(shape: dict, out: Path, device: str) -> int:
    """A random OLMo-shaped model (saved in bf16 on a GPU) and its tokenizer; returns the
    number of parameters."""
    import torch
    from transformers import OlmoConfig, OlmoForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = OlmoForCausalLM(OlmoConfig(**shape))
    model.generation_config.update(
        eos_token_id=shape["eos_token_id"], bos_token_id=None, pad_token_id=shape["pad_token_id"]
    )
    parameters = sum(p.numel() for p in model.parameters())
    if device == "cuda":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    word_tokenizer(shape).save_pretrained(out)
    del model
    free_memory()
    return parameters


def task_records(count: int, max_length: int, vocab: int, seed: int = 0) -> list[dict]:
    """Task examples of random words: a prompt of max/16..max/8 words, a response filling
    up to the length limit (lengths spread over [max/4, max])."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        prompt = rng.randint(max_length // 16, max_length // 8)
        response = rng.randint(max_length // 4, max_length - 1) - prompt
        records.append(
            {
                "kind": "task",
                "prompt": " ".join(f"t{rng.randrange(vocab // 2)}" for _ in range(prompt)),
                "response": " ".join(f"t{rng.randrange(vocab // 2)}" for _ in range(response)),
            }
        )
    return records


def context_free_samples(count: int, max_length: int, shape: dict, seed: int = 1) -> list[dict]:
    """Context-free samples as cfs.generate writes them (random tokens, no EOS)."""
    rng = random.Random(seed)
    specials = {0, shape["eos_token_id"], shape["pad_token_id"]}
    ids = [i for i in range(shape["vocab_size"]) if i not in specials]
    return [
        {
            "index": index,
            "prompt_token_id": shape["eos_token_id"],
            "token_ids": rng.choices(ids, k=rng.randint(max_length // 4, max_length - 1)),
            "finish_reason": "length",
        }
        for index in range(count)
    ]


def setup(work: Path, smoke: bool) -> dict:
    """The models and data every part reads, described in work/context.json."""
    from cfs.artifacts import write_jsonl

    device = device_kind()
    context = {"smoke": smoke, "device": device, "work": str(work)}
    sizes = sizes_of(context)
    config = load_config(OLMO_CONFIG)
    max_length = sizes["train"].get("max_length", config["train"]["max_length"])
    with Timer() as timer:
        context["olmo"] = str(work / "olmo")
        context["parameters"] = build_olmo(sizes["olmo"], work / "olmo", device)
        if smoke:
            context["small"] = context["olmo"]
        else:
            context["small"] = str(work / "small")
            build_olmo(sizes["small"], work / "small", device)
    context["model_seconds"] = timer.seconds
    train = sizes["train"]
    count = train["steps"] * train["batch_size"]  # one epoch of `steps` optimizer steps
    vocab = sizes["olmo"]["vocab_size"]
    context["task"] = str(write_jsonl(work / "task.jsonl", task_records(count, max_length, vocab)))
    samples = context_free_samples(count, max_length, sizes["olmo"])
    context["samples"] = str(write_jsonl(work / "context_free.jsonl", samples))
    resume = sizes["resume"]
    records = task_records(resume["steps"] * resume["batch_size"], resume["max_length"], vocab)
    context["resume_task"] = str(write_jsonl(work / "resume_task.jsonl", records))
    (work / "context.json").write_text(json.dumps(context, indent=2))
    return context


# --------------------------------------------------------------------------- fine-tuning


class Probe:
    """What one fine-tune did: tokens through the trained model, time at each optimizer
    step's end, the trainer; and whether to kill the process after its first checkpoint."""

    def __init__(self):
        self.reset()
        self.kill_after_save = False
        self.save_model = True

    def reset(self):
        self.hook_next = True
        self.tokens = 0
        self.marks: list[tuple[float, int]] = []
        self.trainer = None

    def count(self, module, args, kwargs):
        if module.training and "input_ids" in kwargs:
            mask = kwargs.get("attention_mask")
            self.tokens += int(mask.sum()) if mask is not None else kwargs["input_ids"].numel()


def instrument(probe: Probe) -> None:
    """Patch cfs.train where fine_tune looks things up: the trained model (its first
    load_model) counts its tokens, the trainer marks each step's end, FSDP is on in one
    process, and saving the final model can be skipped (or the process killed at its first
    checkpoint)."""
    import cfs.distributed as distributed
    import cfs.train as train
    import cfs.trainer as trainer_module
    from transformers import TrainerCallback

    load_model, save_fine_tuned = train.load_model, train.save_fine_tuned

    def load_and_hook(*args, **kwargs):
        model = load_model(*args, **kwargs)
        if probe.hook_next:
            probe.hook_next = False
            model.register_forward_pre_hook(probe.count, with_kwargs=True)
        return model

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync()
            probe.marks.append((time.perf_counter(), probe.tokens))

        def on_save(self, args, state, control, **kwargs):
            if probe.kill_after_save:
                print(
                    f"killing the run after its checkpoint at step {state.global_step}", flush=True
                )
                os.kill(os.getpid(), signal.SIGKILL)

    class Instrumented(trainer_module.RegularizedTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(StepClock())
            probe.trainer = self

    def fsdp_in_one_process(settings):
        # the arguments a multi-process run gets (train.fsdp on), here for one process
        real = distributed.world_size
        distributed.world_size = lambda: 2
        try:
            return distributed.distributed_arguments(settings)
        finally:
            distributed.world_size = real

    def save(*args, **kwargs):
        if probe.save_model:
            save_fine_tuned(*args, **kwargs)

    train.load_model = load_and_hook
    train.save_fine_tuned = save
    train.distributed_arguments = fsdp_in_one_process
    trainer_module.RegularizedTrainer = Instrumented


def cell_settings(method: str, overrides: dict) -> dict:
    """cfs.train's settings for config/olmo.yaml's first cell of `method`, FSDP on."""
    config = load_config(OLMO_CONFIG)
    settings = train_settings(config, method, first_cell(config, method))
    settings.update(fsdp=True, epochs=1, logging_steps=1, save_steps=10**6, curve_every=0)
    settings.update({k: v for k, v in overrides.items() if k != "steps"})
    return settings


def fine_tune_run(
    context: dict, probe: Probe, method: str, settings: dict, folder: Path, model: str, task: str
) -> dict:
    """One cfs.train.fine_tune of `method`, timed; its figures."""
    import torch
    from cfs.artifacts import read_jsonl, write_jsonl
    from cfs.mix import mix_at_ratio
    from cfs.study import METHODS
    from cfs.train import fine_tune

    spec = METHODS[method]
    folder.mkdir(parents=True, exist_ok=True)
    data = Path(task)
    if spec.mixes:  # context-free data mixed into the task set (cfs.mix)
        mixed = mix_at_ratio(
            read_jsonl(data),
            read_jsonl(context["samples"]),
            settings["method"]["ratio"],
            settings["seed"],
        )
        data = write_jsonl(folder / "train.jsonl", mixed)
    synthetic = Path(context["samples"]) if spec.synthetic_term else None
    probe.reset()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    summary = fine_tune(
        Path(model), data, settings, folder / "checkpoints", folder / "model", synthetic=synthetic
    )
    seconds = time.perf_counter() - start
    marks = probe.marks[1:]  # the first step warms up (kernels, allocator, FSDP's set-up)
    tokens_per_s = None
    if len(marks) >= 2:
        tokens_per_s = (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])
    trainer = probe.trainer
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    record = {
        "method": method,
        "objective": spec.trains,
        "activation_checkpointing": settings["gradient_checkpointing"],
        "fsdp": summary["fsdp"],
        "fsdp_version": getattr(plugin, "fsdp_version", None),
        "bf16": trainer.args.bf16,
        "steps": summary["global_steps"],
        "timed_steps": max(len(marks) - 1, 0),
        "gradient_sync": summary.get("gradient_sync"),
        "checkpoint_format": summary.get("checkpoint_format"),
        "tokens": probe.tokens,
        "tokens_per_s": tokens_per_s,
        "train_loss": summary["train_loss"],
        "seconds": seconds,
        "resumed_from": summary["resumed_from"],
        "peak_memory_gib": gib(torch.cuda.max_memory_allocated())
        if torch.cuda.is_available()
        else None,
    }
    probe.trainer = None
    del trainer
    free_memory()
    return record


def worker_train(context: dict, result: Path) -> None:
    """Part (a), in a process of its own: every trained method, checkpointing off and on."""
    import torch
    from cfs.study import METHODS, PROPOSED

    probe = Probe()
    instrument(probe)
    sizes = sizes_of(context)
    # one cell per objective, and context-free mixing (the other mixing methods train like
    # it, on other samples)
    methods = [
        n for n, spec in METHODS.items() if spec.trains and (not spec.mixes or n == PROPOSED)
    ]
    plan = [(name, False) for name in methods] + [(name, True) for name in methods]
    plan.sort(key=lambda run: run[0] != "plain")  # plain first: the goal's figure
    peak = peak_flops()
    records = []
    for index, (method, checkpointing) in enumerate(plan):
        reset_accelerate()
        probe.save_model = index == 0  # gather and write the model once (FSDP's state dict)
        label = f"{method}{'+ac' if checkpointing else ''}"
        print(f"train: {label}", flush=True)
        try:
            settings = cell_settings(
                method, {**sizes["train"], "gradient_checkpointing": checkpointing}
            )
            record = fine_tune_run(
                context,
                probe,
                method,
                settings,
                Path(context["work"]) / "train" / label,
                context["olmo"],
                context["task"],
            )
            record["status"] = "ok" if record["timed_steps"] >= 1 else "failed"
            if record["tokens_per_s"] and peak:
                record["mfu"] = 6 * context["parameters"] * record["tokens_per_s"] / peak
            else:
                record["mfu"] = None
        except Exception as error:  # noqa: BLE001 - recorded, the next run goes on
            record = {
                "method": method,
                "activation_checkpointing": checkpointing,
                "status": "failed",
                "error": error_text(error),
            }
            if isinstance(error, torch.cuda.OutOfMemoryError):
                record["status"] = "out of memory"
            free_memory()
        records.append(record)
        result.write_text(json.dumps(records, indent=2))


def worker_resume(context: dict, result: Path, mode: str) -> None:
    """Part (c), in processes of their own: `killed` dies right after its first
    checkpoint; `finish` runs the same command again (it resumes), then a whole run."""
    sizes = sizes_of(context)
    probe = Probe()
    instrument(probe)
    settings = cell_settings(
        "plain",
        {**sizes["resume"], "learning_rate": 1e-3, "save_steps": 2, "save_precision": "float32"},
    )
    work = Path(context["work"]) / "resume"
    runs = {"killed": ["resumed"], "finish": ["resumed", "whole"]}[mode]
    records = {}
    for name in runs:
        reset_accelerate()
        probe.kill_after_save = mode == "killed"
        records[name] = fine_tune_run(
            context, probe, "plain", settings, work / name, context["small"], context["resume_task"]
        )
    result.write_text(json.dumps(records, indent=2))


# --------------------------------------------------------------------------- the parts


def peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((value for key, value in PEAK_BF16.items() if key in name), None)


def error_text(error: BaseException) -> str:
    return "".join(traceback.format_exception(error))[-3000:]


def worker_env() -> dict:
    """One process of a process group of one (what torchrun --nproc-per-node 1 sets)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return dict(
        os.environ,
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def run_worker(context: dict, part: str, seconds: float, mode: str = "") -> tuple[int, Path]:
    result = Path(context["work"]) / f"{part}{mode}.json"
    result.unlink(missing_ok=True)
    command = [
        sys.executable,
        __file__,
        "--worker",
        part,
        "--context",
        str(Path(context["work"]) / "context.json"),
        "--result",
        str(result),
    ]
    if mode:
        command += ["--mode", mode]
    process = subprocess.Popen(command, env=worker_env(), start_new_session=True)
    try:
        code = process.wait(timeout=max(seconds, 1))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise TimeoutError(f"{part}{mode} ran past its {seconds:.0f} s") from None
    return code, result


def part_train(context: dict, seconds: float) -> dict:
    try:
        code, result = run_worker(context, "train", seconds)
        timed_out = False
    except TimeoutError:
        code, result, timed_out = None, Path(context["work"]) / "train.json", True
    runs = json.loads(result.read_text()) if result.is_file() else []
    plain = next((r for r in runs if r["method"] == "plain" and r.get("mfu") is not None), None)
    figures = {
        "runs": runs,
        "parameters": context["parameters"],
        "peak_bf16_flops": peak_flops(),
        "goal_mfu": GOAL_MFU,
        "plain_mfu": plain["mfu"] if plain else None,
        "goal_met": bool(plain and plain["mfu"] >= GOAL_MFU),
        "exit_code": code,
    }
    if timed_out:
        figures["status"] = "timeout"
    elif code != 0 or not runs or any(run["status"] != "ok" for run in runs):
        figures["status"] = "failed"
    return figures


def part_resume(context: dict, seconds: float) -> dict:
    import torch
    from safetensors.torch import load_file

    started = time.monotonic()
    code, _ = run_worker(context, "resume", seconds, "killed")
    checkpoints = sorted(
        (Path(context["work"]) / "resume" / "resumed" / "checkpoints").glob("checkpoint-*")
    )
    if code != -signal.SIGKILL or not checkpoints:
        raise RuntimeError(f"the run to kill ended with {code}, checkpoints {checkpoints}")
    code, result = run_worker(context, "resume", seconds - (time.monotonic() - started), "finish")
    if code != 0:
        raise RuntimeError(f"the resumed and whole runs ended with exit code {code}")
    runs = json.loads(result.read_text())
    folders = {name: Path(context["work"]) / "resume" / name / "model" for name in runs}

    def weights(folder):
        state = {}
        for shard in sorted(Path(folder).glob("*.safetensors")):
            state.update(load_file(shard))
        return state

    resumed, whole, base = (
        weights(f) for f in (folders["resumed"], folders["whole"], context["small"])
    )
    difference = update = 0.0
    largest = 0.0
    for name, tensor in whole.items():
        a, b, c = tensor.double(), resumed[name].double(), base[name].double()
        difference += float(((a - b) ** 2).sum())
        update += float(((a - c) ** 2).sum())
        largest = max(largest, float((a - b).abs().max()))
    relative = math.sqrt(difference) / max(math.sqrt(update), 1e-30)
    tolerance = RESUME_TOLERANCE[context["device"]]
    figures = {
        "killed_after_checkpoint": checkpoints[0].name,
        "resumed_from": runs["resumed"]["resumed_from"],
        "steps": runs["resumed"]["steps"],
        "relative_difference": relative,
        "max_abs_difference": largest,
        "update_norm": math.sqrt(update),
        "tolerance": tolerance,
        "fsdp": runs["resumed"]["fsdp"],
        "bf16": runs["resumed"]["bf16"],
    }
    if (
        not runs["resumed"]["resumed_from"]
        or relative > tolerance
        or not torch.isfinite(torch.tensor(relative))
    ):
        figures["status"] = "failed"
    return figures


def part_terms(context: dict, seconds: float) -> dict:
    """KL to base and L2 as the trainer calls them, bf16 autocast against float32."""
    import torch
    from cfs.artifacts import read_jsonl
    from cfs.examples import build_examples, padding_collator
    from cfs.modeling import load_model, load_tokenizer
    from cfs.objectives import KLToBase, L2ToInitial, SyntheticBatches

    device = torch.device(context["device"])
    size = sizes_of(context)["terms_batch"]
    tokenizer = load_tokenizer(context["olmo"])
    records = [{**r, "kind": "context_free"} for r in read_jsonl(context["samples"])[:size]]
    examples = build_examples(records, tokenizer, 1024, "samples")
    batches = SyntheticBatches(examples, size, 1, 0, padding_collator(tokenizer))
    model = load_model(context["olmo"], "float32", device)
    model.config.use_cache = False
    l2 = L2ToInitial("mean")
    l2.setup(list(model.parameters()))
    torch.manual_seed(0)
    with torch.no_grad():  # a fine-tune's distance from the base model
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter), alpha=2e-3)

    def kl(base, autocast: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            term, _ = KLToBase(batches, base)(model, 0, 0)
        term.backward()
        gradients = [p.grad.detach().float().flatten() for p in model.parameters()]
        return float(term), gradients

    base = load_model(context["olmo"], "bfloat16", device)  # as a GPU fine-tune loads it
    kl_bf16, grad_bf16 = kl(base, True)
    del base
    free_memory()
    kl_fp32, grad_fp32 = kl(load_model(context["olmo"], "float32", device), False)
    dot = sum(float(a @ b) for a, b in zip(grad_bf16, grad_fp32, strict=True))
    norms = [math.sqrt(sum(float(g @ g) for g in grads)) for grads in (grad_bf16, grad_fp32)]
    cosine = dot / max(norms[0] * norms[1], 1e-30)
    del grad_bf16, grad_fp32
    with torch.no_grad():
        l2_fp32 = float(l2(model, 0, 0))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            l2_bf16 = float(l2(model, 0, 0))
        # for scale: the term on weights stored in bf16 (a run without float32 master weights)
        l2_bf16_weights = float(
            sum(((p.bfloat16().float() - r.bfloat16().float()) ** 2).sum() for p, r in l2.pairs)
            / l2.num_params
        )
    model = None
    free_memory()
    figures = {
        "batch": [size, max(len(e["input_ids"]) for e in examples)],
        "kl_to_base": {
            "bf16": kl_bf16,
            "float32": kl_fp32,
            "relative_error": abs(kl_bf16 - kl_fp32) / max(abs(kl_fp32), 1e-30),
            "tolerance": TERM_RTOL,
            "gradient_cosine": cosine,
            "gradient_cosine_goal": GRAD_COSINE,
        },
        "l2": {
            "bf16_autocast": l2_bf16,
            "float32": l2_fp32,
            "relative_error": abs(l2_bf16 - l2_fp32) / max(abs(l2_fp32), 1e-30),
            "tolerance": L2_RTOL,
            "bf16_weights": l2_bf16_weights,
            "bf16_weights_relative_error": abs(l2_bf16_weights - l2_fp32) / max(l2_fp32, 1e-30),
        },
    }
    values = [kl_bf16, kl_fp32, cosine, l2_bf16, l2_fp32]
    if (
        not all(math.isfinite(v) for v in values)
        or figures["kl_to_base"]["relative_error"] > TERM_RTOL
        or figures["l2"]["relative_error"] > L2_RTOL
        or cosine < GRAD_COSINE
    ):
        figures["status"] = "failed"
    return figures


def part_generation(context: dict, seconds: float) -> dict:
    """Context-free samples through cfs.generate's sampler and batches (backend hf)."""
    from cfs.generate import make_sampler, sample_batches
    from cfs.modeling import load_tokenizer
    from cfs.tokens import context_free_prompt_id

    config = load_config(OLMO_CONFIG)
    settings = {**config["generation"], "seed": 0, "dtype": config["models"]["olmo"]["dtype"]}
    settings.update(sizes_of(context)["generation"], backend="hf")
    tokenizer = load_tokenizer(context["olmo"])
    prompt = context_free_prompt_id(tokenizer, settings["prompt_token_id"])
    with Timer() as load:
        sample_batch, batch_size = make_sampler(
            "hf", Path(context["olmo"]), tokenizer, settings, temperature=1.0
        )
    batches = []

    def timed(prompts, seed):
        sync()
        start = time.perf_counter()
        outputs = sample_batch(prompts, seed)
        sync()
        batches.append(
            {"seconds": time.perf_counter() - start, "tokens": sum(len(ids) for ids, _ in outputs)}
        )
        return outputs

    outputs = sample_batches(
        timed, [[prompt]] * (2 * batch_size), batch_size=batch_size, seed=settings["seed"]
    )
    free_memory()
    steady = batches[-1]
    return {
        "settings": {k: settings[k] for k in ("batch_size", "max_new_tokens", "top_p", "dtype")},
        "samples": len(outputs),
        "ended_with_eos": sum(reason == "eos" for _, reason in outputs),
        "model_load_seconds": load.seconds,
        "batches": batches,
        "tokens_per_s": steady["tokens"] / steady["seconds"],
    }


def part_lm_eval(context: dict, seconds: float) -> dict:
    """cfs.evaluate.run_lm_eval on tasks/cfs_capitals, lm-eval's HF model and cfs-hf."""
    import yaml
    from cfs.evaluate import run_lm_eval

    config = load_config(OLMO_CONFIG)
    schema = yaml.safe_load(SCHEMA.read_text())
    entry = fill_defaults(
        {"task": "cfs_capitals", "metric": "p_correct,none"},
        schema["definitions"]["lm_eval_task"],
        schema,
    )
    settings = {key: value for key, value in config["evaluation"].items() if key != "kl"}
    settings.update(
        target=entry,
        forgetting=[entry],
        seed=0,
        dtype=config["models"]["olmo"]["dtype"],
        limit=sizes_of(context)["lm_eval_limit"],
    )
    figures, items = {}, {}
    for backend in ("hf", "cfs-hf"):
        with Timer() as timer:
            scores, items[backend], harness, requests = run_lm_eval(
                Path(context["olmo"]), {**settings, "backend": backend}
            )
        free_memory()
        figures[backend] = {
            "seconds": timer.seconds,
            "scores": scores["cfs_capitals"],
            "requests": requests,
            "batch_size": harness["batch_size"],
        }
    hf, ours = items["hf"]["cfs_capitals"], items["cfs-hf"]["cfs_capitals"]
    figures["max_item_score_difference"] = max(abs(hf[key] - ours[key]) for key in hf)
    figures["items"] = len(hf)
    figures["lm_eval_version"] = harness["lm_eval_version"]
    if not all(math.isfinite(v) for v in figures["hf"]["scores"].values()):
        figures["status"] = "failed"
    return figures


def readme_memory() -> list[dict]:
    """config/README.md's memory table: each row's setting and its per-GPU estimate."""
    text = (REPO / "config" / "README.md").read_text()
    section = text.split("### Memory per GPU", 1)[-1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 2 or cells[0] in ("setting", "---"):
            continue
        total = re.search(r"\*\*about (\d+(?:\.\d+)?) GB\*\*", cells[1], re.I)
        layer = re.search(r"about (\d+(?:\.\d+)?) GB per layer", cells[1])
        rows.append(
            {
                "setting": cells[0],
                "per_gpu_gb": float(total.group(1)) if total else None,
                "activations_per_layer_gb": float(layer.group(1)) if layer else None,
            }
        )
    return rows


def part_memory(context: dict, seconds: float) -> dict:
    """Forward + backward at the 8B shape for 1 and 2 layers, scaled to 32 layers."""
    import torch
    from cfs.examples import trained_positions_only
    from cfs.objectives import token_kl
    from cfs.tokens import IGNORE_INDEX
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = sizes_of(context)
    shape, length = sizes["llama"], sizes["tokens"]
    device = torch.device(context["device"])
    cuda = device.type == "cuda"

    def saved_bytes():
        """Bytes autograd keeps for the backward pass (outside recomputed regions)."""
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        return storages, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def measure(layers: int, mode: str, checkpointing: bool) -> dict:
        config = LlamaConfig(**shape, num_hidden_layers=layers)
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config)  # float32 master weights
            base = LlamaForCausalLM(config).to(torch.bfloat16) if mode == "kl_to_base" else None
        model.config.use_cache = False
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        ids = torch.randint(3, shape["vocab_size"], (1, length), device=device)
        labels = ids.clone()
        labels[0, 0] = IGNORE_INDEX  # the context-free prompt token is not trained on
        free_memory()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() if cuda else None
        storages, hooks = saved_bytes()
        with hooks, torch.autocast(device.type, dtype=torch.bfloat16):
            if mode == "plain":  # the task loss (cfs.trainer: trained positions only)
                loss = model(**trained_positions_only({"input_ids": ids, "labels": labels})).loss
            else:  # KLToBase: the base model's logits, then the model's, token_kl
                with torch.no_grad():
                    base_logits = base(input_ids=ids).logits
                loss = token_kl(base_logits, model(input_ids=ids).logits, labels)
        loss.backward()
        sync()
        record = {
            "mode": mode,
            "activation_checkpointing": checkpointing,
            "layers": layers,
            "parameters": sum(p.numel() for p in model.parameters()),
            "resident_gib": gib(resident),
            "peak_gib": gib(torch.cuda.max_memory_allocated()) if cuda else None,
            "saved_for_backward_gib": gib(sum(storages.values())),
            "loss": float(loss),
        }
        del model, base, loss, storages
        free_memory()
        return record

    runs = []
    for mode, checkpointing in (
        ("plain", False),
        ("plain", True),
        ("kl_to_base", True),
        ("kl_to_base", False),
    ):
        for layers in (1, 2):
            runs.append(measure(layers, mode, checkpointing))
    # per layer: the difference between 2 layers and 1 (weights, gradients, activations)
    scaled = {}
    for one, two in zip(runs[::2], runs[1::2], strict=True):
        label = f"{one['mode']}{'+ac' if one['activation_checkpointing'] else ''}"
        per_layer_parameters = two["parameters"] - one["parameters"]
        entry = {
            "scaled": True,
            "layers_scaled_to": 32,
            "per_layer_parameters": per_layer_parameters,
            "per_layer_float32_weights_gib": gib(4 * per_layer_parameters),
        }
        for key in ("peak_gib", "saved_for_backward_gib"):
            if one[key] is None:
                entry[f"per_layer_{key}"] = entry[f"32_layers_{key}"] = None
                continue
            per_layer = two[key] - one[key]
            entry[f"per_layer_{key}"] = per_layer
            entry[f"32_layers_{key}"] = one[key] + 31 * per_layer
        scaled[label] = entry
    return {
        "shape": {**shape, "tokens": length},
        "measured": "torch.cuda.max_memory_allocated" if cuda else "saved tensors (CPU)",
        "note": "one device, nothing sharded: float32 weights and gradients whole; the "
        "32-layer figures are the 1-layer measurement plus 31 x the per-layer difference "
        "(peak: a layer's weights, gradients and activations; saved for backward: its "
        "activations and the bf16 copies autocast keeps)",
        "runs": runs,
        "scaled_to_32_layers": scaled,
        "config_readme": readme_memory(),
    }


PARTS = {
    "train": part_train,
    "resume": part_resume,
    "terms": part_terms,
    "generation": part_generation,
    "lm_eval": part_lm_eval,
    "memory": part_memory,
}


class PartTimeout(Exception):
    pass


def run_part(name: str, context: dict, seconds: float) -> dict:
    """One part within `seconds`: its figures with a status (ok, failed, timeout)."""

    def alarm(signum, frame):
        raise PartTimeout(f"{name} ran past its {seconds:.0f} s")

    start = time.perf_counter()
    signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1) + 5)  # workers have their own limit
    try:
        figures = PARTS[name](context, seconds)
        figures.setdefault("status", "ok")
    except (PartTimeout, TimeoutError) as error:
        figures = {"status": "timeout", "error": str(error)}
    except Exception as error:  # noqa: BLE001 - recorded, the next part runs
        figures = {"status": "failed", "error": error_text(error)}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    free_memory()
    return {"seconds": time.perf_counter() - start, **figures}


def versions() -> dict:
    import accelerate
    import peft
    import torch
    import transformers

    found = {}
    for module in (torch, transformers, accelerate, peft):
        found[module.__name__] = {"version": module.__version__, "from": module.__file__}
    for name in ("lm_eval", "datasets"):
        try:
            module = __import__(name)
            found[name] = {"version": getattr(module, "__version__", None), "from": module.__file__}
        except ImportError as error:
            found[name] = {"error": str(error)}
    return found


def summary_rows(parts: dict) -> list[list]:
    rows = []
    for name, part in parts.items():
        note = ""
        if name == "train":
            plain = next((r for r in part.get("runs", []) if r.get("tokens_per_s")), None)
            if part.get("plain_mfu") is not None:
                note = f"plain MFU {part['plain_mfu']:.1%}"
            elif plain:
                note = f"{plain['method']}: {plain['tokens_per_s']:.0f} tokens/s"
        elif name == "generation" and "tokens_per_s" in part:
            note = f"{part['tokens_per_s']:.0f} tokens/s"
        elif name == "resume" and "relative_difference" in part:
            note = f"difference {part['relative_difference']:.2e} of the update"
        elif name == "terms" and "kl_to_base" in part:
            note = f"KL rel. error {part['kl_to_base']['relative_error']:.1e}"
        elif name == "lm_eval" and "hf" in part:
            note = f"item difference {part['max_item_score_difference']:.1e}"
        rows.append([name, part["status"], f"{part['seconds']:.1f}", note])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on CPU")
    parser.add_argument("--json", default="gpu_check.json", help="where the figures go")
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--worker", choices=["train", "resume"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="", help=argparse.SUPPRESS)
    parser.add_argument("--context", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_smoke:  # as on the GPU machine (workers inherit it)
        os.environ.setdefault("CFS_GPU_CHECK_HIDE", "datasets,lxml")
    quiet()
    if args.worker:
        context = json.loads(Path(args.context).read_text())
        if context["device"] == "cpu":
            run_accelerate_fsdp_on_cpu()
        worker = worker_train if args.worker == "train" else worker_resume
        worker(context, Path(args.result), *([args.mode] if args.mode else []))
        return
    import tempfile

    import torch

    started = time.monotonic()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        sys.exit("no CUDA device: run on the GPU machine, or pass --cpu-smoke")
    deadline = float(os.environ.get("CFS_GPU_CHECK_SECONDS", DEADLINE))
    work = Path(args.work or tempfile.mkdtemp(prefix="cfs-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "smoke": args.cpu_smoke,
        "python": sys.version.split()[0],
        "versions": versions(),
        "peak_bf16_flops": peak_flops(),
        "use_hub_kernels": os.environ["USE_HUB_KERNELS"],
        "hidden_packages": os.environ.get("CFS_GPU_CHECK_HIDE", ""),
        "budgets_seconds": BUDGETS,
        "parts": {},
    }
    print(f"gpu_check on {payload['device']}; work folder {work}", flush=True)
    try:
        with Timer() as timer:
            context = setup(work, args.cpu_smoke)
        payload["setup_seconds"] = timer.seconds
        failure = None
    except Exception as error:  # noqa: BLE001 - every part is then recorded as failed
        failure = error_text(error)
        print(failure, flush=True)
    for name in args.parts:
        left = deadline - (time.monotonic() - started)
        if failure:
            payload["parts"][name] = {"status": "failed", "seconds": 0.0, "error": failure}
        elif left < 10:
            payload["parts"][name] = {
                "status": "skipped",
                "seconds": 0.0,
                "error": "no time left before the deadline",
            }
        else:
            limit = min(600 if args.cpu_smoke else BUDGETS[name], left)
            print(f"\n== {name} (limit {limit:.0f} s)", flush=True)
            payload["parts"][name] = run_part(name, context, limit)
            print(
                f"== {name}: {payload['parts'][name]['status']} in "
                f"{payload['parts'][name]['seconds']:.1f} s",
                flush=True,
            )
        payload["seconds"] = time.monotonic() - started
        out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print()
    print(table(summary_rows(payload["parts"]), ["part", "status", "seconds", "figure"]))
    print(f"wrote {out} ({payload['seconds']:.0f} s)")
    if not args.work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    if any(part["status"] != "ok" for part in payload["parts"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
