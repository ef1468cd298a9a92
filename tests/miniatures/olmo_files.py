"""What miniature/olmo.yaml points at: a random OlmoForCausalLM with OLMo-1B's vocabulary
size and special ids (no BOS, <|endoftext|> at 50279), and local data in the formats of
MetaMathQA, GSM8K and a Dolma sample. tests/end_to_end/test_olmo_miniature.py builds a
tiny one; benchmarks/gpu_check.py a GPU-sized one. Needs torch, transformers and pandas
(with pyarrow), and `cfs` on the path."""

from __future__ import annotations

from pathlib import Path

OLMO_END_OF_DOC, OLMO_END_OF_DOC_ID = "<|endoftext|>", 50279
OLMO_VOCAB_SIZE = 50304
# (hidden, layers, heads, intermediate); one head of 32, the least vLLM's CPU attention runs
TINY = (32, 2, 1, 64)


def olmo_model(tokenizer, out_dir: Path, shape=TINY, dtype="float32") -> int:
    """A random OlmoForCausalLM of `shape` with OLMo-1B's vocabulary and special ids, saved
    with `tokenizer` in `out_dir`; its parameter count."""
    import torch
    from transformers import OlmoConfig, OlmoForCausalLM

    hidden, layers, heads, intermediate = shape
    config = OlmoConfig(
        vocab_size=OLMO_VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=2048,
        bos_token_id=None, eos_token_id=OLMO_END_OF_DOC_ID, pad_token_id=OLMO_END_OF_DOC_ID,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = OlmoForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sum(parameter.numel() for parameter in model.parameters())


def olmo_data(folder: Path, dolma_texts: list[str], num_rows: int = 48) -> None:
    """MetaMathQA rows (query, response ending "The answer is: N"), GSM8K problems
    (question, answer ending "#### N") and a Dolma sample (parquet: id, text, source)."""
    import pandas as pd
    from cfs.arithmetic import arithmetic_problems
    from cfs.artifacts import write_jsonl

    rows = arithmetic_problems(num_rows, seed=11)
    write_jsonl(
        folder / "metamathqa.jsonl",
        [
            {"query": r["query"], "response": r["response"], "type": "GSM_AnsAug",
             "original_question": r["query"]}
            for r in rows
        ],
    )  # fmt: skip
    gsm8k = [
        {"question": r["query"], "answer": r["response"].replace("The answer is: ", "#### ")}
        for r in arithmetic_problems(12, seed=12)
    ]
    write_jsonl(folder / "gsm8k_train.jsonl", gsm8k[:4])
    write_jsonl(folder / "gsm8k_test.jsonl", gsm8k[4:])
    (folder / "dolma").mkdir(exist_ok=True)
    pd.DataFrame(
        {"id": [str(i) for i in range(len(dolma_texts))], "text": dolma_texts}
        | {"source": "miniature"}
    ).to_parquet(folder / "dolma" / "train.parquet")
