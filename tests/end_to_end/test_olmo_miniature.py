"""config/olmo.yaml in miniature (tests/miniatures/olmo.yaml): `snakemake all` through the
real rules with 2 seeds, on a random 2-layer OLMo with OLMo-1B's special ids (no BOS,
<|endoftext|> 50279), MetaMathQA-format rows, gsm8k's own task YAML over local problems
and multiple-choice tasks scored by acc and acc_norm."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from cfs.stage_settings import load_config
from conftest import REPO, failure_report, forgetting_task_texts
from miniatures import MINIATURES, miniature_repo, run_miniature, with_special_ids
from olmo_files import OLMO_END_OF_DOC, OLMO_END_OF_DOC_ID, olmo_data, olmo_model

pytestmark = [pytest.mark.slow, pytest.mark.miniature]


def olmo_tokenizer(bpe_tokenizer_object):
    """The tests' byte-level BPE with OLMo-1B's conventions: no BOS, and documents ended by
    <|endoftext|> at OLMo's id 50279 (EOS and pad)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=with_special_ids(
            bpe_tokenizer_object, {OLMO_END_OF_DOC: OLMO_END_OF_DOC_ID}
        ),
        eos_token=OLMO_END_OF_DOC,
        pad_token=OLMO_END_OF_DOC,
        model_max_length=2048,
    )
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (None, OLMO_END_OF_DOC_ID)
    return tokenizer


@pytest.fixture(scope="module")
def olmo(bpe_tokenizer_object, tmp_path_factory):
    repo = miniature_repo(tmp_path_factory, "olmo")
    folder = repo / "miniature" / "olmo"
    olmo_model(olmo_tokenizer(bpe_tokenizer_object), folder / "model")
    olmo_data(folder, dolma_texts=forgetting_task_texts()[:64])
    result = run_miniature(repo, "olmo")
    config = load_config(REPO / "config" / "olmo.yaml", MINIATURES / "olmo.yaml")
    return {"repo": repo, "result": result, "config": config}


def test_olmo_miniature_runs_to_completion(olmo):
    assert olmo["result"].returncode == 0, failure_report(olmo["repo"], olmo["result"])


def test_olmo_miniature_has_every_method_over_both_seeds(olmo):
    table = pd.read_csv(olmo["repo"] / "results" / "studies" / "olmo" / "summary.csv")
    methods = set(table["method"])
    assert methods == {"base", "plain", *olmo["config"]["study"]["methods"]}, methods
    trained = table[table["method"] != "base"]
    assert (trained["num_seeds"] == 2).all(), trained[["label", "num_seeds"]]
    for column in ("target", "forgetting_avg", "kl_to_base"):
        assert all(math.isfinite(v) for v in trained[column]), trained[["label", column]]
    lambdas = sorted(table.loc[table["method"] == "l2", "lambda"])
    assert lambdas == sorted(olmo["config"]["methods"]["l2"]["lambdas"])


def test_olmo_miniature_samples_after_end_of_document(olmo):
    """No BOS: the context-free prompt is <|endoftext|> (50279)."""
    samples = olmo["repo"] / "results" / "olmo" / "temp1" / "seed0" / "context_free.jsonl"
    first = json.loads(samples.read_text().splitlines()[0])
    assert first["prompt_token_id"] == OLMO_END_OF_DOC_ID


def test_olmo_miniature_generates_through_vllm(olmo):
    """`generation.backend: auto` in vLLM's environment picks vLLM, its CPU build here."""
    provenances = {
        str(path.relative_to(olmo["repo"])): json.loads(path.read_text())
        for path in (olmo["repo"] / "results" / "olmo").glob("**/*.provenance.json")
    }
    backends = {
        path: provenance["backend"]
        for path, provenance in provenances.items()
        if provenance["stage"].startswith("generate_")
    }
    assert backends and set(backends.values()) == {"vllm"}, backends
