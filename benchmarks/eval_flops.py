"""Model FLOPs of one evaluation of the configured study, counted from the tokenizer.

    .venv/bin/python benchmarks/eval_flops.py [--model results/models/smollm2/base]
        [--params 134.5e6] [--seconds-target 141 --seconds-forgetting 96]

Builds lm-eval's requests of the target and forgetting tasks exactly as an eval job does
(config/config.yaml's `evaluation`; run after `prepare_task_data`, from the repository
root) and counts the token positions a forward pass computes:
- target (generate_until): prompts in batches of `evaluation.batch_size`, sorted by length and
  left-padded to the longest of their batch, plus `max_gen_toks` decode steps of every row
  (an upper bound: a batch stops once all its rows have stopped);
- forgetting (log-likelihood): context + continuation - 1 per request, where requests with a
  one-token continuation after the same context share one forward (lm-eval's logits cache).
Each position costs 2 x params FLOPs (LM head included). Given the stage's measured seconds,
it prints the model FLOP/s, to divide by `machine_limit.py`'s rate.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from _common import DEFAULT_CONFIG, DEFAULT_MODEL, REPO, load_config, require_model, table


def requests(task_names: list[str], include_path: str) -> dict[str, list]:
    from cfs.evaluate import local_task_manager

    manager = local_task_manager(include_path, task_names)
    tasks = manager.load_task_or_group(task_names)
    out = {}
    for name in task_names:
        task = tasks[name]
        task.build_all_requests(rank=0, world_size=1)
        out[name] = [instance.arguments for instance in task.instances]
    return out


def target_positions(tokenizer, arguments: list, batch_size: int) -> tuple[int, int]:
    lengths = sorted(
        (len(tokenizer(context)["input_ids"]) for context, _ in arguments), reverse=True
    )
    max_new = max(int(kwargs.get("max_gen_toks", 256)) for _, kwargs in arguments)
    batches = [lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)]
    return sum(max(batch) * len(batch) for batch in batches), max_new * len(lengths)


def loglikelihood_positions(tokenizer, arguments: list) -> int:
    positions, shared = 0, set()
    for context, continuation in arguments:
        context_ids = tokenizer(context)["input_ids"]
        whole = tokenizer(context + continuation)["input_ids"]
        continuation_ids = whole[len(context_ids) :]
        key = tuple(context_ids + continuation_ids[:-1])
        if len(continuation_ids) == 1 and key in shared:
            continue
        shared.add(key)
        positions += len(context_ids) + len(continuation_ids) - 1
    return positions


def main() -> None:
    from cfs.modeling import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--params", type=float, default=134.5e6)
    parser.add_argument("--seconds-target", type=float)
    parser.add_argument("--seconds-forgetting", type=float)
    args = parser.parse_args()
    os.chdir(REPO)
    evaluation = load_config(args.config)["evaluation"]
    tokenizer = load_tokenizer(require_model(args.model))
    target = evaluation["target"]["task"]
    forgetting = [entry["task"] for entry in evaluation["forgetting"]]
    built = requests([target, *forgetting], evaluation["include_path"])
    prefill, decode = target_positions(tokenizer, built[target], evaluation["batch_size"])
    loglik = sum(loglikelihood_positions(tokenizer, built[name]) for name in forgetting)
    rows = []
    for stage, positions, seconds in (
        (f"target: {len(built[target])} prompts, prefill", prefill, None),
        ("target: decode (at most)", decode, None),
        ("target: all", prefill + decode, args.seconds_target),
        (
            f"forgetting: {sum(len(built[n]) for n in forgetting)} requests",
            loglik,
            args.seconds_forgetting,
        ),
    ):
        flops = 2 * args.params * positions
        rate = f"{flops / seconds / 1e9:.1f}" if seconds else ""
        rows.append([stage, f"{positions:,}", f"{flops / 1e12:.2f}", rate])
    print(table(rows, ["stage", "token positions", "TFLOP", "GFLOP/s"]))


if __name__ == "__main__":
    main()
