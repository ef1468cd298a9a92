"""Run several `cfs.train` runs in one pair of CPU processes (gloo), for the tests: their
start-up is most of a tiny run's time. Each run is FSDP2 as cfs.train runs it on CPU
processes (cfs.distributed.fsdp_on_cpu): accelerate's `fsdp2_prepare_model` (every
parameter a sharded DTensor, cpu_ram_efficient_loading's broadcast from rank 0), the
Trainer's FSDP checkpointing and `get_state_dict`, and cfs.train's own FSDP code (L2 on
the shards, the sharded base model of KL-to-base, LoRA merged on the gathered weights).

    torchrun --standalone --nproc-per-node 2 tests/end_to_end/fsdp_on_cpu.py --model ...
    torchrun --standalone --nproc-per-node 2 tests/end_to_end/fsdp_on_cpu.py --runs runs.json

(the first with cfs.train's own arguments); reset_accelerate between the runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    """`--runs FILE`: a JSON list of cfs.train argument lists, run one after another in
    these processes (start-up is most of a tiny run's time); otherwise cfs.train's own."""
    sys.path.append(str(Path(__file__).resolve().parents[2] / "workflow"))  # after PYTHONPATH
    from cfs.cli import run_stage
    from cfs.train import main as train

    runs = json.loads(Path(argv[1]).read_text()) if argv[:1] == ["--runs"] else [argv]
    for run in runs:
        reset_accelerate()  # each run as in a process of its own
        run_stage(train, run)


def reset_accelerate() -> None:
    """Forget the previous run's accelerate state (its Accelerator also left
    ACCELERATE_USE_FSDP in the environment); the process group stays."""
    import os

    from accelerate.state import AcceleratorState, GradientState

    os.environ.pop("ACCELERATE_USE_FSDP", None)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


if __name__ == "__main__":
    main(sys.argv[1:])
