"""Loading models and tokenizers the same way in every stage."""

from __future__ import annotations

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
        return model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype, device))
    return model.to(device)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
