"""Config validation: the schema (workflow/schemas/config.schema.yaml) and cfs.study's
checks refuse a bad config with a message that names its key, checked in-process as the
Snakefile checks it; and once through Snakemake itself, which stops before any job."""

from __future__ import annotations

import copy
import re

import yaml
from cfs.study import METHODS, Study
from conftest import REPO, copy_repo, default_config, run_snakemake


def rejection(config) -> str:
    """The message a config is refused with, as the Snakefile refuses it: the schema
    (snakemake.utils.validate), then cfs.study's checks."""
    from snakemake.utils import validate

    try:
        validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
        Study(config).check()
    except Exception as error:  # WorkflowError (schema) or ValueError (study)
        return str(error)
    raise AssertionError("the config was accepted")


def assert_refused(config, *needles):
    message = rejection(copy.deepcopy(config))
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message[-3000:]}"


def test_the_default_config_is_accepted():
    from snakemake.utils import validate

    config = default_config()
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    Study(config).check()


def test_a_refused_config_stops_snakemake_naming_the_key(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    config = default_config()
    config["study"]["ratios"] = [0.0, -0.5]
    (repo / "neg_ratio.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = run_snakemake(repo, "-n", "--configfile", "neg_ratio.yaml", timeout=300)
    assert result.returncode != 0, result.stdout[-3000:]
    for needle in ("ratios", "-0.5"):
        assert needle in result.stdout, f"{needle!r} not in:\n{result.stdout[-3000:]}"
    assert "Job stats" not in result.stdout, "Snakemake scheduled jobs for a refused config"


def test_negative_ratio_is_rejected():
    config = default_config()
    config["study"]["ratios"] = [0.0, -0.5]
    assert_refused(config, "ratios", "-0.5")


def test_string_temperature_is_rejected():
    config = default_config()
    config["study"]["temperatures"] = [0.7, "hot"]
    assert_refused(config, "temperatures", "hot")


def test_zero_temperature_is_rejected():
    config = default_config()
    config["study"]["temperatures"] = [0, 1.0]
    assert_refused(config, "temperatures")


def test_unknown_model_key_is_rejected():
    config = default_config()
    config["study"]["models"] = [*config["study"]["models"], "nosuchmodel"]
    assert_refused(config, "study.models", "nosuchmodel")


def test_misspelt_section_is_rejected():
    config = default_config()
    config["trian"] = {"epochs": 3}
    assert_refused(config, "trian")


def test_too_few_generated_samples_for_largest_ratio_is_rejected():
    config = default_config()
    config["study"]["ratios"] = [0.0, 1.0]
    config["task"]["num_train"] = 50
    config["generation"]["num_samples"] = 10
    assert_refused(config, "generation.num_samples")


def test_nonzero_ratio_without_temperatures_is_rejected():
    config = default_config()
    config["study"]["temperatures"] = []
    config["study"]["ratios"] = [0.0, 0.5]
    assert_refused(config, "study.temperatures")


def test_missing_required_section_is_rejected():
    config = default_config()
    del config["task"]
    assert_refused(config, "'task' is a required property")


def test_missing_required_nested_key_is_rejected():
    config = default_config()
    del config["evaluation"]["target"]
    assert_refused(config, "'target' is a required property")


def test_a_single_seed_under_study_seed_is_rejected_by_name():
    """`study.seeds` holds the seeds; a `study.seed` key is refused, not ignored."""
    config = default_config()
    del config["study"]["seeds"]
    config["study"]["seed"] = 0
    assert_refused(config, "('seed' was unexpected)")


def test_unknown_method_is_rejected():
    config = default_config()
    config["study"]["methods"] = ["context_free", "dropout"]
    known = [name for name in METHODS if name != "plain"]  # plain: ratio 0
    assert_refused(config, "study.methods", "dropout", ", ".join(known))


def test_wiseft_without_plain_fine_tuning_is_rejected():
    config = default_config()
    config["study"]["ratios"] = [1.0]
    assert_refused(config, "study.ratios", "WiSE-FT")


def test_unknown_resource_section_or_key_is_rejected():
    config = default_config()
    model = config["study"]["models"][0]
    config["models"][model]["resources"] = {"loar": {"gpus": 1}}
    assert_refused(config, f"models.{model}.resources.loar")
    config["models"][model]["resources"] = {"lora": {"gpu": 1}}
    assert_refused(config, f"models.{model}.resources.lora.gpu")
    config["models"][model]["resources"] = {"train": 8}  # a section, not a value
    assert_refused(config, f"models.{model}.resources.train")


def test_a_primary_claim_outside_the_grid_is_rejected_by_name():
    config = default_config()
    config["claims"]["primary"] = {"cell": "temp0.7/ratio1", "versus": "ratio0"}
    assert_refused(config, "claims.primary.cell", "temp0.7/ratio1")


def test_a_primary_claim_the_study_does_not_compare_is_rejected():
    config = default_config()
    config["study"]["ratios"] = [0.0, 0.5, 1.0]
    # both cells run, but the exact penalty is compared only at its own temperature and ratio
    config["claims"]["primary"] = {
        "cell": "temp1/ratio0.5",
        "versus": "kl_to_base/temp1/ratio1/lambda1",
    }
    assert_refused(config, "claims.primary", "no comparison the study makes")


def test_a_config_without_claims_has_no_primary():
    from snakemake.utils import validate

    config = default_config()
    del config["claims"]
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    assert config["claims"] == {
        "primary": None,
        "equivalence_margin": 0.25,
        "matched_target_gain": None,
    }
    Study(config).check()


def schema_keys(node: dict, path: tuple = ()) -> set[tuple[str, ...]]:
    """Every key path the schema names (a model's keys under `models.*`)."""
    keys = set()
    for name, child in (node.get("properties") or {}).items():
        keys.add((*path, name))
        keys |= schema_keys(child, (*path, name))
    for child in [node.get("items"), node.get("additionalProperties")]:
        if isinstance(child, dict):
            keys |= schema_keys(child, (*path, "*"))
    for choice in node.get("oneOf", []) + node.get("anyOf", []) + node.get("allOf", []):
        keys |= schema_keys(choice, path)
    return keys


def test_config_readme_names_every_schema_key():
    """config/README.md is the key reference: every key of the schema appears there in
    code format (alone, or as the last part of a dotted name such as `kl.seed`)."""
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    keys = schema_keys(schema)
    for name, definition in schema.get("definitions", {}).items():
        keys |= schema_keys(definition, ("definitions", name))
    text = re.sub(r"```\w*", "", (REPO / "config" / "README.md").read_text())  # fences
    spans = " ".join(re.findall(r"`([^`]+)`", text))
    missing = [
        ".".join(path)
        for path in sorted(keys)
        if not re.search(rf"(?<![\w-]){re.escape(path[-1])}(?![\w-])", spans)
    ]
    assert missing == [], f"config/README.md does not name: {missing}"
