"""The fine-tuned model at fractions of its optimizer steps (train.evaluate_at), each a
plain model folder like the final one, evaluated like a cell: each method's frontier
along training intensity (cfs.frontier).

A snapshot is written into the checkpoint folder when its step ends (a resumed run finds
the ones already written there) and moved to its declared folder when training ends.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from transformers import TrainerCallback

from cfs.errors import DataError, SettingsError
from cfs.saving import save_fine_tuned


def parse_snapshots(folders: list[str] | None) -> dict[float, Path]:
    """{fraction: folder} of the snapshot folders, each named by the study's grammar
    (`<cell>/at<fraction>/seed<S>/snapshot`)."""
    snapshots = {}
    for folder in folders or []:
        found = re.search(r"(?:^|/)at(\d+(?:\.\d+)?)/", folder)
        fraction = float(found.group(1)) if found else -1.0
        if not 0 < fraction < 1:
            raise SettingsError(
                f"--snapshots {folder!r}: expected a folder below at<FRACTION>/, 0 < FRACTION < 1"
            )
        snapshots[fraction] = Path(folder)
    return snapshots


def snapshot_step(fraction: float, max_steps: int) -> int:
    """The optimizer step whose model stands for `fraction` of training (at least 1)."""
    return max(1, round(fraction * max_steps))


class Snapshots(TrainerCallback):
    """Saves the model (every process takes part: a collective under FSDP) at the step of
    each fraction, into `checkpoints/snapshot-at<fraction>`."""

    def __init__(self, trainer, tokenizer, settings, data, targets: dict[float, Path], folder):
        self.trainer, self.tokenizer, self.settings, self.data = trainer, tokenizer, settings, data
        self.targets = targets
        self.folder = Path(folder)

    def staged(self, fraction: float) -> Path:
        return self.folder / f"snapshot-at{fraction:g}"

    def on_step_end(self, args, state, control, **kwargs):
        for fraction in self.targets:
            step = snapshot_step(fraction, state.max_steps)
            if state.global_step == step:
                summary = {"fraction": fraction, "step": step, "max_steps": state.max_steps}
                model = self.trainer.accelerator.unwrap_model(self.trainer.model)
                save_fine_tuned(
                    self.trainer,
                    self.tokenizer,
                    self.settings,
                    self.data,
                    summary,
                    self.staged(fraction),
                )
                model.config.use_cache = False  # saving turns it on; training keeps it off

    def finish(self) -> None:
        """Move every snapshot to its declared folder (main process)."""
        for fraction, target in self.targets.items():
            staged = self.staged(fraction)
            if not staged.is_dir():
                raise DataError(
                    f"{staged}: the model at {fraction:g} of training was not saved (a run "
                    "resumed from a checkpoint written before it, without it)"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(str(staged), str(target))
