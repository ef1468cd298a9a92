"""cfs.vllm_backend: backend selection, and the mapping of our sampling settings onto vLLM's
`LLM`, `SamplingParams` and `LLM.generate` with token-id prompts.

vLLM cannot run on CPU, so `vllm` is replaced here by a stand-in module that follows vLLM's
documented API (v0.33, the version envs/vllm.yaml pins): `SamplingParams` accepts only its
documented keyword arguments and checks them as vLLM does; `LLM(model, *, ...)`;
`LLM.generate(prompts, sampling_params, *, use_tqdm)` takes one `SamplingParams` per prompt
(or one for all) and returns `RequestOutput`s in prompt order whose `outputs[0]` has
`token_ids` (the stop token included when generation stopped on it), `finish_reason`
("stop" | "length") and `stop_reason` (None for EOS, the token id for stop_token_ids).
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import types

import pytest
from cfs import vllm_backend
from cfs.errors import SettingsError
from cfs.tokens import split_at_eos
from conftest import generation_settings

# SamplingParams' keyword arguments, as vLLM 0.33 documents them (vllm/sampling_params.py).
DOCUMENTED_SAMPLING_PARAMS = {
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature",
    "watermarking", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "bad_words",
    "thinking_token_budget", "include_stop_str_in_output", "ignore_eos", "max_tokens",
    "min_tokens", "logprobs", "prompt_logprobs", "detokenize", "skip_special_tokens",
    "spaces_between_special_tokens", "output_kind", "structured_outputs", "logit_bias",
    "allowed_token_ids", "extra_args", "repetition_detection",
}  # fmt: skip
# LLM's documented keyword arguments that the adapter may use (vllm/entrypoints/llm.py);
# the rest of EngineArgs (generation_config, max_model_len, ...) pass through **kwargs.
DOCUMENTED_LLM_ARGS = {
    "tokenizer", "skip_tokenizer_init", "trust_remote_code", "tensor_parallel_size", "dtype",
    "quantization", "revision", "seed", "gpu_memory_utilization", "enforce_eager",
    "max_model_len", "generation_config",
}  # fmt: skip
VOCAB = 50
EOS = 2


class FakeSamplingParams:
    def __init__(self, **kwargs):
        unknown = set(kwargs) - DOCUMENTED_SAMPLING_PARAMS
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword(s) {sorted(unknown)}")
        self.n = kwargs.get("n", 1)
        self.temperature = kwargs.get("temperature", 1.0)
        self.top_p = kwargs.get("top_p", 1.0)
        self.top_k = kwargs.get("top_k", 0)
        self.min_p = kwargs.get("min_p", 0.0)
        self.seed = kwargs.get("seed")
        self.stop = kwargs.get("stop")
        self.stop_token_ids = list(kwargs.get("stop_token_ids") or [])
        self.ignore_eos = kwargs.get("ignore_eos", False)
        self.max_tokens = kwargs.get("max_tokens", 16)
        self.min_tokens = kwargs.get("min_tokens", 0)
        self.detokenize = kwargs.get("detokenize", True)
        # vLLM's own checks (SamplingParams._verify_args)
        if self.n < 1:
            raise ValueError("n must be at least 1")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be non-negative")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ValueError("seed out of int64 range")


@dataclasses.dataclass
class FakeCompletion:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: int | str | None


@dataclasses.dataclass
class FakeRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[FakeCompletion]


class FakeLLM:
    instances: list[FakeLLM] = []

    def __init__(self, model: str, **kwargs):
        unknown = set(kwargs) - DOCUMENTED_LLM_ARGS
        if unknown:
            raise TypeError(f"LLM got unexpected keyword(s) {sorted(unknown)}")
        self.model, self.kwargs, self.calls = model, kwargs, []
        # vLLM: requests without a seed of their own draw from the engine's generator
        self.rng = random.Random(kwargs.get("seed"))
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, **_):
        prompts = [prompts] if isinstance(prompts, dict) else list(prompts)
        if not isinstance(sampling_params, list | tuple):
            sampling_params = [sampling_params] * len(prompts)
        assert len(sampling_params) == len(prompts), "one SamplingParams per prompt"
        self.calls.append((prompts, sampling_params))
        results = []
        for number, (prompt, params) in enumerate(zip(prompts, sampling_params, strict=True)):
            assert set(prompt) == {"prompt_token_ids"}, f"a TokensPrompt, got {prompt!r}"
            # vLLM: a per-request generator from `seed`, else the engine's
            rng = random.Random(params.seed) if params.seed is not None else self.rng
            stops = set(params.stop_token_ids) | ({EOS} if not params.ignore_eos else set())
            ids, finish, stop_reason = [], "length", None
            while len(ids) < params.max_tokens:
                token = rng.randrange(VOCAB) if rng.random() > 0.15 else EOS
                ids.append(token)  # the stop token is kept in token_ids, as vLLM v1 does
                if token in stops and len(ids) >= params.min_tokens:
                    finish = "stop"
                    stop_reason = None if token == EOS else token
                    break
            text = "" if not params.detokenize else " ".join(map(str, ids))
            results.append(
                FakeRequestOutput(
                    request_id=str(number),
                    prompt_token_ids=list(prompt["prompt_token_ids"]),
                    outputs=[FakeCompletion(0, text, ids, finish, stop_reason)],
                )
            )
        return results


def TokensPrompt(**kwargs):  # noqa: N802 - vLLM's name; a TypedDict there
    assert set(kwargs) <= {"prompt_token_ids", "prompt"}, f"TokensPrompt got {sorted(kwargs)}"
    return dict(kwargs)


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams, module.TokensPrompt = (
        FakeLLM,
        FakeSamplingParams,
        TokensPrompt,
    )
    module.__spec__ = None
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(vllm_backend, "vllm_importable", lambda: True)
    monkeypatch.setattr(vllm_backend, "_ENGINE", {})
    FakeLLM.instances = []
    return module


def run(prompts, **overrides):
    settings = dict(
        temperature=0.7,
        top_p=0.9,
        max_new_tokens=12,
        seed=5,
        eos_token_ids=[EOS, 7],
        dtype="auto",
        tensor_parallel_size=2,
    )
    settings.update(overrides)
    return vllm_backend.generate_vllm("/models/olmo", prompts, **settings)


def test_sampling_settings_map_onto_sampling_params(fake_vllm):
    params = vllm_backend.sampling_params(
        temperature=1.3, top_p=0.95, max_new_tokens=512, eos_token_ids=[50279]
    )
    assert type(params) is FakeSamplingParams, f"not vllm.SamplingParams: {type(params)}"
    assert (params.n, params.temperature, params.top_p) == (1, 1.3, 0.95)
    # top-k off: the full (nucleus-filtered) distribution
    assert params.top_k in (0, -1), f"top_k {params.top_k}, expected off (0 or -1)"
    assert params.min_p == 0.0
    assert (params.max_tokens, params.min_tokens) == (512, 0)
    assert params.seed is None  # no per-request seed: the engine's seed governs
    assert (params.stop_token_ids, params.ignore_eos) == ([50279], False)


def test_llm_is_built_from_the_model_folder_and_settings(fake_vllm):
    run([[1]] * 3, max_new_tokens=40, tensor_parallel_size=4)
    (llm,) = FakeLLM.instances
    assert llm.model == "/models/olmo"
    assert llm.kwargs["dtype"] == "bfloat16"  # `auto` is bfloat16 on a GPU, as for HF
    assert llm.kwargs["tensor_parallel_size"] == 4
    assert llm.kwargs["max_model_len"] == 1 + 40  # the prompt token + the new tokens
    assert llm.kwargs["generation_config"] == "vllm"  # the model's defaults do not apply
    run([[1]] * 3, max_new_tokens=40, tensor_parallel_size=4, dtype="float16")
    assert FakeLLM.instances[-1].kwargs["dtype"] == "float16"


def test_prompts_are_token_ids_and_the_engine_has_the_one_seed(fake_vllm):
    """Per-request seeds make vLLM sample request by request; one engine seed
    keeps samples reproducible and, for identical prompts, distinct."""
    prompts = [[50279]] * 6  # context-free: every prompt is the same single token
    results = run(prompts, seed=3)
    (llm,) = FakeLLM.instances
    ((sent, params),) = llm.calls
    assert sent == [{"prompt_token_ids": [50279]}] * 6
    assert {p.seed for p in params} == {None}
    assert llm.kwargs["seed"] == 3
    distinct = {tuple(ids) for ids, _ in results}
    assert len(distinct) > 1, "identical prompts gave identical samples"


def test_outputs_follow_prompt_order_and_the_split_at_eos_convention(fake_vllm):
    results = run([[1]] * 40 + [[1, 9, 9]], max_new_tokens=12)
    assert len(results) == 41
    reasons = {reason for _, reason in results}
    assert reasons == {"eos", "length"}, "the stand-in produces both endings"
    for ids, reason in results:
        assert 1 <= len(ids) <= 12, f"{len(ids)} tokens, expected 1 to 12: {ids}"
        expected = split_at_eos(ids, {EOS, 7})
        assert (ids, reason) == expected
        stops = [index for index, token in enumerate(ids) if token in (EOS, 7)]
        if reason == "eos":
            assert stops == [len(ids) - 1], f"an EOS-ended sample with stops at {stops}: {ids}"
        else:
            assert (len(ids), stops) == (12, []), f"a length-ended sample: {ids}"


def test_same_seed_same_samples_and_identical_prompts_differ(fake_vllm):
    first = run([[1]] * 8, seed=1)
    vllm_backend._ENGINE.clear()  # a new job: a new engine
    again = run([[1]] * 8, seed=1)
    vllm_backend._ENGINE.clear()
    other = run([[1]] * 8, seed=2)
    assert first == again, "the same seed gave other samples"
    assert first != other, "seeds 1 and 2 gave the same samples"
    distinct = {tuple(ids) for ids, _ in first}
    assert len(distinct) > 1, "identical prompts gave identical samples"
    # later calls of one job continue the engine's generator: new samples
    assert run([[1]] * 8, seed=2) != other, "a second call of the job repeated its samples"


def test_engine_is_reused_while_its_settings_stay(fake_vllm):
    run([[1]] * 2, seed=1)
    run([[1]] * 2, seed=2)
    assert len(FakeLLM.instances) == 1
    run([[1]] * 2, max_new_tokens=30)
    assert len(FakeLLM.instances) == 2


def test_stop_token_missing_from_ids_is_put_back():
    completion = FakeCompletion(0, "", [5, 6], "stop", 7)
    assert vllm_backend.finished_sample(completion, {7}) == ([5, 6, 7], "eos")
    with pytest.raises(RuntimeError, match="other than EOS"):
        vllm_backend.finished_sample(FakeCompletion(0, "", [5], "stop", "###"), {7})
    with pytest.raises(RuntimeError, match="abort"):
        vllm_backend.finished_sample(FakeCompletion(0, "", [5], "abort", None), {7})


def test_no_prompts_no_engine(fake_vllm):
    assert run([]) == []
    assert FakeLLM.instances == []


# --------------------------------------------------------------------------- selection


def test_auto_falls_back_to_hf_without_vllm_or_gpu(monkeypatch):
    monkeypatch.setattr(vllm_backend, "vllm_importable", lambda: False)
    assert vllm_backend.vllm_usable() is False
    assert vllm_backend.select_backend("auto") == "hf"
    monkeypatch.setattr(vllm_backend, "vllm_importable", lambda: True)
    monkeypatch.setattr(vllm_backend, "cuda_available", lambda: False)
    assert vllm_backend.select_backend("auto") == "hf"
    assert vllm_backend.select_backend("hf") == "hf"


def test_auto_picks_vllm_where_usable(monkeypatch):
    monkeypatch.setattr(vllm_backend, "vllm_importable", lambda: True)
    monkeypatch.setattr(vllm_backend, "cuda_available", lambda: True)
    assert vllm_backend.select_backend("auto") == "vllm"
    assert vllm_backend.select_backend("vllm") == "vllm"
    assert vllm_backend.select_backend("hf") == "hf"


def test_forced_vllm_that_cannot_run_names_the_key_and_why(monkeypatch):
    monkeypatch.setattr(vllm_backend, "vllm_importable", lambda: False)
    with pytest.raises(SettingsError) as caught:
        vllm_backend.select_backend("vllm")
    for needle in ("generation.backend", "not installed", "envs/vllm.yaml"):
        assert needle in str(caught.value), f"{needle!r} not in: {caught.value}"
    monkeypatch.setattr(vllm_backend, "vllm_importable", lambda: True)
    monkeypatch.setattr(vllm_backend, "cuda_available", lambda: False)
    with pytest.raises(SettingsError, match="no CUDA GPU"):
        vllm_backend.select_backend("vllm")


def test_unknown_backend_is_refused():
    with pytest.raises(SettingsError, match="generation.backend 'tgi'"):
        vllm_backend.select_backend("tgi")


def test_this_machine_has_no_usable_vllm():
    """The test machines have no GPU: `auto` must mean HF generate here."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert vllm_backend.vllm_usable() is False


# --------------------------------------------------------------------------- chunks, resume


def test_vllm_generation_runs_in_chunks_and_resumes(
    fake_vllm, tiny_model_dir, tmp_path, monkeypatch
):
    """Each `vllm_chunk_size` prompts are one vLLM call, recorded in the resume file, so a
    job killed at its time limit loses at most one chunk: a restarted job samples only the
    chunks not yet finished, with one engine (one context length) for the whole job."""
    from cfs import generate

    settings = generation_settings(
        num_samples=10, max_new_tokens=6, batch_size=32, vllm_chunk_size=4, backend="vllm", seed=3
    )
    out = tmp_path / "context_free.jsonl"
    argv = ["--model", str(tiny_model_dir), "--out", str(out)]
    argv += ["--settings", json.dumps(settings)]
    real_generate = FakeLLM.generate

    def killed_after_two_chunks(self, prompts, *args, **kwargs):
        if len(self.calls) == 2:
            raise KeyboardInterrupt("killed at the time limit")
        return real_generate(self, prompts, *args, **kwargs)

    monkeypatch.setattr(vllm_backend, "cuda_available", lambda: True)
    fake_vllm.LLM.generate = killed_after_two_chunks
    with pytest.raises(KeyboardInterrupt):
        generate.main(argv)
    fake_vllm.LLM.generate = real_generate
    partial = out.with_name(out.name + ".partial.jsonl")
    finished = [json.loads(line) for line in partial.read_text().splitlines()[1:]]
    assert [batch["batch"] for batch in finished] == [0, 1]
    assert [len(batch["outputs"]) for batch in finished] == [4, 4]

    vllm_backend._ENGINE.clear()  # the restarted job is a new process
    FakeLLM.instances = []
    generate.main(argv)
    (llm,) = FakeLLM.instances
    assert [len(prompts) for prompts, _ in llm.calls] == [2], "only the unfinished chunk"
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(samples) == 10
    kept = [ids for batch in finished for ids, _ in batch["outputs"]]
    assert [sample["token_ids"] for sample in samples[:8]] == kept
    assert llm.kwargs["max_model_len"] == 1 + 6
