"""Extra TrainingArguments for multi-process fine-tuning (DDP, FSDP), from train settings."""

from __future__ import annotations


def distributed_arguments(settings: dict) -> dict:
    """FSDP settings pass through to TrainingArguments; nothing extra for one process."""
    if not settings.get("fsdp"):
        return {}
    return {"fsdp": settings["fsdp"], "fsdp_config": settings.get("fsdp_config") or {}}
