"""The fine-tuned model as a plain transformers folder, whatever the method and however
many processes trained it.

Every process takes part in gathering the full state dict (under FSDP each holds a shard:
the gather is a collective, so no process may return before it); the main process then
merges LoRA adapters into the gathered full weights (W + scaling x B @ A, as peft's
`merge_and_unload` does), casts to the save precision and writes. Nothing is merged on
weights still sharded across the other processes, and nothing on the GPU: the state dict
is gathered into host memory first (under FSDP, accelerate's full state dict is offloaded
to the CPU already), so the merge needs no GPU memory beside the model's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from cfs.artifacts import atomic_path, provenance, write_json
from cfs.curves import CURVES_FILE, curve_rows
from cfs.modeling import DTYPES

PEFT_PREFIX = "base_model.model."
SAVE_DTYPES = {name: DTYPES[name] for name in ("float32", "bfloat16")}  # train.save_precision


def full_state_dict(trainer) -> dict[str, torch.Tensor]:
    """The whole model's state dict, in host memory, on the main process (an empty dict or
    a copy on the others). A collective under FSDP: call it on every process."""
    if trainer.is_fsdp_enabled:
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    else:
        model = trainer.accelerator.unwrap_model(trainer.model)
        state_dict = {key: value.detach() for key, value in model.state_dict().items()}
    return on_cpu(state_dict)


def on_cpu(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with every tensor in host memory (tensors already there as they
    are); tensors that share storage (tied embeddings) share one copy."""
    copies: dict = {}
    out = {}
    for key, value in state_dict.items():
        if value.device.type == "cpu":
            out[key] = value
            continue
        shared = (value.untyped_storage().data_ptr(), value.storage_offset(), value.shape)
        if shared not in copies:
            copies[shared] = value.to("cpu")
        out[key] = copies[shared]
    return out


def lora_layers(model, adapter: str = "default") -> dict[str, tuple[float, bool]]:
    """{module name: (scaling, fan_in_fan_out)} of every LoRA layer of a peft model."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.scaling:
            if getattr(module, "use_dora", {}).get(adapter, False):
                raise NotImplementedError("merging DoRA adapters into a state dict")
            layers[state_dict_name(name)] = (
                float(module.scaling[adapter]),
                bool(module.fan_in_fan_out),
            )
    return layers


def state_dict_name(module_name: str) -> str:
    """A module's name as state dict keys spell it: without the wrappers that activation
    checkpointing (FSDP's) and torch.compile insert, which state dicts leave out."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):
        module_name = module_name.replace(wrapper, "")
    return module_name


def merge_lora(
    state_dict: dict[str, torch.Tensor], layers: dict[str, tuple[float, bool]], adapter="default"
) -> dict[str, torch.Tensor]:
    """A peft model's full state dict as the plain model's: for every LoRA layer
    W <- W + scaling x (B @ A) (computed in float32), `base_layer.` and the peft prefix
    dropped, adapter weights removed. A key the merge does not understand is an error."""
    merged = {}
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue
        merged[key] = value
    for name, (scaling, fan_in_fan_out) in layers.items():
        weight_key = f"{name}.base_layer.weight"
        down = state_dict[f"{name}.lora_A.{adapter}.weight"].float()
        up = state_dict[f"{name}.lora_B.{adapter}.weight"].float()
        delta = (up @ down) * scaling
        if fan_in_fan_out:
            delta = delta.T
        weight = merged[weight_key]
        merged[weight_key] = (weight.float() + delta).to(weight.dtype)
    plain = {}
    for key, value in merged.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        name = name.replace(".base_layer.", ".")
        if "lora_" in name or name in plain:
            raise ValueError(f"cannot turn peft state dict key {key!r} into a plain model's")
        plain[name] = value
    return plain


def cast_floating(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """Floating-point tensors in `dtype`; tensors that share storage (tied embeddings)
    still share it afterwards, so save_pretrained still drops the tied copy."""
    cast: dict = {}
    out = {}
    for key, value in state_dict.items():
        if not value.is_floating_point() or value.dtype == dtype:
            out[key] = value
            continue
        shared = (value.untyped_storage().data_ptr(), value.storage_offset(), value.shape)
        if shared not in cast:
            cast[shared] = value.to(dtype)
        out[key] = cast[shared]
    return out


def save_dtype(name: str, trained_in_bf16: bool, device: torch.device) -> torch.dtype:
    """`train.save_precision`: `auto` is bfloat16 for a model trained in bf16 on a GPU (half
    the disk at 8B) and float32 otherwise, the float32 master weights as they are; `float32`
    or `bfloat16` force one. On a CPU disk is not the limit, and rounding the weights to bf16
    rounds away every change smaller than half a bf16 step of the weight: it moved the
    default's plain fine-tune 1.8% back toward base (KL to base 0.494 -> 0.485)."""
    if name == "auto":
        name = "bfloat16" if trained_in_bf16 and device.type == "cuda" else "float32"
    return SAVE_DTYPES[name]


def record_dtype(folder: Path, dtype: torch.dtype) -> None:
    """save_pretrained writes the dtype of the model object (float32 master weights), not
    that of the tensors written: correct config.json."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_fine_tuned(trainer, tokenizer, settings, data, summary, out: Path) -> None:
    """A plain model folder whatever the method, in the save precision
    (`train.save_precision`). Every process takes part in gathering the full weights (a
    collective under FSDP); the main one then merges LoRA adapters into the gathered full
    weights and writes (cfs.saving)."""
    state_dict = full_state_dict(trainer)
    if not trainer.is_world_process_zero():
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "get_base_model"):  # peft: merge the adapters into the weights
        state_dict = merge_lora(state_dict, lora_layers(model))
        model = model.get_base_model()
    dtype = save_dtype(settings["save_precision"], trainer.args.bf16, trainer.args.device)
    state_dict = cast_floating(state_dict, dtype)
    model.config.use_cache = True
    with atomic_path(out, directory=True) as tmp:
        model.save_pretrained(str(tmp), state_dict=state_dict)
        record_dtype(tmp, dtype)
        tokenizer.save_pretrained(str(tmp))
        write_json(
            tmp / "train_log.json", {"summary": summary, "log_history": trainer.state.log_history}
        )
        curves = curve_rows(trainer.state.log_history)
        if curves:
            pd.DataFrame(curves).to_csv(tmp / CURVES_FILE, index=False)
        write_json(
            tmp / "cfs_provenance.json",
            provenance("fine_tune", settings, seed=settings["seed"], data=str(data), **summary),
        )
