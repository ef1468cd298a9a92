"""GPU-hours of a study on a Slurm cluster: every GPU job of the config's grid, its tokens,
its hours and GPUs, from the config and stated throughputs, and whether the configured
runtime of each job covers the slower estimate.

    python -m cfs.budget config/reasoning.yaml        # a Markdown table
    python -m cfs.budget config/olmo.yaml --jobs      # and every job
    python -m cfs.budget --document > docs/cluster-budget.md   # the paper's settings

Nothing here is measured. Each estimate is a range: the low end with the faster
throughputs of ASSUMPTIONS and HARDWARE, the high end with the slower ones. What a token
costs: a training token 6N FLOPs (8N with activation checkpointing, which recomputes the
forward pass; LoRA 4N, or 6N with checkpointing: no weight gradients) plus attention; under
FSDP each micro-batch also moves the bf16 weights twice (all-gathers for the forward and
backward passes) and the gradient once (reduce-scatter), overlapped with compute at the
low end and not at the high end. Generation and sampled evaluation are decode throughputs
of vLLM on one GPU. Checkpoint writes: sharded (each GPU writes its part of the float32
weights and Adam moments, 12 bytes a parameter) every `train.save_minutes`, or the full
state of accelerate's default every `train.save_steps` (rank 0 alone, 16 bytes a
parameter: the weights twice and the moments, while the other GPUs wait) for comparison.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

from cfs.stage_settings import REPO, load_config


@dataclass(frozen=True)
class Hardware:
    """One GPU kind and the node around it: ranges are (fast, slow)."""

    name: str = "H100 SXM 80 GB"
    bf16_flops: float = 989e12  # dense bf16 peak
    flops_used: tuple[float, float] = (0.45, 0.30)  # share of the peak reached in training
    collective_bytes_per_s: tuple[float, float] = (360e9, 200e9)  # NCCL bus bandwidth, NVLink
    checkpoint_bytes_per_s: tuple[float, float] = (4e9, 1e9)  # a node writing to shared disk
    single_writer_bytes_per_s: tuple[float, float] = (1e9, 0.4e9)  # one process writing


@dataclass(frozen=True)
class Assumption:
    """What a model and its task cost, by assumption (none of it measured here)."""

    params: float
    layers: int
    hidden: int
    task_tokens: int  # prompt + response of a fine-tuning example
    context_free_tokens: dict  # temperature -> mean sample length (before max_new_tokens)
    contextual_tokens: dict  # temperature -> mean response length
    replay_tokens: int
    decode_tokens_per_s: tuple[float, float]  # vLLM (or HF) on one GPU, many sequences
    # evaluation: task -> (questions, mean tokens of an answer); log-likelihood tasks and
    # the rest of an eval as fixed hours on one GPU
    eval_answers: dict = field(default_factory=dict)
    eval_fixed_hours: tuple[float, float] = (0.05, 0.1)


ASSUMPTIONS = {
    # MedReason examples: question and options ~200 tokens, reasoning ~700, answer ~60.
    # R1-distill samples from its BOS alone are long thinking-style texts, most cut at
    # 8192 at T 1.3 (where it rarely ends a text); its answers to MedReason prompts think
    # for ~1.5k tokens. Answer lengths on the benchmarks: thinking included.
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": Assumption(
        params=8.03e9,
        layers=32,
        hidden=4096,
        task_tokens=1000,
        context_free_tokens={0.5: 5000, 0.7: 5500, 1.0: 6500, 1.3: 8000},
        contextual_tokens={0.5: 1500, 0.7: 1500, 1.0: 2000, 1.3: 5000},
        replay_tokens=8000,
        decode_tokens_per_s=(5000, 2500),
        eval_answers={
            "aime24": (30, 14000),
            "minerva_math500": (500, 4000),
            "gpqa_diamond_cot_zeroshot": (198, 8000),
            "gpqa_diamond_cot_zeroshot_boxed": (198, 8000),
            "medqa_4options_think": (1273, 1500),
        },
        eval_fixed_hours=(0.1, 0.2),  # engine start-up, KL to base, log-likelihood tasks
    ),
    # MetaMathQA: Alpaca prompt with the query ~90 tokens, response ~160. OLMo-1B samples
    # from <|endoftext|> are documents, nearly all longer than 512 tokens.
    "allenai/OLMo-1B-hf": Assumption(
        params=1.18e9,
        layers=16,
        hidden=2048,
        task_tokens=250,
        context_free_tokens={0.5: 490, 0.7: 490, 1.0: 495, 1.3: 500},
        contextual_tokens={0.5: 350, 0.7: 380, 1.0: 420, 1.3: 480},
        replay_tokens=480,
        decode_tokens_per_s=(30000, 12000),
        eval_answers={},  # the hf backend: GSM8K 5-shot and 8 log-likelihood tasks
        eval_fixed_hours=(0.25, 0.5),
    ),
}


# --------------------------------------------------------------------------- config


def resource(config: dict, model: str, stage: str, key: str, method: str | None = None):
    """models.<model>.resources as workflow/rules/resources.smk reads it."""
    from cfs.study import model_resource

    default = config["resources"]["model_stages"].get(key)
    return model_resource(config, model, stage, key, method, default)


# --------------------------------------------------------------------------- jobs


@dataclass
class Job:
    rule: str
    name: str
    gpus: int
    tokens: float
    hours: tuple[float, float]  # wall-clock (fast, slow)
    runtime_minutes: int
    checkpoint_hours: tuple[float, float] = (0.0, 0.0)  # wall-clock, included in `hours`
    full_state_checkpoint_hours: tuple[float, float] = (0.0, 0.0)  # the same, unsharded
    attempts: int = 1  # jobs of the slower estimate's length (each resumes the last)

    @property
    def gpu_hours(self) -> tuple[float, float]:
        return (self.hours[0] * self.gpus, self.hours[1] * self.gpus)


def sample_tokens(assumption: dict, temperature: float, cap: int) -> float:
    return min(assumption[min(assumption, key=lambda t: abs(t - temperature))], cap)


def decode_hours(tokens: float, speed: tuple[float, float]) -> tuple[float, float]:
    return (tokens / speed[0] / 3600, tokens / speed[1] / 3600)


def generation_jobs(config, model, study, spec: Assumption) -> list[Job]:
    from cfs.study import METHODS, parse_cell

    generation = config["generation"]
    cap, samples = generation["max_new_tokens"], generation["num_samples"]
    runtime = resource(config, model, "generate", "runtime")
    gpus = resource(config, model, "generate", "gpus")
    kinds = set()
    for cell in study.cells():
        knobs = parse_cell(cell)
        kind = METHODS[knobs["method"]].samples
        if kind in ("context_free", "contextual"):
            kinds.add((kind, knobs["temperature"]))
    jobs = []
    for seed in study.seeds:
        for kind, temperature in sorted(kinds):
            lengths = spec.context_free_tokens if kind == "context_free" else spec.contextual_tokens
            tokens = samples * sample_tokens(lengths, temperature, cap)
            hours = decode_hours(tokens, spec.decode_tokens_per_s)
            jobs.append(
                Job(
                    f"generate_{kind}",
                    f"{kind} T{temperature:g} seed{seed}",
                    gpus,
                    tokens,
                    hours,
                    runtime,
                    attempts=math.ceil(hours[1] * 60 / runtime),
                )
            )
    kl = config["evaluation"]["kl"]
    tokens = kl["num_samples"] * kl["max_new_tokens"]
    hours = decode_hours(tokens, spec.decode_tokens_per_s)
    jobs.append(Job("generate_heldout", "heldout", gpus, tokens, hours, runtime))
    return jobs


def train_tokens(config, knobs: dict, spec: Assumption) -> tuple[float, float, float]:
    """(examples, their tokens, tokens of a separate synthetic term) a cell trains on."""
    from cfs.study import METHODS

    train, task = config["train"], config["task"]
    method = METHODS[knobs["method"]]
    num_train, batch = task["num_train"], train["batch_size"]
    steps = math.ceil(train["epochs"] * num_train / batch)
    ratio = knobs.get("ratio", 0.0)
    cap = min(config["generation"]["max_new_tokens"], train["max_length"])
    if method.samples == "replay":
        sample = min(spec.replay_tokens, cap)
    elif method.samples == "contextual":
        sample = sample_tokens(spec.contextual_tokens, knobs["temperature"], cap)
    elif method.samples:
        sample = sample_tokens(spec.context_free_tokens, knobs["temperature"], cap)
    else:
        sample = 0
    task_examples = steps * batch
    task_tokens = task_examples * min(spec.task_tokens, train["max_length"])
    if method.mixes:
        if train["mixing"] == "augment":  # the samples extend the set: more steps
            samples = math.ceil(train["epochs"] * round(ratio * num_train))
        else:  # equal_steps: ratio x batch samples beside each step's task examples
            samples = steps * round(ratio * batch)
        return task_examples + samples, task_tokens + samples * sample, 0.0
    if method.synthetic_term:
        return task_examples, task_tokens, steps * round(ratio * batch) * sample
    return task_examples, task_tokens, 0.0


def train_job(config, model, cell, seed, spec: Assumption, hardware: Hardware) -> Job:
    from cfs.objectives import objective_for
    from cfs.study import METHODS, parse_cell

    knobs = parse_cell(cell)
    method = METHODS[knobs["method"]]
    objective = objective_for(method.trains)  # what its loss costs beside the task's
    train = config["train"]
    gpus = resource(config, model, "train", "gpus", knobs["method"])
    runtime = resource(config, model, "train", "runtime", knobs["method"])
    examples, tokens, term_tokens = train_tokens(config, knobs, spec)
    lora = not objective.trains_base_weights  # LoRA: no weight gradients, adapters saved
    recompute = train["gradient_checkpointing"]
    passes = 3 + (1 if recompute else 0)  # forward, backward (twice a forward), recompute
    linear = (2 if lora else 3) * passes / 3 * 2 * spec.params  # LoRA: no weight gradients
    sequence = min(tokens / examples, train["max_length"])
    attention = passes * 2 * spec.layers * spec.hidden * sequence  # causal: half the square
    per_token = linear + attention
    flops = tokens * per_token + term_tokens * per_token  # term_tokens: 0 without a term
    # a frozen base model's forward (KL to base) on the term's tokens
    flops += objective.base_forwards * term_tokens * 2 * spec.params
    compute = [flops / (gpus * hardware.bf16_flops * share) for share in hardware.flops_used]
    sharded = train["fsdp"] and gpus > 1
    communication = [0.0, 0.0]
    steps = math.ceil(examples / train["batch_size"])
    if sharded:
        # bf16 weights gathered for the forward and the backward pass, the gradient
        # reduce-scattered each micro-batch (or once a step); the synthetic term's passes
        # again, and KL's base model gathered for its forward
        micro_batches = examples / (train["micro_batch_size"] * gpus)
        term_batches = steps * round(knobs.get("ratio", 0) * train["batch_size"]) / gpus
        if not method.synthetic_term:
            term_batches = 0
        reduce = micro_batches if train["fsdp_reduce_each_micro_batch"] else steps
        gathers = 2 * micro_batches + reduce + 3 * term_batches
        gathers += objective.base_forwards * term_batches
        moved = gathers * 2 * spec.params * (gpus - 1) / gpus
        communication = [moved / speed for speed in hardware.collective_bytes_per_s]
    seconds = (max(compute[0], communication[0]), compute[1] + communication[1])
    # checkpoints: every save_minutes (or save_steps); under FSDP each GPU writes its part
    # of the float32 weights and Adam moments at once, otherwise one process writes them
    size = (0.05 if lora else 12) * spec.params
    speeds = hardware.checkpoint_bytes_per_s if sharded else hardware.single_writer_bytes_per_s
    by_steps = steps // train["save_steps"] if train["save_steps"] else math.inf
    # accelerate's default under FSDP, every 50 steps: the whole state through rank 0
    full = steps // (train["save_steps"] or 50) * 16 * spec.params if sharded and not lora else 0
    checkpoint_hours, full_state_hours, hours = [], [], []
    for end in range(2):
        by_time = seconds[end] / 60 // train["save_minutes"] if train["save_minutes"] else math.inf
        count = min(by_steps, by_time)
        checkpoint_hours.append((0 if count == math.inf else count) * size / speeds[end] / 3600)
        full_state_hours.append(full / hardware.single_writer_bytes_per_s[end] / 3600)
        final_save = 2 * spec.params / hardware.single_writer_bytes_per_s[end] / 3600
        hours.append(seconds[end] / 3600 + checkpoint_hours[end] + final_save)
    return Job(
        "fine_tune",
        f"{cell} seed{seed}",
        gpus,
        tokens + term_tokens,
        tuple(hours),
        runtime,
        tuple(checkpoint_hours),
        tuple(full_state_hours),
    )


def evaluation_jobs(config, model, study, spec: Assumption) -> list[Job]:
    evaluation = config["evaluation"]
    gpus = resource(config, model, "evaluate", "gpus")
    runtime = resource(config, model, "evaluate", "runtime")
    tokens = 0.0
    for entry in [evaluation["target"], *evaluation["forgetting"]]:
        questions, length = spec.eval_answers.get(entry["task"], (0, 0))
        cap = entry["gen_kwargs"].get("max_gen_toks", length)
        limit = evaluation["limit"] or questions
        tokens += min(questions, limit) * entry["repeats"] * min(length, cap)
    decode = decode_hours(tokens, spec.decode_tokens_per_s)
    hours = (decode[0] + spec.eval_fixed_hours[0], decode[1] + spec.eval_fixed_hours[1])
    evaluated = study.cells() + study.point_cells()  # points along training too
    cells = ["base"] + [f"{cell} seed{seed}" for cell in evaluated for seed in study.seeds]
    jobs = []
    for name in cells:
        rule = "evaluate_base" if name == "base" else "evaluate_finetuned"
        jobs.append(Job(rule, name, gpus, tokens, hours, runtime))
    return jobs


def study_jobs(config: dict, hardware: Hardware = Hardware()) -> list[Job]:
    from cfs.study import METHODS, Study, parse_cell

    study = Study(config)
    jobs = []
    for model in study.study["models"]:
        hub_id = config["models"][model].get("hub_id")
        if hub_id not in ASSUMPTIONS:
            raise SystemExit(f"cfs.budget: no assumptions for model '{model}' ({hub_id})")
        spec = ASSUMPTIONS[hub_id]
        jobs += generation_jobs(config, model, study, spec)
        for cell in study.cells():
            if METHODS[parse_cell(cell)["method"]].trains:
                jobs += [train_job(config, model, cell, s, spec, hardware) for s in study.seeds]
        jobs += evaluation_jobs(config, model, study, spec)
    return jobs


# --------------------------------------------------------------------------- report


def totals(jobs: list[Job]) -> dict:
    """Per rule: jobs, tokens, GPU-hours (fast, slow) and the longest job (slow)."""
    table: dict = {}
    for job in jobs:
        row = table.setdefault(
            job.rule, {"jobs": 0, "tokens": 0.0, "gpu_hours": [0.0, 0.0], "longest": None}
        )
        row["jobs"] += 1
        row["tokens"] += job.tokens
        for end in range(2):
            row["gpu_hours"][end] += job.gpu_hours[end]
        if row["longest"] is None or job.hours[1] > row["longest"].hours[1]:
            row["longest"] = job
    return table


def checkpoint_gpu_hours(jobs: list[Job]) -> dict:
    sharded = [sum(j.checkpoint_hours[e] * j.gpus for j in jobs) for e in range(2)]
    full = [sum(j.full_state_checkpoint_hours[e] * j.gpus for j in jobs) for e in range(2)]
    return {"sharded": sharded, "full_state": full}


def too_long(jobs: list[Job]) -> list[Job]:
    """Jobs whose slower estimate exceeds their configured runtime, generation excepted
    (it resumes from its finished chunks across attempts: `attempts`)."""
    return [job for job in jobs if job.attempts == 1 and job.hours[1] * 60 > job.runtime_minutes]


def markdown(config: dict, jobs: list[Job], with_jobs: bool = False) -> str:
    def hours(pair):
        low, high = pair
        return f"{low:,.0f}–{high:,.0f}" if high >= 10 else f"{low:.1f}–{high:.1f}"

    lines = [
        "| jobs | count | tokens | GPUs a job | GPU-hours | longest job (slow estimate) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    table = totals(jobs)
    for rule, row in table.items():
        longest = row["longest"]
        gpus = "/".join(str(n) for n in sorted({job.gpus for job in jobs if job.rule == rule}))
        attempts = f", {longest.attempts} attempts" if longest.attempts > 1 else ""
        lines.append(
            f"| `{rule}` | {row['jobs']} | {row['tokens'] / 1e9:.2f} B | {gpus} | "
            f"{hours(row['gpu_hours'])} | {longest.name}: {longest.hours[1]:.1f} h "
            f"(runtime {longest.runtime_minutes / 60:g} h{attempts}) |"
        )
    total = [sum(row["gpu_hours"][end] for row in table.values()) for end in range(2)]
    lines.append(f"| **all** | {len(jobs)} | | | **{hours(total)}** | |")
    checkpoints = checkpoint_gpu_hours(jobs)
    lines += ["", f"Checkpoint writes, included above: {hours(checkpoints['sharded'])} GPU-hours."]
    if checkpoints["full_state"][1] > 0:
        every = config["train"]["save_steps"] or 50
        lines[-1] += (
            f" Full-state checkpoints (accelerate's default) every {every} steps instead: "
            f"{hours(checkpoints['full_state'])}."
        )
    if with_jobs:
        lines += ["", "| job | GPUs | hours | runtime |", "| --- | --- | --- | --- |"]
        for job in jobs:
            lines.append(
                f"| {job.rule} {job.name} | {job.gpus} | {hours(job.hours)} | "
                f"{job.runtime_minutes} min |"
            )
    return "\n".join(lines)


DOCUMENTED = ("config/reasoning.yaml", "config/olmo.yaml")

DOCUMENT_HEAD = """# Cluster budget

Generated by `python -m cfs.budget --document > docs/cluster-budget.md` (run in `workflow/`,
or with it on `PYTHONPATH`); tests/unit/test_budget.py checks that this file is the
script's output. Every GPU job of each paper setting's grid, its tokens and its hours, from
the config and the assumptions in `workflow/cfs/budget.py`. **Nothing here is measured.**
Each figure is a range between a faster and a slower set of assumptions:

- the GPU: an H100 SXM (989 TFLOP/s dense bf16); training reaches 45% (fast) or 30% (slow)
  of it; FSDP's collectives run at an NCCL bus bandwidth of 360 or 200 GB/s (NVLink),
  overlapped with compute (fast) or not (slow);
- FLOPs: a trained token 6N (8N with activation checkpointing; LoRA 4N or 6N), plus
  attention; KL to base adds the frozen model's forward on its samples;
- lengths (by assumption, not counted from the data): a MedReason example 1,000 tokens, a
  MetaMathQA one 250; R1-distill's context-free samples 5,000 to 8,000 tokens by
  temperature, its answers to the MedReason prompts 1,500 to 5,000; OLMo's nearly all cut
  at 512; benchmark answers with their thinking: AIME 14,000 tokens, MATH-500 4,000, GPQA
  8,000;
- decoding (vLLM, one GPU, many sequences): 5,000 or 2,500 tokens/s for the 8B model,
  30,000 or 12,000 for OLMo-1B; OLMo's evaluations 0.25 to 0.5 h each;
- checkpoints: a node writes 4 or 1 GB/s to shared disk, one process 1 or 0.4 GB/s.
  Sharded: 12 bytes a parameter, all GPUs writing at once; accelerate's full state: 16
  bytes a parameter through rank 0 while the others wait.
"""


def document() -> str:
    """docs/cluster-budget.md: the head above and each paper setting's table."""
    parts = [DOCUMENT_HEAD]
    for name in DOCUMENTED:
        config = load_config(REPO / name)
        jobs = study_jobs(config)
        parts.append(f"## `{name}`\n\n{len(jobs)} GPU jobs.\n")
        parts.append(markdown(config, jobs) + "\n")
        parts += [
            f"Runtime too short: {job.rule} {job.name}, {job.hours[1]:.1f} h estimated.\n"
            for job in too_long(jobs)
        ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "config", type=Path, nargs="?", help="a config merged over config/config.yaml"
    )
    parser.add_argument("--jobs", action="store_true", help="list every job too")
    parser.add_argument(
        "--document", action="store_true", help="docs/cluster-budget.md: the paper's settings"
    )
    args = parser.parse_args(argv)
    if args.document:
        print(document(), end="")
        return
    if args.config is None:
        parser.error("a config, or --document")
    config = load_config(args.config)
    jobs = study_jobs(config)
    print(markdown(config, jobs, args.jobs))
    for job in too_long(jobs):
        print(f"runtime too short: {job.rule} {job.name}: {job.hours[1]:.1f} h estimated")


if __name__ == "__main__":
    main()
