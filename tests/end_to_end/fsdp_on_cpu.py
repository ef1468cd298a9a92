"""Run `cfs.train` under FSDP2 on CPU processes (gloo), for the tests.

torch's FSDP2 (`fully_shard`) runs on CPU with gloo, but accelerate (1.15) routes several
CPU processes to DDP even when the Trainer hands it an FSDP plugin: its FSDP branch covers
GPU-like devices only. This launcher switches the accelerate state to FSDP before the
Trainer builds its Accelerator, so everything after that is the real code path of a GPU
run: accelerate's `fsdp2_prepare_model` (every parameter replaced by a sharded DTensor,
cpu_ram_efficient_loading's broadcast from rank 0), the Trainer's FSDP checkpointing and
`get_state_dict`, and cfs.train's own FSDP code (L2 on the shards, the sharded base model
of KL-to-base, LoRA merged on the gathered weights).

    torchrun --standalone --nproc-per-node 2 tests/end_to_end/fsdp_on_cpu.py --model ...
    torchrun --standalone --nproc-per-node 2 tests/end_to_end/fsdp_on_cpu.py --runs runs.json

(the first with cfs.train's own arguments). benchmarks/gpu_check.py imports the switch
(run_accelerate_fsdp_on_cpu, for its CPU smoke) and reset_accelerate (between the
fine-tunes of one process) from here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def run_accelerate_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        fresh = not AcceleratorState._shared_state
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fresh and fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = __init__


def main(argv: list[str]) -> None:
    """`--runs FILE`: a JSON list of cfs.train argument lists, run one after another in
    these processes (start-up is most of a tiny run's time); otherwise cfs.train's own."""
    sys.path.append(str(Path(__file__).resolve().parents[2] / "workflow"))  # after PYTHONPATH
    run_accelerate_fsdp_on_cpu()
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
