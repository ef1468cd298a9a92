"""WiSE-FT: interpolate the base and a fine-tuned model's weights, no training.

    theta = (1 - alpha) * theta_base + alpha * theta_finetuned

    python -m cfs.wiseft --base results/models/smollm2/base \
        --finetuned results/smollm2/ratio0/model --settings '{"alpha": 0.5}' \
        --out results/smollm2/wiseft/alpha0.5/model
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cfs.artifacts import atomic_path, provenance, write_json
from cfs.cli import require, run_as_process, set_threads, stage_parser
from cfs.errors import DataError, SettingsError
from cfs.modeling import load_model, load_tokenizer

log = logging.getLogger("cfs.wiseft")


def interpolate(base: dict, finetuned: dict, alpha: float) -> dict:
    """Weights at alpha between base (0) and fine-tuned (1): exactly either at the ends."""
    if not 0 <= alpha <= 1:
        raise SettingsError(f"WiSE-FT alpha must be in [0, 1], got {alpha}")
    if base.keys() != finetuned.keys():
        missing = sorted(base.keys() ^ finetuned.keys())[:5]
        raise DataError(f"base and fine-tuned models differ in their weights: {missing}")
    mixed = {}
    for name, theta0 in base.items():
        theta1 = finetuned[name]
        if theta0.shape != theta1.shape:
            raise DataError(f"weight {name}: shape {tuple(theta0.shape)} vs {tuple(theta1.shape)}")
        if theta0.is_floating_point():
            mixed[name] = (1 - alpha) * theta0 + alpha * theta1
        else:
            mixed[name] = theta1.clone()
    return mixed


@torch.no_grad()
def interpolate_models(base_dir: Path, finetuned_dir: Path, alpha: float, out: Path) -> None:
    model = load_model(base_dir, "float32")
    finetuned = load_model(finetuned_dir, "float32")
    model.load_state_dict(interpolate(model.state_dict(), finetuned.state_dict(), alpha))
    with atomic_path(out, directory=True) as tmp:
        model.save_pretrained(str(tmp))
        load_tokenizer(finetuned_dir).save_pretrained(str(tmp))
        write_json(
            tmp / "cfs_provenance.json",
            provenance(
                "wiseft",
                {"alpha": alpha},
                base=str(base_dir),
                finetuned=str(finetuned_dir),
            ),
        )


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, type=Path, help="base model folder")
    parser.add_argument("--finetuned", required=True, type=Path, help="fine-tuned model folder")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    alpha = require(args.settings, "alpha")
    interpolate_models(args.base, args.finetuned, alpha, args.out)
    log.info("wrote %s (alpha %s)", args.out, alpha)


if __name__ == "__main__":
    run_as_process(main)
