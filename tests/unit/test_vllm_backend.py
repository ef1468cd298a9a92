"""cfs.vllm_backend without vLLM: backend selection, vLLM's completions cut at EOS as
cfs.tokens does, and the calls that need no engine. Real vLLM (its CPU build) runs in
tests/end_to_end/test_vllm_cpu.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from cfs import vllm_backend
from cfs.errors import SettingsError


def completion(token_ids, finish_reason, stop_reason=None):
    """What finished_sample reads of a vLLM `CompletionOutput`."""
    return SimpleNamespace(
        token_ids=token_ids, finish_reason=finish_reason, stop_reason=stop_reason
    )


def test_completions_are_cut_at_the_first_eos():
    assert vllm_backend.finished_sample(completion([5, 7], "stop", 7), {7}) == ([5, 7], "eos")
    assert vllm_backend.finished_sample(completion([5, 6], "length"), {7}) == ([5, 6], "length")


def test_stop_token_missing_from_ids_is_put_back():
    assert vllm_backend.finished_sample(completion([5, 6], "stop", 7), {7}) == ([5, 6, 7], "eos")
    with pytest.raises(RuntimeError, match="other than EOS"):
        vllm_backend.finished_sample(completion([5], "stop", "###"), {7})
    with pytest.raises(RuntimeError, match="abort"):
        vllm_backend.finished_sample(completion([5], "abort"), {7})


def test_no_prompts_no_engine_and_no_eos_refused(monkeypatch):
    monkeypatch.setattr(vllm_backend, "_ENGINE", {})
    settings = dict(temperature=1.0, top_p=1.0, max_new_tokens=8, seed=0)
    assert vllm_backend.generate_vllm("/nowhere", [], eos_token_ids=[2], **settings) == []
    assert vllm_backend._ENGINE == {}
    with pytest.raises(SettingsError, match="no EOS token id"):
        vllm_backend.generate_vllm("/nowhere", [[1]], eos_token_ids=[], **settings)


def test_engine_seed_is_one_numpy_takes():
    assert vllm_backend.engine_seed(5) == 5
    assert 0 <= vllm_backend.engine_seed(2**64 + 3) < 2**32


# --------------------------------------------------------------------------- selection


def where(monkeypatch, *, importable: bool, cuda: bool, cpu_build: bool = False) -> None:
    monkeypatch.setattr(vllm_backend, "vllm_importable", lambda: importable)
    monkeypatch.setattr(vllm_backend, "cuda_available", lambda: cuda)
    monkeypatch.setattr(vllm_backend, "vllm_cpu_build", lambda: cpu_build)


def test_auto_falls_back_to_hf_without_vllm_or_gpu(monkeypatch):
    where(monkeypatch, importable=False, cuda=True)
    assert vllm_backend.vllm_usable() is False
    assert vllm_backend.select_backend("auto") == "hf"
    where(monkeypatch, importable=True, cuda=False)
    assert vllm_backend.select_backend("auto") == "hf"
    assert vllm_backend.select_backend("hf") == "hf"


def test_auto_picks_vllm_with_a_gpu(monkeypatch):
    where(monkeypatch, importable=True, cuda=True)
    assert vllm_backend.select_backend("auto") == "vllm"
    assert vllm_backend.select_backend("vllm") == "vllm"
    assert vllm_backend.select_backend("hf") == "hf"
    assert vllm_backend.engine_options() == {}


def test_auto_picks_the_cpu_build_of_vllm(monkeypatch):
    """vLLM's CPU build generated the default's samples about twice as fast as HF generate
    (BENCHMARKS.md, "Generation"): `auto` takes it too."""
    where(monkeypatch, importable=True, cuda=False, cpu_build=True)
    assert vllm_backend.vllm_usable() is True
    assert vllm_backend.select_backend("vllm") == "vllm"
    assert vllm_backend.select_backend("auto") == "vllm"
    assert vllm_backend.engine_options() == {"enforce_eager": True}


def test_forced_vllm_that_cannot_run_names_the_key_and_why(monkeypatch):
    where(monkeypatch, importable=False, cuda=False)
    with pytest.raises(SettingsError) as caught:
        vllm_backend.select_backend("vllm")
    for needle in ("generation.backend", "not installed", "envs/vllm.yaml"):
        assert needle in str(caught.value), f"{needle!r} not in: {caught.value}"
    where(monkeypatch, importable=True, cuda=False)
    with pytest.raises(SettingsError, match="no CUDA GPU"):
        vllm_backend.select_backend("vllm")


def test_unknown_backend_is_refused():
    with pytest.raises(SettingsError, match="generation.backend 'tgi'"):
        vllm_backend.select_backend("tgi")


def test_auto_is_hf_generate_in_this_environment():
    """The suite's environment has no vLLM (it has its own), and here no GPU: `auto` means
    HF generate."""
    if vllm_backend.vllm_usable():
        pytest.skip("vLLM runs in this environment")
    assert vllm_backend.select_backend("auto") == "hf"
