"""Mix synthetic or replayed samples into the fine-tuning set at a ratio.

Samples are context-free generations, contextual generations (the base model's responses
to the task prompts) or pretraining-text chunks; the `kind` setting says which, and each keeps the
fields its training example needs (settings: ratio, kind, seed).

The ratio counts synthetic examples per fine-tuning example (0.5 = half as many); ratio 0
is plain fine-tuning. Samples are taken in generation order, so a smaller ratio's set is a
subset of a larger one's, then the whole set is shuffled with the seed. The stage streams:
it keeps where each line starts, not the records (a reasoning model's sample file is
gigabytes, and mixing runs on the submitting host).

    python -m cfs.mix --task results/data/arith/train.jsonl \
        --generations results/smollm2/temp0.7/context_free.jsonl \
        --settings '{"ratio": 0.5, "kind": "context_free", "seed": 0}' \
        --out results/smollm2/temp0.7/ratio0.5/train.jsonl
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from pathlib import Path

from cfs.artifacts import (
    atomic_path,
    parse_jsonl_line,
    provenance,
    require_record_fields,
    write_json,
)
from cfs.cli import require, run_as_process, stage_parser
from cfs.errors import DataError, SettingsError
from cfs.examples import TASK
from cfs.study import SAMPLE_KINDS

log = logging.getLogger("cfs.mix")
TASK_FIELDS = ("prompt", "response")


def synthetic_count(num_task: int, ratio: float) -> int:
    return round(num_task * ratio)


def samples_wanted(num_task: int, num_samples: int, ratio: float) -> int:
    """round(ratio x num_task), or an error where the ratio is negative or asks for more
    samples than there are."""
    if ratio < 0:
        raise SettingsError(f"ratio must be >= 0, got {ratio}")
    wanted = synthetic_count(num_task, ratio)
    if wanted > num_samples:
        raise DataError(
            f"ratio {ratio} needs {wanted} synthetic samples for {num_task} task examples, "
            f"but only {num_samples} were generated: raise generation.num_samples"
        )
    return wanted


def mix_at_ratio(
    task: list[dict], samples: list[dict], ratio: float, seed: int, kind: str = "context_free"
) -> list[dict]:
    """Task examples (kind "task") plus round(ratio * len(task)) samples of `kind`."""
    wanted = samples_wanted(len(task), len(samples), ratio)
    return list(mixed_records(task.__getitem__, len(task), samples.__getitem__, wanted, seed, kind))


def mixed_records(read_task, num_task: int, read_sample, wanted: int, seed: int, kind: str | None):
    """The mixed set in its shuffled order: the task examples (read_task(i), i < num_task)
    and the first `wanted` samples (read_sample(j)), each with the fields its training
    example needs. The permutation depends only on the seed and the set's size."""
    order = list(range(num_task + wanted))
    random.Random(seed).shuffle(order)
    fields = SAMPLE_KINDS[kind].fields if wanted else ()
    for index in order:
        if index < num_task:
            example = read_task(index)
            yield {"kind": TASK, **{field: example[field] for field in TASK_FIELDS}}
        else:
            sample = read_sample(index - num_task)
            yield {"kind": kind, **{field: sample[field] for field in fields}}


def empty_generations(path: Path) -> str:
    return f"{path}: the generation set is empty; refusing to fine-tune on task data only"


class LineIndex:
    """Where each record of a JSONL file starts, checked line by line as `read_jsonl` and
    `require_fields` check it (the same messages), without holding the records: the
    sample files of long generations are gigabytes."""

    def __init__(self, path: Path, fields: tuple[str, ...]):
        self.path = path
        self.offsets: list[int] = []
        with path.open("rb") as handle:
            offset = 0
            for line_number, line in enumerate(handle, start=1):
                if line.strip():
                    record = parse_jsonl_line(line, path, line_number)
                    require_record_fields(record, fields, path, line_number)
                    self.offsets.append(offset)
                offset += len(line)

    def __len__(self) -> int:
        return len(self.offsets)

    def reader(self, handle):
        def read(index: int) -> dict:
            handle.seek(self.offsets[index])
            return json.loads(handle.readline())

        return read


def write_mixed(
    task: LineIndex, samples: LineIndex | None, wanted: int, seed: int, kind: str, out: Path
) -> None:
    """`mix_at_ratio` of the two files (`wanted` samples, `samples_wanted`), written to
    `out` record by record (the same bytes as `write_jsonl(out, mix_at_ratio(...))`), with
    two lists of line offsets in memory instead of the records."""
    with contextlib.ExitStack() as stack:
        read_task = task.reader(stack.enter_context(task.path.open("rb")))
        read_sample = None
        if wanted:
            read_sample = samples.reader(stack.enter_context(samples.path.open("rb")))
        tmp = stack.enter_context(atomic_path(out))
        handle = stack.enter_context(tmp.open("w", encoding="utf-8"))
        for record in mixed_records(read_task, len(task), read_sample, wanted, seed, kind):
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, type=Path, help="fine-tuning set JSONL")
    parser.add_argument("--generations", type=Path, help="samples JSONL to mix in")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    ratio, kind = require(args.settings, "ratio"), require(args.settings, "kind")
    task = LineIndex(args.task, TASK_FIELDS)
    if not len(task):
        raise DataError(f"{args.task}: the fine-tuning set is empty")
    if ratio > 0 and (args.generations is None or kind not in SAMPLE_KINDS):
        raise SettingsError(
            f"ratio {ratio} > 0 needs --generations and a kind of samples "
            f"({', '.join(sorted(SAMPLE_KINDS))}), got {kind!r}"
        )
    samples = None
    if ratio > 0:
        samples = LineIndex(args.generations, SAMPLE_KINDS[kind].fields)
        if not len(samples):
            raise DataError(empty_generations(args.generations))
    seed = require(args.settings, "seed")
    wanted = samples_wanted(len(task), len(samples) if samples else 0, ratio)
    log.info("%d task examples + %d %s samples", len(task), wanted, kind)
    write_json(
        args.out.with_suffix(".provenance.json"),
        provenance(
            "mix_at_ratio",
            args.settings,
            seed=seed,
            ratio=ratio,
            kind=kind,
            num_task=len(task),
            num_synthetic=wanted,
            generations=str(args.generations) if args.generations else None,
        ),
    )
    write_mixed(task, samples, wanted, seed, kind, args.out)


if __name__ == "__main__":
    run_as_process(main)
