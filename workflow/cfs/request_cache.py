"""The per-request cache of one evaluation: lm-eval's own (CachingLM, an SQLite file written
as each request finishes), kept beside the evaluation's output and keyed to the model
folder and the harness settings.

A restarted evaluation (killed at its time limit) and one that gains a task compute only
the requests the cache does not hold. A cache made for another model folder (a fine-tune
run again), another backend, batch size or model arguments is removed, never read.
Requests are keyed by their own content (context, continuation, generation arguments), so
a task's options that change its prompts change its keys. lm-eval leaves sampled
generations (do_sample) out of the cache: they are computed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from cfs.artifacts import add_folder_fingerprint

log = logging.getLogger("cfs.request_cache")
# lm-eval appends this to the prefix it is given (one file per rank)
RANK_SUFFIX = "_rank0.db"


def cache_key(model_dir: Path, harness: dict) -> str:
    """The model folder (files, sizes, times) and the harness settings that decide each
    request's answer; the task list is not among them."""
    keyed = {key: value for key, value in harness.items() if key != "tasks"}
    digest = hashlib.sha256(json.dumps([str(model_dir), keyed], sort_keys=True).encode())
    add_folder_fingerprint(digest, model_dir)
    return digest.hexdigest()[:16]


def cache_prefix(folder: Path, model_dir: Path, harness: dict) -> Path:
    """Where this evaluation's requests are cached (lm-eval's `use_cache`); caches of other
    keys in `folder` are removed."""
    key = cache_key(model_dir, harness)
    if folder.is_dir():
        for stale in folder.iterdir():
            if not stale.name.startswith(key):
                log.info("removing %s: a cache of another model or harness", stale)
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    return folder / key


def cached_requests(prefix: Path) -> int:
    """How many requests the cache at `prefix` holds."""
    path = Path(str(prefix) + RANK_SUFFIX)
    if not path.is_file():
        return 0
    from sqlitedict import SqliteDict

    with SqliteDict(str(path), flag="r") as cache:
        return len(cache)
