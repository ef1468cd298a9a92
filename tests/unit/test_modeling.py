"""cfs.modeling: the dtype and the precision `auto` stand for on each device, and a model
built without its weights."""

from __future__ import annotations

import pytest
import torch
from cfs.modeling import autocast, compute_precision, dtype_name, load_model, pick_dtype
from olmo_files import olmo_model


def test_dtype_auto_is_bfloat16_on_gpu_float32_on_cpu():
    assert dtype_name("auto", "cuda") == "bfloat16"
    assert dtype_name(None, "cuda") == "bfloat16"
    assert dtype_name("auto", torch.device("cpu")) == "float32"
    assert dtype_name("float16", "cpu") == "float16"
    assert pick_dtype("auto", torch.device("cpu")) is torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        ({"avx512_bf16": True, "amx_bf16": False}, "bfloat16"),
        ({"avx512_bf16": False, "amx_bf16": True}, "bfloat16"),
        ({"avx512_bf16": False, "amx_bf16": False, "avx2": True}, "float32"),
    ],
)
def test_auto_precision_is_bf16_where_the_cpu_has_native_bf16(monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert compute_precision("auto", "cpu") == expected
    assert compute_precision("float32", "cpu") == "float32"  # an explicit precision stays
    assert compute_precision("bfloat16", "cpu") == "bfloat16"


def test_autocast_computes_matrix_products_in_bf16_only_for_bfloat16():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("bfloat16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("float32", "cpu"):
        assert (a @ b).dtype == torch.float32


def test_a_model_built_without_its_weights_keeps_its_tied_embeddings(tokenizer, tmp_path):
    """An FSDP run's processes other than rank 0 build the model without reading its
    weights. OLMo's (and SmolLM2's) lm_head is the input embedding: it must stay one
    parameter there as in rank 0's model, or accelerate's FSDP2 cannot match them."""
    olmo_model(tokenizer, tmp_path)
    cpu = torch.device("cpu")
    built = load_model(tmp_path, "float32", cpu, weights=False)
    assert built.lm_head.weight is built.model.embed_tokens.weight
    read = load_model(tmp_path, "float32", cpu)
    assert [name for name, _ in built.named_parameters()] == [
        name for name, _ in read.named_parameters()
    ]
