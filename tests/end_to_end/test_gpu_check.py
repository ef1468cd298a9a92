"""benchmarks/gpu_check.py --quick: the stage commands `snakemake -n -p` emits for the OLMo
setting in miniature, run on CPU as a user runs the check, and the figures it reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

# the OLMo miniature's stages again, on one core: with the paper settings in miniature
pytestmark = [pytest.mark.slow, pytest.mark.miniature]

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    command = [sys.executable, str(SCRIPT), "--quick", "--json", str(out)]
    result = subprocess.run(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=500,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:]
    assert "| fine_tune |" in result.stdout, "no table printed"
    return json.loads(out.read_text())


def test_every_stage_the_rules_emit_runs(figures):
    """The jobs are the dry run's: every rule of the OLMo miniature that loads a model or
    data, each one ok."""
    rules = {job["rule"].split(" (")[0] for job in figures["jobs"]}
    expected = {"prepare_model", "prepare_task_data", "mix_at_ratio", "replay_chunks"}
    expected |= {"generate_context_free", "generate_contextual", "generate_heldout"}
    expected |= {"fine_tune", "interpolate_wiseft", "evaluate_base", "evaluate_finetuned"}
    assert expected <= rules, rules
    assert [job for job in figures["jobs"] if job["status"] != "ok"] == []
    assert all(job["seconds"] >= 0 and job["peak_memory_mib"] > 0 for job in figures["jobs"])


def test_every_method_fine_tunes_and_one_runs_fsdp_under_torchrun(figures):
    """Each of the setting's methods that trains its own way, at one value of its knob,
    plain fine-tuning, and a 2-process FSDP fine-tune of OLMo (tied embeddings, weights
    read by rank 0 only)."""
    tunes = [job for job in figures["jobs"] if job["rule"].startswith("fine_tune")]
    outputs = {job["command"].split("--out ")[1].split()[0] for job in tunes}
    methods = {"lora", "cf_weighted", "kl_to_base", "l2", "ratio0", "temp1"}
    assert {out.split("/")[2] for out in outputs} == methods, outputs
    for job in tunes:
        assert job["tokens_per_s"] > 0 and job["steps"] >= 1, job
        assert job["mfu"] is None  # no bf16 peak on a CPU
    (launched,) = [job for job in tunes if "torchrun" in job["rule"]]
    assert "--gpus 2" in launched["command"] and launched["fsdp"] is True


def test_the_plan_is_written_and_run_apart(tmp_path):
    """--plan writes the dry run's jobs (where Snakemake is) for --jobs elsewhere."""
    plan = tmp_path / "plan.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--plan", str(plan)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    planned = json.loads(plan.read_text())
    assert planned["quick"] is True and planned["config"]["models"]["olmo_fsdp"]["local_path"]
    assert all(job["command"].startswith(("python ", "if [")) for job in planned["jobs"])
    assert not any("CFS_" in job["command"] for job in planned["jobs"])
