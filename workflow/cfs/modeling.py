"""Loading models and tokenizers the same way in every stage, and the precision they
compute in."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dtype_name(name: str | None, device: torch.device | str) -> str:
    """The dtype `name` stands for on `device`: `auto` (or None) is bfloat16 on a GPU and
    float32 on the CPU (bf16 matmuls are slow there); any other name is itself."""
    if name in (None, "auto"):
        return "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return name


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of `dtype_name(name, device)`."""
    return DTYPES[dtype_name(name, device)]


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` multiplies bf16 matrices natively: a GPU that supports bf16, or a CPU
    with AVX-512 BF16 or AMX-BF16 instructions (without them, torch emulates bf16 and its
    matrix products run at a few GFLOP/s instead of several times fp32's rate)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def compute_precision(name: str, device: torch.device | str) -> str:
    """The precision `train.precision` or `evaluation.precision` stands for on `device`:
    `auto` is bfloat16 (autocast, with float32 weights) where the device has native bf16,
    float32 elsewhere; `float32` and `bfloat16` are themselves."""
    if name == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"precision must be auto, float32 or bfloat16, got {name!r}")
    return name


def autocast(precision: str, device: torch.device | str):
    """bf16 autocast on `device` for `precision` bfloat16 (a resolved precision), nothing
    for float32. Matrix products run in bf16 over float32 weights. What needs float32 stays
    in it: every log-softmax over the vocabulary takes logits cast to float32 first (the
    task loss in transformers' ForCausalLMLoss, the KL term in cfs.objectives._chunk_kl, KL
    to base and held-out NLL in cfs.heldout.predicted_logprobs, the curves' target loss in
    cfs.curves.target_nll), and the sums over tokens and examples are float32."""
    if precision == "bfloat16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_model(
    path: str | Path,
    dtype: str = "auto",
    device: torch.device | None = None,
    weights: bool = True,
):
    """The causal LM at `path` on `device`. `weights=False` builds it without reading the
    weights, for the processes of an FSDP run other than rank 0, which receive their shards
    from rank 0 (the weights are read once): parameters are uninitialised tensors (memory
    the process never touches is never resident; accelerate moves them to the meta device
    before sharding, and matches the optimizer's parameters by their distinct storage),
    buffers are computed as usual."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device = device or pick_device()
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no model at '{path}' (config.json missing)")
    if not weights:
        from accelerate import init_empty_weights

        config = AutoConfig.from_pretrained(path)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=pick_dtype(dtype, device))
        buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
        model = model.to_empty(device=device)
        for name, buffer in buffers.items():
            owner, _, attribute = name.rpartition(".")
            getattr(model.get_submodule(owner), attribute).copy_(buffer)
        # to_empty gives each module a tensor of its own: tied embeddings come apart, and
        # accelerate's FSDP2 then finds lm_head.weight here that rank 0's model lacks
        model.tie_weights()
        return model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype, device))
    return model.to(device)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
