"""Checkpoints of a fine-tune, and resuming from them: a restarted job (killed at its time
limit, preempted) continues from the last complete checkpoint of the same run."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from cfs.artifacts import add_folder_fingerprint, read_json, write_json
from cfs.distributed import is_main_process

log = logging.getLogger("cfs.checkpoints")


def run_fingerprint(model_dir: Path, data: Path, settings: dict, other_inputs=()) -> str:
    """What makes one training run: a checkpoint of another run must not be resumed.
    `other_inputs`: the run's other input files (None where it has none)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(data.read_bytes())
    for path in other_inputs:
        if path is not None:
            digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    add_folder_fingerprint(digest, model_dir)
    return digest.hexdigest()


def is_complete_checkpoint(path: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint without a whole one was cut
    short by a kill. A sharded (FSDP) checkpoint's folders are complete once their
    `.metadata` is there: torch.distributed.checkpoint writes it after every process has
    written its shard."""
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    sharded = [folder for folder in path.iterdir() if folder.is_dir()]
    return all((folder / ".metadata").is_file() for folder in sharded if is_dcp_folder(folder))


def is_dcp_folder(folder: Path) -> bool:
    """A torch.distributed.checkpoint folder (accelerate names them pytorch_model_fsdp_<i>
    and optimizer_<i>)."""
    return any(folder.glob("*.distcp")) or folder.name.startswith(
        ("pytorch_model_fsdp", "optimizer")
    )


def checkpoint_to_resume(checkpoints: Path, fingerprint: str, barrier=lambda: None) -> str | None:
    """The last complete checkpoint of this same run, if any. Checkpoints of another run
    are removed, and so are checkpoints cut short by a kill. With several processes the
    main one tidies up while the others wait at `barrier`."""
    from transformers.trainer_utils import get_last_checkpoint

    if is_main_process():
        stamp = checkpoints / "cfs_run.json"
        if checkpoints.exists():
            same_run = stamp.is_file() and read_json(stamp).get("fingerprint") == fingerprint
            if not same_run:
                log.info("discarding checkpoints of a different run in %s", checkpoints)
                shutil.rmtree(checkpoints)
        checkpoints.mkdir(parents=True, exist_ok=True)
        write_json(stamp, {"fingerprint": fingerprint})
        for path in checkpoints.glob("checkpoint-*"):
            if not is_complete_checkpoint(path):
                log.info("removing %s: cut short before it was complete", path)
                shutil.rmtree(path)
    barrier()
    return get_last_checkpoint(str(checkpoints))
