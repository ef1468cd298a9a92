"""Pretraining-data replay: real text cut into samples shaped like the context-free ones.

Each document contributes its first `chunk_tokens` tokens after the model's document-start
token (the same prompt id a context-free sample starts from); a document that ends within
the limit gets the end-of-sequence token and finish reason "eos", one cut off gets
"length" and no EOS, exactly as generated samples are recorded.

Corpus sources (config methods.replay.corpus):
  {python_stdlib: "*.py"}    the CPython standard library's source files (offline)
  {files: ["docs/*.txt"]}    local text files, globs relative to the working directory;
                             with `separator: "%"`, a line holding only "%" splits a file
                             into documents (fortune files: config/sweep.yaml)
  {hub_dataset: id, config: name, split: train, field: text}   streamed from the hub

    python -m cfs.replay --model results/models/smollm2/base \
        --settings '{"corpus": {"python_stdlib": "*.py"}, "num_chunks": 64, ...}' \
        --out results/smollm2/replay/chunks.jsonl
"""

from __future__ import annotations

import glob
import hashlib
import logging
import random
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from cfs.artifacts import provenance, require_fields, write_json, write_jsonl
from cfs.cli import require, run_as_process, stage_parser
from cfs.errors import DataError, SettingsError
from cfs.modeling import load_tokenizer
from cfs.study import REPLAY_SOURCES, SAMPLE_KINDS
from cfs.tokens import context_free_prompt_id

log = logging.getLogger("cfs.replay")


def corpus_paths(patterns: list[str], root: Path) -> list[str]:
    paths = sorted({path for pattern in patterns for path in glob.glob(str(root / pattern))})
    if not paths:
        raise DataError(
            f"config key methods.replay.corpus.files: no file matches {patterns} under {root}"
        )
    return paths


def local_documents(
    patterns: list[str], root: Path, separator: str | None = None
) -> Iterator[tuple[str, str]]:
    """(source, text) per file, or per document of a file split at `separator` lines."""
    for path in corpus_paths(patterns, root):
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if separator is None:
            parts = [text]
        else:
            parts = re.split(rf"^{re.escape(separator)}[ \t]*$", text, flags=re.MULTILINE)
        for index, part in enumerate(parts):
            if part.strip():
                yield (path if separator is None else f"{path}#{index}"), part.strip("\n")


def hub_documents(corpus: dict, seed: int) -> Iterator[tuple[str, str]]:
    from datasets import load_dataset

    name = require(corpus, "hub_dataset")
    field = corpus["field"]
    stream = load_dataset(name, corpus["config"], split=corpus["split"], streaming=True).shuffle(
        seed=seed, buffer_size=corpus["shuffle_buffer"]
    )
    for index, row in enumerate(stream):
        if field not in row:
            raise DataError(f"corpus {name}: no field {field!r} (fields: {sorted(row)})")
        yield f"{name}#{index}", row[field]


def documents(corpus: dict, seed: int) -> Iterator[tuple[str, str]]:
    """(source, text) pairs; local corpora in a seeded order, hub ones streamed shuffled."""
    sources = [key for key in REPLAY_SOURCES if corpus[key] is not None]
    if len(sources) > 1:
        raise SettingsError(
            f"config key methods.replay.corpus: set one of {', '.join(sources)} "
            "(set the others to null)"
        )
    if "hub_dataset" in sources:
        yield from hub_documents(corpus, seed)
        return
    if "python_stdlib" in sources:
        found = list(local_documents([corpus["python_stdlib"]], Path(sysconfig.get_path("stdlib"))))
    elif "files" in sources:
        found = list(local_documents(corpus["files"], Path.cwd(), corpus["separator"]))
    else:
        raise SettingsError(
            f"config key methods.replay.corpus: needs one of {', '.join(REPLAY_SOURCES)}"
        )
    random.Random(seed).shuffle(found)
    yield from found


def corpus_digests(corpus: dict) -> dict[str, str] | None:
    """sha256 of each local corpus file: which text was replayed, wherever it came from."""
    if corpus["files"] is None:
        return None
    return {
        path: hashlib.sha256(Path(path).read_bytes()).hexdigest()
        for path in corpus_paths(corpus["files"], Path.cwd())
    }


def document_chunk(text: str, tokenizer, chunk_tokens: int, eos_id: int) -> tuple[list[int], str]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < chunk_tokens:
        return ids + [eos_id], "eos"
    return ids[:chunk_tokens], "length"


def replay_chunks(docs, tokenizer, num_chunks: int, chunk_tokens: int, prompt_id: int):
    chunks = []
    for source, text in docs:
        token_ids, finish_reason = document_chunk(
            text, tokenizer, chunk_tokens, tokenizer.eos_token_id
        )
        chunks.append(
            {
                "index": len(chunks),
                "source": source,
                "prompt_token_id": prompt_id,
                "token_ids": token_ids,
                "finish_reason": finish_reason,
                "text": tokenizer.decode(token_ids, skip_special_tokens=False),
            }
        )
        if len(chunks) == num_chunks:
            return chunks
    raise DataError(f"the corpus has {len(chunks)} documents, fewer than {num_chunks} needed")


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="model folder (tokenizer)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    settings = args.settings
    tokenizer = load_tokenizer(args.model)
    prompt_id = context_free_prompt_id(tokenizer, settings["prompt_token_id"])
    chunks = replay_chunks(
        documents(require(settings, "corpus"), require(settings, "seed")),
        tokenizer,
        require(settings, "num_chunks"),
        require(settings, "chunk_tokens"),
        prompt_id,
    )
    require_fields(chunks, SAMPLE_KINDS["replay"].fields, args.out)
    write_json(
        args.out.with_suffix(".provenance.json"),
        provenance(
            "replay_chunks",
            settings,
            seed=settings["seed"],
            prompt_token_id=prompt_id,
            num_chunks=len(chunks),
            num_tokens=sum(len(chunk["token_ids"]) for chunk in chunks),
            stdlib=sysconfig.get_path("stdlib"),
            corpus_files=corpus_digests(settings["corpus"]),
        ),
    )
    write_jsonl(args.out, chunks)
    log.info("%d replay chunks from %s", len(chunks), settings["corpus"])


if __name__ == "__main__":
    run_as_process(main)
