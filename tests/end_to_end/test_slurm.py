"""The study on a real Slurm: a single-node Slurm started on this machine
(scripts/local_slurm.sh: munged, slurmctld and slurmd on localhost, on a free pair of
ports), and a tiny grid run with the project's profile, `snakemake --profile slurm`,
through the Slurm executor: every job through Slurm, GPUs asked for by the GPU stages only,
a 2-GPU fine-tune in two processes, and a preempted fine-tune resuming from its
checkpoint. (The profile's settings and the jobs' resources in dry runs: tests/workflow.)

Starting Slurm needs root and Debian's slurm-wlm and munge; without them the Slurm run is
skipped with the reason, unless CFS_REQUIRE_SLURM=1 (set by .ci/run), where it fails. The
module holds the machine's only Slurm: `make test` runs a module in one process."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from cfs.figures import FIGURES
from conftest import (
    MODEL,
    REPO,
    complete_checkpoints,
    copy_repo,
    failure_report,
    snakemake_env,
    tiny_config,
)

pytestmark = pytest.mark.slow

SCRIPT = REPO / "scripts" / "local_slurm.sh"
FAKE_GPUS = 2  # the node advertises 2 GPUs (no devices): fine_tune asks for both
SQUEUE_FIELDS = "JobID:24,State:24,tres-per-job:40,Comment:400"


# --------------------------------------------------------------------------- local Slurm


def slurm_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "starting slurmctld, slurmd and munged needs root"
    for binary in ("slurmctld", "slurmd", "munged", "sbatch", "squeue"):
        if shutil.which(binary) is None:
            return f"no {binary} on PATH (apt-get install slurm-wlm munge)"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed"
    return None


def skip_or_fail(reason: str):
    if os.environ.get("CFS_REQUIRE_SLURM") == "1":
        pytest.fail(f"CFS_REQUIRE_SLURM=1, but Slurm cannot run here: {reason}")
    pytest.skip(reason)


def free_port_pair() -> int:
    """A port p with p and p+1 free (slurmctld and slurmd)."""
    for _ in range(100):
        port = random.randint(20000, 30000)
        try:
            for candidate in (port, port + 1):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    reason = slurm_unavailable()
    if reason:
        skip_or_fail(reason)
    state = tmp_path_factory.mktemp("slurm")
    env = dict(
        os.environ,
        CFS_SLURM_DIR=str(state),
        CFS_SLURM_PORT=str(free_port_pair()),
        CFS_SLURM_GPUS=str(FAKE_GPUS),
    )
    started = subprocess.run(
        ["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=120
    )
    try:
        if started.returncode != 0:
            skip_or_fail(f"local Slurm did not start:\n{started.stderr[-3000:]}")
        client_env = dict(
            line.removeprefix("export ").split("=", 1)
            for line in started.stdout.splitlines()
            if line.startswith("export ")
        )
        # the node's GPUs are advertised, not real: its GPU jobs run on the CPU
        assert client_env.get("CFS_GPUS_ON_CPU") == "1", started.stdout
        yield {"dir": state, "env": client_env}
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


def squeue(env: dict) -> str:
    return subprocess.run(
        ["squeue", "--states=all", "--noheader", "--Format", SQUEUE_FIELDS],
        env=env,
        capture_output=True,
        text=True,
    ).stdout


def start_requeued_job_now(job_id: str, env: dict) -> None:
    """Slurm holds a requeued job back for about two minutes (its BeginTime): once it is
    pending again, let it start at once, to keep the test short."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = subprocess.run(
            ["squeue", "--noheader", "--states=all", "--jobs", job_id, "--format=%T"],
            env=env,
            capture_output=True,
            text=True,
        ).stdout.strip()
        if state == "PENDING":
            subprocess.run(
                ["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=True
            )
            return
        time.sleep(0.2)


def requeue_after_first_checkpoint(process, checkpoints: Path, env: dict) -> str | None:
    """Preempt the running fine-tune as Slurm would (`scontrol requeue`: killed, queued
    again, started again) once it has written a checkpoint; the Slurm job id, or None if
    the fine-tune ended first."""
    while process.poll() is None:
        if complete_checkpoints(checkpoints):
            for line in squeue(env).splitlines():
                job_id, state, _, comment = line.strip().split(maxsplit=3)
                if comment.startswith("rule_fine_tune") and state == "RUNNING":
                    subprocess.run(["scontrol", "requeue", job_id], env=env, check=True)
                    start_requeued_job_now(job_id, env)
                    return job_id
        time.sleep(0.1)
    return None


@pytest.fixture(scope="module")
def slurm_run(local_slurm, tiny_model_dir, tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("slurm_study") / "repo")
    shutil.copytree(REPO / "slurm", repo / "slurm")
    config = tiny_config(tiny_model_dir)
    config["study"].update(temperatures=[1.0], ratios=[0.5])
    config["claims"]["primary"] = None  # no plain fine-tuning to compare with
    config["threads"] = 1
    # long enough to be preempted between checkpoints
    config["train"].update(epochs=12, save_steps=4, logging_steps=4)
    # the global batch must split over the fine-tune's FAKE_GPUS processes
    config["train"].update(batch_size=4, micro_batch_size=4 // FAKE_GPUS)
    config["models"][MODEL]["resources"] = {
        "mem_mb": 2000,
        "runtime": 20,
        "train": {"gpus": FAKE_GPUS},
    }
    (repo / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # no conda on this machine: every job runs in the test's environment
    env = snakemake_env({**local_slurm["env"], "OMP_NUM_THREADS": "1", "CFS_SLURM_SDM": "none"})
    # what a user types (README), plus a short first status check for the test
    command = [sys.executable, "-m", "snakemake", "--profile", "slurm", "all"]
    command += ["--slurm-init-seconds-before-status-checks", "2"]
    output = repo / "snakemake.out"
    with output.open("w") as handle:
        process = subprocess.Popen(
            command, cwd=repo, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True
        )
    try:
        checkpoints = repo / "results" / MODEL / "temp1" / "ratio0.5" / "seed0" / "checkpoints"
        requeued = requeue_after_first_checkpoint(process, checkpoints, env)
        process.wait(timeout=1200)
    finally:
        process.kill()
    result = subprocess.CompletedProcess(command, process.returncode, output.read_text())
    restarts = ""
    if requeued:
        restarts = subprocess.run(
            ["scontrol", "show", "job", requeued], env=env, capture_output=True, text=True
        ).stdout
    return {
        "repo": repo,
        "result": result,
        "jobs": squeue(env),
        "requeued": requeued,
        "requeued_job": restarts,
    }


def slurm_jobs(run) -> list[dict]:
    rows = []
    for line in run["jobs"].splitlines():
        job_id, state, tres, comment = line.strip().split(maxsplit=3)
        rule = re.match(r"rule_([A-Za-z0-9_]+?)(?:_wildcards_.*)?$", comment)
        rows.append({"id": job_id, "rule": rule and rule.group(1), "state": state, "tres": tres})
    return rows


def test_slurm_run_completes(slurm_run):
    result = slurm_run["result"]
    assert result.returncode == 0, failure_report(slurm_run["repo"], result)
    report = slurm_run["repo"] / "results" / "studies" / "default"
    table = pd.read_csv(report / "summary.csv")
    assert sorted(table["method"]) == ["base", "context_free"]
    figures = sorted(path.name for path in (report / "figures").iterdir())
    assert figures == sorted(f"{MODEL}_{name}.png" for name in FIGURES)


def test_every_job_went_through_slurm(slurm_run):
    result = slurm_run["result"]
    assert result.returncode == 0, failure_report(slurm_run["repo"], result)
    submitted = re.findall(r"submitted with SLURM jobid (\d+)", result.stdout)
    jobs = slurm_jobs(slurm_run)
    assert sorted(submitted) == sorted(job["id"] for job in jobs), result.stdout[-3000:]
    states = {job["id"]: job["state"] for job in jobs}
    assert states == {job["id"]: "COMPLETED" for job in jobs}, jobs
    rules = sorted(str(job["rule"]) for job in jobs)
    # jobs of seconds (checks, mixing, seeds' summaries, table, figures) run locally
    assert rules == sorted(
        [
            "prepare_model",
            "prepare_task_data",
            "generate_heldout",
            "generate_context_free",
            "fine_tune",
            "evaluate_base",
            "evaluate_finetuned",
        ]
    ), jobs
    local = re.findall(r"^localrule (\w+):", result.stdout, re.M)
    missing = {"mix_at_ratio", "summarise_seeds", "summary_table", "figures"} - set(local)
    assert missing == set(), f"jobs not run locally; local jobs: {local}"


def test_gpu_stages_ask_slurm_for_gpus_and_cpu_stages_do_not(slurm_run):
    result = slurm_run["result"]
    assert result.returncode == 0, failure_report(slurm_run["repo"], result)
    for job in slurm_jobs(slurm_run):
        if job["rule"] == "fine_tune":
            assert f"gpu:{FAKE_GPUS}" in job["tres"], job
        else:
            assert "gpu" not in job["tres"], job


def test_fine_tune_with_two_gpus_runs_two_processes(slurm_run):
    result = slurm_run["result"]
    assert result.returncode == 0, failure_report(slurm_run["repo"], result)
    logs = list((slurm_run["repo"] / "results" / "logs" / "fine_tune").rglob("*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    # torchrun started 2 processes; each logs its end
    assert text.count("cfs.train: done") == FAKE_GPUS, text[-3000:]


def test_preempted_fine_tune_resumes_from_its_checkpoint(slurm_run):
    """`scontrol requeue` (what preemption with requeue does) killed the running fine-tune;
    Slurm started it again and it went on from its last checkpoint."""
    result = slurm_run["result"]
    assert result.returncode == 0, failure_report(slurm_run["repo"], result)
    assert slurm_run["requeued"] is not None, "the fine-tune ended before it could be requeued"
    assert re.search(r"\bRestarts=1\b", slurm_run["requeued_job"]), slurm_run["requeued_job"]
    assert re.search(r"\bRequeue=1\b", slurm_run["requeued_job"]), "the profile's --requeue"
    cell = slurm_run["repo"] / "results" / MODEL / "temp1" / "ratio0.5" / "seed0"
    summary = json.loads((cell / "model" / "train_log.json").read_text())["summary"]
    assert summary["resumed_from"] is not None, f"not resumed: {summary}"
    logs = slurm_run["repo"] / "results" / "logs" / "fine_tune"
    log = (logs / MODEL / "temp1" / "ratio0.5" / "seed0.log").read_text()
    assert "resuming from" in log, log[-3000:]
    assert not (cell / "checkpoints").exists(), "checkpoints left after the final save"
