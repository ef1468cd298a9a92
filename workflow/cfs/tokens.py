"""Token-level conventions every stage shares (no torch: the vLLM environment imports it)."""

from __future__ import annotations

from cfs.errors import SettingsError

IGNORE_INDEX = -100  # label of a position that is not trained on (Hugging Face's convention)


def context_free_prompt_id(tokenizer, override: int | None = None) -> int:
    """The one token a context-free sample starts from: BOS, else end-of-document.

    OLMo has no BOS; its documents are separated by <|endoftext|>, which is its EOS, so a
    sample that follows it is a sample of a new document. Never an empty string."""
    if override is not None:
        return int(override)
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise SettingsError(
        "the tokenizer has neither a BOS nor an EOS token; set generation.prompt_token_id"
    )


def split_at_eos(row: list[int], eos_ids: set[int]) -> tuple[list[int], str]:
    """Keep tokens up to and including the first EOS; the finish reason says which ended it."""
    for position, token in enumerate(row):
        if token in eos_ids:
            return row[: position + 1], "eos"
    return row, "length"


def batch_seed(seed: int, batch_index: int) -> int:
    """Each batch (or cycle) has its own seed, so its draws do not depend on those before it."""
    return seed * 1_000_003 + batch_index
