"""The paper-setting miniatures' overlays (tests/miniatures/, run by
tests/end_to_end/test_olmo_miniature.py and test_reasoning_miniature.py) change only what
cannot run here: the model, the hub data, the hub evaluation tasks, and sizes. Anything
else they changed would make a miniature stand for another config than the paper's."""

from __future__ import annotations

import pytest
from cfs.stage_settings import load_config
from conftest import REPO

MINIATURES = REPO / "tests" / "miniatures"
# What an overlay may change: the model, the hub data, the hub evaluation tasks, sizes.
SWAPPABLE = {
    "olmo": (
        "study.temperatures",
        "study.ratios",
        "study.seeds",
        "models.olmo.hub_id",
        "models.olmo.local_path",
        "models.olmo.resources.cpus_per_task",
        "task.source",
        "task.data_files",
        "task.num_train",
        "task.num_test",
        "methods.replay.corpus.hub_dataset",
        "methods.weighted_synthetic.ratios",
        "methods.kl_to_base.ratios",
        "methods.wiseft.alphas",
        "generation.num_samples",
        "generation.max_new_tokens",
        "generation.batch_size",
        "train.batch_size",
        "train.micro_batch_size",
        "train.max_length",
        "evaluation.include_path",
        "evaluation.batch_size",
        "evaluation.limit",
        "evaluation.target",
        "evaluation.forgetting",
        "evaluation.kl.num_samples",
        "evaluation.kl.max_new_tokens",
        "evaluation.kl.batch_size",
    ),
    "reasoning": (
        "study.temperatures",
        "study.ratios",
        "study.seeds",
        "models.r1_llama8b.hub_id",
        "models.r1_llama8b.local_path",
        "models.r1_llama8b.resources.cpus_per_task",
        "models.r1_llama8b.resources.train.gpus",
        "models.r1_llama8b.resources.train.cpus_per_task",
        "models.r1_llama8b.resources.lora.cpus_per_task",
        "task.source",
        "task.data_files",
        "task.num_train",
        "methods.wiseft.alphas",
        "generation.num_samples",
        "generation.max_new_tokens",
        "generation.vllm_chunk_size",
        "train.batch_size",
        "train.max_length",
        "evaluation.include_path",
        "evaluation.limit",
        "evaluation.model_args.max_model_len",
        "evaluation.target.task",
        "evaluation.target.gen_kwargs.max_gen_toks",
        "evaluation.forgetting",
        "evaluation.kl.num_samples",
        "evaluation.kl.max_new_tokens",
    ),
}


def leaves(value, prefix=""):
    """{dotted key: value} of every leaf of a nested config (a list is one leaf)."""
    if isinstance(value, dict) and value:
        found = {}
        for key, item in value.items():
            found.update(leaves(item, f"{prefix}.{key}" if prefix else key))
        return found
    return {prefix: value}


def changed_keys(before: dict, after: dict) -> set[str]:
    old, new = leaves(before), leaves(after)
    return {key for key in old.keys() | new.keys() if old.get(key) != new.get(key)}


def swapped(key: str, allowed) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in allowed)


@pytest.mark.parametrize("name", sorted(SWAPPABLE))
def test_the_miniature_changes_only_the_model_the_data_the_tasks_and_sizes(name):
    paper = load_config(REPO / "config" / f"{name}.yaml")
    miniature = load_config(REPO / "config" / f"{name}.yaml", MINIATURES / f"{name}.yaml")
    changed = changed_keys(paper, miniature)
    assert changed, "the overlay changes nothing"
    beyond = sorted(key for key in changed if not swapped(key, SWAPPABLE[name]))
    assert beyond == [], f"the overlay changes what the paper setting fixes: {beyond}"
    assert len(miniature["study"]["seeds"]) >= 2
