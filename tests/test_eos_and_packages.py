"""Where samples end (the tokenizer's end-of-document id only), and the packages
the paper settings need."""

from __future__ import annotations

import pytest
import yaml
from cfs import generate
from conftest import REPO
from transformers import GenerationConfig


def test_samples_end_at_the_tokenizers_eos_only(tokenizer_no_bos, tokenizer):
    """OLMo-1B-hf's generation_config says eos_token_id 0 while its tokenizer's EOS is
    <|endoftext|> (50279): stop at the tokenizer's only. Here the OLMo-like tokenizer's EOS
    is 0 and its generation_config names 1 and 2."""
    olmo_like = GenerationConfig(eos_token_id=[1, 2])
    assert generate.eos_token_ids(olmo_like, tokenizer_no_bos) == {0}
    # a SmolLM2- / R1-like model whose generation_config agrees with its tokenizer
    assert generate.eos_token_ids(GenerationConfig(eos_token_id=2), tokenizer) == {2}
    assert generate.eos_token_ids(None, tokenizer) == {2}


def test_the_vllm_extra_brings_math_verify_and_the_env_brings_peft():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(spec.startswith("lm-eval[math]") for spec in extras["vllm"])
    pip = yaml.safe_load((REPO / "envs" / "cfs.yaml").read_text())["dependencies"][-1]["pip"]
    assert any(spec.startswith("peft") for spec in pip)
