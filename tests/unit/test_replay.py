"""cfs.replay: pretraining-data replay, real text cut into chunks shaped like context-free
samples (here from the Python standard library), seeded, and mixed in as its own kind."""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import pytest
from cfs import mix, replay
from cfs.errors import DataError, SettingsError
from conftest import read_jsonl, replay_settings, task_records


def test_replay_chunks_are_shaped_like_context_free_samples(tokenizer):
    docs = [("a", "short text"), ("b", " ".join(["word"] * 200))]
    chunks = replay.replay_chunks(iter(docs), tokenizer, 2, chunk_tokens=16, prompt_id=1)
    short, long = chunks
    eos = tokenizer.eos_token_id
    assert (short["finish_reason"], short["token_ids"][-1]) == ("eos", eos)
    assert (long["finish_reason"], len(long["token_ids"])) == ("length", 16)
    assert eos not in long["token_ids"], f"EOS in a chunk cut at its length: {long}"
    assert {c["prompt_token_id"] for c in chunks} == {1}
    with pytest.raises(DataError, match="fewer than 3"):
        replay.replay_chunks(iter(docs), tokenizer, 3, chunk_tokens=16, prompt_id=1)


def test_replay_from_the_python_standard_library(tiny_model_dir, tmp_path):
    settings = replay_settings({"python_stdlib": "*.py"}, num_chunks=6, chunk_tokens=12)

    def run(out):
        replay.main(
            ["--model", str(tiny_model_dir), "--settings", json.dumps(settings)]
            + [
                "--out",
                str(out),
            ]
        )
        return read_jsonl(out)

    chunks = run(tmp_path / "chunks.jsonl")
    assert len(chunks) == 6
    stdlib = sysconfig.get_path("stdlib")
    elsewhere = [
        c["source"]
        for c in chunks
        if not (c["source"].startswith(stdlib) and c["source"].endswith(".py"))
    ]
    assert elsewhere == [], f"chunks from outside the standard library's .py files ({stdlib})"
    assert run(tmp_path / "again.jsonl") == chunks  # seeded document order
    mixed = mix.mix_at_ratio(task_records(4, seed=1), chunks, 1.0, seed=0, kind="replay")
    assert sum(r["kind"] == "replay" for r in mixed) == 4


def test_replay_without_a_corpus_source_names_the_key():
    with pytest.raises(SettingsError, match="methods.replay.corpus"):
        list(replay.documents(replay_settings({})["corpus"], 0))


def test_replay_from_files_split_into_documents_records_each_files_digest(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Fortune files hold many documents, each ended by a line holding only "%"."""
    monkeypatch.chdir(tmp_path)
    quotes = [f"Quotation number {n} about the weather." for n in range(5)]
    Path("quotes").write_text("\n%\n".join(quotes) + "\n%\n")
    settings = replay_settings(
        {"files": ["quotes"], "separator": "%"}, num_chunks=5, chunk_tokens=200
    )
    out = tmp_path / "chunks.jsonl"
    replay.main(
        ["--model", str(tiny_model_dir), "--settings", json.dumps(settings), "--out", str(out)]
    )
    chunks = read_jsonl(out)
    assert all(c["finish_reason"] == "eos" for c in chunks), "a quotation was cut"
    found = sorted(quote for c in chunks for quote in quotes if c["text"].startswith(quote))
    assert found == sorted(quotes), [c["text"] for c in chunks]
    assert all("%" not in c["text"] for c in chunks)
    digest = hashlib.sha256(Path("quotes").read_bytes()).hexdigest()
    recorded = json.loads(out.with_suffix(".provenance.json").read_text())["corpus_files"]
    assert list(recorded.values()) == [digest]
