"""cfs.timing: a job's timing row from the kernel's accounting of the command and the
processes it waited for, written whatever the command's end, with its exit status passed on."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

from conftest import REPO

# A grandchild that holds 200 MB and spins for 0.4 s of CPU.
GRANDCHILD = (
    "import time; held = bytearray(200 * 2**20); start = time.process_time()\n"
    "while time.process_time() - start < 0.4: pass\n"
)


def timed(path, *command: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "workflow")}
    return subprocess.Popen(
        [sys.executable, "-m", "cfs.timing", str(path), "--", *command], env=env
    )


def read_row(path) -> dict[str, str]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert len(rows) == 1, rows
    return rows[0]


def test_the_row_counts_the_processes_the_command_waited_for(tmp_path):
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {GRANDCHILD!r}])"
    path = tmp_path / "bench" / "job.tsv"
    assert timed(path, sys.executable, "-c", child).wait(timeout=60) == 0
    row = read_row(path)
    assert list(row) == ["s", "h:m:s", "max_rss", "io_in", "io_out", "cpu_time", "exit_code"]
    assert row["exit_code"] == "0"
    assert float(row["cpu_time"]) >= 0.4, row  # the grandchild's CPU time is in it
    assert float(row["max_rss"]) >= 200, row  # and so is its memory, in MB
    assert float(row["s"]) >= float(row["cpu_time"]) - 0.1, row
    assert row["h:m:s"] == "0:00:00"


def test_a_failed_command_keeps_its_status_and_its_row(tmp_path):
    path = tmp_path / "job.tsv"
    assert timed(path, "sh", "-c", "exit 3").wait(timeout=60) == 3
    assert read_row(path)["exit_code"] == "3"
    assert not list(tmp_path.glob(".*partial")), "a partial file was left behind"


def test_a_scheduler_s_sigterm_reaches_the_command(tmp_path):
    """Slurm or Snakemake ending the job: the command gets the signal, the row is written,
    and the status is the shell's 128 + 15."""
    path, started = tmp_path / "job.tsv", tmp_path / "started"
    wait = f"import pathlib, time; pathlib.Path({str(started)!r}).touch(); time.sleep(60)"
    process = timed(path, sys.executable, "-c", wait)
    deadline = time.monotonic() + 30
    while not started.exists():
        assert time.monotonic() < deadline and process.poll() is None, "the command never ran"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    row = read_row(path)
    assert row["exit_code"] == str(128 + signal.SIGTERM)
    assert float(row["s"]) < 30, row


def test_a_usage_error_names_the_form():
    result = subprocess.run(
        [sys.executable, "-m", "cfs.timing", "job.tsv", "sleep", "1"],
        env={**os.environ, "PYTHONPATH": str(REPO / "workflow")},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "FILE -- COMMAND" in result.stderr, result.stderr
