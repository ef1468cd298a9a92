"""cfs.tokens: the token-level conventions every stage shares (the seed stride of sampling
batches, where a sample ends, the ignored label, the context-free prompt token), and that
the stages use these and no copies of their own."""

from __future__ import annotations

import inspect
import random

import pytest
from cfs import examples, generate, objectives, tokens, vllm_backend
from cfs.errors import SettingsError
from cfs.modeling import load_tokenizer
from cfs.tokens import context_free_prompt_id, split_at_eos
from conftest import LLAMA_BOS_ID, OLMO_END_OF_DOC_ID

# --------------------------------------------------------------------------- shared values


def test_seed_stride_is_the_one_generation_and_the_synthetic_pool_use(monkeypatch):
    assert tokens.batch_seed(3, 5) == 3 * 1_000_003 + 5
    seen = []
    monkeypatch.setattr(generate, "batch_seed", lambda s, i: seen.append((s, i)) or 0)
    generate.sample_batches(
        lambda batch, seed: [([1], "eos")] * len(batch), [[0]] * 3, batch_size=2, seed=7
    )
    assert seen == [(7, 0), (7, 1)]
    pool = objectives.SyntheticBatches(list(range(10)), 2, 1, seed=4, collator=None)
    order = list(range(10))
    random.Random(tokens.batch_seed(4, 1)).shuffle(order)
    drawn = [pool._pool_index(10 + k) for k in range(10)]
    assert drawn == order, "the pool's second pass is shuffled with batch_seed(seed, 1)"


def test_split_at_eos_is_the_one_vllm_cuts_with():
    source = inspect.getsource(vllm_backend.finished_sample)
    assert "split_at_eos(" in source, f"vllm_backend.finished_sample does not call it:\n{source}"
    assert generate.split_at_eos is tokens.split_at_eos, "cfs.generate has a split of its own"


def test_ignore_index_is_defined_once():
    assert (examples.IGNORE_INDEX, objectives.IGNORE_INDEX) == (-100, -100)
    assert examples.IGNORE_INDEX is tokens.IGNORE_INDEX, "cfs.examples defines its own"
    assert objectives.IGNORE_INDEX is tokens.IGNORE_INDEX, "cfs.objectives defines its own"


def test_split_at_eos_keeps_up_to_first_eos():
    assert split_at_eos([5, 6, 2, 7, 2], {2}) == ([5, 6, 2], "eos")
    assert split_at_eos([5, 6, 7], {2}) == ([5, 6, 7], "length")
    assert split_at_eos([9, 3, 8], {2, 3}) == ([9, 3], "eos")


# --------------------------------------------------------------------------- the prompt token


def test_prompt_id_is_bos_when_the_tokenizer_has_one(tokenizer):
    assert tokenizer.bos_token_id == 1
    assert context_free_prompt_id(tokenizer) == 1


def test_prompt_id_is_end_of_document_without_bos(tokenizer_no_bos):
    prompt_id = context_free_prompt_id(tokenizer_no_bos)
    assert prompt_id == tokenizer_no_bos.eos_token_id == 0
    assert tokenizer_no_bos.convert_ids_to_tokens(prompt_id) == "<|endoftext|>"


def test_prompt_id_override_wins(tokenizer, tokenizer_no_bos):
    assert context_free_prompt_id(tokenizer, override=7) == 7
    assert context_free_prompt_id(tokenizer_no_bos, override=0) == 0
    assert context_free_prompt_id(tokenizer, override=None) == 1


def test_prompt_id_without_bos_or_eos_is_a_settings_error():
    class Bare:
        bos_token_id = None
        eos_token_id = None

    with pytest.raises(SettingsError, match="prompt_token_id"):
        context_free_prompt_id(Bare())


def test_context_free_prompt_of_an_olmo_like_tokenizer_is_end_of_document(
    olmo_like_tokenizer, tmp_path
):
    assert olmo_like_tokenizer.bos_token_id is None, "the OLMo-like tokenizer has a BOS"
    assert OLMO_END_OF_DOC_ID == 50279
    assert context_free_prompt_id(olmo_like_tokenizer) == 50279
    olmo_like_tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)  # as the stages load it
    assert context_free_prompt_id(reloaded) == 50279
    assert reloaded.convert_ids_to_tokens(50279) == "<|endoftext|>"
    assert context_free_prompt_id(reloaded, override=7) == 7


def test_context_free_prompt_of_a_llama_like_tokenizer_is_bos(llama_like_tokenizer, tmp_path):
    assert LLAMA_BOS_ID == 128000
    assert context_free_prompt_id(llama_like_tokenizer) == 128000
    llama_like_tokenizer.save_pretrained(tmp_path)
    assert context_free_prompt_id(load_tokenizer(tmp_path)) == 128000
