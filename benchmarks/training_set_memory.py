"""The fine-tune's training set in memory: what a process holds while it builds the set
(cfs.training_set.build: read, tokenize, order, write; before the set was shared, every
process of a fine-tune did this and kept the result) against what a process holds that
memory-maps the built set (every process but the main one now).

The set: --examples context-free samples of --tokens tokens each (pre-tokenized, so the
figures are the set's, not a tokenizer's). Each side runs in a fresh process. Its figure is
private (anonymous) memory above the process's own after its imports: the builder's peak
(ru_maxrss less that base), the reader's after it has read every row. Pages of the mapped
files are the page cache's, shared by all processes, and reported apart. --quick: 200 x 64.
"""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import arguments, report, table

VOCABULARY = 128_256  # Llama 3's: ids above 256 are one Python int object each in a list


def memory_kib() -> dict:
    status = Path("/proc/self/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in status)
    return {key: int(fields[key].split()[0]) for key in ("RssAnon", "RssFile")}


def build_settings(tokens: int) -> dict:
    return {
        "max_length": tokens + 1,
        "mixing": "augment",
        "batch_size": 8,
        "epochs": 1,
        "seed": 0,
        "method": {"name": "plain"},
    }


def child(side: str, folder: Path, data: Path, tokens: int) -> dict:
    """In a fresh process: the memory this side of the comparison holds."""
    import datasets  # noqa: F401 - its import is not the set's memory
    from cfs import training_set
    from cfs.study import METHODS

    base = memory_kib()
    if side == "build":
        settings = build_settings(tokens)
        training_set.build(METHODS["plain"], settings, None, data, None, folder, "benchmark")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"private_mib": (peak - base["RssAnon"] - base["RssFile"]) / 1024}
    loaded = training_set.load(folder)
    trained = sum(len(row["input_ids"]) for row in loaded.rows)  # every row, as training does
    after = memory_kib()
    return {
        "private_mib": (after["RssAnon"] - base["RssAnon"]) / 1024,
        "mapped_mib": (after["RssFile"] - base["RssFile"]) / 1024,
        "tokens": trained,
    }


def write_samples(path: Path, examples: int, tokens: int) -> None:
    rng = random.Random(0)
    with path.open("w") as out:
        for index in range(examples):
            ids = [rng.randrange(VOCABULARY) for _ in range(tokens)]
            record = {"index": index, "prompt_token_id": 1, "token_ids": ids}
            out.write(json.dumps({**record, "kind": "context_free"}) + "\n")


def run_side(side: str, folder: Path, data: Path, tokens: int) -> dict:
    command = [sys.executable, __file__, "--child", side, str(folder), str(data), str(tokens)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"the {side} process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        side, folder, data, tokens = sys.argv[2:]
        print(json.dumps(child(side, Path(folder), Path(data), int(tokens))))
        return
    parser = arguments(__doc__)
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per example")
    args = parser.parse_args()
    examples, tokens = (200, 64) if args.quick else (args.examples, args.tokens)
    with tempfile.TemporaryDirectory(prefix="cfs-bench-set-") as scratch:
        data, folder = Path(scratch) / "train.jsonl", Path(scratch) / "tokenized"
        write_samples(data, examples, tokens)
        built = run_side("build", folder, data, tokens)
        mapped = run_side("load", folder, data, tokens)
    total = examples * tokens
    figures = {"examples": examples, "tokens": total, "build": built, "memory_mapped": mapped}
    figures["bytes_per_token"] = {
        side: figures[side]["private_mib"] * 2**20 / total for side in ("build", "memory_mapped")
    }
    rows = [
        [side, f"{figures[side]['private_mib']:,.0f}", f"{figures['bytes_per_token'][side]:.1f}"]
        for side in ("build", "memory_mapped")
    ]
    print(f"{examples:,} examples of {tokens} tokens ({total:,} tokens)")
    print(table(rows, ["process", "private MiB", "bytes per token"]))
    print(f"the mapped files' pages (page cache, shared): {mapped['mapped_mib']:,.0f} MiB")
    report("training_set_memory", figures, args.json)


if __name__ == "__main__":
    main()
