"""What the paper-setting miniatures share (test_olmo_miniature.py,
test_reasoning_miniature.py): a repository copy with tests/miniatures/ as miniature/, the
tests' BPE tokenizer with a real model's special ids, and `snakemake all` on the paper's
config with the overlay merged over it, its GPU jobs on the CPU."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from conftest import REPO, copy_repo, run_snakemake, snakemake_env

MINIATURES = REPO / "tests" / "miniatures"


def miniature_repo(tmp_path_factory, name: str):
    """A repository copy with miniature/ and an empty miniature/<name>/ for the model and
    data."""
    repo = copy_repo(tmp_path_factory.mktemp(f"{name}_miniature") / "repo")
    shutil.copytree(MINIATURES, repo / "miniature")
    (repo / "miniature" / name).mkdir()
    return repo


def vllm_environment() -> Path:
    """The virtual environment with vLLM's CPU build that stands in for envs/vllm.yaml
    (`make vllm-env`, which `make test` runs first; CFS_ENV_VLLM names another)."""
    venv = Path(os.environ.get("CFS_ENV_VLLM", REPO / ".venv-vllm"))
    assert (venv / "bin" / "python").is_file(), (
        f"no vLLM environment at {venv}: `make vllm-env` builds it (scripts/vllm_cpu_env.sh)"
    )
    return venv


def run_miniature(repo, name: str, timeout: int = 1800):
    """`snakemake all` on config/<name>.yaml with miniature/<name>.yaml merged over it. The
    paper's GPU jobs run on the CPU: the rules still hand each its GPUs. vLLM's stages run
    in vLLM's environment (vllm_environment), as envs/vllm.yaml on a cluster."""
    configs = [f"config/{name}.yaml", f"miniature/{name}.yaml"]
    env = snakemake_env({"CFS_GPUS_ON_CPU": "1", "CFS_ENV_VLLM": str(vllm_environment())})
    return run_snakemake(
        repo, "all", "--cores", "2", "--configfile", *configs, timeout=timeout, env=env
    )


def with_special_ids(bpe_tokenizer_object, special: dict[str, int]):
    """The tests' byte-level BPE with its own special tokens replaced by `special`, each at
    its given (real model's) id."""
    from tokenizers import Tokenizer

    spec = json.loads(bpe_tokenizer_object.to_str())
    template = spec["added_tokens"][0]
    for token in spec["added_tokens"]:
        spec["model"]["vocab"].pop(token["content"])
    spec["model"]["vocab"].update(special)
    spec["added_tokens"] = [
        {**template, "content": text, "id": id_} for text, id_ in special.items()
    ]
    return Tokenizer.from_str(json.dumps(spec))
