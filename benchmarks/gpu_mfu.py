"""GPU: fine-tuning tokens/s and MFU of a 1B model of OLMo's shape, and generation tokens/s
through the pipeline against raw HF generate / raw vLLM on the same prompts.

    python benchmarks/gpu_mfu.py [--quick] [--json out.json]     # needs a CUDA GPU
    python benchmarks/gpu_mfu.py --cpu-smoke                     # code-path check on CPU

Run it in an environment with a CUDA build of torch (and vLLM for the vLLM rows, e.g.
envs/vllm.yaml). Without a GPU it prints "not measured (no GPU on this machine)" and exits.

The model is random-weight (no download): transformers' OlmoConfig with OLMo-1B's shape
(hidden 2048, 16 layers, 16 heads, MLP 8192, vocab 50304, tied embeddings; about 1.18 B
parameters), saved with a stand-in word-level tokenizer of the same vocabulary (end of
document <|endoftext|> = 50279, no BOS, as OLMo).

1. fine-tuning: `cfs.train.fine_tune` with config/olmo.yaml's `train:` settings (bf16,
   micro-batch 16, max length 1024, packing as configured) on random-token "context_free"
   records of varied length, a few optimizer steps. tokens/s = non-padding tokens / the
   Trainer's loop time; MFU = 6 * N * tokens/s / peak bf16 FLOP/s of the card (N = all
   parameters; attention FLOPs not counted, so MFU is slightly understated). Beside it, a
   raw loop (bf16 autocast forward+backward+AdamW) on the batches the pipeline's run used.
   Goal: MFU >= 40%.
2. generation: the pipeline's sampler (`cfs.generate.make_sampler` + `sample_batches`,
   backend as config/olmo.yaml says: vLLM where usable, else HF) against raw HF `generate`
   (one call per batch) and raw vLLM (`LLM.generate`, every prompt at once) on the same
   context-free prompts and sampling settings.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

from _common import REPO, Timer, alternate, best, load_config, quiet, report, table

# dense bf16 peak FLOP/s (no sparsity), by the name torch reports
PEAK_BF16 = {
    "H100 SXM": 989.4e12,
    "H100 80GB HBM3": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H100 NVL": 835.0e12,
    "H200": 989.4e12,
    "GH200": 989.4e12,
    "A100": 312.0e12,
    "L40S": 362.1e12,
    "A10G": 70.0e12,
    "L4": 121.0e12,
}
GOAL_MFU = 0.40
OLMO_1B = dict(
    vocab_size=50304,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    eos_token_id=50279,
    pad_token_id=1,
    bos_token_id=None,
)
SMOKE = dict(
    OLMO_1B,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=512,
    eos_token_id=500,
)


def peak_flops(name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for key, value in PEAK_BF16.items():
        if key.lower() in name.lower():
            return value
    return None


def build_model(shape: dict, out: Path, dtype) -> tuple[Path, int]:
    """A random OLMo-shaped model and a word-level tokenizer of its vocabulary, saved."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import OlmoConfig, OlmoForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = OlmoConfig(**shape)
    model = OlmoForCausalLM(config).to(dtype)
    model.generation_config.eos_token_id = shape["eos_token_id"]
    model.generation_config.pad_token_id = shape["pad_token_id"]
    model.generation_config.bos_token_id = None
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    vocab["<|endoftext|>"] = shape["eos_token_id"]
    vocab["<|padding|>"] = shape["pad_token_id"]
    del vocab[f"t{shape['eos_token_id']}"], vocab[f"t{shape['pad_token_id']}"]
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|padding|>", unk_token="t0"
    )
    tokenizer.save_pretrained(out)
    return out, params


def synthetic_records(count: int, max_length: int, vocab: int, eos: int, seed: int = 0):
    """Context-free-like records: random token ids, lengths spread over [max/4, max]."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        length = rng.randint(max(2, max_length // 4), max_length - 1)
        ids = [rng.randrange(3, vocab - 4) for _ in range(length)]
        ids = [i if i != eos else i + 1 for i in ids]
        records.append(
            {
                "kind": "context_free",
                "prompt_token_id": eos,
                "token_ids": ids,
                "finish_reason": "length",
            }
        )
    return records


# --------------------------------------------------------------------------- training


def train_pipeline(model_dir: Path, data: Path, settings: dict, workdir: Path) -> dict:
    import cfs.train as train

    batches: list[dict] = []
    original = train.load_model

    def load_and_record(*args, **kwargs):
        model = original(*args, **kwargs)

        def record(module, _args, kwargs):
            if module.training and "input_ids" in kwargs:
                batches.append(
                    {
                        k: v.detach()
                        for k, v in kwargs.items()
                        if hasattr(v, "detach") and k != "num_items_in_batch"
                    }
                )

        model.register_forward_pre_hook(record, with_kwargs=True)
        return model

    train.load_model = load_and_record
    out = workdir / "tuned"
    try:
        with Timer() as timer:
            summary = train.fine_tune(model_dir, data, settings, workdir / "checkpoints", out)
    finally:
        train.load_model = original
    log = json.loads((out / "train_log.json").read_text())["log_history"]
    runtime = next(e["train_runtime"] for e in reversed(log) if "train_runtime" in e)
    shutil.rmtree(out, ignore_errors=True)
    real = positions = 0
    for batch in batches:
        mask = batch.get("attention_mask")
        positions += batch["input_ids"].numel()
        real += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    return {
        "seconds": runtime,
        "end_to_end_seconds": timer.seconds,
        "steps": summary["global_steps"],
        "micro_batches": len(batches),
        "real_tokens": real,
        "positions": positions,
        "batches": batches,
    }


def train_raw(model_dir: Path, batches: list[dict], settings: dict, device, use_bf16: bool) -> dict:
    """bf16-autocast forward + backward + AdamW on the same micro-batches, same accumulation."""
    import torch
    from cfs.modeling import load_model

    model = load_model(model_dir, "float32", device)
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["learning_rate"], fused=True)
    accumulation = settings["batch_size"] // settings.get(
        "micro_batch_size", settings["batch_size"]
    )
    real = 0
    # one untimed step first: kernel selection and allocator warm-up, as the Trainer's first
    for batch in batches[:accumulation]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    with Timer() as timer:
        for index, batch in enumerate(batches):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss / accumulation
            loss.backward()
            mask = batch.get("attention_mask")
            real += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            if (index + 1) % accumulation == 0:
                torch.nn.utils.clip_grad_norm_(
                    model.parameters(), settings.get("max_grad_norm", 1.0)
                )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        _sync(device)
    del model, optimizer
    _free(device)
    return {"seconds": timer.seconds, "real_tokens": real}


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device):
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- generation


def generate_pipeline(model_dir, tokenizer, settings, prompts, temperature):
    from cfs import generate
    from cfs.vllm_backend import select_backend

    backend = select_backend(settings.get("backend", "auto"))
    sample_batch, batch_size = generate.make_sampler(
        backend, Path(model_dir), tokenizer, settings, temperature
    )
    sample_batch(prompts[: min(len(prompts), 8)], 0)  # warm-up (vLLM engine start, kernels)
    with Timer() as timer:
        outputs = generate.sample_batches(
            sample_batch, prompts, batch_size=batch_size, seed=settings.get("seed", 0)
        )
        _sync_any()
    tokens = sum(len(ids) for ids, _ in outputs)
    return {
        "seconds": timer.seconds,
        "tokens": tokens,
        "backend": backend,
        "batch_size": batch_size,
    }


def generate_raw_hf(model, settings, prompts, temperature, eos):
    import torch

    batch_size = settings.get("batch_size", 32)
    tokens = 0
    with torch.no_grad():
        ids = torch.tensor(prompts[:8], device=model.device)
        model.generate(input_ids=ids, do_sample=True, max_new_tokens=4, pad_token_id=eos)
        _sync_any()
        with Timer() as timer:
            for start in range(0, len(prompts), batch_size):
                ids = torch.tensor(prompts[start : start + batch_size], device=model.device)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    temperature=temperature,
                    top_p=settings.get("top_p", 1.0),
                    top_k=0,
                    max_new_tokens=settings["max_new_tokens"],
                    eos_token_id=eos,
                    pad_token_id=eos,
                )
                for row in out[:, ids.shape[1] :].tolist():
                    tokens += row.index(eos) + 1 if eos in row else len(row)
            _sync_any()
    return {"seconds": timer.seconds, "tokens": tokens, "batch_size": batch_size}


def generate_raw_vllm(model_dir, settings, prompts, temperature, eos):
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(
        model=str(model_dir),
        dtype="bfloat16",
        seed=0,
        max_model_len=settings["max_new_tokens"] + 8,
        generation_config="vllm",
    )
    params = SamplingParams(
        temperature=temperature,
        top_p=settings.get("top_p", 1.0),
        max_tokens=settings["max_new_tokens"],
        stop_token_ids=[eos],
        detokenize=False,
        seed=0,
    )
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(requests[:8], params, use_tqdm=False)
    with Timer() as timer:
        outputs = llm.generate(requests, params, use_tqdm=False)
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    del llm
    return {"seconds": timer.seconds, "tokens": tokens}


def _sync_any():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and samples")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny OLMo-shaped model on CPU: checks the code paths, measures nothing",
    )
    parser.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s of the card")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 6)")
    parser.add_argument("--samples", type=int, default=None, help="generation prompts")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    quiet()
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(
            "gpu_mfu: not measured (no GPU on this machine): torch sees no CUDA device "
            f"(torch {torch.__version__}). Run it where one is, with a CUDA build of torch."
        )
        report("gpu_mfu", {"measured": False, "reason": "no GPU on this machine"}, args.json)
        return
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke test)"
    peak = peak_flops(name, args.peak_tflops) if device.type == "cuda" else None
    olmo = (
        load_config(REPO / "config" / "olmo.yaml")
        if (REPO / "config" / "olmo.yaml").is_file()
        else {}
    )
    train_cfg = dict(olmo.get("train") or {})
    gen_cfg = dict(olmo.get("generation") or {})
    shape = SMOKE if args.cpu_smoke else OLMO_1B
    workdir = Path(tempfile.mkdtemp(prefix="cfs-bench-gpu-"))
    payload: dict = {"device": name, "peak_bf16_flops": peak, "smoke": args.cpu_smoke}
    rows = []
    try:
        model_dir, params = build_model(shape, workdir / "olmo1b-random", torch.float32)
        payload["parameters"] = params
        print(
            f"gpu_mfu: {name}; OLMo-1B-shaped random model, {params / 1e9:.3f} B parameters"
            + (f"; peak bf16 {peak / 1e12:.0f} TFLOP/s" if peak else "")
        )
        if not args.skip_training:
            settings = {
                "learning_rate": 1e-5,
                "lr_scheduler": "cosine",
                "warmup_ratio": 0.03,
                "batch_size": 128,
                "micro_batch_size": 16,
                "max_length": 1024,
                "max_grad_norm": 1.0,
                "precision": "bfloat16",
                "logging_steps": 1,
                **train_cfg,
                "epochs": 1,
                "save_steps": 10**6,
                "seed": 0,
                "keep_checkpoints": False,
            }
            if args.cpu_smoke:
                settings.update(
                    batch_size=4, micro_batch_size=2, max_length=64, precision="float32"
                )
            micro = settings["micro_batch_size"]
            steps = args.steps or (3 if args.quick or args.cpu_smoke else 6)
            count = steps * settings["batch_size"]
            data = workdir / "train.jsonl"
            records = synthetic_records(
                count, settings["max_length"], shape["vocab_size"], shape["eos_token_id"]
            )
            data.write_text("".join(json.dumps(r) + "\n" for r in records))
            use_bf16 = settings.get("precision") == "bfloat16" or (
                settings.get("precision", "auto") == "auto" and device.type == "cuda"
            )
            print(
                f"  fine-tuning: {count} examples, {steps} optimizer steps of "
                f"{settings['batch_size']} "
                f"(micro-batch {micro}), max length {settings['max_length']}, "
                f"packing={settings.get('packing', False)}, bf16={use_bf16}"
            )
            pipe = train_pipeline(model_dir, data, settings, workdir)
            batches = pipe.pop("batches")
            _free(device)
            raw = train_raw(model_dir, batches, settings, device, use_bf16)
            for label, entry in (("pipeline fine_tune", pipe), ("raw loop, same batches", raw)):
                entry["tokens_per_s"] = entry["real_tokens"] / entry["seconds"]
                entry["mfu"] = 6 * params * entry["tokens_per_s"] / peak if peak else None
                rows.append(
                    [
                        label,
                        entry["real_tokens"],
                        f"{entry['seconds']:.2f}",
                        f"{entry['tokens_per_s']:.0f}",
                        f"{entry['mfu']:.1%}" if entry["mfu"] is not None else "n/a",
                    ]
                )
            pipe["non_padding"] = pipe["real_tokens"] / pipe["positions"]
            payload["training"] = {
                "settings": settings,
                "pipeline": pipe,
                "raw": raw,
                "overhead_vs_raw": pipe["seconds"] / raw["seconds"] - 1,
                "goal_mfu_met": bool(pipe["mfu"] and pipe["mfu"] >= GOAL_MFU),
            }
        if not args.skip_generation:
            from cfs.modeling import load_model, load_tokenizer

            tokenizer = load_tokenizer(model_dir)
            samples = args.samples or (64 if args.cpu_smoke else 256 if args.quick else 1024)
            settings = {
                "top_p": 1.0,
                "batch_size": 256,
                "max_new_tokens": 512,
                "backend": "auto",
                **gen_cfg,
                "seed": 0,
            }
            if args.max_new_tokens or args.cpu_smoke or args.quick:
                settings["max_new_tokens"] = args.max_new_tokens or (16 if args.cpu_smoke else 256)
            if args.cpu_smoke:
                settings.update(batch_size=16, backend="hf", dtype="float32")
            eos = shape["eos_token_id"]
            prompts = [[eos]] * samples
            print(
                f"  generation: {samples} context-free prompts, "
                f"{settings['max_new_tokens']} new tokens, "
                f"T=1, batch {settings['batch_size']} (HF)"
            )

            def pipeline_run():
                result = generate_pipeline(model_dir, tokenizer, settings, prompts, 1.0)
                _free(device)
                return result

            def raw_hf_run():
                model = load_model(model_dir, settings.get("dtype", "auto"), device).eval()
                result = generate_raw_hf(model, settings, prompts, 1.0, eos)
                del model
                _free(device)
                return result

            rounds = 1 if args.quick else 2
            runs = alternate({"pipeline": pipeline_run, "raw HF generate": raw_hf_run}, rounds)
            gen = {name: best(values) for name, values in runs.items()}
            try:
                import vllm  # noqa: F401

                if device.type == "cuda":
                    gen["raw vLLM"] = generate_raw_vllm(model_dir, settings, prompts, 1.0, eos)
            except ImportError:
                print("  (vLLM not importable here: no raw vLLM row)")
            for entry in gen.values():
                entry["tokens_per_s"] = entry["tokens"] / entry["seconds"]
            reference = (
                gen.get("raw vLLM")
                if gen["pipeline"]["backend"] == "vllm"
                else gen["raw HF generate"]
            )
            for label, entry in gen.items():
                rows.append(
                    [
                        f"generation: {label}"
                        + (f" ({entry['backend']})" if "backend" in entry else ""),
                        entry["tokens"],
                        f"{entry['seconds']:.2f}",
                        f"{entry['tokens_per_s']:.0f}",
                        f"{entry['tokens_per_s'] / reference['tokens_per_s']:.2f}x"
                        if reference
                        else "",
                    ]
                )
            payload["generation"] = {"settings": settings, "results": gen}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(rows, ["what", "tokens", "seconds", "tokens/s", "MFU / ratio"]))
    if "training" in payload and peak:
        mfu = payload["training"]["pipeline"]["mfu"]
        print(f"goal: MFU >= {GOAL_MFU:.0%}: {'met' if mfu >= GOAL_MFU else 'MISSED'} ({mfu:.1%})")
    if args.cpu_smoke:
        print("(cpu smoke test: code paths only; these numbers are not GPU figures)")
    report("gpu_mfu", payload, args.json)


if __name__ == "__main__":
    sys.exit(main())
