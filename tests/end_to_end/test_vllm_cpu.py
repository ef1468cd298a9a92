"""Real vLLM (its CPU build, in an environment of its own) through `python -m cfs.generate`
with the stage's settings: context-free samples split at EOS, one engine seed, chunked
generation that resumes, contextual prompts passed as token ids and returned in prompt
order, and samples from the same distribution as HF generate's.

The vLLM environment is the one CFS_ENV_VLLM names, else .venv-vllm (`make vllm-env`
builds it). The module runs vLLM three times, 15-30 s each on two CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cfs import vllm_backend
from conftest import (
    REPO,
    build_tiny_model,
    generation_settings,
    read_jsonl,
    stage_settings,
    task_records,
)

pytestmark = pytest.mark.slow

VLLM_ENV = Path(os.environ.get("CFS_ENV_VLLM", REPO / ".venv-vllm"))
MAX_NEW_TOKENS = 16
SEED = 3


def context_free_settings(backend: str) -> dict:
    """400 context-free samples of at most 16 tokens at temperature 1, four vLLM calls."""
    return generation_settings(
        backend=backend,
        num_samples=400,
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=50,
        vllm_chunk_size=100,
        seed=SEED,
        temperature=1.0,
    )


def build_vllm_model(tokenizer, out_dir: Path, logit_scale: float) -> Path:
    """A random 2-layer Llama that vLLM's CPU attention runs (it has no kernel for the
    head size 16 of conftest's tiny model; 32 is its smallest). The output layer is scaled
    by `logit_scale` (at 10 the logits' std is ~1.5: the temperature shows in the samples),
    and EOS's row twice that, so that about half the context-free samples end at EOS."""

    def scale_logits(model):
        model.lm_head.weight.mul_(logit_scale)
        model.lm_head.weight[tokenizer.eos_token_id].mul_(2.0)

    return build_tiny_model(
        tokenizer, out_dir, edit=scale_logits, hidden_size=64, intermediate_size=128
    )


def generate(python, model_dir: Path, out: Path, settings: dict, prompts: Path | None = None):
    """`python -m cfs.generate` in the environment of `python`; its output (both streams)."""
    argv = [str(python), "-m", "cfs.generate", "--model", str(model_dir), "--out", str(out)]
    argv += ["--settings", json.dumps(settings)]
    if prompts is not None:
        argv += ["--prompts", str(prompts)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "workflow")}
    result = subprocess.run(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
    )
    assert result.returncode == 0, f"{' '.join(argv[:3])} failed:\n{result.stdout[-6000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    python = VLLM_ENV / "bin" / "python"
    if not python.is_file():
        pytest.fail(
            f"no vLLM environment at {VLLM_ENV} (CFS_ENV_VLLM, else .venv-vllm): "
            "`make vllm-env` builds it"
        )
    return python


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    return build_vllm_model(tokenizer, tmp_path_factory.mktemp("vllm_model") / "model", 10.0)


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory, tokenizer) -> Path:
    """The same model with 100 times the logits: the same greedy paths, its near ties
    100 times wider."""
    return build_vllm_model(tokenizer, tmp_path_factory.mktemp("peaked") / "model", 1000.0)


@pytest.fixture(scope="module")
def vllm_runs(vllm_python, model_dir, tmp_path_factory) -> list[list[dict]]:
    """The same context-free job run twice by vLLM, each a job of its own: asked for by
    name, then through `auto`, which picks vLLM's CPU build where it is installed."""
    runs = []
    for name, backend in (("first", "vllm"), ("again", "auto")):
        out = tmp_path_factory.mktemp(name) / "context_free.jsonl"
        generate(vllm_python, model_dir, out, context_free_settings(backend))
        assert json.loads(out.with_suffix(".provenance.json").read_text())["backend"] == "vllm"
        runs.append(read_jsonl(out))
    return runs


@pytest.fixture(scope="module")
def hf_samples(model_dir, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("hf") / "context_free.jsonl"
    generate(sys.executable, model_dir, out, context_free_settings("hf"))
    return read_jsonl(out)


def test_context_free_samples_end_at_eos_or_the_length_limit(vllm_runs):
    from cfs.tokens import split_at_eos

    samples, eos = vllm_runs[0], 2
    assert [sample["index"] for sample in samples] == list(range(400))
    assert {sample["prompt_token_id"] for sample in samples} == {1}  # the BOS
    for sample in samples:
        ids, reason = sample["token_ids"], sample["finish_reason"]
        assert split_at_eos(ids, {eos}) == (ids, reason), f"not cut at its first EOS: {sample}"
        if reason == "eos":
            assert eos not in ids[:-1] and ids[-1] == eos, sample
        else:
            assert (reason, len(ids), eos in ids) == ("length", MAX_NEW_TOKENS, False), sample
    reasons = [sample["finish_reason"] for sample in samples]
    assert 0 < reasons.count("eos") < len(samples), "expected samples of both endings"
    # short samples may coincide (nearly a quarter end at EOS within 4 tokens)
    distinct = {tuple(sample["token_ids"]) for sample in samples if len(sample["token_ids"]) > 4}
    assert len(distinct) == sum(len(sample["token_ids"]) > 4 for sample in samples)


def test_the_same_seed_gives_the_same_samples(vllm_runs):
    first, again = vllm_runs
    assert first == again, "a second run of the same job sampled other samples"


def per_token_nll(model_dir: Path, samples: list[dict]) -> list[float]:
    """Each sample's mean NLL per generated token (EOS included) under the model, after its
    prompt token."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    width = 1 + max(len(sample["token_ids"]) for sample in samples)
    rows = [[sample["prompt_token_id"], *sample["token_ids"]] for sample in samples]
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    with torch.no_grad():
        logprobs = model(input_ids=input_ids, attention_mask=mask).logits.log_softmax(-1)
    targets = logprobs[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]
    generated = mask[:, 1:].float()
    return (-(targets * generated).sum(1) / generated.sum(1)).tolist()


def test_vllm_and_hf_sample_the_same_distribution(vllm_runs, hf_samples, model_dir):
    """At temperature 1 the two backends' samples have the same mean NLL per token under
    the model and the same share ending at EOS, within 99% intervals (400 samples each:
    a temperature of 0.7 instead of 1 moves the NLL by ~0.8 and the EOS share by ~0.1)."""
    from scipy import stats

    vllm_samples = vllm_runs[0]
    assert len(vllm_samples) == len(hf_samples) == 400
    vllm_nll, hf_nll = per_token_nll(model_dir, vllm_samples), per_token_nll(model_dir, hf_samples)
    welch = stats.ttest_ind(vllm_nll, hf_nll, equal_var=False).confidence_interval(0.99)
    means = f"NLL per token: vLLM {stats.tmean(vllm_nll):.3f}, HF {stats.tmean(hf_nll):.3f}"
    assert welch.low <= 0 <= welch.high, (
        f"{means}, difference in [{welch.low:.3f}, {welch.high:.3f}]"
    )

    def eos_share(samples):
        return sum(sample["finish_reason"] == "eos" for sample in samples) / len(samples)

    vllm_eos, hf_eos = eos_share(vllm_samples), eos_share(hf_samples)
    assert 0.1 < hf_eos < 0.9, f"the model ends {hf_eos:.0%} of HF's samples at EOS"
    half_width = stats.norm.ppf(0.995) * math.sqrt(
        vllm_eos * (1 - vllm_eos) / len(vllm_samples) + hf_eos * (1 - hf_eos) / len(hf_samples)
    )
    assert abs(vllm_eos - hf_eos) <= half_width, (
        f"EOS share: vLLM {vllm_eos:.3f}, HF {hf_eos:.3f}, 99% half-width {half_width:.3f}"
    )


# --------------------------------------------------------------------------- contextual


# vLLM's lowest temperature (it raises lower ones to 0.01): sampling, yet greedy on a
# model whose top two logits are always more than 0.3 apart
TEMPERATURE = 0.01


def greedy_continuations(model_dir: Path, prompt_ids: list[list[int]]) -> list[list[int]]:
    """HF's greedy continuations of the prompts (split at EOS), after checking that no
    step of them is a near tie that a tiny temperature or float rounding could flip."""
    import torch
    from cfs.tokens import split_at_eos
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    continuations = []
    for ids in prompt_ids:
        output = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            eos_token_id=2,
            pad_token_id=2,
            output_scores=True,
            return_dict_in_generate=True,
        )
        for scores in output.scores:
            first, second = scores[0].topk(2).values.tolist()
            assert first - second > 0.3, f"a near tie in the greedy path of {ids}"
        continuations.append(split_at_eos(output.sequences[0, len(ids) :].tolist(), {2})[0])
    return continuations


@pytest.fixture(scope="module")
def resumed_contextual(vllm_python, peaked_model_dir, tmp_path_factory):
    """A contextual job of 12 prompts in chunks of 4, restarted after its first chunk: the
    partial file holds that chunk (marker samples, so that a resampled chunk shows)."""
    from cfs.generate import contextual_prompts, encode_prompt, run_fingerprint
    from cfs.modeling import load_tokenizer

    folder = tmp_path_factory.mktemp("contextual")
    task = sorted(task_records(12, seed=0), key=lambda record: len(record["prompt"]))
    prompts = folder / "train.jsonl"
    prompts.write_text("".join(json.dumps(record) + "\n" for record in task))
    settings = {
        **stage_settings().contextual("smollm2", SEED, TEMPERATURE),
        "backend": "vllm",
        "num_samples": 12,
        "max_new_tokens": MAX_NEW_TOKENS,
        "vllm_chunk_size": 4,
    }
    tokenizer = load_tokenizer(peaked_model_dir)
    prompt_ids = [encode_prompt(tokenizer, p) for p in contextual_prompts(task, 12)]
    out = folder / "samples.jsonl"
    fingerprint = run_fingerprint(peaked_model_dir, TEMPERATURE, settings, prompt_ids)
    marker = [[[7] * MAX_NEW_TOKENS, "length"]] * 4
    out.with_name(out.name + ".partial.jsonl").write_text(
        json.dumps({"fingerprint": fingerprint}) + "\n"
        + json.dumps({"batch": 0, "outputs": marker}) + "\n"
    )  # fmt: skip
    log = generate(vllm_python, peaked_model_dir, out, settings, prompts=prompts)
    return task, prompt_ids, read_jsonl(out), log


def test_contextual_prompts_are_token_ids_in_prompt_order_and_the_job_resumes(
    resumed_contextual, peaked_model_dir
):
    """The resumed job samples only the chunks not finished, with one engine for all of
    them (its context length from the whole job's longest prompt), and each sample is the
    continuation of its own prompt's token ids."""
    task, prompt_ids, samples, log = resumed_contextual
    assert "resuming: 1 finished batches" in log
    assert log.count("starting vLLM for") == 1, "the chunks were sampled by more than one engine"
    assert [sample["prompt"] for sample in samples] == [record["prompt"] for record in task]
    assert [sample["prompt_token_ids"] for sample in samples] == prompt_ids
    assert [sample["token_ids"] for sample in samples[:4]] == [[7] * MAX_NEW_TOKENS] * 4
    expected = greedy_continuations(peaked_model_dir, prompt_ids[4:])
    assert len({tuple(ids) for ids in expected}) == 8, "prompts with the same continuation"
    assert max(map(len, prompt_ids[4:8])) < max(map(len, prompt_ids[8:])), (
        "the last chunk must hold the longest prompt, so that an engine sized per chunk shows"
    )
    assert [sample["token_ids"] for sample in samples[4:]] == expected


def test_the_engine_keeps_a_small_kv_cache_not_most_of_the_memory(resumed_contextual):
    """vLLM on a CPU would reserve gpu_memory_utilization of the machine's memory for its
    KV cache and zero it at every start; cfs gives it CPU_KV_CACHE_GIB."""
    log = resumed_contextual[3]
    found = re.search(r"(Explicitly|Auto) set \(([\d.]+)/[\d.]+\) GiB for KV cache", log)
    assert found, "vLLM logged no KV cache size"
    assert (found[1], float(found[2])) == ("Explicitly", vllm_backend.CPU_KV_CACHE_GIB)
