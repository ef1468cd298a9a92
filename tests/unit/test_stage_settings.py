"""cfs.stage_settings: the one place each stage's --settings is built (the rules, the
budget, the tests and the benchmarks call it), and the config as the Snakefile sees it."""

from __future__ import annotations

import pytest
from cfs.stage_settings import StageSettings, load_config, merged
from conftest import REPO, default_config, validated_config


def settings_for(**sections) -> StageSettings:
    config = default_config()
    for name, section in sections.items():
        config[name] = {**config.get(name, {}), **section}
    return StageSettings(validated_config(config))


def test_an_overlay_merges_key_by_key_and_replaces_lists():
    base = {"study": {"seeds": [0, 1, 2], "name": "a"}, "train": {"epochs": 1}}
    over = {"study": {"seeds": [7]}, "train": None}
    assert merged(base, over) == {"study": {"seeds": [7], "name": "a"}, "train": None}
    assert base["study"]["seeds"] == [0, 1, 2], "the base was changed in place"


def test_a_loaded_overlay_fills_the_schema_defaults(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("study: {name: other, seeds: [3]}\n")
    config = load_config(overlay)
    assert (config["study"]["name"], config["study"]["seeds"]) == ("other", [3])
    assert config["study"]["models"] == default_config()["study"]["models"]
    assert config["evaluation"]["kl"]["temperature"] == 1.0  # a schema default


@pytest.mark.parametrize(
    "backend, environment", [("auto", "vllm"), ("vllm", "vllm"), ("hf", "cfs")]
)
def test_generation_with_auto_runs_where_vllm_is_installed(backend, environment):
    """Under conda, `auto` could only ever pick vLLM inside vLLM's environment."""
    assert settings_for(generation={"backend": backend}).environment("generation") == environment


def test_every_knob_of_a_cell_is_in_its_settings():
    stages = settings_for()
    assert stages.generation("smollm2", 2, "0.7")["temperature"] == 0.7
    assert stages.mix("temp0.7/ratio0.5", 1) == {"ratio": 0.5, "kind": "context_free", "seed": 1}
    assert stages.mix("ratio0", 1) == {"ratio": 0.0, "kind": None, "seed": 1}
    assert stages.wiseft("0.25") == {"alpha": 0.25}
    rated = stages.train("ratio0/lr0.0002", 3)
    assert (rated["learning_rate"], rated["seed"]) == (0.0002, 3)
    assert "evaluate_at" not in rated, "points along training are outputs, not settings"


def test_a_speed_knob_of_generation_resamples_no_held_out_set():
    """The held-out set of KL to base is an input of every evaluation: generation's batch
    sizes (which decide how the context-free samples are seeded) must not change its
    settings, which would re-run it and every evaluation after it."""
    before = settings_for().heldout("smollm2")
    faster = settings_for(generation={"batch_size": 7, "vllm_chunk_size": 5})
    assert faster.heldout("smollm2") == before
    assert faster.generation("smollm2", 0, 1.0) != settings_for().generation("smollm2", 0, 1.0)
    assert settings_for(evaluation={"kl": {"seed": 1}}).heldout("smollm2") != before


def test_a_null_hub_id_swaps_a_configs_hub_model_for_a_local_folder():
    """An overlay over a config whose model comes from the hub sets hub_id to null and
    names local_path: the model is prepared from the folder, and nothing is fetched."""
    config = load_config(
        REPO / "config" / "olmo.yaml",
        {"models": {"olmo": {"hub_id": None, "local_path": "my/olmo"}}},
    )
    settings = StageSettings(config)
    assert settings.prepare("olmo") == {"local_path": "my/olmo", "revision": None}
    assert settings.fetch()["models"] == []
