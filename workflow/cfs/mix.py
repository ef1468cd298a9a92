"""Mix synthetic or replayed samples into the fine-tuning set at a ratio.

Samples are context-free generations, contextual generations (the base model's responses
to the task prompts) or pretraining-text chunks; --kind says which, and each keeps the
fields its training example needs.

The ratio counts synthetic examples per fine-tuning example (0.5 = half as many); ratio 0
is plain fine-tuning. Samples are taken in generation order, so a smaller ratio's set is a
subset of a larger one's, then the whole set is shuffled with the seed.

    python -m cfs.mix --task results/data/arith/train.jsonl \
        --generations results/smollm2/temp0.7/context_free.jsonl --ratio 0.5 \
        --settings '{"seed": 0}' --out results/smollm2/temp0.7/ratio0.5/train.jsonl
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from cfs.artifacts import provenance, read_jsonl, require_fields, write_json, write_jsonl
from cfs.cli import require, run_stage, stage_parser
from cfs.errors import DataError, SettingsError
from cfs.examples import TASK
from cfs.study import SAMPLE_KINDS

log = logging.getLogger("cfs.mix")
TASK_FIELDS = ("prompt", "response")


def synthetic_count(num_task: int, ratio: float) -> int:
    return round(num_task * ratio)


def mix_at_ratio(
    task: list[dict], samples: list[dict], ratio: float, seed: int, kind: str = "context_free"
) -> list[dict]:
    """Task examples (kind "task") plus round(ratio * len(task)) samples of `kind`."""
    if ratio < 0:
        raise SettingsError(f"ratio must be >= 0, got {ratio}")
    wanted = synthetic_count(len(task), ratio)
    if wanted > len(samples):
        raise DataError(
            f"ratio {ratio} needs {wanted} synthetic samples for {len(task)} task examples, "
            f"but only {len(samples)} were generated: raise generation.num_samples"
        )
    mixed = [{"kind": TASK, **{field: ex[field] for field in TASK_FIELDS}} for ex in task]
    fields = SAMPLE_KINDS[kind].fields
    mixed += [
        {"kind": kind, **{field: sample[field] for field in fields}} for sample in samples[:wanted]
    ]
    random.Random(seed).shuffle(mixed)
    return mixed


def load_generations(path: Path, kind: str = "context_free") -> list[dict]:
    samples = read_jsonl(path)
    if not samples:
        raise DataError(
            f"{path}: the generation set is empty; refusing to fine-tune on task data only"
        )
    require_fields(samples, SAMPLE_KINDS[kind].fields, path)
    return samples


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, type=Path, help="fine-tuning set JSONL")
    parser.add_argument("--generations", type=Path, help="samples JSONL to mix in")
    parser.add_argument("--kind", choices=sorted(SAMPLE_KINDS), default="context_free")
    parser.add_argument("--ratio", required=True, type=float)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    task = read_jsonl(args.task)
    if not task:
        raise DataError(f"{args.task}: the fine-tuning set is empty")
    require_fields(task, TASK_FIELDS, args.task)
    if args.ratio > 0 and args.generations is None:
        raise SettingsError(f"ratio {args.ratio} > 0 needs --generations")
    samples = load_generations(args.generations, args.kind) if args.ratio > 0 else []
    seed = require(args.settings, "seed")
    mixed = mix_at_ratio(task, samples, args.ratio, seed, args.kind)
    num_synthetic = len(mixed) - len(task)
    log.info("%d task examples + %d %s samples", len(task), num_synthetic, args.kind)
    write_json(
        args.out.with_suffix(".provenance.json"),
        provenance(
            "mix_at_ratio",
            args.settings,
            seed=seed,
            ratio=args.ratio,
            kind=args.kind,
            num_task=len(task),
            num_synthetic=num_synthetic,
            generations=str(args.generations) if args.generations else None,
        ),
    )
    write_jsonl(args.out, mixed)


if __name__ == "__main__":
    run_stage(main)
