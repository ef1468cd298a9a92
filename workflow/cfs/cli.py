"""What every stage's command line shares: settings as JSON, threads, logging, clean errors."""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import multiprocessing
import os
import sys
from collections.abc import Callable

from cfs.errors import DataError, SettingsError


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--settings",
        type=parse_settings,
        default=Settings(),
        help="the stage's settings as a JSON object (the Snakemake rule passes config values)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument(
        "--gpus",
        type=int,
        default=0,
        help="GPUs the job was given (the rule's resources.gpu): without CUDA it stops at once",
    )
    return parser


class Settings(dict):
    """A stage's settings, as the rules hand them: every key is there, with the schema's
    default where the config left it out (workflow/schemas/config.schema.yaml holds every
    default). A stage indexes them; `get` with a fallback of its own would be a second
    default, so it is refused."""

    def get(self, key, default=None):
        raise SettingsError(
            f"a stage read setting {key!r} with a fallback; defaults live in "
            "workflow/schemas/config.schema.yaml: index the setting instead"
        )


def parse_settings(text: str) -> Settings:
    try:
        settings = json.loads(text, object_hook=Settings)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"--settings is not valid JSON: {error}") from None
    if not isinstance(settings, dict):
        raise argparse.ArgumentTypeError("--settings must be a JSON object")
    return settings


def require(settings: dict, key: str):
    if key not in settings:
        raise SettingsError(f"missing setting '{key}'")
    return settings[key]


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


# A test cluster whose nodes advertise GPUs they do not have (scripts/local_slurm.sh): its
# GPU jobs run on the CPU.
GPUS_ON_CPU = "CFS_GPUS_ON_CPU"


def require_gpus(gpus: int) -> None:
    """A job given GPUs that torch cannot see stops at start, not after hours on the CPU,
    unless CFS_GPUS_ON_CPU=1 says the GPUs were never real."""
    if not gpus or os.environ.get(GPUS_ON_CPU) == "1":
        return
    import torch

    if not torch.cuda.is_available():
        raise SettingsError(
            f"this job was given {gpus} GPU(s) (models.<name>.resources gpus) but torch "
            f"{torch.__version__} sees no CUDA device (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); not running on the CPU instead. "
            "Run it on a GPU node, or set the model's gpus to 0 to run it on the CPU "
            f"({GPUS_ON_CPU}=1: a test node that advertises GPUs it does not have)"
        )


def run_stage(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a stage's main with hub kernels off; known input errors print one clear line
    and exit 1."""
    # transformers swaps kernels from the hub into some models (e.g. Llama's RMSNorm) at
    # model.train() on a GPU, looking their versions up online: on a compute node without
    # network that fails, and the stages' numbers must not depend on downloaded code.
    os.environ["USE_HUB_KERNELS"] = "NO"
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        main(argv)
    except (DataError, SettingsError, FileNotFoundError) as error:
        logging.getLogger("cfs").error("%s", error)
        sys.exit(1)


def run_as_process(
    main: Callable[[list[str] | None], None], then: Callable[[], None] | None = None
) -> None:
    """`python -m cfs.<stage>`: run_stage, then `then` (if given), then end the process
    without the interpreter's teardown (end_process)."""
    # The modules imported so far (torch, transformers, ...) are never garbage: out of the
    # full collections that follow, which would each walk every object they hold.
    gc.freeze()
    run_stage(main)
    if then is not None:
        then()
    end_process()


def end_process() -> None:
    """End a stage's process once its work is done, its outputs written and closed: its
    output streams flushed, exit status 0, without the interpreter's teardown. That
    teardown is seconds of a short job (vLLM's engine shutdown runs three full garbage
    collections over millions of objects, then every module is torn down) and changes
    nothing on disk. A process ends normally where child processes still run (a vLLM
    engine in a process of its own, data loader workers), so that they are stopped, and
    under a profiler, coverage or a debugger, so that they write what they gathered."""
    if multiprocessing.active_children() or sys.getprofile() or sys.gettrace():
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    ctypes.CDLL(None).fflush(None)  # what C and C++ code wrote to buffered streams
    os._exit(0)


def process_seconds() -> float | None:
    """Seconds since this process started (its imports included), where /proc says."""
    try:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        uptime = float(open("/proc/uptime").read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - started
