"""benchmarks/gpu_check.sh --cpu-smoke: every part of the GPU check on tiny models on CPU,
through the carried wheels (unpacked onto PYTHONPATH, as on the GPU machine); and the
wheels themselves: pure Python, the versions pyproject.toml pins, well under the 64 MiB a
GPU call carries."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO, json_leaves

WHEELS = REPO / "benchmarks" / "wheels"
PARTS = {"train", "resume", "terms", "generation", "lm_eval", "memory"}
OBJECTIVES = {"plain", "context_free", "lora", "l2", "weighted_synthetic", "kl_to_base"}
CARRY_LIMIT = 64 * 2**20  # everything a GPU call carries, the repository included


def numbers(value):
    """The numbers of a JSON document (not its booleans)."""
    for leaf in json_leaves(value):
        if isinstance(leaf, int | float) and not isinstance(leaf, bool):
            yield leaf


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(
        os.environ,
        OUT=str(out),
        PYTHON=sys.executable,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-6000:]
    return json.loads((out / "gpu_check.json").read_text()), out


def test_every_part_runs_and_its_numbers_are_finite(smoke):
    figures, out = smoke
    assert figures["device"] == "cpu" and figures["smoke"] is True
    assert set(figures["parts"]) == PARTS
    for name, part in figures["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"))
    assert all(math.isfinite(number) for number in numbers(figures))
    assert "gpu_check.sh: exit 0" in (out / "gpu_check.log").read_text()


def test_the_carried_packages_are_the_ones_imported(smoke):
    versions = smoke[0]["versions"]
    for name in ("transformers", "accelerate", "peft", "lm_eval"):
        assert "/site/" in versions[name]["from"], (name, versions[name])
    assert versions["lm_eval"]["version"] == "0.4.13+notasks"
    # hidden as the GPU machine lacks it: the stand-in serves cfs.train and lm-eval
    assert versions["datasets"]["from"].endswith("benchmarks/shim/datasets/__init__.py")


def test_every_objective_trains_under_fsdp_with_and_without_checkpointing(smoke):
    runs = smoke[0]["parts"]["train"]["runs"]
    done = {(run["method"], run["activation_checkpointing"]) for run in runs}
    assert done == {(method, flag) for method in OBJECTIVES for flag in (False, True)}
    for run in runs:
        assert run["fsdp"] is True and run["fsdp_version"] == 2, run
        assert run["tokens_per_s"] > 0 and run["timed_steps"] >= 1, run


def test_a_killed_fine_tune_resumes_to_the_uninterrupted_weights(smoke):
    resume = smoke[0]["parts"]["resume"]
    assert "checkpoint-" in resume["resumed_from"]
    assert resume["relative_difference"] <= resume["tolerance"] == 1e-4


def test_terms_and_memory_report_their_figures(smoke):
    parts = smoke[0]["parts"]
    assert parts["terms"]["kl_to_base"]["gradient_cosine"] >= 0.99
    assert parts["terms"]["l2"]["relative_error"] <= parts["terms"]["l2"]["tolerance"]
    scaled = parts["memory"]["scaled_to_32_layers"]
    assert set(scaled) == {"plain", "plain+ac", "kl_to_base", "kl_to_base+ac"}
    assert all(entry["32_layers_saved_for_backward_gib"] > 0 for entry in scaled.values())
    assert any(row["per_gpu_gb"] for row in parts["memory"]["config_readme"])
    assert {"hf", "cfs-hf"} <= set(parts["lm_eval"])


def test_the_wheels_are_pure_python_at_the_pinned_versions_and_small():
    wheels = sorted(WHEELS.glob("*.whl"))
    total = sum(wheel.stat().st_size for wheel in wheels)
    assert total < CARRY_LIMIT / 2, f"{total / 2**20:.1f} MiB of wheels"
    names = {}
    for wheel in wheels:
        name, version, *_, abi, platform = wheel.stem.split("-")
        assert (abi, platform) == ("none", "any"), wheel.name
        with zipfile.ZipFile(wheel) as archive:
            metadata = archive.read(f"{name}-{version}.dist-info/METADATA").decode()
        assert re.search(r"^Version: (\S+)", metadata, re.M).group(1) == version, wheel.name
        names[name.lower().replace("_", "-")] = version
    pyproject = (REPO / "pyproject.toml").read_text()
    for package in ("transformers", "accelerate", "peft", "lm-eval"):
        pinned = re.search(rf'"{package}==([^"]+)"', pyproject).group(1)
        assert names[package].split("+")[0] == pinned, (package, names[package], pinned)


def test_without_wheels_the_check_stops_saying_how_to_build_them(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    script = tmp_path / "benchmarks" / "gpu_check.sh"
    script.write_text((REPO / "benchmarks" / "gpu_check.sh").read_text())
    result = subprocess.run(
        ["bash", str(script)],
        env=dict(os.environ, OUT=str(tmp_path / "out")),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout
    assert "benchmarks/wheels/build.py" in result.stdout, result.stdout
