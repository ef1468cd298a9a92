"""Generation: the pipeline's context-free sampling against a naive loop, and the bound.

    .venv/bin/python benchmarks/generation.py [--quick] [--model DIR] [--json out.json]

- pipeline: `cfs.generate.sample_context_free` (the batched HF `generate`, the settings of
  `generation:` in config/config.yaml) on the embedded default model (SmolLM2-135M, float32,
  CPU), counting the tokens it keeps (up to and including EOS);
- naive: what a user would otherwise write — one prompt at a time through `model.generate`
  with the same sampling settings;
- bound: the batched forward pass alone: a hand-written KV-cache decode loop at the same
  batch size and length (fixed tokens, no sampling, no `generate` machinery), i.e. what
  batched decoding costs if nothing but the model ran; and, for scale, one full-sequence
  forward pass over the same number of positions (prefill, the compute ceiling);
- proposed: the fix this benchmark's profile points to (torch.multinomial's per-entry
  exponentials are a large share of each step on CPU): the same batched decode by hand,
  sampling by inverse CDF.

Goal: pipeline tokens/s >= 8x the naive loop.
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


def decode_inverse_cdf(model, tokenizer, settings: dict, num_samples: int, temperature: float):
    """The proposed fix, measured: a hand-written KV-cache decode loop that samples by
    inverse CDF (cumsum + searchsorted: one uniform per row) instead of torch.multinomial
    (one exponential per vocabulary entry and row), stopping a batch when every row has
    ended; same prompts, batches and settings as the pipeline (top-p 1, no top-k)."""
    import torch
    from cfs.tokens import context_free_prompt_id
    from transformers import DynamicCache

    prompt_id = context_free_prompt_id(tokenizer, settings["prompt_token_id"])
    eos = tokenizer.eos_token_id
    batch_size, steps = settings["batch_size"], settings["max_new_tokens"]
    tokens = 0
    with Timer() as timer, torch.no_grad():
        for index, start in enumerate(range(0, num_samples, batch_size)):
            size = min(batch_size, num_samples - start)
            generator = torch.Generator().manual_seed(settings["seed"] * 1_000_003 + index)
            ids = torch.full((size, 1), prompt_id, dtype=torch.long)
            cache = DynamicCache(config=model.config)
            done = torch.zeros(size, dtype=torch.bool)
            for _ in range(steps):
                output = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
                cache = output.past_key_values
                probs = torch.softmax(output.logits[:, -1].float() / temperature, -1)
                uniform = torch.rand((size, 1), generator=generator)
                ids = torch.searchsorted(probs.cumsum(-1), uniform).clamp_(max=probs.shape[-1] - 1)
                tokens += int((~done).sum())
                done |= ids[:, 0] == eos
                if bool(done.all()):
                    break
    return {"seconds": timer.seconds, "tokens": tokens}


def prefill_bound(model, batch_size: int, steps: int):
    """One forward pass over the same number of positions, no cache (the compute ceiling)."""
    import torch

    ids = torch.randint(3, model.config.vocab_size, (batch_size, steps + 1))
    with Timer() as timer, torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return {"seconds": timer.seconds, "tokens": batch_size * (steps + 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, one batch, one round")
    parser.add_argument("--model", help=f"model folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--config", help="a config file merged over config/config.yaml")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--naive-samples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, help="override generation.batch_size")
    parser.add_argument(
        "--compare-batch-size", type=int, help="also run the pipeline at this batch size"
    )
    parser.add_argument("--num-samples", type=int, help="override generation.num_samples")
    parser.add_argument("--profile", action="store_true", help="torch.profiler of the pipeline")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    quiet()
    set_threads(args.threads)
    import torch
    from cfs.modeling import load_model, load_tokenizer

    config = load_config(*([args.config] if args.config else []))
    # cfs.generate's settings as the rule hands them (seed 0: the first seed's samples)
    settings = {**config["generation"], "seed": 0}
    scratch = None
    if args.quick:
        quick_mode()
        scratch = Path(tempfile.mkdtemp(prefix="cfs-bench-generation-"))
        model_dir = Path(args.model) if args.model else tiny_model(scratch / "tiny")
        settings.update(batch_size=8, max_new_tokens=8)
    else:
        model_dir = require_model(Path(args.model or DEFAULT_MODEL))
    if args.batch_size:
        settings["batch_size"] = args.batch_size
    if args.num_samples:
        settings["num_samples"] = args.num_samples
    num_samples = settings["batch_size"] if args.quick else settings["num_samples"]
    naive_samples = args.naive_samples or (2 if args.quick else 8)
    rounds = args.rounds or (1 if args.quick else 2)

    model = load_model(model_dir, "float32").eval()
    tokenizer = load_tokenizer(model_dir)
    batch, steps = settings["batch_size"], settings["max_new_tokens"]
    print(
        f"generation: {model_dir.name} float32, "
        f"{torch.get_num_threads()} torch threads; {num_samples} samples x {steps} new tokens, "
        f"batch {batch}, T={args.temperature}, top-p {settings['top_p']}; naive: "
        f"{naive_samples} samples one at a time; best of {rounds} alternating rounds"
    )
    # warm-up: first calls pay for allocation and kernel selection
    call_naive(model, tokenizer, {**settings, "max_new_tokens": 4}, 1, args.temperature)
    decode_bound(model, batch, 2)

    variants = {
        "pipeline": lambda: call_pipeline(model, tokenizer, settings, num_samples, args.temperature)
    }
    other_batch = {**settings, "batch_size": args.compare_batch_size}
    if args.compare_batch_size:
        variants["pipeline_other_batch"] = lambda: call_pipeline(
            model, tokenizer, other_batch, num_samples, args.temperature
        )
    runs = alternate(
        {
            **variants,
            "naive": lambda: call_naive(
                model, tokenizer, settings, naive_samples, args.temperature
            ),
            "inverse_cdf_decode": lambda: decode_inverse_cdf(
                model, tokenizer, settings, num_samples, args.temperature
            ),
            "decode_bound": lambda: decode_bound(model, batch, steps),
            "prefill_bound": lambda: prefill_bound(model, batch, steps),
        },
        rounds,
    )
    result = {name: best(values) for name, values in runs.items()}
    for entry in result.values():
        entry["tokens_per_s"] = entry["tokens"] / entry["seconds"]
    pipe, naive = result["pipeline"], result["naive"]
    pipe["positions_per_s"] = pipe["positions"] / pipe["seconds"]
    ratio = pipe["tokens_per_s"] / naive["tokens_per_s"]
    per_round = round_ratios(runs, "pipeline", "naive", lambda r: r["tokens"] / r["seconds"])
    of_decode = pipe["tokens_per_s"] / result["decode_bound"]["tokens_per_s"]
    positions_of_decode = pipe["positions_per_s"] / result["decode_bound"]["tokens_per_s"]
    of_prefill = pipe["tokens_per_s"] / result["prefill_bound"]["tokens_per_s"]
    extra_rows = []
    if args.compare_batch_size:
        other = result["pipeline_other_batch"]
        extra_rows.append(
            [
                f"pipeline at batch {args.compare_batch_size}",
                f"{other['tokens']}",
                f"{other['seconds']:.2f}",
                f"{other['tokens_per_s']:.1f}",
                f"{other['tokens_per_s'] / naive['tokens_per_s']:.2f}x naive",
            ]
        )
    rows = [
        [
            "pipeline (sample_context_free)",
            f"{pipe['tokens']}",
            f"{pipe['seconds']:.2f}",
            f"{pipe['tokens_per_s']:.1f}",
            f"{ratio:.2f}x naive",
        ],
        [
            "naive one-prompt loop",
            f"{naive['tokens']}",
            f"{naive['seconds']:.2f}",
            f"{naive['tokens_per_s']:.1f}",
            "1.00x",
        ],
        [
            f"decode bound (bare forward, batch {batch})",
            f"{result['decode_bound']['tokens']}",
            f"{result['decode_bound']['seconds']:.2f}",
            f"{result['decode_bound']['tokens_per_s']:.1f}",
            f"pipeline = {of_decode:.0%} of it",
        ],
        [
            "proposed: decode loop + inverse-CDF sampling",
            f"{result['inverse_cdf_decode']['tokens']}",
            f"{result['inverse_cdf_decode']['seconds']:.2f}",
            f"{result['inverse_cdf_decode']['tokens_per_s']:.1f}",
            f"{result['inverse_cdf_decode']['tokens_per_s'] / naive['tokens_per_s']:.2f}x naive",
        ],
        [
            "prefill (one forward, same positions)",
            f"{result['prefill_bound']['tokens']}",
            f"{result['prefill_bound']['seconds']:.2f}",
            f"{result['prefill_bound']['tokens_per_s']:.1f}",
            f"pipeline = {of_prefill:.1%} of it",
        ],
    ]
    rows[1:1] = extra_rows
    print()
    print(table(rows, ["variant", "tokens", "seconds", "tokens/s", "ratio"]))
    print(
        f"\npipeline: {pipe['ended_with_eos']}/{pipe['samples']} samples ended with EOS; "
        f"{pipe['positions']} decode positions for {pipe['tokens']} kept tokens "
        f"({pipe['tokens'] / pipe['positions']:.0%}); positions/s = {positions_of_decode:.0%} "
        f"of the decode bound"
    )
    print(
        f"pipeline / naive tokens/s within each round: "
        f"{', '.join(f'{r:.2f}x' for r in per_round['per_round'])} "
        f"(median {per_round['median']:.2f}x); the table pairs each variant's best round"
    )
    print(
        f"pipeline time inside the model's forward: {pipe['forward_seconds']:.2f} s "
        f"of {pipe['seconds']:.2f} s ({pipe['forward_seconds'] / pipe['seconds']:.0%}; "
        f"{pipe['forward_calls']} calls); the rest is generate's sampling, cache and bookkeeping"
    )
    print(
        f"goal: pipeline >= {GOAL_RATIO:g}x naive tokens/s (median of rounds): "
        f"{goal(per_round['median'] >= GOAL_RATIO)} ({per_round['median']:.2f}x; "
        f"best rounds {ratio:.2f}x)"
    )
    if args.profile:
        print("\nprofile of one pipeline run (torch.profiler, top operators by self CPU time):")
        profile_call(
            lambda: call_pipeline(model, tokenizer, settings, num_samples, args.temperature)
        )
    report(
        "generation",
        {
            "settings": {**settings, "num_samples": num_samples, "temperature": args.temperature},
            "naive_samples": naive_samples,
            "rounds": rounds,
            "results": result,
            "ratio_vs_naive": ratio,
            "ratio_vs_naive_per_round": per_round,
            "share_of_decode_bound": of_decode,
            "positions_share_of_decode_bound": positions_of_decode,
            "share_of_prefill": of_prefill,
            "goal_met": per_round["median"] >= GOAL_RATIO,
        },
        args.json,
    )
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
