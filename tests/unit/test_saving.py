"""cfs.saving: the fine-tuned model as a plain transformers folder: LoRA merged on the
(gathered) weights as peft merges it, a LoRA model saved as cfs.train saves it (peft's
merge, done on weights in host memory, float32 or bfloat16), state dicts moved to host
memory with shared storage kept shared, and bfloat16 saves that keep tied weights tied."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from cfs import saving
from cfs.saving import cast_floating, lora_layers, merge_lora, save_dtype
from conftest import lora_model, model_weights, write_jsonl


def test_lora_merge_on_the_state_dict_equals_peft_merge(tiny_model_dir):
    """merge_lora (used on the gathered full weights) gives exactly peft's
    merge_and_unload, keys of the plain model included."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    )
    torch.manual_seed(1)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters something to merge
            torch.nn.init.normal_(parameter, std=0.1)
    state_dict = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    merged = merge_lora(state_dict, lora_layers(peft_model))
    expected = peft_model.merge_and_unload().state_dict()
    assert sorted(merged) == sorted(expected), "the merged state dict has other keys than peft's"
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=0)


def test_saving_in_bf16_keeps_tied_weights_tied():
    embedding = torch.randn(5, 3)
    state = {"embed.weight": embedding, "lm_head.weight": embedding, "step": torch.tensor(3)}
    cast = cast_floating(state, save_dtype("auto", True, torch.device("cuda")))
    assert cast["embed.weight"].dtype == torch.bfloat16
    assert cast["embed.weight"] is cast["lm_head.weight"], "save_pretrained drops the tie"
    assert cast["step"].dtype == torch.int64


def test_auto_saves_bf16_only_for_a_model_trained_in_bf16_on_a_gpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert save_dtype("auto", True, gpu) == torch.bfloat16
    assert save_dtype("auto", False, gpu) == torch.float32
    # bf16 on a CPU: the float32 master weights, not the changes rounded away
    assert save_dtype("auto", True, cpu) == torch.float32
    assert save_dtype("bfloat16", False, cpu) == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_lora_model_is_peft_merge_and_merged_in_host_memory(
    tiny_model_dir, tokenizer, tmp_path, monkeypatch, dtype
):
    """save_fine_tuned as cfs.train calls it: the saved weights are peft's merge_and_unload
    (to 1e-6 in float32; bf16 rounding otherwise), and the merge gets host tensors only."""
    peft_model = lora_model(tiny_model_dir, dtype)
    devices = set()
    real_merge = saving.merge_lora

    def merge_lora(state_dict, layers, adapter="default"):
        devices.update(tensor.device.type for tensor in state_dict.values())
        return real_merge(state_dict, layers, adapter)

    monkeypatch.setattr(saving, "merge_lora", merge_lora)
    fake_trainer = SimpleNamespace(
        is_fsdp_enabled=False,
        model=peft_model,
        accelerator=SimpleNamespace(unwrap_model=lambda model: model),
        is_world_process_zero=lambda: True,
        args=SimpleNamespace(bf16=dtype == torch.bfloat16, device=torch.device("cpu")),
        state=SimpleNamespace(log_history=[]),
    )
    settings = {"save_precision": str(dtype).removeprefix("torch."), "seed": 0}
    data = write_jsonl(tmp_path / "train.jsonl", [{"kind": "task"}])
    saving.save_fine_tuned(fake_trainer, tokenizer, settings, data, {}, tmp_path / "model")
    assert devices == {"cpu"}
    saved = model_weights(tmp_path / "model")
    expected = peft_model.merge_and_unload().state_dict()
    assert sorted(saved) == sorted(expected)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    for name, tensor in expected.items():
        assert saved[name].dtype == dtype, name
        torch.testing.assert_close(saved[name].float(), tensor.float(), atol=tolerance, rtol=0)


def test_state_dict_in_host_memory_keeps_shared_storage():
    embedding = torch.randn(5, 3)
    state = {"embed.weight": embedding, "lm_head.weight": embedding, "norm": torch.ones(3)}
    moved = saving.on_cpu(state)
    assert moved["embed.weight"] is moved["lm_head.weight"]
    assert all(tensor.device.type == "cpu" for tensor in moved.values())
