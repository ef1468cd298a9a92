"""The per-request cache of one evaluation: lm-eval's own (CachingLM, an SQLite file written
as each request finishes), kept beside the evaluation's output and keyed to the model
folder and the harness settings.

A restarted evaluation (killed at its time limit) and one that gains a task compute only
the requests the cache does not hold. A cache made for another model folder (a fine-tune
run again), another backend, batch size or model arguments is removed, never read.
Requests are keyed by their own content (context, continuation, generation arguments), so
a task's options that change its prompts change its keys.

Generations (`resumable_generation`) are sent to the backend in chunks of
`evaluation.generation_chunk_size` requests, and each finished chunk is cached, sampled
answers included (lm-eval's own cache leaves those out): a job killed in the middle of a
long reasoning evaluation loses at most one chunk, with any backend (vLLM answers a whole
call at once). The k answers of a question sampled k times (`repeats`) are told apart by
their number among identical requests, so each keeps its own sample. Before each chunk the
torch generator is seeded from (the evaluation's seed, the chunk's number), so the HF
backends sample a restarted evaluation's chunks as an uninterrupted one does; vLLM samples
with its engine's seed, so there a restarted job's remaining answers are new draws.

With a scratch folder (the rule passes Snakemake's `resources.tmpdir`, node-local on a
cluster), the SQLite file works there, not on the shared filesystem (Lustre and NFS locks
make SQLite slow or fail), and is copied back beside the evaluation after each generation
chunk and when the evaluation ends (`working_cache`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from cfs.artifacts import add_folder_fingerprint

log = logging.getLogger("cfs.request_cache")
# lm-eval appends this to the prefix it is given (one file per rank)
RANK_SUFFIX = "_rank0.db"
# the table lm-eval's CachingLM writes (SqliteDict's default name)
CACHE_TABLE = "unnamed"


def cache_key(model_dir: Path, harness: dict, seed: int) -> str:
    """The model folder (files, sizes, times), the harness settings and the seed that decide
    each request's answer; the task list is not among them."""
    keyed = {key: value for key, value in harness.items() if key != "tasks"}
    digest = hashlib.sha256(json.dumps([str(model_dir), keyed, seed], sort_keys=True).encode())
    add_folder_fingerprint(digest, model_dir)
    return digest.hexdigest()[:16]


def cache_prefix(folder: Path, model_dir: Path, harness: dict, seed: int) -> Path:
    """Where this evaluation's requests are cached (lm-eval's `use_cache`); caches of other
    keys in `folder` are removed."""
    key = cache_key(model_dir, harness, seed)
    if folder.is_dir():
        for stale in folder.iterdir():
            if not stale.name.startswith(key):
                log.info("removing %s: a cache of another model or harness", stale)
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    return folder / key


def cache_file(prefix: Path) -> Path:
    return Path(str(prefix) + RANK_SUFFIX)


@contextlib.contextmanager
def working_cache(
    folder: Path, scratch: Path | None, model_dir: Path, harness: dict, seed: int
) -> Iterator[tuple[Path, Callable[[], None]]]:
    """(the prefix the cache works at, a function copying it back into `folder`). Without
    `scratch`, the cache works in `folder` itself; with it, in a fresh folder under
    `scratch` seeded from `folder`'s copy and removed at the end."""
    kept = cache_prefix(folder, model_dir, harness, seed)
    if scratch is None:
        yield kept, lambda: None
        return
    scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cfs-request-cache-", dir=scratch))
    local = work / kept.name
    if cache_file(kept).is_file():
        shutil.copyfile(cache_file(kept), cache_file(local))

    def copy_back() -> None:
        if cache_file(local).is_file():
            partial = cache_file(kept).with_name(cache_file(kept).name + ".partial")
            shutil.copyfile(cache_file(local), partial)
            os.replace(partial, cache_file(kept))

    log.info("request cache working in %s, copied back to %s", work, folder)
    try:
        yield local, copy_back
    finally:
        copy_back()
        shutil.rmtree(work, ignore_errors=True)


def cached_requests(prefix: Path) -> int:
    """How many requests the cache at `prefix` holds. A file without the cache's table (a job
    killed, or read, between creating the file and its table) holds none."""
    path = cache_file(prefix)
    if not path.is_file():
        return 0
    from sqlitedict import SqliteDict

    if CACHE_TABLE not in SqliteDict.get_tablenames(str(path)):
        return 0
    with SqliteDict(str(path), tablename=CACHE_TABLE, flag="r") as cache:
        return len(cache)


def generation_keys(requests) -> list[str]:
    """Each generation request's cache key: lm-eval's hash of its arguments, with its number
    among identical requests after the first (the k samples of one question)."""
    from lm_eval.api.model import hash_args

    seen: Counter = Counter()
    keys = []
    for request in requests:
        key = hash_args("generate_until", request.args)
        keys.append(key if not seen[key] else f"{key}#{seen[key]}")
        seen[key] += 1
    return keys


def caching_lm_class(chunk_size: int, seed: int, after_chunk: Callable[[], None] = lambda: None):
    """lm-eval's CachingLM, its generations sent and cached chunk by chunk (module doc),
    `after_chunk` called once each chunk is committed."""
    import torch
    from lm_eval.api.model import CacheHook, CachingLM

    class ChunkedGenerationCache(CachingLM):
        def __getattr__(self, attr):
            if attr == "generate_until":
                return self.generate_in_chunks
            return super().__getattr__(attr)

        def generate_in_chunks(self, requests) -> list[str]:
            keys = generation_keys(requests)
            answers = [self.dbdict.get(key) for key in keys]
            log.info(
                "generation: %d of %d answers cached, the rest in chunks of %d",
                sum(answer is not None for answer in answers),
                len(requests),
                chunk_size,
            )
            # the backend's own per-request writes would key the k samples of a question
            # alike: only whole chunks are written, here
            self.lm.set_cache_hook(CacheHook(None))
            try:
                for number, start in enumerate(range(0, len(requests), chunk_size)):
                    todo = [
                        index
                        for index in range(start, min(start + chunk_size, len(requests)))
                        if answers[index] is None
                    ]
                    if not todo:
                        continue
                    torch.manual_seed(seed * 1_000_003 + number)
                    done = self.lm.generate_until([requests[index] for index in todo])
                    for index, answer in zip(todo, done, strict=True):
                        answers[index] = answer
                        self.dbdict[keys[index]] = answer
                    self.dbdict.commit()
                    after_chunk()
            finally:
                self.lm.set_cache_hook(CacheHook(self))
            return answers

    return ChunkedGenerationCache


@contextlib.contextmanager
def resumable_generation(chunk_size: int, seed: int, after_chunk: Callable[[], None]):
    """While active, lm-eval's `use_cache` wraps the model in caching_lm_class's cache."""
    import lm_eval.api.model

    original = lm_eval.api.model.CachingLM
    lm_eval.api.model.CachingLM = caching_lm_class(chunk_size, seed, after_chunk)
    try:
        yield
    finally:
        lm_eval.api.model.CachingLM = original
