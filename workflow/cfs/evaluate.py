"""Evaluate a model: lm-eval on the target and forgetting tasks, plus the per-token KL
from the base model to this model on held-out context-free samples of the base model.

    python -m cfs.evaluate --model results/smollm2/temp0.7/ratio0.5/model \
        --base-model results/models/smollm2/base --heldout results/smollm2/heldout.jsonl \
        --base-eval results/smollm2/base/eval.json --settings '{...}' \
        --out results/smollm2/temp0.7/ratio0.5/eval.json
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cfs.artifacts import DataError, provenance, read_json, read_jsonl, require_fields, write_json
from cfs.cli import SettingsError, require, run_stage, set_threads, stage_parser
from cfs.modeling import load_model, pick_device

log = logging.getLogger("cfs.evaluate")


def run_lm_eval(model_dir: Path, settings: dict) -> dict[str, dict]:
    """Run lm-eval's HF backend on every task; return {task: {metric: value}}.

    No request cache: lm-eval's cache is keyed by request, not by model, and would hand
    the first checkpoint's answers to every later one."""
    import lm_eval

    tasks = [require(settings, "target")["task"]]
    tasks += [entry["task"] for entry in require(settings, "forgetting")]
    task_manager = local_task_manager(require(settings, "include_path"), tasks)
    device = pick_device()
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args={
            "pretrained": str(model_dir),
            "dtype": "bfloat16" if device.type == "cuda" else "float32",
        },
        tasks=tasks,
        task_manager=task_manager,
        batch_size=settings.get("batch_size", 16),
        device=str(device),
        use_cache=None,
        log_samples=False,
        bootstrap_iters=0,
        limit=settings.get("limit"),
        random_seed=require(settings, "seed"),
        numpy_random_seed=settings["seed"],
        torch_random_seed=settings["seed"],
        fewshot_random_seed=settings["seed"],
    )
    results = output["results"]
    missing = [task for task in tasks if task not in results]
    if missing:
        raise DataError(f"lm-eval returned no results for task(s): {', '.join(missing)}")
    return {
        task: {
            key: value
            for key, value in results[task].items()
            if isinstance(value, int | float) and "_stderr" not in key
        }
        for task in tasks
    }


def local_task_manager(include_path: str, tasks: list[str]):
    """Index only the local task folder when it holds every task: scanning lm-eval's
    thousands of built-in task files costs seconds in every evaluation job."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(task in local.all_tasks for task in tasks):
        return local
    return TaskManager(include_path=include_path)


def metric(task_scores: dict[str, dict], task: str, name: str) -> float:
    try:
        return float(task_scores[task][name])
    except KeyError:
        available = ", ".join(sorted(task_scores.get(task, {})))
        raise SettingsError(
            f"evaluation metric '{name}' not reported for task '{task}' (has: {available})"
        ) from None


def pad_batch(samples: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [[sample["prompt_token_id"], *sample["token_ids"]] for sample in samples]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.tensor(row)
        mask[index, : len(row)] = 1
    return input_ids, mask


@torch.no_grad()
def kl_to_base(base_model, model, samples: list[dict], batch_size: int = 8) -> dict[str, float]:
    """Mean over sampled tokens of KL(p_base(.|x<t) || p_model(.|x<t)), and the model's
    mean negative log-likelihood of those tokens (the quantity the paper's term minimises)."""
    kl_sum, nll_sum, count = 0.0, 0.0, 0
    device = model.device
    for start in tqdm(range(0, len(samples), batch_size), desc="KL to base", unit="batch"):
        input_ids, mask = pad_batch(samples[start : start + batch_size], pad_id=0)
        input_ids, mask = input_ids.to(device), mask.to(device)
        base_logp = F.log_softmax(base_model(input_ids, attention_mask=mask).logits.float(), -1)
        model_logp = F.log_softmax(model(input_ids, attention_mask=mask).logits.float(), -1)
        # position t predicts token t+1; only positions followed by a real token count
        predicts_real = mask[:, 1:].bool()
        base_logp, model_logp = base_logp[:, :-1][predicts_real], model_logp[:, :-1][predicts_real]
        targets = input_ids[:, 1:][predicts_real]
        kl_sum += (base_logp.exp() * (base_logp - model_logp)).sum().item()
        nll_sum += -model_logp.gather(-1, targets[:, None]).sum().item()
        count += targets.numel()
    if count == 0:
        raise DataError("the held-out context-free samples hold no tokens")
    return {"kl_to_base": kl_sum / count, "heldout_nll": nll_sum / count, "heldout_tokens": count}


def summarise(task_scores: dict[str, dict], settings: dict) -> dict:
    target = settings["target"]
    forgetting = {
        entry["task"]: metric(task_scores, entry["task"], entry["metric"])
        for entry in settings["forgetting"]
    }
    return {
        "target": metric(task_scores, target["task"], target["metric"]),
        "forgetting_avg": sum(forgetting.values()) / len(forgetting),
        "forgetting": forgetting,
    }


def evaluate(
    model_dir: Path,
    settings: dict,
    base_model_dir: Path | None,
    heldout: Path | None,
    base_eval: Path | None,
) -> dict:
    task_scores = run_lm_eval(model_dir, settings)
    metrics = summarise(task_scores, settings)
    if base_model_dir is None:
        metrics.update({"kl_to_base": 0.0})
    else:
        samples = read_jsonl(heldout)
        if not samples:
            raise DataError(f"{heldout}: no held-out samples to measure KL on")
        require_fields(samples, ("prompt_token_id", "token_ids"), heldout)
        device = pick_device()
        base = load_model(base_model_dir, settings.get("dtype", "auto"), device).eval()
        model = load_model(model_dir, settings.get("dtype", "auto"), device).eval()
        metrics.update(kl_to_base(base, model, samples, settings.get("kl_batch_size", 8)))
    record = {"cell": settings.get("cell", {}), "metrics": metrics, "lm_eval": task_scores}
    if base_eval is not None:
        base = read_json(base_eval)["metrics"]
        record["base"] = base
        record["change_from_base"] = {
            key: metrics[key] - base[key]
            for key in ("target", "forgetting_avg", "kl_to_base")
            if isinstance(base.get(key), float) and not math.isnan(base[key])
        }
    upstream = model_dir / "cfs_provenance.json"
    record["provenance"] = provenance(
        "evaluate",
        settings,
        seed=settings["seed"],
        model=str(model_dir),
        heldout=str(heldout) if heldout else None,
        heldout_provenance=_read_optional(
            heldout.with_suffix(".provenance.json") if heldout else None
        ),
        model_provenance=_read_optional(upstream),
    )
    return record


def _read_optional(path: Path | None) -> dict | None:
    return read_json(path) if path is not None and path.is_file() else None


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="model folder to evaluate")
    parser.add_argument("--base-model", type=Path, help="base model folder (for KL to base)")
    parser.add_argument("--heldout", type=Path, help="held-out context-free samples JSONL")
    parser.add_argument("--base-eval", type=Path, help="the base model's eval.json")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    if (args.base_model is None) != (args.heldout is None):
        raise SettingsError("--base-model and --heldout go together")
    set_threads(args.threads)
    record = evaluate(args.model, args.settings, args.base_model, args.heldout, args.base_eval)
    log.info("metrics: %s", record["metrics"])
    write_json(args.out, record)


if __name__ == "__main__":
    run_stage(main)
