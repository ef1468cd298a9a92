"""Sampling from the base model: context-free (only its beginning-of-sequence token, or
its end-of-document token where it has no BOS) or contextual (the fine-tuning prompts).

    python -m cfs.generate --model results/models/smollm2/base \
        --settings '{"temperature": 0.7, "num_samples": 256, "max_new_tokens": 96, ...}' \
        --out results/smollm2/temp0.7/context_free.jsonl
    python -m cfs.generate ... --prompts results/data/arith/train.jsonl \
        --out results/smollm2/contextual/temp0.7/samples.jsonl

Finished batches are appended to `<out>.partial.jsonl`; a restarted run with the same
inputs skips them, so a preempted generation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from tqdm import tqdm

from cfs.artifacts import (
    add_folder_fingerprint,
    provenance,
    read_jsonl,
    require_fields,
    write_json,
    write_jsonl,
)
from cfs.cli import require, require_gpus, run_as_process, set_threads, stage_parser
from cfs.errors import SettingsError
from cfs.hub import go_offline_unless_reachable
from cfs.modeling import load_model, load_tokenizer
from cfs.study import SAMPLE_KINDS
from cfs.tokens import batch_seed, context_free_prompt_id, split_at_eos

log = logging.getLogger("cfs.generate")


def eos_token_ids(generation_config, tokenizer) -> set[int]:
    """The ids a sample ends at: the tokenizer's end-of-sequence (end-of-document) id only,
    the token fine-tuning appends and the one that separates documents. A model's
    generation_config may name others that are no end of a document: OLMo-1B-hf's says
    `eos_token_id: 0` (not its end-of-document token) while its tokenizer's EOS is
    <|endoftext|> (50279); stopping at 0 would cut samples and label them EOS.
    DeepSeek-R1-Distill-Llama-8B's generation_config and tokenizer agree (128001,
    <｜end▁of▁sentence｜>). The generation_config is used only for a tokenizer without EOS."""
    if tokenizer.eos_token_id is not None:
        return {tokenizer.eos_token_id}
    ids = generation_config.eos_token_id if generation_config is not None else None
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if not ids:
        raise SettingsError("the model has no end-of-sequence token id to stop sampling at")
    return ids


@torch.no_grad()
def sample_batch_hf(model, prompts, *, temperature, top_p, max_new_tokens, seed, eos_ids, pad_id):
    """Continuations of left-padded prompts with HF generate: (token ids, finish reason)."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    output = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention.to(model.device),
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=sorted(eos_ids),
        pad_token_id=pad_id,
    )
    return [split_at_eos(row, eos_ids) for row in output[:, width:].tolist()]


class PartialFile:
    """Finished batches of one run, one JSON line each, appended as they finish.

    The first line holds the run's fingerprint: batches of another run are discarded. A
    line cut short by a kill is dropped with everything after it."""

    def __init__(self, path: Path, fingerprint: str):
        self.path = path
        self.batches: dict[int, list] = {}
        if path.exists():
            self._load(fingerprint)
        if not self.batches:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")

    def _load(self, fingerprint: str) -> None:
        lines = self.path.read_text().splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            header = {}
        if header.get("fingerprint") != fingerprint:
            log.info("discarding %s: it belongs to another run", self.path)
            return
        kept = [lines[0]]
        for line in lines[1:]:
            try:
                batch = json.loads(line)
            except json.JSONDecodeError:
                break
            self.batches[batch["batch"]] = batch["outputs"]
            kept.append(line)
        self.path.write_text("\n".join(kept) + "\n")
        log.info("resuming: %d finished batches in %s", len(self.batches), self.path)

    def append(self, batch_index: int, outputs: list) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"batch": batch_index, "outputs": outputs}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.batches[batch_index] = outputs


def sample_batches(
    sample_batch,
    prompts: list[list[int]],
    *,
    batch_size: int,
    seed: int,
    partial: PartialFile | None = None,
    desc: str = "sampling",
) -> list[tuple[list[int], str]]:
    """Run `sample_batch(prompts, seed)` over fixed batches, skipping finished ones."""
    outputs: list[tuple[list[int], str]] = []
    progress = tqdm(total=len(prompts), desc=desc, unit="sample")
    for batch_index, start in enumerate(range(0, len(prompts), batch_size)):
        batch = prompts[start : start + batch_size]
        done = partial.batches.get(batch_index) if partial else None
        if done is None:
            done = [list(pair) for pair in sample_batch(batch, batch_seed(seed, batch_index))]
            if partial:
                partial.append(batch_index, done)
        outputs += [(list(ids), reason) for ids, reason in done]
        progress.update(len(batch))
    progress.close()
    return outputs


def hf_sampler(model, tokenizer, *, temperature, top_p, max_new_tokens):
    eos_ids = eos_token_ids(model.generation_config, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)

    def sample_batch(prompts, seed):
        return sample_batch_hf(
            model,
            prompts,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            eos_ids=eos_ids,
            pad_id=pad_id,
        )

    return sample_batch


def context_free_records(outputs, prompt_token_id: int, tokenizer) -> list[dict]:
    return [
        {
            "index": index,
            "prompt_token_id": prompt_token_id,
            "token_ids": token_ids,
            "finish_reason": finish_reason,
            "text": tokenizer.decode(token_ids, skip_special_tokens=False),
        }
        for index, (token_ids, finish_reason) in enumerate(outputs)
    ]


def sample_context_free(
    model,
    tokenizer,
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    batch_size: int,
    prompt_token_id: int,
) -> list[dict]:
    """`num_samples` context-free samples of an HF model already loaded, with the functions
    `python -m cfs.generate` runs (HF sampler, seeded batches, the same records): for
    tests and benchmarks that hold the model in memory."""
    sample_batch = hf_sampler(
        model, tokenizer, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens
    )
    outputs = sample_batches(
        sample_batch, [[prompt_token_id]] * num_samples, batch_size=batch_size, seed=seed
    )
    return context_free_records(outputs, prompt_token_id, tokenizer)


def contextual_prompts(task: list[dict], num_samples: int) -> list[str]:
    """The fine-tuning prompts in order, cycled to `num_samples`: a ratio <= 1 uses
    distinct prompts, as context-free samples are distinct draws."""
    return [task[index % len(task)]["prompt"] for index in range(num_samples)]


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Tokenized as the fine-tuning examples are (cfs.train.task_example), no added BOS."""
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def contextual_records(outputs, prompts: list[str], prompt_ids, tokenizer) -> list[dict]:
    return [
        {
            "index": index,
            "prompt": prompt,
            "prompt_token_ids": ids,
            "token_ids": token_ids,
            "finish_reason": finish_reason,
            "text": tokenizer.decode(token_ids, skip_special_tokens=False),
        }
        for index, (prompt, ids, (token_ids, finish_reason)) in enumerate(
            zip(prompts, prompt_ids, outputs, strict=True)
        )
    ]


def run_fingerprint(model_dir: Path, temperature: float, settings: dict, prompts) -> str:
    digest = hashlib.sha256(json.dumps([str(model_dir), temperature, settings]).encode())
    digest.update(json.dumps(prompts).encode())
    add_folder_fingerprint(digest, model_dir)
    return digest.hexdigest()


def make_sampler(
    backend: str,
    model_dir: Path,
    tokenizer,
    settings: dict,
    temperature: float,
    max_prompt_tokens: int = 1,
):
    """(sample_batch, batch size) for the chosen backend. vLLM gets `vllm_chunk_size`
    prompts per call, each finished call recorded in the resume file like an HF batch (a
    job killed at its time limit resumes after the last finished chunk); one engine serves
    every call (its context length from the longest prompt of the whole job)."""
    top_p = require(settings, "top_p")
    max_new_tokens = require(settings, "max_new_tokens")
    if backend == "vllm":
        from transformers import GenerationConfig

        from cfs.vllm_backend import generate_vllm

        try:
            generation_config = GenerationConfig.from_pretrained(model_dir)
        except OSError:
            generation_config = None
        eos_ids = sorted(eos_token_ids(generation_config, tokenizer))

        def sample_batch(prompts, seed):
            return generate_vllm(
                model_dir,
                prompts,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                seed=seed,
                eos_token_ids=eos_ids,
                dtype=settings["dtype"],
                tensor_parallel_size=settings["tensor_parallel_size"],
                max_model_len=max_prompt_tokens + max_new_tokens,
            )

        return sample_batch, settings["vllm_chunk_size"]
    model = load_model(model_dir, settings["dtype"])
    model.eval()
    sampler = hf_sampler(
        model, tokenizer, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens
    )
    return sampler, settings["batch_size"]


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="base model folder")
    parser.add_argument("--prompts", type=Path, help="fine-tuning set: sample contextually")
    parser.add_argument("--out", required=True, type=Path, help="JSONL of samples")
    args = parser.parse_args(argv)
    require_gpus(args.gpus)
    set_threads(args.threads)
    # a compute node without network reads what the first job fetched into the cache
    go_offline_unless_reachable()
    settings = args.settings
    temperature = require(settings, "temperature")
    if temperature <= 0:
        raise SettingsError(f"temperature must be > 0, got {temperature}")
    from cfs.vllm_backend import select_backend

    backend = select_backend(settings["backend"])
    tokenizer = load_tokenizer(args.model)
    num_samples = require(settings, "num_samples")
    extra: dict = {}
    if args.prompts:
        task = read_jsonl(args.prompts)
        require_fields(task, ("prompt",), args.prompts)
        if not task:
            raise SettingsError(f"{args.prompts}: no prompts to sample from")
        prompt_texts = contextual_prompts(task, num_samples)
        prompt_ids = [encode_prompt(tokenizer, prompt) for prompt in prompt_texts]
        kind = SAMPLE_KINDS["contextual"]
        extra = {"prompts": str(args.prompts)}
    else:
        prompt_id = context_free_prompt_id(tokenizer, settings["prompt_token_id"])
        log.info("prompt token id %d (%r)", prompt_id, tokenizer.convert_ids_to_tokens(prompt_id))
        prompt_ids = [[prompt_id]] * num_samples
        kind = SAMPLE_KINDS["context_free"]
        extra = {
            "prompt_token_id": prompt_id,
            "prompt_token": tokenizer.convert_ids_to_tokens(prompt_id),
        }
    sample_batch, batch_size = make_sampler(
        backend,
        args.model,
        tokenizer,
        settings,
        temperature,
        max_prompt_tokens=max(len(prompt) for prompt in prompt_ids),
    )
    partial = PartialFile(
        args.out.with_name(args.out.name + ".partial.jsonl"),
        run_fingerprint(args.model, temperature, {**settings, "backend": backend}, prompt_ids),
    )
    outputs = sample_batches(
        sample_batch,
        prompt_ids,
        batch_size=batch_size,
        seed=require(settings, "seed"),
        partial=partial,
        desc=f"{kind.name} T={temperature}",
    )
    if args.prompts:
        samples = contextual_records(outputs, prompt_texts, prompt_ids, tokenizer)
    else:
        samples = context_free_records(outputs, prompt_ids[0][0], tokenizer)
    require_fields(samples, kind.fields, args.out)  # what training reads of each record
    finished = sum(sample["finish_reason"] == "eos" for sample in samples)
    tokens = sum(len(sample["token_ids"]) for sample in samples)
    log.info("%d samples, %d tokens, %d ended with EOS", len(samples), tokens, finished)
    write_json(
        args.out.with_suffix(".provenance.json"),
        provenance(
            f"generate_{kind.name}",
            settings,
            seed=settings["seed"],
            temperature=temperature,
            backend=backend,
            model=str(args.model),
            num_samples=len(samples),
            num_tokens=tokens,
            num_finished_with_eos=finished,
            **extra,
        ),
    )
    write_jsonl(args.out, samples)
    partial.path.unlink()


if __name__ == "__main__":
    run_as_process(main)
