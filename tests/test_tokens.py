"""The shared basics of the lowest modules are the ones every stage uses."""

from __future__ import annotations

import hashlib
import inspect
import random

import pytest
import torch
from cfs import evaluate, examples, generate, heldout, objectives, tokens, vllm_backend
from cfs.artifacts import add_folder_fingerprint
from cfs.modeling import dtype_name, pick_dtype


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
    assert [pool._pool_index(10 + k) for k in range(10)] == order


def test_split_at_eos_is_the_one_vllm_cuts_with():
    assert "split_at_eos(" in inspect.getsource(vllm_backend.finished_sample)
    assert generate.split_at_eos is tokens.split_at_eos


def test_ignore_index_is_defined_once():
    assert examples.IGNORE_INDEX is tokens.IGNORE_INDEX is objectives.IGNORE_INDEX == -100


def test_dtype_auto_is_bfloat16_on_gpu_float32_on_cpu():
    assert dtype_name("auto", "cuda") == dtype_name(None, "cuda") == "bfloat16"
    assert dtype_name("auto", torch.device("cpu")) == "float32"
    assert dtype_name("float16", "cpu") == "float16"
    assert pick_dtype("auto", torch.device("cpu")) is torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16


def test_folder_fingerprint_changes_with_a_file(tmp_path):
    def fingerprint():
        digest = hashlib.sha256()
        add_folder_fingerprint(digest, tmp_path)
        return digest.hexdigest()

    (tmp_path / "a").write_text("x")
    before = fingerprint()
    assert fingerprint() == before
    (tmp_path / "a").write_text("xy")
    assert fingerprint() != before


class Logits(torch.nn.Module):
    """A stand-in causal LM: fixed logits per token id."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    @property
    def device(self):
        return self.anchor.device

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_evaluation_kl_is_the_regulariser_token_kl():
    torch.manual_seed(0)
    base, model = Logits(torch.randn(6, 6)), Logits(torch.randn(6, 6))
    samples = [
        {"prompt_token_id": 1, "token_ids": [2, 3, 4]},
        {"prompt_token_id": 1, "token_ids": [5]},
    ]
    result = evaluate.kl_to_base(base, model, samples, batch_size=2)
    ((input_ids, mask),) = heldout.padded_batches(samples, batch_size=2)
    labels = input_ids.masked_fill(mask == 0, tokens.IGNORE_INDEX)
    expected = objectives.token_kl(base.table[input_ids], model.table[input_ids], labels)
    assert result["heldout_tokens"] == 4
    assert result["kl_to_base"] == pytest.approx(expected.item(), rel=1e-6)
    # by hand: the predicting positions hold ids 1, 2, 3 (first sample) and 1 (second)
    kl = [
        torch.nn.functional.kl_div(
            model.table[i].log_softmax(-1),
            base.table[i].log_softmax(-1),
            log_target=True,
            reduction="sum",
        ).item()
        for i in (1, 2, 3, 1)
    ]
    assert result["kl_to_base"] == pytest.approx(sum(kl) / 4, rel=1e-5)
