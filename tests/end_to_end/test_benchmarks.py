"""Every benchmark's --quick mode: the script's real code path on tiny settings (a tiny
random model, the repository's configs), run as a user runs it, offline. A benchmark out of
step with the pipeline's code fails here. The scripts run side by side (their start-up is
most of their time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

BENCHMARKS = REPO / "benchmarks"
# script -> the figures its --json must hold
EXPECTED = {
    "machine_limit": ("float32", "bfloat16", "per_size", "auto"),
    "study_cost": ("rules", "total_seconds"),
    "dag": ("results",),
    "generation": ("results", "ratio_vs_naive", "share_of_decode_bound"),
    "finetune": ("results", "overhead_vs_raw", "tokens_per_s_vs_padded"),
    "eval_speed": ("backends", "equivalence", "startup_seconds", "speedup"),
    "precision": ("limit", "auto", "runs", "ratios", "scores"),
    "training_set_memory": ("build", "memory_mapped", "bytes_per_token"),
    "stage_end": ("hf",),
}
TIMEOUT = 300


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Start every --quick at once; each test waits for its own."""
    folder = tmp_path_factory.mktemp("benchmarks")
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        CFS_BENCH_QUIET_WAIT="0",
    )
    env.pop("HF_TOKEN", None)
    runs = {}
    for name in EXPECTED:
        log = (folder / f"{name}.log").open("w")
        command = [sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick"]
        command += ["--json", str(folder / f"{name}.json")]
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        runs[name] = (process, log, folder)
    yield runs
    for process, log, _ in runs.values():
        process.kill()
        process.wait()
        log.close()


@pytest.mark.parametrize("name", list(EXPECTED))
def test_quick_mode_runs_and_writes_its_figures(quick_runs, name):
    process, log, folder = quick_runs[name]
    code = process.wait(timeout=TIMEOUT)
    log.flush()
    output = (folder / f"{name}.log").read_text()
    assert code == 0, output[-5000:]
    figures = json.loads((folder / f"{name}.json").read_text())
    assert figures["benchmark"] == name
    for key in EXPECTED[name]:
        assert key in figures, (key, sorted(figures))
    assert "|" in output, "no table printed"
    if name == "stage_end":  # its two endings computed the same evaluation
        assert figures["hf"]["same_metrics"], output[-3000:]


def test_every_benchmark_has_a_quick_run_here():
    scripts = {path.stem for path in BENCHMARKS.glob("*.py") if not path.stem.startswith("_")}
    assert scripts == set(EXPECTED) | {"gpu_check"}  # gpu_check: tests/end_to_end/test_gpu_check
