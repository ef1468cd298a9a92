"""cfs.wiseft: WiSE-FT's interpolation of the base and a fine-tuned model's weights, exactly
either model at the ends and the mean halfway, through the stage's command line."""

from __future__ import annotations

import json

import pytest
import torch
from cfs import wiseft
from cfs.errors import SettingsError
from conftest import assert_same_weights, model_weights


def interpolate(base, finetuned, alpha, out):
    wiseft.main(
        ["--base", str(base), "--finetuned", str(finetuned)]
        + ["--settings", json.dumps({"alpha": alpha}), "--out", str(out)]
    )
    return out


def test_wiseft_ends_are_exactly_base_and_fine_tuned(tiny_model_dir, perturbed_model_dir, tmp_path):
    """The perturbed model stands in for a fine-tuned one (same shapes, other weights)."""
    for alpha, expected in ((0.0, tiny_model_dir), (1.0, perturbed_model_dir)):
        out = interpolate(tiny_model_dir, perturbed_model_dir, alpha, tmp_path / f"a{alpha:g}")
        assert_same_weights(expected, out)
    out = interpolate(tiny_model_dir, perturbed_model_dir, 0.5, tmp_path / "alpha0.5")
    base, tuned, mid = (model_weights(p) for p in (tiny_model_dir, perturbed_model_dir, out))
    assert sorted(mid) == sorted(base), "the interpolated model has other tensors than base's"
    for name in base:
        torch.testing.assert_close(mid[name], (base[name] + tuned[name]) / 2)
    prov = json.loads((out / "cfs_provenance.json").read_text())
    assert prov["settings"] == {"alpha": 0.5}


def test_wiseft_rejects_alpha_outside_unit_interval():
    with pytest.raises(SettingsError, match="alpha"):
        wiseft.interpolate({}, {}, 1.5)
