"""Evaluate a model: lm-eval on the target and forgetting tasks, plus the per-token KL
from the base model to this model on held-out context-free samples of the base model.

lm-eval runs with the backend of `evaluation.backend` (cfs-hf: lm-eval's HF model computing
each position once, cfs.lm_eval_model; hf: lm-eval's own; or vllm on a GPU), recorded in
eval.json with every other harness setting; a post eval must match its base eval's. Per task,
`repeats` samples k answers per question and averages their scores into pass@1, `gen_kwargs`
and `num_fewshot` override the task's own, `apply_chat_template` wraps its prompts.

    python -m cfs.evaluate --model results/smollm2/temp0.7/ratio0.5/model \
        --base-model results/models/smollm2/base --heldout results/smollm2/heldout.jsonl \
        --base-eval results/smollm2/base/eval.json --settings '{...}' \
        --out results/smollm2/temp0.7/ratio0.5/eval.json
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cfs.answers import count_cut_answers, cut_answers_marked, marks_cut_answers
from cfs.artifacts import (
    provenance,
    read_json,
    read_jsonl,
    require_fields,
    scrub_secrets,
    write_json,
)
from cfs.cli import (
    process_seconds,
    require,
    require_gpus,
    run_as_process,
    set_threads,
    stage_parser,
)
from cfs.errors import DataError, SettingsError
from cfs.heldout import kl_and_nll_sums, padded_batches, predicted_logprobs
from cfs.heldout import summarise as heldout_summary
from cfs.hub import go_offline_unless_reachable
from cfs.lm_eval_model import PositionCounter
from cfs.lm_eval_tasks import build_tasks, local_task_manager
from cfs.modeling import autocast, compute_precision, dtype_name, load_model, pick_device
from cfs.request_cache import cached_requests, resumable_generation, working_cache
from cfs.task_check import metric_parts
from cfs.vllm_backend import freeze_heap

log = logging.getLogger("cfs.evaluate")


LM_EVAL_BACKENDS = ("cfs-hf", "hf", "vllm")
HF_BACKENDS = ("cfs-hf", "hf")
TASK_OPTIONS = ("repeats", "gen_kwargs", "num_fewshot", "apply_chat_template")


def lm_eval_model_args(model_dir: Path, settings: dict) -> tuple[str, dict]:
    """(backend, model_args) for lm-eval: the backend from `evaluation.backend`, the model
    and its dtype from us, then `evaluation.model_args` (e.g. tensor_parallel_size,
    gpu_memory_utilization, max_model_len, think_end_token)."""
    backend = settings["backend"]
    if backend not in LM_EVAL_BACKENDS:
        raise SettingsError(
            f"evaluation.backend '{backend}' is not one of {', '.join(LM_EVAL_BACKENDS)}"
        )
    extra = dict(settings["model_args"])
    for key in ("pretrained", "mixed_precision_dtype"):
        if key in extra:
            raise SettingsError(
                f"evaluation.model_args must not set `{key}` (the stage does: evaluation.precision)"
            )
    device = pick_device()
    args = {"pretrained": str(model_dir), "dtype": dtype_name(settings["dtype"], device)}
    if backend in HF_BACKENDS and compute_precision(settings["precision"], device) == "bfloat16":
        args["mixed_precision_dtype"] = "bfloat16"  # lm-eval's HFLM: bf16 autocast
    if backend == "vllm":
        from cfs.vllm_backend import engine_options, prepare_cpu_environment, vllm_usable

        if not vllm_usable():
            raise SettingsError(
                "evaluation.backend is 'vllm' but vLLM cannot run here (it needs the vllm "
                "package, envs/vllm.yaml, and a CUDA GPU or vLLM's CPU build); set "
                "evaluation.backend to 'cfs-hf'"
            )
        prepare_cpu_environment()
        args.update(engine_options(), seed=require(settings, "seed"))
    return backend, {**args, **extra}


def task_entries(settings: dict) -> list[dict]:
    """The target and forgetting entries, each {task, metric, and per-task options}."""
    entries = [require(settings, "target"), *require(settings, "forgetting")]
    default_chat = settings["apply_chat_template"]
    return [
        {
            **entry,
            "apply_chat_template": (
                default_chat
                if entry["apply_chat_template"] is None
                else entry["apply_chat_template"]
            ),
        }
        for entry in entries
    ]


PER_EVAL_ARGS = ("pretrained", "seed")  # model_args that are no part of the harness


def lm_eval_harness_settings(settings: dict, backend: str, model_args: dict) -> dict:
    """What must be the same for a base eval and the post evals compared with it."""
    from importlib import metadata

    harness = {
        "backend": backend,
        "precision": harness_precision(backend, model_args),
        "lm_eval_version": metadata.version("lm_eval"),
        "batch_size": settings["batch_size"],
        "limit": settings["limit"],
        # the model and the replicate's seed differ between the evals compared, by design
        "model_args": scrub_secrets(
            {key: value for key, value in model_args.items() if key not in PER_EVAL_ARGS}
        ),
        "tasks": {
            entry["task"]: {key: entry[key] for key in TASK_OPTIONS}
            for entry in task_entries(settings)
        },
    }
    if marks_cut_answers(model_args.get("think_end_token")):
        harness["cut_answers"] = "scored as no answer (cfs.answers)"
    return harness


def harness_precision(backend: str, model_args: dict) -> str:
    """What the backend computes in: bf16 autocast over the loaded weights (HF backends with
    `mixed_precision_dtype`), else the dtype the weights are loaded in (vLLM computes in
    it)."""
    if backend in HF_BACKENDS and model_args.get("mixed_precision_dtype"):
        return f"{model_args['mixed_precision_dtype']} autocast, {model_args['dtype']} weights"
    return str(model_args["dtype"])


def check_same_harness(base_record: dict, harness: dict, base_eval: Path) -> None:
    """A post eval must use the base eval's backend, harness version, batch size, model
    arguments and task options, or the change from base would compare two harnesses."""
    base = base_record.get("lm_eval_settings")
    if base is None:
        return  # an eval.json written before these settings were recorded
    differ = [key for key in harness if base.get(key) != harness[key]]
    if differ:
        details = "; ".join(
            f"{key}: base {base.get(key)!r}, now {harness[key]!r}" for key in differ
        )
        raise SettingsError(
            f"the base eval {base_eval} used other lm-eval settings ({details}); base and post "
            "evals of one model must use the same evaluation.backend, precision (`auto` "
            "resolves per machine: bf16 where the CPU or GPU has native bf16), batch size, "
            "model_args, task options and lm-eval version: re-run the base eval"
        )


def run_lm_eval(model_dir: Path, settings: dict, cache_folder=None, seconds=None, scratch=None):
    """Run lm-eval on every task; return ({task: {metric: value}}, {task: {item: score}},
    the harness settings, {"total", "computed"} request counts).

    The backend (cfs-hf, hf or vllm) comes from `evaluation.backend`; one model serves every
    task. Tasks run in groups by `apply_chat_template` (a per-task option: reasoning
    benchmarks want the chat template, log-likelihood multiple choice usually not). With a
    `cache_folder`, finished requests are kept there (cfs.request_cache), keyed to this model
    folder, harness and seed: a rerun computes only what is not cached, generations in
    chunks of `generation_chunk_size`; with a `scratch` folder (node-local), the cache works
    there and is copied back after each chunk. `seconds`, if given, gets the model's load
    time."""
    import lm_eval
    from lm_eval.api.registry import get_model

    entries = task_entries(settings)
    tasks = [entry["task"] for entry in entries]
    task_manager = local_task_manager(require(settings, "include_path"), tasks)
    backend, model_args = lm_eval_model_args(model_dir, settings)
    batch_size = settings["batch_size"]
    extra = {"batch_size": batch_size, "max_batch_size": None}
    if backend in HF_BACKENDS:
        extra["device"] = str(pick_device())
    if backend == "cfs-hf":
        import cfs.lm_eval_model  # noqa: F401 - registers the backend with lm-eval
    log.info("lm-eval backend %s, model_args %s", backend, scrub_secrets(model_args))
    started = time.perf_counter()
    model_class = get_model(backend)
    if backend == "vllm":
        freeze_heap()  # the KL models are freed (evaluate), vLLM's modules imported
    lm = model_class.create_from_arg_obj(model_args, extra)
    if seconds is not None:
        seconds["model_load"] = time.perf_counter() - started
    counter = PositionCounter(lm.model) if backend in HF_BACKENDS else None
    harness = lm_eval_harness_settings(settings, backend, model_args)
    seed = require(settings, "seed")
    results: dict = {}
    samples: dict = {}
    with contextlib.ExitStack() as stack:
        prefix, copy_back = None, lambda: None
        if cache_folder:
            cache = working_cache(Path(cache_folder), scratch, model_dir, harness, seed)
            prefix, copy_back = stack.enter_context(cache)
        cached_before = cached_requests(prefix) if prefix else 0
        for chat in (False, True):
            group = [entry for entry in entries if bool(entry["apply_chat_template"]) == chat]
            if not group:
                continue
            chunk_size = require(settings, "generation_chunk_size")
            chunked = resumable_generation(chunk_size, seed, copy_back)
            with (
                cut_answers_marked(model_args.get("think_end_token")),
                chunked,
                without_environment_report(),
            ):
                output = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=build_tasks(task_manager, group, seed),
                    task_manager=task_manager,
                    apply_chat_template=chat,
                    use_cache=str(prefix) if prefix else None,
                    log_samples=True,  # per-item scores, for paired intervals
                    bootstrap_iters=0,
                    limit=settings["limit"],
                    random_seed=seed,
                    numpy_random_seed=seed,
                    torch_random_seed=seed,
                    fewshot_random_seed=seed,
                )
            results.update(output["results"])
            samples.update(output["samples"])
        computed = cached_requests(prefix) - cached_before if prefix else None
    missing = [task for task in tasks if task not in results]
    if missing:
        raise DataError(f"lm-eval returned no results for task(s): {', '.join(missing)}")
    scores = {
        task: {
            key: value
            for key, value in results[task].items()
            if isinstance(value, int | float) and "_stderr" not in key
        }
        for task in tasks
    }
    requests = {"per_task": count_requests(samples)}
    if "cut_answers" in harness:  # answers cut at the token limit inside their thinking
        filters = {e["task"]: metric_parts(e["metric"])[1] for e in entries}
        requests["cut_answers"] = count_cut_answers(samples, filters)
    if counter is not None:  # what the model computed, padding included
        requests.update(counter.remove())
    if computed is not None:
        requests["computed"] = computed
    return scores, item_scores(samples, entries), harness, requests


@contextlib.contextmanager
def without_environment_report():
    """lm-eval's simple_evaluate without the report of the environment it adds to its
    results (pip list, lscpu and git in subprocesses: about a second per call, two calls
    where tasks differ in chat template). cfs keeps lm-eval's results and samples only,
    and records its own provenance."""
    from unittest import mock

    with mock.patch.multiple(
        "lm_eval.evaluator",
        add_env_info=lambda results: None,
        get_git_commit_hash=lambda: None,
    ):
        yield


def count_requests(samples: dict[str, list[dict]]) -> dict[str, int]:
    """Each task's requests, from lm-eval's logged samples (one per item and filter)."""
    return {
        task: sum(len(sample["arguments"]) for sample in {s["doc_id"]: s for s in logged}.values())
        for task, logged in samples.items()
    }


def item_scores(samples: dict[str, list[dict]], entries: list[dict]) -> dict[str, dict]:
    """{task: {item id: score}} of each entry's metric, from lm-eval's logged samples."""
    items = {}
    for entry in entries:
        task, (name, filter_name) = entry["task"], metric_parts(entry["metric"])
        chosen = [s for s in samples.get(task, []) if s["filter"] == filter_name]
        if not chosen or name not in chosen[0]:
            raise DataError(f"lm-eval logged no per-item '{entry['metric']}' for task '{task}'")
        items[task] = {str(sample["doc_id"]): float(sample[name]) for sample in chosen}
    return items


def metric(task_scores: dict[str, dict], task: str, name: str) -> float:
    try:
        return float(task_scores[task][name])
    except KeyError:
        available = ", ".join(sorted(task_scores.get(task, {})))
        raise SettingsError(
            f"evaluation metric '{name}' not reported for task '{task}' (has: {available})"
        ) from None


@torch.no_grad()
def kl_to_base(base_model, model, samples: list[dict], batch_size: int = 8) -> dict[str, float]:
    """Mean over sampled tokens of KL(p_base(.|x<t) || p_model(.|x<t)), and the model's
    mean negative log-likelihood of those tokens (the quantity the paper's term minimises)."""
    kl, nll, count = 0.0, 0.0, 0
    batches = list(padded_batches(samples, batch_size))
    for ids, mask in tqdm(batches, desc="KL to base", unit="batch"):
        base_logprobs, _ = predicted_logprobs(base_model, ids, mask)
        logprobs, targets = predicted_logprobs(model, ids, mask)
        sums = kl_and_nll_sums(base_logprobs, logprobs, targets)
        kl, nll, count = kl + sums[0], nll + sums[1], count + sums[2]
    if count == 0:
        raise DataError("the held-out context-free samples hold no tokens")
    return heldout_summary(kl, nll, count)


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
    cache_folder: Path | None = None,
    scratch: Path | None = None,
) -> dict:
    base_record = read_json(base_eval) if base_eval is not None else None
    if base_record is not None:  # refuse a mismatched harness before any work is done
        backend, model_args = lm_eval_model_args(model_dir, settings)
        check_same_harness(
            base_record, lm_eval_harness_settings(settings, backend, model_args), base_eval
        )
    # KL first: its HF models are freed before lm-eval (perhaps vLLM) claims the GPU.
    seconds = {"start_up": process_seconds()}
    started = time.perf_counter()
    kl_metrics = {"kl_to_base": 0.0}
    if base_model_dir is not None:
        samples = read_jsonl(heldout)
        if not samples:
            raise DataError(f"{heldout}: no held-out samples to measure KL on")
        require_fields(samples, ("prompt_token_id", "token_ids"), heldout)
        device = pick_device()
        base = load_model(base_model_dir, settings["dtype"], device).eval()
        model = load_model(model_dir, settings["dtype"], device).eval()
        with autocast(compute_precision(settings["precision"], device), device):
            kl_metrics = kl_to_base(base, model, samples, settings["kl"]["batch_size"])
        del base, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    seconds["kl_to_base"] = time.perf_counter() - started
    task_scores, items, harness, requests = run_lm_eval(
        model_dir, settings, cache_folder, seconds, scratch
    )
    seconds["lm_eval"] = time.perf_counter() - started - seconds["kl_to_base"]
    metrics = summarise(task_scores, settings)
    metrics.update(kl_metrics)
    record = {
        "cell": settings["cell"],
        "metrics": metrics,
        "lm_eval": task_scores,
        "lm_eval_settings": harness,
        "tasks": {
            "target": settings["target"]["task"],
            "forgetting": [entry["task"] for entry in settings["forgetting"]],
        },
        "items": items,
        "requests": requests,
        "seconds": seconds,  # start-up: imports and argument parsing, before any work
    }
    if base_record is not None:
        base = base_record["metrics"]
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
        lm_eval_backend=harness["backend"],
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
    parser.add_argument(
        "--cache",
        type=Path,
        help="the request cache's folder (default: beside --out, <stem>_cache)",
    )
    parser.add_argument(
        "--scratch",
        type=Path,
        help="a node-local folder the request cache works in, copied back to --cache after "
        "each generation chunk and at the end (the rule passes resources.tmpdir)",
    )
    args = parser.parse_args(argv)
    if (args.base_model is None) != (args.heldout is None):
        raise SettingsError("--base-model and --heldout go together")
    require_gpus(args.gpus)
    set_threads(args.threads)
    # a compute node without network reads the task datasets the first job fetched
    go_offline_unless_reachable()
    # finished requests are kept (by default beside the output): a rerun computes only the
    # rest
    cache_folder = args.cache or args.out.with_name(args.out.stem + "_cache")
    record = evaluate(
        args.model,
        args.settings,
        args.base_model,
        args.heldout,
        args.base_eval,
        cache_folder,
        args.scratch,
    )
    log.info("metrics: %s", record["metrics"])
    write_json(args.out, record)


if __name__ == "__main__":
    run_as_process(main)
