"""Two studies of one model key with other evaluation settings, through Snakemake itself:
the second evaluates the first's fine-tunes beside the first's evaluations, and the
eval.json a user types is the evaluation of the study asked."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import MODEL, copy_repo, evaluation_path, failure_report, run_snakemake, tiny_config
from studies import executed, run

pytestmark = pytest.mark.slow

UPSTREAM_OF_EVALUATION = {
    "prepare_model",
    "prepare_task_data",
    "generate_context_free",
    "generate_heldout",
    "mix_at_ratio",
    "fine_tune",
}


def test_two_studies_with_other_evaluation_settings_share_the_fine_tunes(
    tiny_model_dir, tmp_path_factory
):
    """A second study of the same model key with another batch size and fewer forgetting
    tasks evaluates the first's fine-tunes (nothing upstream of the evaluations runs
    again) beside the first's evaluations; then neither study has anything to do, and the
    eval.json a user types is the evaluation of the study asked."""
    repo = copy_repo(tmp_path_factory.mktemp("evaluations") / "repo")
    first = tiny_config(tiny_model_dir)
    first["study"]["temperatures"] = [1.0]
    first["train"]["curve_every"] = 0
    second = copy.deepcopy(first)
    second["study"]["name"] = "other"
    second["evaluation"].update(batch_size=4, forgetting=first["evaluation"]["forgetting"][:2])
    result = run(repo, first, "first.yaml")
    assert result.returncode == 0, failure_report(repo, result)
    fine_tunes = executed(result.stdout)["fine_tune"]
    assert len(fine_tunes) == 2, fine_tunes  # plain fine-tuning and context-free data
    result = run(repo, second, "second.yaml")
    assert result.returncode == 0, failure_report(repo, result)
    ran = set(executed(result.stdout))
    assert ran & UPSTREAM_OF_EVALUATION == set(), result.stdout[-5000:]
    assert {"evaluate_base", "evaluate_finetuned"} <= ran, result.stdout[-5000:]
    for config, name in ((first, "first.yaml"), (second, "second.yaml")):
        again = run(repo, config, name)
        assert again.returncode == 0, again.stdout[-3000:]
        assert "Nothing to be done" in again.stdout, again.stdout[-3000:]
    for config in (first, second):
        tasks = {"cfs_add_sub", *(entry["task"] for entry in config["evaluation"]["forgetting"])}
        for evaluated in ("base", "ratio0/seed0", "temp1/ratio0.5/seed0"):
            record = json.loads((repo / evaluation_path(config, MODEL, evaluated)).read_text())
            settings = record["provenance"]["settings"]
            assert set(record["requests"]["per_task"]) == tasks, evaluated
            assert settings["batch_size"] == config["evaluation"]["batch_size"], evaluated
    typed = f"results/{MODEL}/temp1/ratio0.5/eval.json"
    for name, config in (("second.yaml", second), ("first.yaml", first)):
        result = run_snakemake(repo, typed, "--cores", "1", "--configfile", name)
        assert result.returncode == 0, failure_report(repo, result)
        card = evaluation_path(config, MODEL, "temp1/ratio0.5")
        assert (repo / typed).read_bytes() == (repo / card).read_bytes()
