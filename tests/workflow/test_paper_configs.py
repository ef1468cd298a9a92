"""The paper's two settings as config files (config/olmo.yaml, config/reasoning.yaml) and
the "any model, any dataset" worked example (config/examples/my_study.yaml): what they set,
full-grid dry runs offline with per-rule job counts from the grid arithmetic
(conftest.expected_jobs), the settings the stages get from them, the lm-eval task names they
use, and a training
schedule that the configured batch sizes allow for every trained cell. (What they rest
on, module by module: tests/unit, e.g. the prompt ids of OLMo-like and Llama-like
tokenizers in test_tokens.py, local datasets in test_data.py, sampled pass@1 evals in
test_evaluate.py.)"""

from __future__ import annotations

import json

import pytest
import yaml
from cfs.stage_settings import merged
from conftest import (
    LLAMA_BOS_ID,
    PAPER_CONFIGS,
    REPO,
    copy_repo,
    default_config,
    evaluation_path,
    expected_jobs,
    job_stats,
    run_snakemake,
)

ZERO_SHOT_SUITE = [
    "arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "sciq", "winogrande",
]  # fmt: skip


def paper_config(name: str) -> dict:
    return yaml.safe_load((REPO / PAPER_CONFIGS[name]).read_text())


def effective_config(name: str) -> dict:
    """The default config with the paper's config merged over it, as --configfile does."""
    return merged(default_config(), paper_config(name))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("paper_configs") / "repo")


# --------------------------------------------------------------------------- dry runs


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_full_grid_dry_run_builds_offline_with_grid_counts(repo, name):
    config = effective_config(name)
    # the target after --configfile's files, as a user may type it
    result = run_snakemake(repo, "-n", "all", "--configfile", PAPER_CONFIGS[name], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    stats = job_stats(result.stdout)
    assert stats.pop("figures") == 1
    assert stats == expected_jobs(config)
    (model,) = config["study"]["models"]
    paths = [
        f"results/{model}/temp{t:g}/seed0/context_free.jsonl"
        for t in config["study"]["temperatures"]
    ]
    paths += [
        evaluation_path(config, model, "ratio0"),
        f"results/data/{config['task']['name']}/train.jsonl",
    ]
    for path in paths:
        assert path in result.stdout, f"{path} not in the dry run"


def test_paper_grid_sizes():
    """4 temperatures x 3 non-zero ratios of context-free and of contextual data, plain
    fine-tuning, and each baseline's sweep; 4 generations, 1 base eval per setting."""
    sizes = {
        "olmo": (4, 1 + 12 + 12 + 3 + 1 + 4 + 6 + 4),
        "reasoning": (4, 1 + 12 + 12 + 1 + 4 + 2 + 1),
    }
    for name in PAPER_CONFIGS:
        expected = expected_jobs(effective_config(name))
        assert (expected["generate_context_free"], expected["fine_tune"]) == sizes[name]
        assert expected["evaluate_base"] == 1


def test_an_olmo_cell_builds_with_the_default_config(repo):
    """`snakemake results/olmo/temp0.7/ratio0.5/eval.json` from the repository root: the
    default config knows `olmo` though its `all` runs only the embedded default."""
    config = default_config()
    assert "olmo" in config["models"], f"models: {sorted(config['models'])}"
    assert "olmo" not in config["study"]["models"], config["study"]["models"]
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
        "current_eval": 1,  # the typed path: a copy of the study's evaluation
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
    expected = {
        stage_line(result.stdout, "cfs.data"): (
            '"source": "hub"',
            '"dataset": "meta-math/MetaMathQA"',
            '"num_train": 100000',
        ),
        stage_line(result.stdout, "cfs.prepare_model"): (
            "cfs.prepare_model --model olmo",
            '"hub_id": "allenai/OLMo-1B-hf"',
        ),
        stage_line(result.stdout, "cfs.generate", "/temp0.7/"): ('"backend": "auto"',),
        # a full fine-tune's (LoRA's cells train at their own rate); the dry run lists the
        # jobs in no fixed order
        stage_line(result.stdout, "cfs.train", '"name": "context_free"'): (
            '"learning_rate": 1e-05',
            '"max_length": 1024',
        ),
        stage_line(result.stdout, "cfs.evaluate"): ('"task": "gsm8k"', "flexible-extract"),
    }
    for line, texts in expected.items():
        for text in texts:
            assert text in line, f"{text} not in: {line}"


# --------------------------------------------------------------------------- the settings


def test_olmo_setting_follows_the_paper():
    config = effective_config("olmo")
    assert config["models"]["olmo"]["hub_id"] == "allenai/OLMo-1B-hf"
    assert config["study"]["temperatures"] == [0.5, 0.7, 1.0, 1.3]
    ratios = config["study"]["ratios"]
    assert (min(ratios), max(ratios)) == (0, 1.0)
    task = config["task"]
    assert (task["source"], task["dataset"]) == ("hub", "meta-math/MetaMathQA")
    assert task["fields"] == {"query": "query", "response": "response"}
    assert task["prompt_template"].startswith("### Instruction:"), task["prompt_template"]
    needed, drawn = max(ratios) * task["num_train"], config["generation"]["num_samples"]
    assert drawn >= needed, f"{drawn} samples for ratio {max(ratios)}, needs {needed}"
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
    gpus = model["resources"]["train"]["gpus"]  # declared for the Slurm profile
    assert gpus > 1, f"train.gpus {gpus}: an 8B full fine-tune is sharded over several"
    task = config["task"]
    assert task["dataset"] == "UCSC-VLAA/MedReason"
    missing = {"question", "reasoning", "answer"} - set(task["fields"].values())
    assert missing == set(), f"columns not mapped: {task['fields']}"
    assert task["prompt_template"].endswith("<｜Assistant｜><think>\n"), task["prompt_template"]
    assert "</think>" in task["response_template"], task["response_template"]
    new_tokens = config["generation"]["max_new_tokens"]
    assert new_tokens >= 4096, f"generation.max_new_tokens {new_tokens}, expected 4096 or more"
    assert config["generation"]["prompt_token_id"] is None  # the BOS, 128000
    train = config["train"]
    assert (train["learning_rate"], train["warmup_ratio"], train["weight_decay"]) == (
        5e-6,
        0.05,
        0.1,
    )
    assert (train["batch_size"], train["max_length"]) == (128, 8192)
    evaluation = config["evaluation"]
    target = evaluation["target"]  # MedQA in the trained format: chat template, thinking
    assert (target["task"], target["apply_chat_template"]) == ("medqa_4options_think", True)
    assert target["metric"] == "exact_match,boxed-flexible-extract"
    for entry in evaluation["forgetting"]:  # reasoning benchmarks, sampled, pass@1 over k
        assert entry["repeats"] > 1, f"{entry['task']}: one answer per question"
        kwargs = entry["gen_kwargs"]
        assert (kwargs["do_sample"], kwargs["temperature"], kwargs["top_p"]) == (True, 0.6, 0.95)
        assert kwargs["max_gen_toks"] >= 16384, f"{entry['task']}: {kwargs['max_gen_toks']}"
    context = evaluation["model_args"]["max_model_len"]
    longest = max(entry["gen_kwargs"]["max_gen_toks"] for entry in evaluation["forgetting"])
    assert context > longest, f"max_model_len {context} leaves no room for {longest} tokens"


def test_every_lm_eval_task_exists_in_the_pinned_harness():
    """Names only (the index of lm-eval's task YAMLs; no dataset is loaded)."""
    from lm_eval.tasks import TaskManager

    known = set(TaskManager(include_path=str(REPO / "tasks")).all_tasks)
    for name in PAPER_CONFIGS:
        evaluation = effective_config(name)["evaluation"]
        for entry in [evaluation["target"], *evaluation["forgetting"]]:
            assert entry["task"] in known, f"{PAPER_CONFIGS[name]}: no lm-eval task {entry['task']}"


def test_reasoning_prompt_template_holds_one_bos(llama_like_tokenizer):
    """Fine-tuning tokenizes prompts without adding special tokens, so the template's
    written-out BOS is the only one (no doubled BOS)."""
    template = paper_config("reasoning")["task"]["prompt_template"]
    ids = llama_like_tokenizer(
        template.format(query="Hello", options="world"), add_special_tokens=False
    )["input_ids"]
    assert (ids[0], ids.count(LLAMA_BOS_ID)) == (LLAMA_BOS_ID, 1)


def test_worked_example_builds(repo, tmp_path):
    """Another hub causal LM and a local dataset, by config alone: the DAG builds."""
    example = yaml.safe_load((REPO / "config" / "examples" / "my_study.yaml").read_text())
    (repo / "my_study.yaml").write_text(yaml.safe_dump(example, sort_keys=False))
    result = run_snakemake(repo, "-n", "-p", "all", "--configfile", "my_study.yaml", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    config = merged(default_config(), example)
    stats = job_stats(result.stdout)
    assert stats.pop("figures") == len(config["study"]["models"])
    assert stats == expected_jobs(config)
    data_line = stage_line(result.stdout, "cfs.data")
    for text in ('"source": "local"', '"fields"'):
        assert text in data_line, f"{text} not in: {data_line}"


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_every_trained_cell_has_a_schedule_the_batch_sizes_allow(name, monkeypatch):
    """What cfs.train checks before its first step, for each cell of the grid with the
    config's batch sizes and the job's processes: the equal-steps schedule (a whole number
    of steps and of samples beside each micro-batch), the accumulation steps, and the
    synthetic term's split over the processes."""
    from cfs import budget as budget_module
    from cfs.distributed import accumulation_steps
    from cfs.examples import step_schedule
    from cfs.objectives import SyntheticBatches
    from cfs.study import METHODS, Study, parse_cell

    config = budget_module.load_config(REPO / PAPER_CONFIGS[name])
    train, task = config["train"], config["task"]
    study = Study(config)
    (model,) = study.study["models"]
    num_train = task["num_train"]
    tasks = [{"kind": "task", "prompt": f"p{i}", "response": "r"} for i in range(num_train)]
    for cell in study.cells():
        knobs = parse_cell(cell)
        method = METHODS[knobs["method"]]
        if not method.trains:
            continue
        gpus = budget_module.resource(config, model, "train", "gpus", knobs["method"])
        monkeypatch.setenv("WORLD_SIZE", str(gpus))
        micro = train["micro_batch_size"]
        accumulation_steps(train["batch_size"], micro)
        samples = round(knobs.get("ratio", 0) * num_train) if method.mixes else 0
        if train["mixing"] == "equal_steps" or not samples:
            records = tasks + [{"kind": "context_free"}] * samples
            step_schedule(records, train["batch_size"], train["epochs"], 0).per_device(micro)
        if method.synthetic_term:
            per_step = round(knobs["ratio"] * train["batch_size"])
            SyntheticBatches([{}], per_step, 1, 0, list, 0, gpus)


# --------------------------------------------------------------------------- curves


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_fine_tunes_draw_no_forgetting_curves(dry_runs, name):
    """The default config's curves are not inherited: at these scales their base
    log-probabilities take tens of GB, and MedReason holds out no target problems."""
    fine_tunes = [block for rule, block in dry_runs[name] if rule == "fine_tune"]
    assert fine_tunes, f"no fine_tune job in the dry run of {PAPER_CONFIGS[name]}"
    for block in fine_tunes:
        assert '"curve_every": 0' in block, block[-1500:]


def test_curves_without_held_out_target_problems_stop_the_dag_build(tmp_path):
    """With curves on, a task that holds out no target problems is refused when the DAG is
    built, whether the prepared test set is empty or the fetched split has no row beyond
    task.num_train."""
    repo = copy_repo(tmp_path / "repo")
    (repo / "curves.yaml").write_text(yaml.safe_dump({"train": {"curve_every": 4}}))
    config = effective_config("reasoning")
    task = config["task"]
    fetch = repo / "results" / "checks" / "hub_fetch.json"
    fetch.parent.mkdir(parents=True)
    rows = {task["split"]: task["num_train"]}
    fetch.write_text(json.dumps({"task": {"dataset": task["dataset"], "rows": rows}}))
    args = ("-n", "all", "--configfile", PAPER_CONFIGS["reasoning"], "curves.yaml")
    fetched_only = run_snakemake(repo, *args, timeout=300)
    fetch.unlink()
    test_set = repo / "results" / "data" / task["name"] / "test.jsonl"
    test_set.parent.mkdir(parents=True)
    test_set.write_text("")
    prepared_empty = run_snakemake(repo, *args, timeout=300)
    for result in (fetched_only, prepared_empty):
        assert result.returncode != 0, result.stdout[-2000:]
        for key in ("train.curve_every", "task.num_train", "task.test_split"):
            assert key in result.stdout, f"{key} not in: {result.stdout[-2000:]}"
        assert "rule fine_tune" not in result.stdout


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_l2_cells_weight_the_squared_distance_itself(dry_runs, name):
    """Per parameter the squared distance is ~1e-6 after a fine-tune: the paper's lambdas
    of 1e-4 to 1e-1 bite only on the sum."""
    l2_tunes = [block for rule, block in dry_runs[name] if rule == "fine_tune" and "/l2/" in block]
    assert len(l2_tunes) == 4, f"{len(l2_tunes)} L2 fine-tunes"
    for block in l2_tunes:
        assert '"reduction": "sum"' in block, block[-1500:]


def test_gpu_stages_are_told_the_gpus_they_were_given(dry_runs):
    """The stage stops at start where torch sees none of them (cfs.cli.require_gpus)."""
    expected = {"generate_context_free": 1, "evaluate_base": 1, "evaluate_finetuned": 1}
    for rule, block in dry_runs["reasoning"]:
        if rule == "fine_tune":
            gpus = 1 if "/lora/" in block else 8
        elif rule in expected:
            gpus = expected[rule]
        else:
            continue
        assert f"--gpus {gpus} " in block, block[-1500:]


def test_model_stages_take_their_threads_from_the_cpus_per_task(repo):
    """config/config.yaml's one thread per job is for a laptop: a cluster job uses the CPUs
    its model's resources give it."""
    result = run_snakemake(
        repo, "-n", "-p", "all", "--cores", "64", "--configfile", PAPER_CONFIGS["reasoning"]
    )
    assert result.returncode == 0, result.stdout[-3000:]
    lines = {
        "full fine-tune": stage_line(result.stdout, "cfs.train", "/temp1/"),
        "LoRA": stage_line(result.stdout, "cfs.train", "/lora/"),
        "generation": stage_line(result.stdout, "cfs.generate"),
        "evaluation": stage_line(result.stdout, "cfs.evaluate"),
    }
    threads = {"full fine-tune": 32, "LoRA": 8, "generation": 8, "evaluation": 8}
    for job, line in lines.items():
        assert f"--threads {threads[job]} " in line, f"{job}: {line[-300:]}"
