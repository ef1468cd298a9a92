"""cfs.budget: the GPU-hours estimate of the paper's two configs (python -m cfs.budget),
run in-process: every job's configured runtime holds its slower estimate within the Slurm
profile's retries, docs/cluster-budget.md is the script's output, sharded
checkpoints cost a fraction of full-state ones, and a cell's trained tokens are counted as
cfs.train trains them."""

from __future__ import annotations

import re

import pytest
from conftest import DAY_MINUTES, PAPER_CONFIGS, REPO


def budget(name: str):
    from cfs import budget

    config = budget.load_config(REPO / PAPER_CONFIGS[name])
    return budget, config, budget.study_jobs(config)


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_the_runtimes_cover_the_slower_estimates(name):
    """Every job's configured runtime holds its slower estimate (cfs.budget); a generation
    longer than its runtime resumes after its finished chunks in the profile's retries."""
    module, _, estimated = budget(name)
    assert module.too_long(estimated) == []
    profile = (REPO / "slurm" / "config.yaml").read_text()
    retries = int(re.search(r'CFS_SLURM_RETRIES", (\d+)', profile).group(1))
    for job in estimated:
        assert job.attempts <= retries + 1, (job.rule, job.name, job.attempts)
        if job.rule.startswith("generate"):
            assert job.runtime_minutes <= DAY_MINUTES


def test_the_committed_budget_is_the_scripts_output():
    """docs/cluster-budget.md is `python -m cfs.budget --document` as it stands: a change of
    an assumption or a config shows up there, or this fails."""
    from cfs import budget as module

    assert {REPO / path for path in PAPER_CONFIGS.values()} == {
        REPO / path for path in module.DOCUMENTED
    }
    committed = (REPO / "docs" / "cluster-budget.md").read_text()
    assert committed == module.document(), (
        "docs/cluster-budget.md is stale: run `python -m cfs.budget --document "
        "> docs/cluster-budget.md` in workflow/"
    )


def test_sharded_checkpoints_cost_a_fraction_of_full_state_ones():
    module, _, estimated = budget("reasoning")
    checkpoints = module.checkpoint_gpu_hours(estimated)
    assert checkpoints["sharded"][1] < checkpoints["full_state"][0] / 5, checkpoints


def test_the_budget_counts_a_cells_tokens_as_cfs_train_trains_them():
    """Plain fine-tuning: ceil(epochs x num_train / batch) steps of `batch` examples; a
    mixed cell under augment adds ratio x num_train samples a epoch; a synthetic term
    adds ratio x batch samples a step to the plain cell's examples."""
    module, config, _ = budget("reasoning")
    spec = module.ASSUMPTIONS["deepseek-ai/DeepSeek-R1-Distill-Llama-8B"]
    train, num_train = config["train"], config["task"]["num_train"]
    steps = -(-train["epochs"] * num_train // train["batch_size"])
    plain = module.train_tokens(config, {"method": "plain", "ratio": 0.0}, spec)
    assert plain == (steps * 128, steps * 128 * spec.task_tokens, 0.0)
    mixed = module.train_tokens(
        config, {"method": "context_free", "temperature": 1.3, "ratio": 1.0}, spec
    )
    assert mixed[0] == plain[0] + train["epochs"] * num_train
    assert mixed[1] == plain[1] + train["epochs"] * num_train * 8000
    term = module.train_tokens(
        config, {"method": "kl_to_base", "temperature": 1.0, "ratio": 0.5, "lambda": 1.0}, spec
    )
    assert term[:2] == plain[:2] and term[2] == steps * 64 * 6500
