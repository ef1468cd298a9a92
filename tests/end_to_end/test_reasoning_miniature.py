"""config/reasoning.yaml in miniature (tests/miniatures/reasoning.yaml): `snakemake all`
through the real rules with 2 seeds, on a random 2-layer Llama with
DeepSeek-R1-Distill-Llama-8B's special ids (BOS 128000, <think> 128013) and chat template,
MedReason-format rows, and the setting's own task YAMLs (MedQA in the trained format,
AIME 2024, MATH-500, GPQA Diamond) over local rows in each dataset's columns. vLLM's CPU
build generates and evaluates, in its own environment as on a cluster; the fine-tunes are
sharded over 2 processes (FSDP2)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import lm_eval.tasks
import pandas as pd
import pytest
from cfs.stage_settings import load_config
from conftest import (
    LLAMA_BOS,
    LLAMA_BOS_ID,
    LLAMA_EOS,
    LLAMA_EOS_ID,
    REPO,
    failure_report,
    write_jsonl,
)
from miniatures import MINIATURES, miniature_repo, run_miniature, with_special_ids

pytestmark = [pytest.mark.slow, pytest.mark.miniature]

# DeepSeek-R1-Distill-Llama-8B's special tokens and ids, and its chat template's shape
R1_TOKENS = {
    LLAMA_BOS: LLAMA_BOS_ID,
    LLAMA_EOS: LLAMA_EOS_ID,
    "<｜User｜>": 128011,
    "<｜Assistant｜>": 128012,
    "<think>": 128013,
    "</think>": 128014,
}
R1_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<｜User｜>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<｜Assistant｜>{{ message['content'] }}"
    "<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)


def r1_tokenizer(bpe_tokenizer_object):
    """BOS 128000, EOS (and pad) 128001, the chat markers and <think> at R1's ids."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    raw = with_special_ids(bpe_tokenizer_object, R1_TOKENS)
    # Llama 3's tokenizer puts BOS before every text it encodes with special tokens
    raw.post_processor = TemplateProcessing(
        single=f"{LLAMA_BOS} $A",
        pair=f"{LLAMA_BOS} $A $B",
        special_tokens=[(LLAMA_BOS, LLAMA_BOS_ID)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=LLAMA_BOS,
        eos_token=LLAMA_EOS,
        pad_token=LLAMA_EOS,
        model_max_length=131072,
        chat_template=R1_CHAT_TEMPLATE,
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in R1_TOKENS}
    assert ids == R1_TOKENS, ids
    return tokenizer


def build_r1(tokenizer, out_dir):
    """A random 2-layer LlamaForCausalLM with Llama 3's vocabulary size and R1's ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=32,  # one head of vLLM's smallest CPU head size
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=131072,
        bos_token_id=LLAMA_BOS_ID,
        eos_token_id=LLAMA_EOS_ID,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = LLAMA_EOS_ID
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


LM_EVAL_TASKS = Path(lm_eval.tasks.__file__).parent


def local_task(source: Path, folder: Path, rows: list[dict], *helpers: Path) -> None:
    """The task of YAML `source` as `<task>_local` in folder/<task>_local/: the same YAML
    (output type, prompt, filters, metrics, helper modules) over `rows`, a local JSONL file
    in the hub dataset's format standing for each split the task names."""
    text = source.read_text()
    name = re.search(r"^task: (\S+)$", text, re.M).group(1)
    task_dir = folder / f"{name}_local"
    task_dir.mkdir(parents=True)
    write_jsonl(task_dir / "rows.jsonl", rows)
    splits = set(re.findall(r"^(?:training|validation|test)_split: (\w+)$", text, re.M))
    files = "".join(f"\n    {split}: {task_dir / 'rows.jsonl'}" for split in sorted(splits))
    text = re.sub(r"^task: \S+$", f"task: {name}_local", text, flags=re.M)
    text = re.sub(r"^dataset_name: .*\n", "", text, flags=re.M)
    text = re.sub(
        r"^dataset_path: .*$",
        f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:{files}",
        text,
        flags=re.M,
    )
    for helper in helpers:
        # an included YAML under another suffix, so that lm-eval does not index it as a task
        copied = f"{helper.name}.included" if helper.suffix == ".yaml" else helper.name
        text = text.replace(f"include: {helper.name}", f"include: {copied}")
        shutil.copy2(helper, task_dir / copied)
    (task_dir / f"{name}_local.yaml").write_text(text)


def reasoning_data(folder: Path, tasks: Path) -> None:
    """MedReason rows for fine-tuning; MedQA, AIME 2024, MATH-500 and GPQA rows, each in
    its hub dataset's columns, under their real task YAMLs (local_task)."""
    from cfs.arithmetic import arithmetic_problems

    def options(answer: str) -> list[str]:
        value = int(answer)
        return [str(value), str(value + 1), str(value - 1), str(value + 10)]

    write_jsonl(
        folder / "medreason.jsonl",
        [
            {
                "id": str(i),
                "question": r["query"],
                "options": "Answer Choices:\n"
                + "\n".join(f"{'ABCD'[k]}. {o}" for k, o in enumerate(options(r["answer"]))),
                "reasoning": r["response"].split("\nThe answer is")[0],
                "answer": f"A. {r['answer']}",
                "dataset_name": "miniature",
            }
            for i, r in enumerate(arithmetic_problems(12, seed=21))
        ],
    )
    problems = arithmetic_problems(4, seed=22)
    medqa = [
        {"id": str(i), "sent1": r["query"], "sent2": "", "label": 0,
         **{f"ending{k}": o for k, o in enumerate(options(r["answer"]))}}
        for i, r in enumerate(problems)
    ]  # fmt: skip
    aime = [
        {"ID": f"2024-I-{i}", "Problem": r["query"], "Solution": r["response"],
         "Answer": int(r["answer"])}
        for i, r in enumerate(problems)
    ]  # fmt: skip
    math500 = [
        {"problem": r["query"], "solution": f"{r['response']} $\\boxed{{{r['answer']}}}$",
         "answer": r["answer"], "subject": "Prealgebra", "level": 1, "unique_id": str(i)}
        for i, r in enumerate(problems)
    ]  # fmt: skip
    gpqa = [
        {"Question": r["query"], "Correct Answer": r["answer"],
         **{f"Incorrect Answer {k}": o for k, o in enumerate(options(r["answer"])[1:], 1)}}
        for r in problems
    ]  # fmt: skip
    reasoning = REPO / "tasks" / "reasoning"
    local_task(
        reasoning / "medqa_4options_think.yaml", tasks, medqa, reasoning / "boxed_answers.py"
    )
    local_task(
        reasoning / "gpqa_diamond_cot_zeroshot_boxed.yaml",
        tasks,
        gpqa,
        reasoning / "boxed_answers.py",
    )
    aime_dir, math_dir = LM_EVAL_TASKS / "aime", LM_EVAL_TASKS / "minerva_math"
    local_task(aime_dir / "aime24.yaml", tasks, aime, aime_dir / "utils.py")
    local_task(
        math_dir / "minerva_math500.yaml",
        tasks,
        math500,
        math_dir / "minerva_math_algebra.yaml",
        math_dir / "utils.py",
    )


@pytest.fixture(scope="module")
def reasoning(bpe_tokenizer_object, tmp_path_factory):
    repo = miniature_repo(tmp_path_factory, "reasoning")
    folder = repo / "miniature" / "reasoning"
    build_r1(r1_tokenizer(bpe_tokenizer_object), folder / "model")
    reasoning_data(folder, repo / "miniature" / "tasks")
    result = run_miniature(repo, "reasoning", timeout=2400)
    config = load_config(REPO / "config" / "reasoning.yaml", MINIATURES / "reasoning.yaml")
    return {"repo": repo, "result": result, "config": config}


def test_reasoning_miniature_runs_to_completion(reasoning):
    assert reasoning["result"].returncode == 0, failure_report(
        reasoning["repo"], reasoning["result"]
    )


def test_reasoning_miniature_has_every_method_over_both_seeds(reasoning):
    table = pd.read_csv(reasoning["repo"] / "results" / "studies" / "reasoning" / "summary.csv")
    assert set(table["method"]) == {"base", "plain", *reasoning["config"]["study"]["methods"]}
    trained = table[table["method"] != "base"]
    assert (trained["num_seeds"] == 2).all(), trained[["label", "num_seeds"]]
    for column in ("target", "forgetting_avg", "kl_to_base"):
        assert all(math.isfinite(v) for v in trained[column]), trained[["label", column]]


def test_reasoning_miniature_fine_tunes_are_sharded_over_two_processes(reasoning):
    """The setting's 8 GPUs, 2 processes here: every full fine-tune ran FSDP2, LoRA one."""
    results = reasoning["repo"] / "results" / "r1_llama8b"
    logs = {
        path.parents[2].relative_to(results): path
        for path in results.glob("**/seed0/model/train_log.json")
    }
    sharded = {
        str(cell): json.loads(log.read_text())["summary"]["fsdp"] for cell, log in logs.items()
    }
    assert sharded.pop("lora/rank64") is False
    assert sharded and all(sharded.values()), sharded
