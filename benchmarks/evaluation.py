"""Evaluation: wall time of the embedded default's base eval and of the KL-to-base metric.

    .venv/bin/python benchmarks/evaluation.py [--quick] [--json out.json]

- base eval: `cfs.evaluate.evaluate` on the base SmolLM2-135M with exactly the settings the
  `evaluate_base` rule passes (read from a forced Snakemake dry run), against what a user
  would otherwise write: `lm_eval.simple_evaluate(model="hf", ...)` on the same tasks,
  batch size and limit, with lm-eval's default task index (`--include_path tasks`);
- KL to base: `cfs.evaluate.kl_to_base` over the held-out context-free samples, against
  its floor: the two forward passes (base and fine-tuned model) over the same batches.

Every forward pass of the evaluated model is counted (positions, including padding), so
the times are also given per 1,000 positions. Quick mode limits lm-eval to 8 items a task.
"""

from __future__ import annotations

import argparse
import json

from _common import (
    DEFAULT_MODEL,
    REPO,
    Timer,
    alternate,
    best,
    load_config,
    machine,
    quiet,
    report,
    require_model,
    rule_settings,
    set_threads,
    table,
)
from cfs.generate import sample_context_free


class PositionCounter:
    """Counts the positions every model loaded with from_pretrained computes."""

    def __init__(self):
        self.positions = 0
        self.real = 0
        self.calls = 0

    def install(self):
        import transformers

        auto = transformers.AutoModelForCausalLM
        original = auto.from_pretrained
        counter = self

        def from_pretrained(*args, **kwargs):
            model = original(*args, **kwargs)
            model.register_forward_pre_hook(counter.count, with_kwargs=True)
            return model

        auto.from_pretrained = from_pretrained
        return original

    def count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or not hasattr(ids, "numel"):
            return
        self.calls += 1
        self.positions += int(ids.numel())
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            self.real += int(mask[:, -ids.shape[1] :].sum())
        else:
            self.real += int(ids.numel())

    def reset(self):
        self.positions = self.real = self.calls = 0


def eval_settings(config: dict) -> dict:
    settings = rule_settings("results/smollm2/base/eval.json", "evaluate")
    if settings is not None:
        return settings
    print("note: Snakemake dry run failed; building the eval settings from the config")
    evaluation = config["evaluation"]
    return {
        "cell": {"model": "smollm2", "method": "base"},
        "include_path": evaluation.get("include_path", "tasks"),
        "target": evaluation["target"],
        "forgetting": evaluation["forgetting"],
        "batch_size": evaluation.get("batch_size", 16),
        "limit": evaluation.get("limit"),
        "kl_batch_size": evaluation.get("kl", {}).get("batch_size", 8),
        "seed": config["study"].get("seed", 0),
        "dtype": "auto",
    }


def run_pipeline_eval(model_dir, settings, counter):
    from cfs.evaluate import evaluate

    counter.reset()
    with Timer() as timer:
        record = evaluate(model_dir, settings, None, None, None)
    return {
        "seconds": timer.seconds,
        "positions": counter.positions,
        "real_tokens": counter.real,
        "forward_calls": counter.calls,
        "target": record["metrics"]["target"],
        "forgetting_avg": record["metrics"]["forgetting_avg"],
    }


def run_plain_lm_eval(model_dir, settings, counter):
    """The lm-eval call a user writes by hand for the same tasks and settings."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = [settings["target"]["task"]] + [entry["task"] for entry in settings["forgetting"]]
    counter.reset()
    with Timer() as timer:
        output = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": "float32"},
            tasks=tasks,
            task_manager=TaskManager(include_path=settings["include_path"]),
            batch_size=settings.get("batch_size", 16),
            device="cpu",
            limit=settings.get("limit"),
            bootstrap_iters=0,
            log_samples=False,
            random_seed=settings["seed"],
            numpy_random_seed=settings["seed"],
            torch_random_seed=settings["seed"],
            fewshot_random_seed=settings["seed"],
        )
    target = settings["target"]
    return {
        "seconds": timer.seconds,
        "positions": counter.positions,
        "real_tokens": counter.real,
        "forward_calls": counter.calls,
        "target": output["results"][target["task"]][target["metric"]],
    }


def heldout_samples(config, model_dir):
    path = REPO / "results" / "smollm2" / "heldout" / "context_free.jsonl"
    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()], str(
            path.relative_to(REPO)
        )
    from cfs.modeling import load_model, load_tokenizer
    from cfs.tokens import context_free_prompt_id

    kl = config["evaluation"].get("kl", {})
    model, tokenizer = load_model(model_dir, "float32").eval(), load_tokenizer(model_dir)
    samples = sample_context_free(
        model,
        tokenizer,
        num_samples=kl.get("num_samples", 24),
        max_new_tokens=kl.get("max_new_tokens", 64),
        temperature=kl.get("temperature", 1.0),
        top_p=1.0,
        seed=kl.get("seed", 12345),
        batch_size=32,
        prompt_token_id=context_free_prompt_id(tokenizer),
    )
    return samples, "generated here with cfs.generate (none in results/)"


def run_kl(base, model, samples, batch_size):
    from cfs.evaluate import kl_to_base

    with Timer() as timer:
        metrics = kl_to_base(base, model, samples, batch_size)
    return {
        "seconds": timer.seconds,
        "tokens": metrics["heldout_tokens"],
        "kl": metrics["kl_to_base"],
    }


def run_two_forwards(base, model, samples, batch_size):
    """The floor under the KL metric: both models' forward passes on the same batches."""
    import torch
    from cfs.evaluate import pad_batch

    tokens = 0
    with Timer() as timer, torch.no_grad():
        for start in range(0, len(samples), batch_size):
            input_ids, mask = pad_batch(samples[start : start + batch_size], pad_id=0)
            base(input_ids, attention_mask=mask)
            model(input_ids, attention_mask=mask)
            tokens += int(mask[:, 1:].sum())
    return {"seconds": timer.seconds, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="lm-eval limit 8, one round")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--skip-lm-eval", action="store_true", help="only the KL metric")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    quiet()
    set_threads(args.threads)
    import torch

    model_dir = require_model(args.model)
    config = load_config()
    settings = eval_settings(config)
    if args.quick:
        settings["limit"] = 8
    rounds = args.rounds or 1
    counter = PositionCounter()
    counter.install()
    print(
        f"evaluation: {model_dir.name} on {machine()['nproc']} CPU cores, "
        f"{torch.get_num_threads()} torch threads; lm-eval tasks "
        f"{[settings['target']['task']] + [e['task'] for e in settings['forgetting']]}, "
        f"batch {settings.get('batch_size')}, limit {settings.get('limit')}"
    )
    payload: dict = {"eval_settings": settings, "rounds": rounds}
    rows = []
    if not args.skip_lm_eval:
        runs = alternate(
            {
                "pipeline base eval (cfs.evaluate)": lambda: run_pipeline_eval(
                    model_dir, settings, counter
                ),
                "plain lm_eval.simple_evaluate": lambda: run_plain_lm_eval(
                    model_dir, settings, counter
                ),
            },
            rounds,
        )
        evals = {name: best(values) for name, values in runs.items()}
        plain = evals["plain lm_eval.simple_evaluate"]
        for name, entry in evals.items():
            entry["seconds_per_1000_positions"] = (
                1000 * entry["seconds"] / max(1, entry["positions"])
            )
            rows.append(
                [
                    name,
                    f"{entry['positions']}",
                    f"{entry['seconds']:.1f}",
                    f"{entry['seconds_per_1000_positions']:.3f}",
                    f"{entry['seconds'] / plain['seconds']:.2f}x",
                ]
            )
        payload["base_eval"] = evals
        payload["base_eval_ratio_vs_plain"] = (
            evals["pipeline base eval (cfs.evaluate)"]["seconds"] / plain["seconds"]
        )

    from cfs.modeling import load_model

    samples, source = heldout_samples(config, model_dir)
    tuned = REPO / "results" / "smollm2" / "ratio0" / "model"
    other = tuned if (tuned / "config.json").is_file() else model_dir
    base = load_model(model_dir, settings.get("dtype", "auto")).eval()
    model = load_model(other, settings.get("dtype", "auto")).eval()
    kl_batch = settings.get("kl_batch_size", 8)
    run_two_forwards(base, model, samples[:kl_batch], kl_batch)  # warm-up
    runs = alternate(
        {
            "kl_to_base": lambda: run_kl(base, model, samples, kl_batch),
            "two forward passes": lambda: run_two_forwards(base, model, samples, kl_batch),
        },
        max(rounds, 2),
    )
    kl = {name: best(values) for name, values in runs.items()}
    floor = kl["two forward passes"]
    for name, entry in kl.items():
        entry["seconds_per_1000_tokens"] = 1000 * entry["seconds"] / entry["tokens"]
        rows.append(
            [
                name,
                f"{entry['tokens']}",
                f"{entry['seconds']:.2f}",
                f"{entry['seconds_per_1000_tokens']:.3f}",
                f"{entry['seconds'] / floor['seconds']:.2f}x",
            ]
        )
    payload["kl"] = kl
    payload["kl_samples"] = {"count": len(samples), "source": source, "model": str(other)}
    payload["kl_ratio_vs_two_forwards"] = kl["kl_to_base"]["seconds"] / floor["seconds"]
    shown = other.relative_to(REPO) if other.is_relative_to(REPO) else other
    print()
    print(table(rows, ["what", "positions / tokens", "seconds", "s per 1,000", "ratio"]))
    print(
        f"\nKL: {len(samples)} held-out samples ({source}), model {shown}, "
        f"batch {kl_batch}; ratio column: base eval vs plain lm-eval, KL vs its two forward passes"
    )
    report("evaluation", payload, args.json)


if __name__ == "__main__":
    main()
