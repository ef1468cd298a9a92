"""Generation: the pipeline's context-free sampling against a naive loop and the bare decode.

- pipeline: `cfs.generate.sample_context_free` with the generation stage's settings on the
  embedded default model (float32, CPU), counting the tokens it keeps (up to and including
  EOS) and the time inside the model's forward;
- naive: one prompt at a time through `model.generate`, same sampling settings;
- decode bound: a bare KV-cache decode loop at the same batch size and length (fixed
  tokens, no sampling): what batched decoding costs if nothing but the model ran.
Goal: pipeline tokens/s >= 8x the naive loop (median of the rounds' ratios).
--quick: a tiny random model, one batch, 8 new tokens, one round.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import _common as common

GOAL_RATIO = 8.0


def call_pipeline(model, tokenizer, settings: dict, num_samples: int) -> dict:
    with common.spy(model, "forward", then=lambda output: None) as forwards:
        samples = common.context_free(model, tokenizer, settings, num_samples)
    tokens = sum(len(sample["token_ids"]) for sample in samples)
    return {"tokens": tokens, "forward_seconds": sum(seconds for _, seconds in forwards)}


def call_naive(model, tokenizer, settings: dict, num_samples: int) -> dict:
    """One prompt at a time, the loop a user would write first."""
    import torch
    from cfs.tokens import context_free_prompt_id

    prompt = torch.tensor([[context_free_prompt_id(tokenizer, settings["prompt_token_id"])]])
    sampling = {key: settings[key] for key in ("temperature", "top_p", "max_new_tokens")}
    sampling |= {"do_sample": True, "top_k": 0, "pad_token_id": tokenizer.pad_token_id}
    sampling["eos_token_id"] = tokenizer.eos_token_id
    tokens = 0
    with torch.no_grad():
        for index in range(num_samples):
            torch.manual_seed(index)
            output = model.generate(prompt, attention_mask=torch.ones_like(prompt), **sampling)
            tokens += output.shape[1] - 1
    return {"tokens": tokens}


def decode_bound(model, batch_size: int, steps: int) -> dict:
    """Bare batched decode: the model's forward with a KV cache, nothing else."""
    import torch
    from transformers import DynamicCache

    ids = torch.full((batch_size, 1), 1, dtype=torch.long)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        for _ in range(steps + 1):  # the prompt token, then one step per new token
            output = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            cache, ids = output.past_key_values, output.logits[:, -1].argmax(-1, keepdim=True)
    return {"tokens": batch_size * steps}


def main() -> None:
    parser = common.arguments(__doc__, "--model", "--config", "--rounds", "--threads")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--naive-samples", type=int, help="default 8 (--quick: 2)")
    args = parser.parse_args()
    common.setup(args)
    from cfs.modeling import load_model, load_tokenizer

    settings = common.stage_settings(args.config).generation("smollm2", 0, args.temperature)
    scratch = Path(tempfile.mkdtemp(prefix="cfs-bench-generation-"))
    if args.quick:
        settings.update(batch_size=8, max_new_tokens=8, num_samples=8)
    model_dir = common.model_folder(args, scratch)
    num_samples, batch = settings["num_samples"], settings["batch_size"]
    steps = settings["max_new_tokens"]
    naive_samples = args.naive_samples or (2 if args.quick else 8)
    rounds = args.rounds or (1 if args.quick else 2)
    model, tokenizer = load_model(model_dir, "float32").eval(), load_tokenizer(model_dir)
    print(
        f"generation: {model_dir.name} float32; {num_samples} samples x {steps} new tokens, "
        f"batch {batch}, T={args.temperature}; naive: {naive_samples} samples one at a time; "
        f"best of {rounds} alternating rounds"
    )
    call_naive(model, tokenizer, {**settings, "max_new_tokens": 4}, 1)  # warm-up
    decode_bound(model, batch, 2)
    variants = {
        "pipeline": lambda: call_pipeline(model, tokenizer, settings, num_samples),
        "naive": lambda: call_naive(model, tokenizer, settings, naive_samples),
        "decode_bound": lambda: decode_bound(model, batch, steps),
    }
    runs = common.alternate(variants, rounds)
    shutil.rmtree(scratch, ignore_errors=True)
    result = {name: common.best(values) for name, values in runs.items()}
    for entry in result.values():
        entry["tokens_per_s"] = entry["tokens"] / entry["seconds"]
    pipe, naive, bound = result["pipeline"], result["naive"], result["decode_bound"]
    ratio = pipe["tokens_per_s"] / naive["tokens_per_s"]
    per_round = common.round_ratios(runs, "pipeline", "naive", lambda r: r["tokens"] / r["seconds"])
    of_decode = pipe["tokens_per_s"] / bound["tokens_per_s"]
    rows = [
        ["pipeline (sample_context_free)", pipe, f"{ratio:.2f}x naive"],
        ["naive one-prompt loop", naive, "1.00x"],
        [f"decode bound (bare forward, batch {batch})", bound, f"pipeline at {of_decode:.0%}"],
    ]
    rows = [
        [n, r["tokens"], f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.1f}", x] for n, r, x in rows
    ]
    print(common.table(rows, ["variant", "tokens", "seconds", "tokens/s", "ratio"]))
    print(
        f"pipeline: {pipe['forward_seconds'] / pipe['seconds']:.0%} of its time inside the "
        f"model's forward; per round {', '.join(f'{r:.2f}x' for r in per_round['per_round'])} "
        f"naive; goal >= {GOAL_RATIO:g}x (median): {common.goal(per_round['median'] >= GOAL_RATIO)}"
    )
    figures = {"results": result, "ratio_vs_naive": ratio, "ratio_vs_naive_per_round": per_round}
    figures |= {"share_of_decode_bound": of_decode, "settings": settings, "rounds": rounds}
    common.report("generation", {**figures, "naive_samples": naive_samples}, args.json)


if __name__ == "__main__":
    main()
