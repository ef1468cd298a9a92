"""cfs.artifacts: checked JSONL, atomic writes, provenance without secrets, and the
fingerprint of a folder's files."""

from __future__ import annotations

import hashlib
import json

import pytest
from cfs.artifacts import (
    add_folder_fingerprint,
    atomic_path,
    provenance,
    read_json,
    read_jsonl,
    require_fields,
    write_json,
    write_jsonl,
)
from cfs.errors import DataError


def test_read_jsonl_round_trips_write_jsonl(tmp_path):
    records = [{"a": 1, "text": "é ünïcode"}, {"a": 2, "nested": {"x": [1, 2]}}]
    path = tmp_path / "data.jsonl"
    write_jsonl(path, records)
    assert read_jsonl(path) == records
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n\n{"a": 3\n{"a": 5}\n')
    with pytest.raises(DataError) as caught:
        read_jsonl(path)
    message = str(caught.value)
    # the 4th line of the file (the blank line 3 counts)
    assert f"{path}:4:" in message, f"expected '{path}:4:' in: {message}"


def test_non_object_line_names_file_and_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"a": 1}\n[1, 2, 3]\n')
    with pytest.raises(DataError, match=rf"{path.name}:2:"):
        read_jsonl(path)


def test_require_fields_names_the_record_missing_a_field(tmp_path):
    path = tmp_path / "records.jsonl"
    records = [{"prompt": "p", "response": "r"}, {"prompt": "p"}]
    with pytest.raises(DataError, match="response") as caught:
        require_fields(records, ("prompt", "response"), path)
    assert f"{path}:2:" in str(caught.value), f"expected '{path}:2:' in: {caught.value}"
    require_fields(records[:1], ("prompt", "response"), path)  # complete records pass


def test_require_fields_line_number_is_the_file_line_after_blank_lines(tmp_path):
    """The message says path:LINE, so LINE must be the file's line even when
    read_jsonl skipped blank lines before the bad record."""
    path = tmp_path / "gappy.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n\n\n{"prompt": "only"}\n')
    with pytest.raises(DataError) as caught:
        require_fields(read_jsonl(path), ("prompt", "response"), path)
    assert f"{path}:4:" in str(caught.value), f"expected '{path}:4:' in: {caught.value}"


def test_read_json_malformed_names_file(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text('{\n  "a": 1,\n  oops\n}\n')
    with pytest.raises(DataError, match=rf"{path.name}:3:"):
        read_json(path)


def test_atomic_path_publishes_on_success_and_leaves_no_temp(tmp_path):
    final = tmp_path / "out" / "result.json"
    with atomic_path(final) as tmp:
        assert tmp != final, "the temporary path is the final one"
        tmp.write_text("done")
        assert not final.exists(), "the output is visible before the block ends"
    assert final.read_text() == "done"
    assert sorted(p.name for p in final.parent.iterdir()) == ["result.json"]


def test_atomic_path_failure_leaves_neither_final_nor_temp(tmp_path):
    final = tmp_path / "result.jsonl"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(final) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_failure_keeps_previous_output(tmp_path):
    final = tmp_path / "result.txt"
    final.write_text("old")
    with pytest.raises(ValueError), atomic_path(final) as tmp:
        tmp.write_text("new")
        raise ValueError
    assert final.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]


def test_atomic_directory_replaces_old_folder_and_cleans_up_on_failure(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "stale.bin").write_text("stale")
    with atomic_path(final, directory=True) as tmp:
        tmp.mkdir(exist_ok=True)
        (tmp / "weights.bin").write_text("fresh")
    assert sorted(p.name for p in final.iterdir()) == ["weights.bin"]
    with pytest.raises(OSError), atomic_path(tmp_path / "other", directory=True) as tmp:
        (tmp / "partial").write_text("x")
        raise OSError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_write_json_is_readable_and_atomic(tmp_path):
    path = tmp_path / "a" / "b.json"
    write_json(path, {"x": 1.5, "path": tmp_path})
    assert read_json(path) == {"x": 1.5, "path": str(tmp_path)}
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]


def test_provenance_records_seed_versions_and_settings():
    record = provenance("stage_x", {"lr": 0.1}, seed=7, prompt_token_id=1)
    assert record["stage"] == "stage_x"
    assert record["seed"] == 7
    assert record["settings"] == {"lr": 0.1}
    assert record["prompt_token_id"] == 1
    for package in ("python", "torch", "transformers", "snakemake"):
        assert record["packages"].get(package), f"no {package} version in {record['packages']}"
    assert "git_commit" in record, f"no git_commit in {sorted(record)}"
    json.dumps(record)  # serialisable as is


def test_provenance_never_contains_hf_token(monkeypatch, tmp_path):
    secret = "hf_TopSecretValue0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", secret + "X")
    settings = {
        "hub_id": "org/model",
        "token": secret,
        "HF_Token": secret,
        "note": f"downloaded with {secret} yesterday",
        "nested": {"password": secret, "urls": [f"https://x/?t={secret}", "plain"]},
        "other": secret + "X",
    }
    record = provenance("prepare_model", settings, seed=0, extra_note=f"token={secret}")
    text = json.dumps(record)
    assert secret not in text, f"the token is in the provenance: {text}"
    assert record["settings"]["hub_id"] == "org/model"  # ordinary values stay
    assert record["settings"]["nested"]["urls"][1] == "plain"
    path = tmp_path / "prov.json"
    write_json(path, record)
    assert secret not in path.read_text(), f"the token is written to {path}"


def test_folder_fingerprint_changes_with_a_file(tmp_path):
    def fingerprint():
        digest = hashlib.sha256()
        add_folder_fingerprint(digest, tmp_path)
        return digest.hexdigest()

    (tmp_path / "a").write_text("x")
    before = fingerprint()
    assert fingerprint() == before, "the same files gave another fingerprint"
    (tmp_path / "a").write_text("xy")
    assert fingerprint() != before, "a changed file left the fingerprint as it was"
