"""Shared by the benchmark scripts: the machine, the config, timing and the tables.

Every benchmark measures the pipeline's own functions (imported from workflow/cfs) against
a baseline in the same process, alternating the two (A, B, A, B, ...) and keeping the best
time of each, because the machines these run on are shared and noisy: a ratio of two
numbers measured side by side means more than either number alone.
"""

from __future__ import annotations

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
DEFAULT_CONFIG = REPO / "config" / "config.yaml"


def machine() -> dict:
    """nproc, CPU model, memory, torch/transformers versions, GPU if any."""
    from cfs.results_page import cpu_name

    cpu = cpu_name()
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    info = {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": memory,
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def _pressure_line() -> dict | None:
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return {key: float(value) for key, value in (part.split("=") for part in first.split()[1:])}
    except (OSError, ValueError, IndexError):
        return None


def cpu_pressure() -> float | None:
    """/proc/pressure/cpu 'some avg60': % of time some task waited for a CPU (other load)."""
    line = _pressure_line()
    return line["avg60"] if line else None


def stall_seconds() -> float | None:
    """Cumulative seconds during which some task waited for a CPU (PSI 'some total')."""
    line = _pressure_line()
    return line["total"] / 1e6 if line else None


QUIET_WAIT = float(os.environ.get("CFS_BENCH_QUIET_WAIT", "180"))


def wait_for_quiet(max_wait: float | None = None, threshold: float = 15.0) -> float | None:
    """Wait (up to max_wait s, default $CFS_BENCH_QUIET_WAIT or 180) until the last 10 s had
    < threshold % CPU pressure, so a timed run does not start in the middle of someone
    else's test suite."""
    max_wait = QUIET_WAIT if max_wait is None else min(max_wait, QUIET_WAIT)
    deadline = time.monotonic() + max_wait
    while True:
        line = _pressure_line()
        if line is None or line["avg10"] < threshold or time.monotonic() > deadline:
            return line["avg10"] if line else None
        time.sleep(2.0)


def load_config(path: Path = DEFAULT_CONFIG) -> dict:
    """The study config with the schema's defaults filled in, as Snakemake sees it."""
    import yaml

    config = yaml.safe_load(Path(path).read_text())
    try:
        from snakemake.utils import validate

        validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    except Exception as error:  # a config being edited must not stop a benchmark
        print(f"note: config not validated ({type(error).__name__}); using it as written")
    return config


def require_model(path: Path = DEFAULT_MODEL) -> Path:
    if not (Path(path) / "config.json").is_file():
        sys.exit(
            f"no model at {path}: run `.venv/bin/snakemake --cores 2 results/models/smollm2/base`"
        )
    return Path(path)


def quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


class Timer:
    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start


def timed(run, quiet_wait: float | None = None) -> dict:
    """Run once after waiting for a quiet CPU; note the share of the run during which
    some task waited for a CPU (0% = the machine was ours alone)."""
    wait_for_quiet(quiet_wait)
    before, start = stall_seconds(), time.perf_counter()
    result = run()
    elapsed = time.perf_counter() - start
    if before is not None:
        result["cpu_stall_share"] = round((stall_seconds() - before) / elapsed, 3)
    return result


def alternate(variants: dict, rounds: int, quiet_wait: float | None = None) -> dict[str, list]:
    """Run each variant (name -> callable returning a dict with 'seconds') once per round,
    in turn, so a burst of load from elsewhere hits all of them alike."""
    runs: dict[str, list] = {name: [] for name in variants}
    for round_index in range(rounds):
        for name, run in variants.items():
            result = timed(run, quiet_wait)
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


def table(rows: list[list], header: list[str]) -> str:
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for index, row in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if index == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def report(name: str, payload: dict, json_path: str | None) -> None:
    payload = {
        "benchmark": name,
        "machine": machine(),
        "cpu_pressure_avg60": cpu_pressure(),
        **payload,
    }
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"wrote {json_path}")


def goal(met: bool) -> str:
    return "met" if met else "MISSED"


def rule_settings(target: str, module: str, timeout: int = 300) -> dict | None:
    """The --settings JSON the Snakemake rule hands `python -m cfs.<module>` for `target`,
    read from a forced dry run (`snakemake -n -p -f target`): the benchmark then runs the
    stage with exactly the settings the pipeline would. None if that dry run fails."""
    import shlex
    import subprocess

    command = [sys.executable, "-m", "snakemake", "-n", "-p", "-f", target]
    try:
        output = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=timeout
        ).stdout
    except (subprocess.TimeoutExpired, OSError):
        return None
    for line in output.splitlines():
        if f"-m cfs.{module} " not in line:
            continue
        words = shlex.split(line.split(":", 1)[1] if line.startswith("Shell command") else line)
        if "--settings" in words:
            return json.loads(words[words.index("--settings") + 1])
    return None


def profile_call(run, top: int = 15, sort_by: str = "self_cpu_time_total"):
    """Run `run()` under torch.profiler and print the operators that took the most time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = run()
    print(prof.key_averages().table(sort_by=sort_by, row_limit=top))
    return result


class ForwardClock:
    """Seconds spent inside a module's forward (pre/post hooks): the rest of a stage's time
    is what surrounds the model (sampling, caches, collation, optimizer, bookkeeping)."""

    def __init__(self, module):
        self.seconds = 0.0
        self.calls = 0
        self._start = None
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


def set_threads(threads: int | None) -> int:
    """torch intra-op threads (default: torch's own, one per core, as a stage given all
    cores runs); returns the number in use."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


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
