"""The study on a real Slurm: a single-node Slurm started on this machine
(scripts/local_slurm.sh: munged, slurmctld and slurmd on localhost), and a tiny grid run
with the project's profile, `snakemake --profile slurm`, through the Slurm executor.

Starting Slurm needs root and Debian's slurm-wlm and munge; without them the Slurm run is
skipped with the reason, unless CFS_REQUIRE_SLURM=1 (set by .ci/run), where it fails."""

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
from cfs.study import FIGURES
from conftest import REPO, copy_repo, run_snakemake, snakemake_env
from test_pipeline import MODEL, failure_report, tiny_config

SCRIPT = REPO / "scripts" / "local_slurm.sh"
PROFILE = REPO / "slurm" / "config.yaml"
FAKE_GPUS = 2  # the node advertises 2 GPUs (no devices): fine_tune asks for both
SQUEUE_FIELDS = "JobID:24,State:24,tres-per-job:40,Comment:400"


# --------------------------------------------------------------------------- the profile


def load_profile(env: dict) -> dict:
    import yte

    saved = dict(os.environ)
    try:
        for key in [key for key in os.environ if key.startswith("CFS_SLURM_")]:
            del os.environ[key]
        os.environ.update(env)
        with PROFILE.open() as handle:
            return yte.process_yaml(handle, require_use_yte=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_profile_selects_slurm_and_retries_without_site_values():
    profile = load_profile({})
    assert profile["executor"] == "slurm"
    assert profile["retries"] >= 1
    assert profile["slurm-requeue"] is True
    assert profile["slurm-no-account"] is True
    assert "set-resources" not in profile and not profile["default-resources"]
    assert "slurm-status-command" not in profile  # the plugin picks sacct or squeue
    assert profile["software-deployment-method"] == "conda"  # each rule in its envs/*.yaml


def test_profile_can_run_every_job_in_the_submitting_environment():
    assert "software-deployment-method" not in load_profile({"CFS_SLURM_SDM": "none"})


def test_profile_takes_site_values_from_the_environment():
    profile = load_profile(
        {
            "CFS_SLURM_PARTITION": "all",
            "CFS_SLURM_GPU_PARTITION": "gpu",
            "CFS_SLURM_GPU_MODEL": "a100",
            "CFS_SLURM_ACCOUNT": "proj1",
            "CFS_SLURM_EXTRA": "--qos=normal --mail-type=FAIL",
            "CFS_SLURM_STATUS_COMMAND": "squeue",
            "CFS_SLURM_RETRIES": "5",
            "CFS_SLURM_JOBS": "7",
        }
    )
    # string resources are Python literals: Snakemake evaluates resource values
    assert profile["default-resources"] == {
        "slurm_partition": "'all'",
        "slurm_account": "'proj1'",
        "slurm_extra": "'--qos=normal --mail-type=FAIL'",
    }
    assert "slurm-no-account" not in profile
    assert profile["slurm-status-command"] == "squeue"
    assert (profile["retries"], profile["jobs"]) == (5, 7)
    assert "set-resources" not in profile  # the rules know their stages (resources.smk)


def test_gpu_site_values_reach_every_gpu_stage_job_and_no_other(tmp_path):
    """CFS_SLURM_GPU_PARTITION and CFS_SLURM_GPU_MODEL go to the jobs of the GPU stages
    (generation, fine-tuning, evaluation), whatever their rule: no list of rule names."""
    repo = copy_repo(tmp_path / "repo")
    env = snakemake_env({"CFS_SLURM_GPU_PARTITION": "gpu", "CFS_SLURM_GPU_MODEL": "a100"})
    # the sweep has every generation rule (contextual samples are not in the default)
    result = run_snakemake(
        repo, "-n", "all", "--configfile", "config/sweep.yaml", timeout=300, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:]
    blocks = re.split(r"^(?=(?:local)?rule \w+:)", result.stdout, flags=re.M)
    jobs = [(re.match(r"(?:local)?rule (\w+):", b).group(1), b) for b in blocks[1:]]
    gpu_stage_rules = {
        "generate_context_free",
        "generate_heldout",
        "generate_contextual",
        "fine_tune",
        "evaluate_base",
        "evaluate_finetuned",
    }
    seen = set()
    for rule, block in jobs:
        on_gpu_partition = "slurm_partition=gpu" in block and "gpu_model=a100" in block
        assert on_gpu_partition == (rule in gpu_stage_rules), (rule, block)
        # a GPU stage's job is one node: its GPUs are never split over two
        assert ("nodes=1" in block) == (rule in gpu_stage_rules), (rule, block)
        seen.add(rule)
    assert gpu_stage_rules <= seen


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


def is_complete_checkpoint(path: Path) -> bool:
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


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
        if any(is_complete_checkpoint(path) for path in checkpoints.glob("checkpoint-*")):
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
    config = tiny_config(tiny_model_dir, repo)
    config["study"].update(temperatures=[1.0], ratios=[0.5])
    config["threads"] = 1
    # long enough to be preempted between checkpoints
    config["train"].update(epochs=12, save_steps=4, logging_steps=4)
    # the global batch must split over the fine-tune's FAKE_GPUS processes
    config["train"].update(batch_size=4, micro_batch_size=4 // FAKE_GPUS)
    config["models"][MODEL]["resources"] = {"mem_mb": 2000, "runtime": 20, "train_gpus": FAKE_GPUS}
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
    for name in FIGURES:
        assert (report / "figures" / f"{MODEL}_{name}.png").is_file(), name


def test_every_job_went_through_slurm(slurm_run):
    result = slurm_run["result"]
    assert result.returncode == 0, failure_report(slurm_run["repo"], result)
    submitted = re.findall(r"submitted with SLURM jobid (\d+)", result.stdout)
    jobs = slurm_jobs(slurm_run)
    assert sorted(submitted) == sorted(job["id"] for job in jobs), result.stdout[-3000:]
    assert all(job["state"] == "COMPLETED" for job in jobs), jobs
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
    assert {"mix_at_ratio", "summarise_seeds", "summary_table", "figures"} <= set(local)


def test_gpu_stages_ask_slurm_for_gpus_and_cpu_stages_do_not(slurm_run):
    assert slurm_run["result"].returncode == 0
    for job in slurm_jobs(slurm_run):
        if job["rule"] == "fine_tune":
            assert f"gpu:{FAKE_GPUS}" in job["tres"], job
        else:
            assert "gpu" not in job["tres"], job


def test_fine_tune_with_two_gpus_runs_two_processes(slurm_run):
    assert slurm_run["result"].returncode == 0
    logs = list((slurm_run["repo"] / "results" / "logs" / "fine_tune").rglob("*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    # torchrun started 2 processes; each logs its end
    assert text.count("cfs.train: done") == FAKE_GPUS, text[-3000:]


def test_preempted_fine_tune_resumes_from_its_checkpoint(slurm_run):
    """`scontrol requeue` (what preemption with requeue does) killed the running fine-tune;
    Slurm started it again and it went on from its last checkpoint."""
    assert slurm_run["result"].returncode == 0
    assert slurm_run["requeued"], "the fine-tune ended before it could be requeued"
    assert re.search(r"\bRestarts=1\b", slurm_run["requeued_job"]), slurm_run["requeued_job"]
    assert re.search(r"\bRequeue=1\b", slurm_run["requeued_job"]), "the profile's --requeue"
    cell = slurm_run["repo"] / "results" / MODEL / "temp1" / "ratio0.5" / "seed0"
    summary = json.loads((cell / "model" / "train_log.json").read_text())["summary"]
    assert summary["resumed_from"], summary
    logs = slurm_run["repo"] / "results" / "logs" / "fine_tune"
    log = logs / MODEL / "temp1" / "ratio0.5" / "seed0.log"
    assert "resuming from" in log.read_text()
    assert not (cell / "checkpoints").exists()
