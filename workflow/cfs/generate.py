"""Context-free generation: sample text from the base model given only its
beginning-of-sequence token (or its end-of-document token where it has no BOS).

    python -m cfs.generate --model results/models/smollm2/base --temperature 0.7 \
        --settings '{"num_samples": 256, "max_new_tokens": 96, "top_p": 1.0, "seed": 1}' \
        --out results/smollm2/temp0.7/context_free.jsonl
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from cfs.artifacts import provenance, write_json, write_jsonl
from cfs.cli import SettingsError, require, run_stage, set_threads, stage_parser
from cfs.modeling import load_model, load_tokenizer

log = logging.getLogger("cfs.generate")


def context_free_prompt_id(tokenizer, override: int | None = None) -> int:
    """The one token a context-free sample starts from: BOS, else end-of-document.

    OLMo has no BOS; its documents are separated by <|endoftext|>, which is its EOS, so a
    sample that follows it is a sample of a new document. Never an empty string."""
    if override is not None:
        return int(override)
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise SettingsError(
        "the tokenizer has neither a BOS nor an EOS token; set generation.prompt_token_id"
    )


def split_at_eos(row: list[int], eos_ids: set[int]) -> tuple[list[int], str]:
    """Keep tokens up to and including the first EOS; the finish reason says which ended it."""
    for position, token in enumerate(row):
        if token in eos_ids:
            return row[: position + 1], "eos"
    return row, "length"


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def generate_context_free(
    model,
    tokenizer,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    batch_size: int,
    prompt_token_id: int,
) -> list[dict]:
    """Sample `num_samples` continuations of the single prompt token, batch by batch.

    Each batch is seeded from (seed, batch index), so the samples do not depend on how
    many batches ran before them in this process."""
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    samples: list[dict] = []
    progress = tqdm(total=num_samples, desc=f"context-free T={temperature}", unit="sample")
    for batch_index, start in enumerate(range(0, num_samples, batch_size)):
        size = min(batch_size, num_samples - start)
        torch.manual_seed(seed * 1_000_003 + batch_index)
        prompt = torch.full((size, 1), prompt_token_id, dtype=torch.long, device=model.device)
        output = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            eos_token_id=sorted(eos_ids),
            pad_token_id=pad_id,
        )
        for offset, row in enumerate(output[:, 1:].tolist()):
            token_ids, finish_reason = split_at_eos(row, eos_ids)
            samples.append(
                {
                    "index": start + offset,
                    "prompt_token_id": prompt_token_id,
                    "token_ids": token_ids,
                    "finish_reason": finish_reason,
                    "text": tokenizer.decode(token_ids, skip_special_tokens=False),
                }
            )
        progress.update(size)
    progress.close()
    return samples


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="base model folder")
    parser.add_argument("--temperature", required=True, type=float)
    parser.add_argument("--out", required=True, type=Path, help="JSONL of samples")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    settings = args.settings
    if args.temperature <= 0:
        raise SettingsError(f"temperature must be > 0, got {args.temperature}")
    model = load_model(args.model, settings.get("dtype", "auto"))
    model.eval()
    tokenizer = load_tokenizer(args.model)
    prompt_id = context_free_prompt_id(tokenizer, settings.get("prompt_token_id"))
    log.info("prompt token id %d (%r)", prompt_id, tokenizer.convert_ids_to_tokens(prompt_id))
    samples = generate_context_free(
        model,
        tokenizer,
        num_samples=require(settings, "num_samples"),
        max_new_tokens=require(settings, "max_new_tokens"),
        temperature=args.temperature,
        top_p=require(settings, "top_p"),
        seed=require(settings, "seed"),
        batch_size=settings.get("batch_size", 32),
        prompt_token_id=prompt_id,
    )
    finished = sum(sample["finish_reason"] == "eos" for sample in samples)
    tokens = sum(len(sample["token_ids"]) for sample in samples)
    log.info("%d samples, %d tokens, %d ended with EOS", len(samples), tokens, finished)
    write_json(
        args.out.with_suffix(".provenance.json"),
        provenance(
            "generate_context_free",
            settings,
            seed=settings["seed"],
            temperature=args.temperature,
            prompt_token_id=prompt_id,
            prompt_token=tokenizer.convert_ids_to_tokens(prompt_id),
            backend="hf",
            model=str(args.model),
            num_samples=len(samples),
            num_tokens=tokens,
            num_finished_with_eos=finished,
        ),
    )
    write_jsonl(args.out, samples)


if __name__ == "__main__":
    run_stage(main)
