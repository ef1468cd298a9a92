"""cfs.cli's settings: defaults live in the schema only, so no stage reads a setting with a
fallback of its own.

The stages get their settings as cfs.cli.Settings, whose `get` refuses; and no module of
the package calls `get` with a fallback on a settings mapping (checked in the source)."""

from __future__ import annotations

import ast
import json
import os
import re

import pytest
from cfs.cli import parse_settings
from cfs.errors import SettingsError
from conftest import PACKAGE_DIR

# names the stages give their settings and the sections within them
SETTINGS_NAMES = {"settings", "method", "corpus", "entry", "options", "section", "kl", "task"}


def fallback_reads(source: str) -> list[tuple[int, str]]:
    """(line, text) of each `<settings name>.get(...)` call in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in SETTINGS_NAMES
        ):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_no_stage_reads_a_setting_with_a_fallback():
    found = {
        path.name: reads
        for path in sorted((PACKAGE_DIR / "cfs").glob("*.py"))
        if path.name != "study.py"  # the grid reads the raw config, before any stage
        and (reads := fallback_reads(path.read_text()))
    }
    assert found == {}, f"settings read with a fallback (put the default in the schema): {found}"


def test_the_source_check_finds_a_fallback():
    assert fallback_reads("def f(settings):\n    return settings.get('x', 3)\n") == [
        (2, "settings.get('x', 3)")
    ]


def test_stage_settings_refuse_a_fallback_at_run_time():
    settings = parse_settings(json.dumps({"train": {"epochs": 1}}))
    assert settings["train"]["epochs"] == 1
    with pytest.raises(SettingsError, match="schema"):
        settings["train"].get("learning_rate", 1e-4)


def test_stages_run_with_hub_kernels_off(monkeypatch):
    """transformers would fetch kernels from the hub at model.train() on a GPU."""
    from cfs.cli import run_stage
    from transformers.integrations import hub_kernels

    monkeypatch.setenv("USE_HUB_KERNELS", "YES")
    seen = []
    run_stage(lambda argv: seen.append(hub_kernels._kernels_enabled()), [])
    assert seen == [False]


class Offline(Exception):
    pass


@pytest.mark.parametrize(
    "stage, argv",
    [
        ("train", ["--model", "m", "--data", "d", "--checkpoints", "c", "--out", "o"]),
        ("generate", ["--model", "m", "--settings", '{"temperature": 1}', "--out", "o"]),
    ],
)
def test_gpu_stages_go_offline_when_the_hub_is_unreachable_before_any_work(
    monkeypatch, stage, argv
):
    import importlib

    module = importlib.import_module(f"cfs.{stage}")

    def go_offline():
        raise Offline

    monkeypatch.setattr(module, "go_offline_unless_reachable", go_offline)
    with pytest.raises(Offline):
        module.main(argv)


@pytest.mark.parametrize(
    "stage, argv",
    [
        ("train", ["--model", "m", "--data", "d", "--checkpoints", "c", "--out", "o"]),
        ("generate", ["--model", "m", "--settings", '{"temperature": 1}', "--out", "o"]),
        ("evaluate", ["--model", "m", "--out", "o"]),
    ],
)
def test_a_stage_given_a_gpu_it_cannot_see_stops_at_start(monkeypatch, stage, argv):
    """Not hours on the CPU until the job's time limit: the message, before any model."""
    import importlib

    import torch

    module = importlib.import_module(f"cfs.{stage}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def go_offline():
        raise AssertionError("the stage went on without the GPU it was given")

    monkeypatch.setattr(module, "go_offline_unless_reachable", go_offline)
    with pytest.raises(SettingsError, match=r"given 1 GPU\(s\) .* sees no CUDA device"):
        module.main([*argv, "--gpus", "1"])


def test_a_test_node_that_advertises_gpus_it_lacks_runs_gpu_jobs_on_the_cpu(monkeypatch):
    import torch
    from cfs.cli import require_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SettingsError):
        require_gpus(2)
    monkeypatch.setenv("CFS_GPUS_ON_CPU", "1")
    require_gpus(2)  # scripts/local_slurm.sh's advertised GPUs: the CPU it is


def test_a_gpu_stage_without_cuda_exits_with_the_message():
    """As the rule runs it, a process of its own: one clear line, exit status 1."""
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = subprocess.run(
        [sys.executable, "-m", "cfs.generate", "--model", "absent"]
        + ["--out", "absent.jsonl", "--gpus", "1"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(PACKAGE_DIR)},
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "sees no CUDA device" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


STAGE_PROCESS = """
import atexit, ctypes, gc, logging, multiprocessing, sys, time
from pathlib import Path
from cfs.cli import run_as_process

def main(argv):
    atexit.register(lambda: Path("teardown").write_text("ran"))
    logging.getLogger("cfs.test").info("frozen objects: %d", gc.get_freeze_count())
    print("written by Python", end="")
    ctypes.CDLL(None).printf(b" and by C")  # buffered: stdout is a pipe
    if sys.argv[1:] == ["child"]:
        # alive until the teardown stops it
        multiprocessing.Process(target=time.sleep, args=(600,), daemon=True).start()

if __name__ == "__main__":
    run_as_process(main, then=lambda: Path("then").write_text("ran"))
"""


@pytest.mark.parametrize("case", ["finished", "with a child process", "under a profiler"])
def test_a_stage_process_ends_without_teardown_unless_something_needs_it(tmp_path, case):
    """A finished stage's process flushes what it wrote and exits 0 without the
    interpreter's teardown (seconds of a short job). It ends normally with a child
    process still running, which the teardown stops, and under a profiler, which writes
    its data then. Its modules were out of the collector's view from the start."""
    import subprocess
    import sys

    (tmp_path / "stage.py").write_text(STAGE_PROCESS)
    command = {
        "finished": ["stage.py"],
        "with a child process": ["stage.py", "child"],
        "under a profiler": ["-m", "cProfile", "-o", "profile.out", "stage.py"],
    }[case]
    result = subprocess.run(
        [sys.executable, *command],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(PACKAGE_DIR)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "written by Python and by C"
    frozen = re.search(r"cfs.test: frozen objects: (\d+)", result.stderr)
    assert frozen and int(frozen.group(1)) > 10_000, result.stderr[-2000:]
    assert (tmp_path / "then").read_text() == "ran"
    assert (tmp_path / "teardown").exists() == (case != "finished")
    assert (tmp_path / "profile.out").exists() == (case == "under a profiler")
