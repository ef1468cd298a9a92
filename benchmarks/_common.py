"""Shared by the benchmark scripts. Each times the pipeline's own functions (workflow/cfs)
against a baseline in the same process, alternating them round by round (A, B, A, B, ...)
and keeping each one's best time: on a shared, noisy machine a ratio of two numbers measured
side by side means more than either number alone. `--quick` runs the same code on tiny
settings (tests/end_to_end/test_benchmarks.py), so a benchmark out of step with the code
fails there."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")  # read once, when tqdm is imported

DEFAULT_MODEL = REPO / "results" / "models" / "smollm2" / "base"
# seconds to wait for a quiet CPU before each timed run (0 in --quick)
QUIET_WAIT = float(os.environ.get("CFS_BENCH_QUIET_WAIT", "180"))
OPTIONS = {
    "--model": {"type": Path, "help": f"model folder (default: {DEFAULT_MODEL})"},
    "--config": {"help": "a config file merged over config/config.yaml"},
    "--rounds": {"type": int, "help": "alternating rounds (best of them)"},
    "--threads": {"type": int, "help": "torch threads (default: one per core)"},
}


def arguments(doc: str, *options: str) -> argparse.ArgumentParser:
    """--quick, --json and the named OPTIONS; the script adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings, a code-path check")
    parser.add_argument("--json", type=lambda p: Path(p).resolve(), help="write figures here")
    for option in options:
        parser.add_argument(option, **OPTIONS[option])
    return parser


def setup(args: argparse.Namespace) -> int | None:
    """No waiting for a quiet CPU in --quick; where the script runs models (--threads): no
    warnings, and torch's threads, returning how many are in use."""
    global QUIET_WAIT
    if args.quick:
        QUIET_WAIT = 0.0
    if not hasattr(args, "threads"):
        return None
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.get_num_threads()


def stage_settings(config: Path | str | None = None):
    """The stages' settings as the rules hand them, `config` merged over the default's."""
    from cfs.stage_settings import StageSettings, load_config

    return StageSettings(load_config(*[config] if config else []))


def model_folder(args: argparse.Namespace, scratch: Path) -> Path:
    """--model, else in --quick a tiny model in `scratch`, else the default's base model."""
    path = getattr(args, "model", None)
    if args.quick and not path:
        return tiny_model(scratch / "tiny")
    path = (path or DEFAULT_MODEL).resolve()
    if not (path / "config.json").is_file():
        sys.exit(f"no model at {path}: run `snakemake --cores 2 {path}` (or pass --quick)")
    return path


def tiny_model(out: Path) -> Path:
    """A random-weight Llama with SmolLM2's special tokens (<|endoftext|> 0, BOS
    <|im_start|> 1, EOS <|im_end|> 2) and a byte-level BPE tokenizer of 500 tokens trained
    on the default task's text and the local lm-eval tasks."""
    import torch
    from cfs.arithmetic import arithmetic_problems
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [f"{p['query']} {p['response']}" for p in arithmetic_problems(200, seed=0)]
    for path in sorted((REPO / "tasks").rglob("*.jsonl")):
        texts += path.read_text(encoding="utf-8").splitlines()
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    raw.train_from_iterator(texts, trainer)
    names = dict(zip(("unk_token", "bos_token", "eos_token"), specials, strict=True))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token=specials[2], **names)
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    shape |= {"num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **shape, **ids))
    model.generation_config.update(**ids)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


def scratch_study(folder: Path) -> Path:
    """--quick: `folder` with tasks/ and the default task's data as prepare_task_data writes
    it, made the working folder (lm-eval reads both relative to it); returns `folder`."""
    from cfs.arithmetic import prepare_arithmetic
    from cfs.artifacts import write_jsonl

    task = stage_settings().config["task"]
    shutil.copytree(REPO / "tasks", folder / "tasks")
    data = folder / "results" / "data" / task["name"]
    for name, records in zip(("train", "test"), prepare_arithmetic(task), strict=True):
        write_jsonl(data / f"{name}.jsonl", records)
    os.chdir(folder)
    return folder


def cpu_pressure() -> dict:
    """/proc/pressure/cpu's 'some' line: avg10 (%) and total (us); {} where there is none."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return {key: float(value) for key, value in (p.split("=") for p in line.split()[1:])}
    return {}


def timed(run) -> dict:
    """run()'s figures, with its wall time as 'seconds' where it has none, run once the last
    10 s had under 15% CPU pressure (waiting up to QUIET_WAIT s); 'cpu_stall_share': the
    share of its time during which some task waited for a CPU (0: the machine was ours)."""
    deadline = time.monotonic() + QUIET_WAIT
    while cpu_pressure().get("avg10", 0.0) >= 15 and time.monotonic() < deadline:
        time.sleep(2.0)
    before, start = cpu_pressure().get("total"), time.perf_counter()
    result = run()
    elapsed = time.perf_counter() - start
    result.setdefault("seconds", elapsed)
    if before is not None:
        result["cpu_stall_share"] = round((cpu_pressure()["total"] - before) / 1e6 / elapsed, 3)
    return result


def alternate(variants: dict, rounds: int) -> dict[str, list[dict]]:
    """Each variant (name -> callable returning a dict of figures) timed once per round, in
    turn, so a burst of load from elsewhere hits all of them alike."""
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for index in range(rounds):
        for name, run in variants.items():
            runs[name].append(result := timed(run))
            stall = result.get("cpu_stall_share")
            note = f" (CPU contended {stall:.0%} of it)" if stall is not None else ""
            print(f"  round {index + 1} {name}: {result['seconds']:.2f} s{note}", flush=True)
    return runs


def best(runs: list[dict]) -> dict:
    """The run with the least time (the least disturbed), with every round's seconds."""
    seconds = [run["seconds"] for run in runs]
    chosen = min(runs, key=lambda run: run["seconds"])
    return {**chosen, "all_seconds": seconds, "median_seconds": statistics.median(seconds)}


def round_ratios(runs: dict, numerator: str, denominator: str, value=lambda run: run["seconds"]):
    """value(numerator) / value(denominator) within each round (the two ran side by side)
    and their median."""
    pairs = zip(runs[numerator], runs[denominator], strict=True)
    ratios = [value(a) / value(b) for a, b in pairs]
    return {"per_round": ratios, "median": statistics.median(ratios)}


@contextlib.contextmanager
def spy(owner, name: str, then=None):
    """Patch owner.name so each call's (result, seconds) lands in the list yielded, or
    (then(result), seconds) where `then` is given (run before the caller gets the result)."""
    original, calls = getattr(owner, name), []

    @functools.wraps(original)  # its signature: transformers inspects a model's forward
    def call(*args, **kwargs):
        start = time.perf_counter()
        result = original(*args, **kwargs)
        seconds = time.perf_counter() - start
        calls.append((then(result) if then else result, seconds))
        return result

    with mock.patch.object(owner, name, call):
        yield calls


def matmul_weights(model) -> tuple[int, int]:
    """(decoder weights, LM-head weights): a position's matrix-product FLOPs are 2x the
    decoder's, plus 2x the head's where logits are computed (attention is negligible)."""
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters())
    body -= model.get_input_embeddings().weight.numel()
    return (body if model.config.tie_word_embeddings else body - head), head


def context_free(model, tokenizer, settings: dict, num_samples: int) -> list[dict]:
    """cfs.generate's context-free samples of a loaded model, with a generation stage's
    settings (cfs.stage_settings)."""
    from cfs.generate import sample_context_free
    from cfs.tokens import context_free_prompt_id

    keys = ("max_new_tokens", "temperature", "top_p", "seed", "batch_size")
    options = {key: settings[key] for key in keys}
    options["prompt_token_id"] = context_free_prompt_id(tokenizer, settings["prompt_token_id"])
    return sample_context_free(model, tokenizer, num_samples=num_samples, **options)


def compare_evaluations(a: dict, b: dict) -> dict:
    """How far two evaluations of one model are apart: lm-eval's logged samples (`samples`:
    log-likelihoods, greedy flags, generations) and per-item scores (`items`)."""
    loglikelihoods, relative, flips, same, texts = [0.0], [0.0], 0, 0, 0
    for task, logged in a["samples"].items():
        other = {(s["doc_id"], s["filter"]): s["resps"] for s in b["samples"][task]}
        for sample in logged:
            theirs = other[sample["doc_id"], sample["filter"]]
            for mine, their in zip(sample["resps"], theirs, strict=True):
                mine, their = mine[0], their[0]
                if isinstance(mine, str):
                    same, texts = same + (mine == their), texts + 1
                    continue
                loglikelihoods.append(abs(mine[0] - their[0]))
                relative.append(loglikelihoods[-1] / max(abs(mine[0]), 1e-30))
                flips += mine[1] != their[1]
    items = [abs(a["items"][t][i] - b["items"][t][i]) for t in a["items"] for i in a["items"][t]]
    return {
        "max_loglikelihood_difference": max(loglikelihoods),
        "max_relative_loglikelihood_difference": max(relative),
        "greedy_flag_flips": flips,
        "identical_generations": f"{same} of {texts}",
        "max_item_score_difference": max(items),
        "mean_item_score_difference": statistics.fmean(items),
    }


def table(rows: list[list], header: list[str]) -> str:
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(map(len, column)) for column in zip(*cells, strict=True)]
    line = "| " + " | ".join(f"{{:<{width}}}" for width in widths) + " |"
    lines = [line.format(*row) for row in cells]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def listing(figures: dict) -> str:
    return ", ".join(
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()
    )


def goal(met: bool) -> str:
    return "met" if met else "MISSED"


def machine() -> dict:
    """Cores, CPU, Python, and torch's and transformers' versions where imported."""
    from cfs.results_page import cpu_name

    info = {"nproc": os.cpu_count(), "cpu": cpu_name(), "python": platform.python_version()}
    for name in ("torch", "transformers"):
        if name in sys.modules:
            info[name] = sys.modules[name].__version__
    return info


def report(name: str, payload: dict, json_path: Path | None) -> None:
    """Write the figures and the machine to `json_path`, if given."""
    if json_path:
        payload = {"benchmark": name, "machine": machine(), **payload}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"wrote {json_path}")
