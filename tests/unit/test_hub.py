"""cfs.hub: without network, a model or dataset missing from the local cache stops the stage
within seconds with one message naming what is missing and how to provide it (HF_TOKEN,
HF_HOME, a local path in config): no hang, no traceback. One found in the cache is used
offline. HF_TOKEN is read from the environment and never written anywhere. The hub probe's
answer for a refusing, a silent and an answering host, and the message for each kind of
hub error.

The stages run as a user runs them: `python -m cfs.<stage>` in a subprocess, with an empty
HF_HOME, either in offline mode or with the hub endpoint pointing at a port where nothing
listens."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cfs import hub
from conftest import PACKAGE_DIR, model_settings, task_settings

SECRET = "hf_cfsTestSecretTokenNotToBeWritten0123"
MODEL_ID = "allenai/OLMo-1B-hf"
DATASET_ID = "meta-math/MetaMathQA"
QUICK_S = 30  # interpreter start and imports included; the hub part itself is instant


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


def user_env(tmp_path: Path, offline: bool) -> dict:
    """The environment of a user with an empty cache: offline mode, or no network."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env.update(
        HF_HOME=str(tmp_path / "empty_hf_home"),
        HF_TOKEN=SECRET,
        PYTHONPATH=str(PACKAGE_DIR),
        TOKENIZERS_PARALLELISM="false",
    )
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:  # "no network": the endpoint refuses connections
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    return env


def run_stage(args: list[str], env: dict, cwd: Path):
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result, time.monotonic() - start


def assert_clear_failure(result, elapsed, *names):
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert elapsed < QUICK_S, f"took {elapsed:.1f} s"
    assert "Traceback" not in output, output[-3000:]
    for name in (*names, "HF_TOKEN", "HF_HOME"):
        assert name in output, f"{name!r} not in:\n{output[-3000:]}"
    assert SECRET not in output, "the token is in the stage's output"


@pytest.mark.parametrize("offline", [True, False], ids=["offline-mode", "no-network"])
def test_uncached_hub_model_fails_fast_with_what_to_do(tmp_path, offline):
    out = tmp_path / "results" / "models" / "olmo" / "base"
    result, elapsed = run_stage(
        [
            "cfs.prepare_model",
            "--model",
            "olmo",
            "--settings",
            json.dumps(model_settings(hub_id=MODEL_ID)),
            "--out",
            str(out),
        ],
        user_env(tmp_path, offline),
        tmp_path,
    )
    assert_clear_failure(result, elapsed, MODEL_ID, "local_path")
    assert "not in the local cache" in result.stderr, result.stderr[-3000:]
    assert list(out.parent.iterdir()) == []  # no half-written folder


@pytest.mark.parametrize("offline", [True, False], ids=["offline-mode", "no-network"])
def test_uncached_hub_dataset_fails_fast_with_what_to_do(tmp_path, offline):
    settings = task_settings(
        name="metamathqa",
        source="hub",
        dataset=DATASET_ID,
        prompt_template="### Instruction:\n{query}\n\n### Response:\n",
        num_train=10,
        num_test=2,
        seed=0,
    )
    train = tmp_path / "results" / "data" / "metamathqa" / "train.jsonl"
    result, elapsed = run_stage(
        [
            "cfs.data",
            "--settings",
            json.dumps(settings),
            "--train",
            str(train),
            "--test",
            str(train.with_name("test.jsonl")),
        ],
        user_env(tmp_path, offline),
        tmp_path,
    )
    assert_clear_failure(result, elapsed, DATASET_ID, "task.data_files")
    written = [str(path) for path in (tmp_path / "results").rglob("*") if path.is_file()]
    assert written == [], "files written by the failed stage"


def fake_hub_cache(home: Path, repo_id: str, model_dir: Path) -> Path:
    """A Hugging Face cache holding `model_dir` as repo_id, laid out as huggingface_hub
    writes it: blobs, and snapshot entries that are symlinks to them."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for number, path in enumerate(sorted(model_dir.iterdir())):
        blob = repo / "blobs" / f"blob{number}"
        shutil.copy2(path, blob)
        (snapshot / path.name).symlink_to(Path("../../blobs") / blob.name)
    return snapshot


def test_cached_hub_model_is_used_offline(tiny_model_dir, tmp_path):
    home = tmp_path / "hf_home"
    fake_hub_cache(home, "cfs-tests/tiny-olmo", tiny_model_dir)
    env = user_env(tmp_path, offline=True) | {"HF_HOME": str(home)}
    out = tmp_path / "base"
    result, _ = run_stage(
        [
            "cfs.prepare_model",
            "--model",
            "tiny",
            "--settings",
            json.dumps(model_settings(hub_id="cfs-tests/tiny-olmo")),
            "--out",
            str(out),
        ],
        env,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for path in tiny_model_dir.iterdir():
        copied = out / path.name
        assert copied.is_file() and not copied.is_symlink(), f"{copied}: not a plain file"
        assert copied.read_bytes() == path.read_bytes(), f"{copied} differs from the cache's"
    provenance = (out / "cfs_provenance.json").read_text()
    assert json.loads(provenance)["settings"] == model_settings(hub_id="cfs-tests/tiny-olmo")
    assert SECRET not in provenance, "the token is in the provenance"
    assert SECRET not in result.stderr, "the token is in the stage's output"


# --------------------------------------------------------------------------- the probe


def test_probe_says_unreachable_at_once_for_a_refusing_host(monkeypatch):
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    assert hub.hub_reachable() is False
    elapsed = time.monotonic() - start
    assert elapsed < 2, f"the probe took {elapsed:.1f} s, expected under 2"


def test_probe_gives_up_on_a_silent_host_after_its_timeout(monkeypatch):
    """A host that accepts connections and never answers (a black-holed proxy, say)."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # the kernel completes handshakes; nobody ever reads or writes
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    try:
        start = time.monotonic()
        assert hub.hub_reachable(timeout=0.5) is False
        elapsed = time.monotonic() - start
        assert elapsed < 3, f"the probe took {elapsed:.1f} s with a 0.5 s timeout"
    finally:
        server.close()


def test_probe_counts_any_http_answer_as_reachable(monkeypatch):
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def answer_404():
        connection, _ = server.accept()
        connection.recv(4096)
        connection.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        connection.close()

    thread = threading.Thread(target=answer_404, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    try:
        assert hub.hub_reachable(timeout=5) is True
    finally:
        thread.join(timeout=5)
        server.close()


def test_offline_mode_skips_the_probe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub.urllib.request, "urlopen", pytest.fail)
    assert hub.hub_reachable() is False


def test_messages_by_kind_of_hub_error():
    from huggingface_hub.errors import GatedRepoError, RevisionNotFoundError

    class Response:
        status_code, headers, url, request = 403, {}, "https://huggingface.co/x", None

    gated = hub.explain_hub_error(
        GatedRepoError("Access to model x is restricted", response=Response()),
        "model",
        "org/x",
        "set local_path",
        reachable=True,
    )
    for needle in ("gated", "accepted its terms", "org/x"):
        assert needle in gated, f"{needle!r} not in: {gated}"
    revision = hub.explain_hub_error(
        RevisionNotFoundError("no revision", response=Response()),
        "dataset",
        "org/y",
        "set task.data_files",
        reachable=True,
    )
    for needle in ("revision", "org/y", "task.data_files"):
        assert needle in revision, f"{needle!r} not in: {revision}"
