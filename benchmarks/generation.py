"""Generation: the pipeline's context-free sampling against a naive loop and the bare decode.

    .venv/bin/python benchmarks/generation.py [--quick] [--model DIR] [--json out.json]

- pipeline: `cfs.generate.sample_context_free` with the settings of `generation:` in
  config/config.yaml, on the embedded default model (float32, CPU), counting the tokens
  it keeps (up to and including EOS);
- naive: one prompt at a time through `model.generate`, same sampling settings;
- decode bound: a bare KV-cache decode loop at the same batch size and length (fixed
  tokens, no sampling): what batched decoding costs if nothing but the model ran.

Goal: pipeline tokens/s >= 8x the naive loop (median of the rounds' ratios).
--quick: a tiny random model, one batch, 8 new tokens, one round.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from _common import (
    DEFAULT_MODEL,
    ForwardClock,
    Timer,
    alternate,
    best,
    goal,
    load_config,
    profile_call,
    quick_mode,
    quiet,
    report,
    require_model,
    round_ratios,
    set_threads,
    table,
    tiny_model,
)
from cfs.generate import sample_context_free

GOAL_RATIO = 8.0


def call_pipeline(model, tokenizer, settings: dict, num_samples: int, temperature: float):
    from cfs.tokens import context_free_prompt_id

    clock = ForwardClock(model)
    try:
        with Timer() as timer:
            samples = sample_context_free(
                model,
                tokenizer,
                num_samples=num_samples,
                max_new_tokens=settings["max_new_tokens"],
                temperature=temperature,
                top_p=settings["top_p"],
                seed=settings["seed"],
                batch_size=settings["batch_size"],
                prompt_token_id=context_free_prompt_id(tokenizer, settings["prompt_token_id"]),
            )
    finally:
        clock.remove()
    tokens = sum(len(sample["token_ids"]) for sample in samples)
    # positions the batched decode ran: each batch runs until its longest sample ends
    positions = 0
    for start in range(0, len(samples), settings["batch_size"]):
        batch = samples[start : start + settings["batch_size"]]
        positions += len(batch) * max(len(sample["token_ids"]) for sample in batch)
    return {
        "seconds": timer.seconds,
        "forward_seconds": clock.seconds,
        "forward_calls": clock.calls,
        "samples": len(samples),
        "tokens": tokens,
        "positions": positions,
        "ended_with_eos": sum(sample["finish_reason"] == "eos" for sample in samples),
    }


def call_naive(model, tokenizer, settings: dict, num_samples: int, temperature: float):
    """One prompt at a time, the loop a user would write first."""
    import torch
    from cfs.tokens import context_free_prompt_id

    prompt_id = context_free_prompt_id(tokenizer, settings["prompt_token_id"])
    eos = tokenizer.eos_token_id
    tokens = 0
    with Timer() as timer, torch.no_grad():
        for index in range(num_samples):
            torch.manual_seed(index)
            prompt = torch.tensor([[prompt_id]])
            output = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                temperature=temperature,
                top_p=settings["top_p"],
                top_k=0,
                max_new_tokens=settings["max_new_tokens"],
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
            tokens += output.shape[1] - 1
    return {"seconds": timer.seconds, "samples": num_samples, "tokens": tokens}


def decode_bound(model, batch_size: int, steps: int):
    """Bare batched decode: the model's forward with a KV cache, nothing else."""
    import torch
    from transformers import DynamicCache

    ids = torch.full((batch_size, 1), 1, dtype=torch.long)
    with Timer() as timer, torch.no_grad():
        cache = DynamicCache(config=model.config)
        for _ in range(steps + 1):  # the prompt token, then one step per new token
            output = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            cache = output.past_key_values
            ids = output.logits[:, -1].argmax(-1, keepdim=True)
    return {"seconds": timer.seconds, "tokens": batch_size * steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, one batch, one round")
    parser.add_argument("--model", help=f"model folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--config", help="a config file merged over config/config.yaml")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--naive-samples", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="torch.profiler of the pipeline")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    quiet()
    set_threads(args.threads)
    from cfs.modeling import load_model, load_tokenizer

    config = load_config(args.config)
    settings = {**config["generation"], "seed": 0}  # as the rule hands them, first seed
    scratch = Path(tempfile.mkdtemp(prefix="cfs-bench-generation-"))
    if args.quick:
        quick_mode()
        model_dir = Path(args.model) if args.model else tiny_model(scratch / "tiny")
        settings.update(batch_size=8, max_new_tokens=8)
    else:
        model_dir = require_model(Path(args.model or DEFAULT_MODEL))
    num_samples = settings["batch_size"] if args.quick else settings["num_samples"]
    naive_samples = args.naive_samples or (2 if args.quick else 8)
    rounds = args.rounds or (1 if args.quick else 2)
    model, tokenizer = load_model(model_dir, "float32").eval(), load_tokenizer(model_dir)
    batch, steps, temperature = settings["batch_size"], settings["max_new_tokens"], args.temperature
    print(
        f"generation: {model_dir.name} float32; {num_samples} samples x {steps} new tokens, "
        f"batch {batch}, T={temperature}; naive: {naive_samples} samples one at a time; "
        f"best of {rounds} alternating rounds"
    )
    call_naive(model, tokenizer, {**settings, "max_new_tokens": 4}, 1, temperature)  # warm-up
    decode_bound(model, batch, 2)
    variants = {
        "pipeline": lambda: call_pipeline(model, tokenizer, settings, num_samples, temperature),
        "naive": lambda: call_naive(model, tokenizer, settings, naive_samples, temperature),
        "decode_bound": lambda: decode_bound(model, batch, steps),
    }
    runs = alternate(variants, rounds)
    result = {name: best(values) for name, values in runs.items()}
    for entry in result.values():
        entry["tokens_per_s"] = entry["tokens"] / entry["seconds"]
    pipe, naive, bound = result["pipeline"], result["naive"], result["decode_bound"]
    ratio = pipe["tokens_per_s"] / naive["tokens_per_s"]
    per_round = round_ratios(runs, "pipeline", "naive", lambda r: r["tokens"] / r["seconds"])
    of_decode = pipe["tokens_per_s"] / bound["tokens_per_s"]
    rows = [
        ["pipeline (sample_context_free)", pipe, f"{ratio:.2f}x naive"],
        ["naive one-prompt loop", naive, "1.00x"],
        [f"decode bound (bare forward, batch {batch})", bound, f"pipeline at {of_decode:.0%}"],
    ]
    rows = [
        [n, r["tokens"], f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.1f}", x] for n, r, x in rows
    ]
    print(table(rows, ["variant", "tokens", "seconds", "tokens/s", "ratio"]))
    inside = pipe["forward_seconds"] / pipe["seconds"]
    print(
        f"pipeline: {pipe['ended_with_eos']}/{pipe['samples']} samples ended with EOS; "
        f"{inside:.0%} of its time inside the model's forward; per round "
        f"{', '.join(f'{r:.2f}x' for r in per_round['per_round'])} naive; goal >= "
        f"{GOAL_RATIO:g}x (median): {goal(per_round['median'] >= GOAL_RATIO)}"
    )
    if args.profile:
        profile_call(lambda: call_pipeline(model, tokenizer, settings, num_samples, temperature))
    report(
        "generation",
        {
            "settings": {**settings, "num_samples": num_samples, "temperature": temperature},
            "naive_samples": naive_samples,
            "rounds": rounds,
            "results": result,
            "ratio_vs_naive": ratio,
            "ratio_vs_naive_per_round": per_round,
            "share_of_decode_bound": of_decode,
            "goal_met": per_round["median"] >= GOAL_RATIO,
        },
        args.json,
    )
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
