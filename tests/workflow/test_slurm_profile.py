"""The Slurm profile (slurm/config.yaml, a YTE template): the Slurm executor with retries,
requeue and conda deployment, and the site's values (partition, account, extra sbatch
flags, status command, retries, jobs) taken from CFS_SLURM_* variables. The profile's run
on a real Slurm: tests/end_to_end/test_slurm.py."""

from __future__ import annotations

import os

from conftest import REPO

PROFILE = REPO / "slurm" / "config.yaml"


def load_profile(env: dict) -> dict:
    """The profile as Snakemake reads it with `env` as the only CFS_SLURM_* variables."""
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
    assert profile["retries"] >= 1, f"retries {profile['retries']}, expected at least 1"
    assert profile["slurm-requeue"] is True
    assert profile["slurm-no-account"] is True
    assert "set-resources" not in profile, profile
    assert profile["default-resources"] == {}
    assert "slurm-status-command" not in profile, "the plugin picks sacct or squeue"
    assert profile["software-deployment-method"] == "conda"  # each rule in its envs/*.yaml


def test_profile_can_run_every_job_in_the_submitting_environment():
    profile = load_profile({"CFS_SLURM_SDM": "none"})
    assert "software-deployment-method" not in profile, profile


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
    assert "slurm-no-account" not in profile, profile
    assert profile["slurm-status-command"] == "squeue"
    assert (profile["retries"], profile["jobs"]) == (5, 7)
    # the rules know their stages (resources.smk)
    assert "set-resources" not in profile, profile
