"""The paper's two settings as config files (config/olmo.yaml, config/reasoning.yaml), and
what they rest on: full-grid dry runs offline with per-rule job counts from the grid
arithmetic, the lm-eval task names they use, the context-free prompt id of OLMo-like and
Llama-like tokenizers, hub/local datasets with a field mapping (the "any model, any dataset"
worked example of config/README.md), and lm-eval options for sampled pass@1 evals."""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml
from cfs import data, evaluate
from cfs.errors import SettingsError
from cfs.modeling import load_tokenizer
from cfs.tokens import context_free_prompt_id
from conftest import (
    LLAMA_BOS_ID,
    OLMO_END_OF_DOC_ID,
    REPO,
    copy_repo,
    default_config,
    evaluation_settings,
    job_stats,
    read_jsonl,
    run_snakemake,
    task_entry,
    task_settings,
    write_jsonl,
)
from test_config import expected_default_jobs

PAPER_CONFIGS = {"olmo": "config/olmo.yaml", "reasoning": "config/reasoning.yaml"}
ZERO_SHOT_SUITE = [
    "arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "sciq", "winogrande",
]  # fmt: skip


def paper_config(name: str) -> dict:
    return yaml.safe_load((REPO / PAPER_CONFIGS[name]).read_text())


def merged(base: dict, over: dict) -> dict:
    """What Snakemake does with --configfile: merged key by key, lists replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def effective_config(name: str) -> dict:
    return merged(default_config(), paper_config(name))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("paper_configs") / "repo")


# --------------------------------------------------------------------------- dry runs


def expected_grid_jobs(config: dict) -> dict[str, int]:
    """Per-rule job counts from the grid arithmetic, every method included (test_config)."""
    return expected_default_jobs(config)


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_full_grid_dry_run_builds_offline_with_grid_counts(repo, name):
    config = effective_config(name)
    # typed as in the brief: --configfile first, then the target
    result = run_snakemake(repo, "-n", "all", "--configfile", PAPER_CONFIGS[name], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    stats = job_stats(result.stdout)
    assert stats.pop("figures") == 1
    assert stats == expected_grid_jobs(config)
    (model,) = config["study"]["models"]
    for temperature in config["study"]["temperatures"]:
        assert f"results/{model}/temp{temperature:g}/seed0/context_free.jsonl" in result.stdout
    assert f"results/{model}/ratio0/eval.json" in result.stdout
    assert f"results/data/{config['task']['name']}/train.jsonl" in result.stdout


def test_paper_grid_sizes():
    """4 temperatures x 3 non-zero ratios of context-free and of contextual data, plain
    fine-tuning, and each baseline's sweep; 4 generations, 1 base eval per setting."""
    sizes = {
        "olmo": (4, 1 + 12 + 12 + 3 + 1 + 4 + 6 + 4),
        "reasoning": (4, 1 + 12 + 12 + 1 + 4 + 2 + 1),
    }
    for name in PAPER_CONFIGS:
        expected = expected_grid_jobs(effective_config(name))
        assert (expected["generate_context_free"], expected["fine_tune"]) == sizes[name]
        assert expected["evaluate_base"] == 1


def test_the_briefs_example_builds_with_the_default_config(repo):
    """`snakemake results/olmo/temp0.7/ratio0.5/eval.json` from the repository root: the
    default config knows `olmo` though its `all` runs only the embedded default."""
    config = default_config()
    assert "olmo" in config["models"] and "olmo" not in config["study"]["models"]
    result = run_snakemake(repo, "-n", "results/olmo/temp0.7/ratio0.5/eval.json", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    stats = job_stats(result.stdout)
    seeds = len(config["study"]["seeds"])
    assert stats == {  # the cell's card, over the default's seeds
        "check_evaluation_tasks": 1,
        "prepare_model": 1,
        "prepare_task_data": 1,
        "evaluate_base": 1,
        "generate_heldout": 1,
        "generate_context_free": seeds,
        "mix_at_ratio": seeds,
        "fine_tune": seeds,
        "evaluate_finetuned": seeds,
        "summarise_seeds": 1,
    }


def stage_line(output: str, module: str, *also: str) -> str:
    """The first shell line running `-m module` (and holding every `also`)."""
    return next(
        line
        for line in output.splitlines()
        if f"-m {module} " in line and all(text in line for text in also)
    )


def test_stage_settings_come_from_the_setting_file(repo):
    result = run_snakemake(
        repo, "-n", "-p", "all", "--configfile", PAPER_CONFIGS["olmo"], timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:]
    data_line = stage_line(result.stdout, "cfs.data")
    for text in ('"source": "hub"', '"dataset": "meta-math/MetaMathQA"', '"num_train": 100000'):
        assert text in data_line
    assert "cfs.prepare_model --model olmo" in result.stdout
    assert '"hub_id": "allenai/OLMo-1B-hf"' in stage_line(result.stdout, "cfs.prepare_model")
    assert '"backend": "auto"' in stage_line(result.stdout, "cfs.generate", "/temp0.7/")
    train_line = stage_line(result.stdout, "cfs.train")
    assert '"learning_rate": 1e-05' in train_line and '"max_length": 1024' in train_line
    eval_line = stage_line(result.stdout, "cfs.evaluate")
    assert '"task": "gsm8k"' in eval_line and "flexible-extract" in eval_line


# --------------------------------------------------------------------------- the settings


def test_olmo_setting_follows_the_paper():
    config = effective_config("olmo")
    assert config["models"]["olmo"]["hub_id"] == "allenai/OLMo-1B-hf"
    assert config["study"]["temperatures"] == [0.5, 0.7, 1.0, 1.3]
    assert 0 in config["study"]["ratios"] and max(config["study"]["ratios"]) == 1.0
    task = config["task"]
    assert (task["source"], task["dataset"]) == ("hub", "meta-math/MetaMathQA")
    assert task["fields"] == {"query": "query", "response": "response"}
    assert "### Instruction:" in task["prompt_template"]
    assert config["generation"]["num_samples"] >= max(config["study"]["ratios"]) * task["num_train"]
    train = config["train"]
    assert (train["learning_rate"], train["epochs"], train["batch_size"]) == (1e-5, 2, 128)
    assert (train["lr_scheduler"], train["warmup_ratio"], train["max_length"]) == (
        "cosine",
        0.03,
        1024,
    )
    evaluation = config["evaluation"]
    assert evaluation["target"] == {"task": "gsm8k", "metric": "exact_match,flexible-extract"}
    assert [entry["task"] for entry in evaluation["forgetting"]] == ZERO_SHOT_SUITE


def test_reasoning_setting_follows_the_paper():
    config = effective_config("reasoning")
    model = config["models"][config["study"]["models"][0]]
    assert model["hub_id"] == "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"
    assert model["resources"]["train_gpus"] > 1  # declared for the Slurm profile
    task = config["task"]
    assert task["dataset"] == "UCSC-VLAA/MedReason"
    assert set(task["fields"].values()) >= {"question", "reasoning", "answer"}
    assert task["prompt_template"].endswith("<｜Assistant｜><think>\n")
    assert "</think>" in task["response_template"]
    assert config["generation"]["max_new_tokens"] >= 4096
    assert config["generation"]["prompt_token_id"] is None  # the BOS, 128000
    train = config["train"]
    assert (train["learning_rate"], train["warmup_ratio"], train["weight_decay"]) == (
        5e-6,
        0.05,
        0.1,
    )
    assert (train["batch_size"], train["max_length"]) == (128, 8192)
    evaluation = config["evaluation"]
    assert evaluation["target"]["task"] == "medqa_4options"
    for entry in evaluation["forgetting"]:  # reasoning benchmarks, sampled, pass@1 over k
        assert entry["repeats"] > 1
        kwargs = entry["gen_kwargs"]
        assert (kwargs["do_sample"], kwargs["temperature"], kwargs["top_p"]) == (True, 0.6, 0.95)
        assert kwargs["max_gen_toks"] >= 16384
    assert (
        evaluation["model_args"]["max_model_len"]
        > evaluation["forgetting"][0]["gen_kwargs"]["max_gen_toks"]
    )


def test_every_lm_eval_task_exists_in_the_pinned_harness():
    """Names only (the index of lm-eval's task YAMLs; no dataset is loaded)."""
    from lm_eval.tasks import TaskManager

    known = set(TaskManager(include_path=str(REPO / "tasks")).all_tasks)
    for name in PAPER_CONFIGS:
        evaluation = effective_config(name)["evaluation"]
        for entry in [evaluation["target"], *evaluation["forgetting"]]:
            assert entry["task"] in known, f"{PAPER_CONFIGS[name]}: no lm-eval task {entry['task']}"


# --------------------------------------------------------------------------- prompt ids


def test_context_free_prompt_of_an_olmo_like_tokenizer_is_end_of_document(
    olmo_like_tokenizer, tmp_path
):
    assert olmo_like_tokenizer.bos_token_id is None
    assert context_free_prompt_id(olmo_like_tokenizer) == OLMO_END_OF_DOC_ID == 50279
    olmo_like_tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)  # as the stages load it
    assert context_free_prompt_id(reloaded) == 50279
    assert reloaded.convert_ids_to_tokens(50279) == "<|endoftext|>"
    assert context_free_prompt_id(reloaded, override=7) == 7


def test_context_free_prompt_of_a_llama_like_tokenizer_is_bos(llama_like_tokenizer, tmp_path):
    assert context_free_prompt_id(llama_like_tokenizer) == LLAMA_BOS_ID == 128000
    llama_like_tokenizer.save_pretrained(tmp_path)
    assert context_free_prompt_id(load_tokenizer(tmp_path)) == 128000


def test_reasoning_prompt_template_holds_one_bos(llama_like_tokenizer):
    """Fine-tuning tokenizes prompts without adding special tokens, so the template's
    written-out BOS is the only one (no doubled BOS)."""
    template = paper_config("reasoning")["task"]["prompt_template"]
    ids = llama_like_tokenizer(
        template.format(query="Hello", options="world"), add_special_tokens=False
    )["input_ids"]
    assert ids[0] == 128000 and ids.count(128000) == 1


# --------------------------------------------------------------------------- any dataset

FIELDS = {"query": "question", "options": "options", "reasoning": "reasoning", "answer": "answer"}
R1_PROMPT = "<｜User｜>{query}\n{options}<｜Assistant｜><think>\n"
R1_RESPONSE = "{reasoning}\n</think>\n\n{answer}"


def medical_rows(count: int) -> list[dict]:
    return [
        {
            "question": f"Question {n}?",
            "options": f"A. x{n}\nB. y{n}" if n % 3 else None,
            "reasoning": f"Because {n}.",
            "answer": f"A. x{n}",
            "extra": n,
        }
        for n in range(count)
    ]


def local_settings(data_files, **extra) -> dict:
    return task_settings(
        **{
            "name": "med",
            "source": "local",
            "data_files": data_files,
            "fields": FIELDS,
            "prompt_template": R1_PROMPT,
            "response_template": R1_RESPONSE,
            "num_train": 12,
            "num_test": 5,
            "seed": 4,
            **extra,
        }
    )


def run_data_stage(settings: dict, out_dir) -> tuple[list[dict], list[dict], dict]:
    train, test = out_dir / "train.jsonl", out_dir / "test.jsonl"
    data.main(["--settings", json.dumps(settings), "--train", str(train), "--test", str(test)])
    provenance = json.loads(train.with_suffix(".provenance.json").read_text())
    return read_jsonl(train), read_jsonl(test), provenance


def test_local_jsonl_dataset_with_field_mapping_and_templates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data_files are relative to the working directory
    write_jsonl(tmp_path / "med.jsonl", medical_rows(40))
    train, test, provenance = run_data_stage(local_settings("med.jsonl"), tmp_path / "out")
    assert (len(train), len(test)) == (12, 5)
    example = train[0]
    row = medical_rows(40)[example["source_index"]]
    options = row["options"] or ""  # a missing optional field renders empty
    assert example["prompt"] == f"<｜User｜>{row['question']}\n{options}<｜Assistant｜><think>\n"
    assert example["response"] == f"{row['reasoning']}\n</think>\n\n{row['answer']}"
    assert example["query"] == row["question"]
    held_out = {r["source_index"] for r in test}
    assert not held_out & {r["source_index"] for r in train}
    assert provenance["num_train"] == 12 and provenance["rows_in_split"] == 40
    again, _, _ = run_data_stage(local_settings("med.jsonl"), tmp_path / "again")
    assert again == train  # the subset is seeded
    other, _, _ = run_data_stage(local_settings("med.jsonl", seed=5), tmp_path / "other")
    assert [r["source_index"] for r in other] != [r["source_index"] for r in train]


def test_local_parquet_dataset_with_its_own_test_split(tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    pd.DataFrame(medical_rows(30)).to_parquet(tmp_path / "train.parquet")
    pd.DataFrame(medical_rows(8)).to_parquet(tmp_path / "test.parquet")
    settings = local_settings(
        {"train": "train.parquet", "test": "test.parquet"}, test_split="test", num_train=100
    )
    train, test, provenance = run_data_stage(settings, tmp_path / "out")
    assert len(train) == 30  # fewer rows than num_train: all of them
    assert len(test) == 5 and all(r["source_index"] < 8 for r in test)
    assert provenance["test_split"] == "test"


def test_default_fields_are_query_and_response(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"query": f"q{n}", "response": f"r{n}\nThe answer is: {n}"} for n in range(10)]
    rows.append({"query": "", "response": "no question"})  # skipped: empty query
    write_jsonl(tmp_path / "mm.jsonl", rows)
    settings = task_settings(
        name="mm",
        source="local",
        data_files=["mm.jsonl"],
        prompt_template="### Instruction:\n{query}\n\n### Response:\n",
        num_train=20,
        num_test=1,
        seed=0,
    )
    train, test, _ = run_data_stage(settings, tmp_path / "out")
    assert len(train) == 10 and test == []
    assert all(r["response"].startswith("r") for r in train)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"fields": {**FIELDS, "answer": "final_answer"}}, "final_answer"),
        ({"fields": {"reasoning": "reasoning"}}, "must map `query`"),
        ({"response_template": "{reasoning} {rationale}"}, "rationale"),
        ({"data_files": "missing.jsonl"}, "missing.jsonl"),
        ({"data_files": "med.txt"}, "JSONL, JSON, Parquet or CSV"),
        ({"data_files": {"train": "med.jsonl"}, "split": "validation"}, "validation"),
    ],
    ids=["unknown-column", "no-query", "unmapped-placeholder", "no-file", "kind", "no-split"],
)
def test_dataset_mistakes_name_the_key(tmp_path, monkeypatch, change, needle):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "med.jsonl", medical_rows(5))
    (tmp_path / "med.txt").write_text("x")
    with pytest.raises(SettingsError) as caught:
        data.prepare_dataset({**local_settings("med.jsonl"), **change})
    assert needle in str(caught.value) and "task." in str(caught.value)


def readme_worked_example() -> dict:
    text = (REPO / "config" / "README.md").read_text()
    match = re.search(r"```yaml\n(# worked example.*?)```", text, re.S)
    assert match, "config/README.md has no ```yaml block starting '# worked example'"
    return yaml.safe_load(match.group(1))


def test_readme_worked_example_builds(repo, tmp_path):
    """Another hub causal LM and a local dataset, by config alone: the DAG builds."""
    example = readme_worked_example()
    (repo / "my_study.yaml").write_text(yaml.safe_dump(example, sort_keys=False))
    result = run_snakemake(repo, "-n", "-p", "all", "--configfile", "my_study.yaml", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    config = merged(default_config(), example)
    stats = job_stats(result.stdout)
    stats.pop("figures")
    assert stats == expected_grid_jobs(config)
    data_line = stage_line(result.stdout, "cfs.data")
    assert '"source": "local"' in data_line and '"fields"' in data_line


# --------------------------------------------------------------------------- lm-eval options


def write_generative_task(folder, name: str = "cfs_test_gen") -> str:
    """A generate_until task whose filter extracts a digit (regex, then take_first)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "test.jsonl", [{"q": f"{n} is", "label": str(n % 2)} for n in range(4)])
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'test.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{q}}"\ndoc_to_target: "{{label}}"\n'
        "generation_kwargs:\n  until: ['\\n']\n  do_sample: false\n  max_gen_toks: 4\n"
        "filter_list:\n  - name: digit\n    filter:\n"
        "      - function: regex\n        regex_pattern: '([0-9])'\n"
        "      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return name


def test_repeats_average_each_questions_answers_into_pass_at_1(
    tiny_model_dir, tmp_path, monkeypatch
):
    """k answers per question, each extracted and scored by the task's own filter and
    metric, averaged per question, then over questions; gen_kwargs reach the requests."""
    import lm_eval.models.huggingface as hf

    name = write_generative_task(tmp_path / "tasks" / "gen")
    other = write_generative_task(tmp_path / "tasks" / "gen2", name="cfs_test_gen2")
    answers = ["x 1", "0", "1!", "zz", "0", "0", "1", "1 0", "1", "0", "0", "?", "1", "1", "0"]
    seen = []

    def fake_generate_until(self, requests, disable_tqdm=False):
        """The n-th request of the sampled task gets answers[n] (clones are consecutive)."""
        out = []
        for request in requests:
            number = sum(r.task_name == request.task_name for r in seen)
            seen.append(request)
            out.append(answers[number % len(answers)] if request.task_name == name else "0")
        return out

    monkeypatch.setattr(hf.HFLM, "generate_until", fake_generate_until)
    settings = evaluation_settings(
        include_path=str(tmp_path / "tasks"),
        target={
            "task": name,
            "metric": "exact_match,digit",
            "repeats": 3,
            "gen_kwargs": {"do_sample": True, "temperature": 0.6, "top_p": 0.95},
        },
        forgetting=[{"task": other, "metric": "exact_match,digit"}],  # greedy, 1 answer
        batch_size=4,
        dtype="float32",
        backend="hf",  # the stock model, whose generate_until is replaced above
    )
    scores, items, harness, _ = evaluate.run_lm_eval(tiny_model_dir, settings)
    sampled = [request for request in seen if request.task_name == name]
    assert len(sampled) == 4 * 3  # 4 questions x 3 answers
    assert all(request.args[1]["temperature"] == 0.6 for request in sampled)
    assert all(request.args[1]["top_p"] == 0.95 for request in sampled)
    assert len([request for request in seen if request.task_name == other]) == 4
    labels = [str(n % 2) for n in range(4)]
    expected = 0.0
    for question, label in enumerate(labels):
        extracted = [re.search(r"[0-9]", a) for a in answers[3 * question : 3 * question + 3]]
        hits = [m is not None and m.group(0) == label for m in extracted]
        expected += sum(hits) / 3 / len(labels)
    assert scores[name]["exact_match,digit"] == pytest.approx(expected)
    assert harness["backend"] == "hf"
    assert harness["tasks"][name]["repeats"] == 3
    # per question: the mean of its 3 answers' scores, as the task metric averages
    assert sum(items[name].values()) / 4 == pytest.approx(expected)
    assert set(items[name].values()) <= {0.0, 1 / 3, 2 / 3, 1.0}


def test_repeats_on_a_log_likelihood_task_is_refused(tmp_path):
    folder = tmp_path / "tasks" / "mc"
    folder.mkdir(parents=True)
    write_jsonl(folder / "test.jsonl", [{"q": "1?", "choices": ["a", "b"], "label": 0}])
    (folder / "cfs_test_mc2.yaml").write_text(
        f"task: cfs_test_mc2\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'test.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n"
    )
    manager = evaluate.local_task_manager(str(tmp_path / "tasks"), ["cfs_test_mc2"])
    with pytest.raises(SettingsError, match="not generative"):
        evaluate.configured_task(
            manager, task_entry(task="cfs_test_mc2", metric="acc,none", repeats=4)
        )
    entry = task_entry(task="cfs_test_mc2", metric="acc,none")
    assert evaluate.configured_task(manager, entry) == "cfs_test_mc2"


def test_lm_eval_backend_and_model_args(tiny_model_dir):
    backend, args = evaluate.lm_eval_model_args(
        tiny_model_dir,
        evaluation_settings(dtype="float32", model_args={"think_end_token": "</think>"}),
    )
    assert backend == "cfs-hf"  # the schema's default
    assert args == {
        "pretrained": str(tiny_model_dir),
        "dtype": "float32",
        "think_end_token": "</think>",
    }
    with pytest.raises(SettingsError, match="evaluation.backend is 'vllm'"):
        evaluate.lm_eval_model_args(tiny_model_dir, evaluation_settings(backend="vllm"))
    with pytest.raises(SettingsError, match="pretrained"):
        evaluate.lm_eval_model_args(
            tiny_model_dir, evaluation_settings(model_args={"pretrained": "x"})
        )


def test_post_eval_with_another_harness_than_the_base_eval_is_refused(tmp_path):
    settings = evaluation_settings(
        target={"task": "t", "metric": "acc,none"},
        forgetting=[{"task": "f", "metric": "acc,none"}],
        batch_size=8,
    )
    base = evaluate.lm_eval_harness_settings(settings, "hf", {"pretrained": "a", "dtype": "x"})
    same = evaluate.lm_eval_harness_settings(settings, "hf", {"pretrained": "b", "dtype": "x"})
    evaluate.check_same_harness({"lm_eval_settings": base}, same, tmp_path / "base.json")
    evaluate.check_same_harness({}, same, tmp_path / "base.json")  # written before: accepted
    other = evaluate.lm_eval_harness_settings(settings, "vllm", {"pretrained": "b", "dtype": "x"})
    with pytest.raises(SettingsError) as caught:
        evaluate.check_same_harness({"lm_eval_settings": base}, other, tmp_path / "base.json")
    assert "backend" in str(caught.value) and "'hf'" in str(caught.value)
