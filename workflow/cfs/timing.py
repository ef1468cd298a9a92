"""A job's timing file (results/benchmarks/<rule>/...tsv): `python -m cfs.timing FILE --
COMMAND ...` runs COMMAND, then writes one row of what it cost, from the kernel's own
accounting of COMMAND and every process it waited for (torchrun's ranks, vLLM's engine
process), and exits with COMMAND's status. It writes the row whether COMMAND succeeded or not.

Columns (Snakemake's `benchmark:` names, where they mean the same):
- `s`, `h:m:s`: wall time;
- `cpu_time`: user plus system CPU seconds of all those processes;
- `max_rss`: the peak resident memory, in MB, of the largest single process among them;
- `io_in`, `io_out`: MB read from and written to block devices;
- `exit_code`: COMMAND's exit status (128 + the signal's number where a signal ended it).

Snakemake's `benchmark:` samples the job's process tree instead, twice a second for the
first 15 s of each job, reading every process's /proc/<pid>/smaps_rollup (psutil's
memory_full_info, 5-17 ms each for a process that has imported torch or vLLM). On the
OLMo setting in miniature, 102 jobs of seconds each, that sampling cost Snakemake's process
about 30 CPU seconds of a 5-minute run on 2 cores (BENCHMARKS.md, "A job's timing file").

It imports only the standard library and cfs.artifacts: it runs in every job, in every
environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cfs.artifacts import atomic_path

COLUMNS = ("s", "h:m:s", "max_rss", "io_in", "io_out", "cpu_time", "exit_code")
# the signals a scheduler ends a job with, passed on to COMMAND (Ctrl-C reaches it as a
# member of the terminal's process group; this process waits for it to end)
FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
BLOCK_BYTES = 512  # getrusage counts block I/O in 512-byte units on Linux


def row(wall: float, usage, code: int) -> dict[str, str]:
    hours, rest = divmod(int(wall), 3600)
    return {
        "s": f"{wall:.4f}",
        "h:m:s": f"{hours}:{rest // 60:02d}:{rest % 60:02d}",
        "max_rss": f"{usage.ru_maxrss / 1024:.2f}",  # KiB on Linux
        "io_in": f"{usage.ru_inblock * BLOCK_BYTES / 1e6:.2f}",
        "io_out": f"{usage.ru_oublock * BLOCK_BYTES / 1e6:.2f}",
        "cpu_time": f"{usage.ru_utime + usage.ru_stime:.2f}",
        "exit_code": str(code),
    }


def write_row(path: Path, values: dict[str, str]) -> None:
    """The timing file, whole or not at all."""
    with atomic_path(path) as partial:
        lines = ["\t".join(COLUMNS), "\t".join(values[c] for c in COLUMNS)]
        partial.write_text("\n".join(lines) + "\n")


def run_timed(path: Path, command: list[str]) -> int:
    """Run `command`, write its timing row to `path`; its exit code."""
    start = time.monotonic()
    child = subprocess.Popen(command)
    for forwarded in FORWARDED:
        signal.signal(forwarded, lambda number, frame: child.send_signal(number))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _, status, usage = os.wait4(child.pid, 0)  # retried after a forwarded signal (PEP 475)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait
    # as the shell reports it: the exit code, or 128 + the signal
    code = 128 - child.returncode if child.returncode < 0 else child.returncode
    write_row(path, row(time.monotonic() - start, usage, code))
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: python -m cfs.timing FILE -- COMMAND [ARGUMENT ...]")
    return run_timed(Path(argv[0]), argv[2:])


if __name__ == "__main__":
    sys.exit(main())
