"""cfs.modeling: the dtype `auto` stands for on each device."""

from __future__ import annotations

import torch
from cfs.modeling import dtype_name, pick_dtype


def test_dtype_auto_is_bfloat16_on_gpu_float32_on_cpu():
    assert dtype_name("auto", "cuda") == "bfloat16"
    assert dtype_name(None, "cuda") == "bfloat16"
    assert dtype_name("auto", torch.device("cpu")) == "float32"
    assert dtype_name("float16", "cpu") == "float16"
    assert pick_dtype("auto", torch.device("cpu")) is torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
