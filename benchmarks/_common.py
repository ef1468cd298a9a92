"""Shared by the benchmark scripts: the config as the stages get it, a tiny model for the
--quick modes, timing, tables and the JSON report.

Every benchmark measures the pipeline's own functions (imported from workflow/cfs) against
a baseline in the same process, alternating the two (A, B, A, B, ...) and keeping the best
time of each, because the machines these run on are shared and noisy: a ratio of two
numbers measured side by side means more than either number alone. `--quick` runs the
same code on tiny settings in seconds (tests/end_to_end/test_benchmarks.py runs it), so a
benchmark out of step with the code fails there.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "workflow"
if str(PACKAGE_DIR) not in sys.path:
    sys.path.insert(0, str(PACKAGE_DIR))

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# tqdm reads TQDM_* once, when it is imported: progress bars of the stages stay silent.
os.environ.setdefault("TQDM_DISABLE", "1")

DEFAULT_MODEL = REPO / "results" / "models" / "smollm2" / "base"


# --------------------------------------------------------------------------- the config


def load_config(path: Path | str | None = None) -> dict:
    """config/config.yaml with `path` merged over it (as `--configfile` does) and the
    schema's defaults filled in: the config as the Snakefile sees it."""
    from cfs.stage_settings import load_config as load

    return load(*([path] if path else []))


def stage_settings(path: Path | str | None = None):
    """The stages' settings as the rules hand them (cfs.stage_settings), for the default
    config with `path` merged over it: a benchmark runs a stage with exactly the settings
    the pipeline would."""
    from cfs.stage_settings import StageSettings

    return StageSettings(load_config(path))


# --------------------------------------------------------------------------- models


def require_model(path: Path = DEFAULT_MODEL) -> Path:
    if not (Path(path) / "config.json").is_file():
        sys.exit(
            f"no model at {path}: run `.venv/bin/snakemake --cores 2 results/models/smollm2/base`"
            " (or pass --quick for a tiny model)"
        )
    return Path(path)


def tiny_model(out: Path, hidden: int = 64, layers: int = 2) -> Path:
    """A random-weight Llama with SmolLM2's special tokens (<|endoftext|> 0, BOS
    <|im_start|> 1, EOS <|im_end|> 2) and a byte-level BPE tokenizer of 500 tokens trained
    on the default task's text and the local lm-eval tasks: what --quick runs on."""
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
    raw.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=500,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=specials[1],
        eos_token=specials[2],
        pad_token=specials[2],
        unk_token=specials[0],
        model_max_length=512,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
            tie_word_embeddings=True,
        )
    )
    model.generation_config.update(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


# --------------------------------------------------------------------------- the machine


def machine() -> dict:
    """nproc, CPU model, memory, Python; torch/transformers versions and the GPU where the
    benchmark imported them."""
    from cfs.results_page import cpu_name

    info = {"nproc": os.cpu_count(), "cpu": cpu_name(), "memory": None}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory"] = f"{int(line.split()[1]) / 2**20:.0f} GiB"
    info["python"] = platform.python_version()
    if "torch" in sys.modules:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if "transformers" in sys.modules:
        import transformers

        info["transformers"] = transformers.__version__
    return info


def _pressure_line() -> dict | None:
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return {key: float(value) for key, value in (part.split("=") for part in first.split()[1:])}
    except (OSError, ValueError, IndexError):
        return None


def stall_seconds() -> float | None:
    """Cumulative seconds during which some task waited for a CPU (PSI 'some total')."""
    line = _pressure_line()
    return line["total"] / 1e6 if line else None


# seconds to wait for a quiet CPU before each timed run ($CFS_BENCH_QUIET_WAIT; --quick: 0)
QUIET_WAIT = float(os.environ.get("CFS_BENCH_QUIET_WAIT", "180"))


def wait_for_quiet(max_wait: float | None = None, threshold: float = 15.0) -> None:
    """Wait (up to max_wait s, default QUIET_WAIT) until the last 10 s had < threshold %
    CPU pressure, so a timed run does not start in the middle of someone else's work."""
    deadline = time.monotonic() + (QUIET_WAIT if max_wait is None else min(max_wait, QUIET_WAIT))
    while True:
        line = _pressure_line()
        if line is None or line["avg10"] < threshold or time.monotonic() > deadline:
            return
        time.sleep(2.0)


def quick_mode() -> None:
    """--quick: no waiting for a quiet CPU (the figures are a code-path check)."""
    global QUIET_WAIT
    QUIET_WAIT = 0.0


def quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def set_threads(threads: int | None) -> int:
    """torch intra-op threads (default: torch's own, one per core, as a stage given all
    cores runs); returns the number in use."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# --------------------------------------------------------------------------- timing


class Timer:
    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start


def timed(run) -> dict:
    """Run once after waiting for a quiet CPU; note the share of the run during which
    some task waited for a CPU (0% = the machine was ours alone)."""
    wait_for_quiet()
    before, start = stall_seconds(), time.perf_counter()
    result = run()
    elapsed = time.perf_counter() - start
    if before is not None:
        result["cpu_stall_share"] = round((stall_seconds() - before) / elapsed, 3)
    return result


def alternate(variants: dict, rounds: int) -> dict[str, list]:
    """Run each variant (name -> callable returning a dict with 'seconds') once per round,
    in turn, so a burst of load from elsewhere hits all of them alike."""
    runs: dict[str, list] = {name: [] for name in variants}
    for round_index in range(rounds):
        for name, run in variants.items():
            result = timed(run)
            runs[name].append(result)
            stall = result.get("cpu_stall_share")
            note = f" (CPU contended {stall:.0%} of it)" if stall is not None else ""
            print(f"  round {round_index + 1} {name}: {result['seconds']:.2f} s{note}", flush=True)
    return runs


def best(runs: list[dict], key: str = "seconds") -> dict:
    """The run with the least time (the least disturbed by other load), plus the spread."""
    chosen = dict(min(runs, key=lambda run: run[key]))
    chosen["all_" + key] = [round(run[key], 3) for run in runs]
    chosen["median_" + key] = statistics.median(run[key] for run in runs)
    return chosen


def round_ratios(runs: dict[str, list], numerator: str, denominator: str, value) -> dict:
    """The ratio value(numerator) / value(denominator) within each round (the two ran side
    by side), with its median and range: how much the ratio moved with the machine's load."""
    ratios = [value(a) / value(b) for a, b in zip(runs[numerator], runs[denominator], strict=True)]
    return {
        "per_round": [round(r, 3) for r in ratios],
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
    }


class ForwardClock:
    """Seconds spent inside a module's forward (pre/post hooks): the rest of a stage's time
    is what surrounds the model (sampling, caches, collation, optimizer, bookkeeping)."""

    def __init__(self, module):
        self.seconds = 0.0
        self.calls = 0
        self._start = 0.0
        self._handles = [
            module.register_forward_pre_hook(self._enter),
            module.register_forward_hook(self._exit),
        ]

    def _enter(self, *args):
        self._start = time.perf_counter()

    def _exit(self, *args):
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def remove(self):
        for handle in self._handles:
            handle.remove()


def profile_call(run, top: int = 15):
    """Run `run()` under torch.profiler and print the operators that took the most time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = run()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    return result


# --------------------------------------------------------------------------- output


def table(rows: list[list], header: list[str]) -> str:
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for index, row in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if index == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def goal(met: bool) -> str:
    return "met" if met else "MISSED"


def report(name: str, payload: dict, json_path: str | None) -> None:
    """Write the figures (and the machine) to `json_path`, if given."""
    if not json_path:
        return
    payload = {"benchmark": name, "machine": machine(), **payload}
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {json_path}")
