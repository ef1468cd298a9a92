"""The study's baselines and the two methods beyond the paper, on tiny models: L2 toward
the original weights, WiSE-FT, LoRA, contextual generation, pretraining replay, the
lambda-weighted synthetic loss and the KL-to-base regulariser."""

from __future__ import annotations

import json
import sysconfig

import pytest
import torch
from cfs import examples, generate, mix, objectives, replay, train, wiseft
from cfs.data import arithmetic_problems, render
from cfs.errors import DataError, SettingsError
from cfs.modeling import load_model, load_tokenizer
from cfs.study import SAMPLE_KINDS
from conftest import (
    TEMPLATE,
    generation_settings,
    model_weights,
    read_jsonl,
    replay_settings,
    train_settings,
    write_jsonl,
)

SETTINGS = {
    **train_settings(),
    "learning_rate": 5e-3,
    "lr_scheduler": "constant",
    "warmup_ratio": 0.0,
    "epochs": 1,
    "batch_size": 4,
    "micro_batch_size": 2,
    "max_length": 64,
    "seed": 0,
    "save_steps": 100,
    "logging_steps": 1,
}


def task_records(n=8):
    return [
        {"kind": "task", "prompt": r["prompt"], "response": r["response"]}
        for r in render(arithmetic_problems(n, seed=1), TEMPLATE)
    ]


def cf_samples(n=8):
    return [
        {
            "index": i,
            "prompt_token_id": 1,
            "token_ids": [60 + i, 70 + i, 80 + i, 90 + i],
            "finish_reason": "length",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods_data")
    return {
        "task": write_jsonl(root / "task.jsonl", task_records()),
        "samples": write_jsonl(root / "context_free.jsonl", cf_samples()),
        "root": root,
    }


def run_fine_tune(model_dir, data_files, name, method=None, synthetic=False, **overrides):
    out = data_files["root"] / name
    settings = {**SETTINGS, **overrides}
    if method is not None:
        settings["method"] = method
    summary = train.fine_tune(
        model_dir,
        data_files["task"],
        settings,
        out / "checkpoints",
        out / "model",
        synthetic=data_files["samples"] if synthetic else None,
    )
    return out / "model", summary


@pytest.fixture(scope="module")
def plain_model(tiny_model_dir, data_files):
    return run_fine_tune(tiny_model_dir, data_files, "plain")[0]


def assert_same_weights(a, b):
    wa, wb = model_weights(a), model_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def assert_weights_differ(a, b):
    wa, wb = model_weights(a), model_weights(b)
    assert any(not torch.equal(wa[name], wb[name]) for name in wa)


# --------------------------------------------------------------------------- L2


def test_l2_penalty_is_zero_at_start_and_grows_as_weights_move(tiny_model_dir):
    model = load_model(tiny_model_dir, "float32")
    penalty = objectives.L2ToInitial()
    penalty.setup(model.parameters())  # the Trainer does it on the wrapped model's
    assert penalty(model, 0, 0).item() == 0.0
    first = next(model.parameters())
    values = []
    with torch.no_grad():
        for _ in range(3):
            first.add_(0.01)
            values.append(penalty(model, 0, 0).item())
    assert 0 < values[0] < values[1] < values[2]
    # sum of squares over all parameters / n_params: one tensor moved by 0.03 everywhere
    expected = first.numel() * 0.03**2 / penalty.num_params
    assert values[2] == pytest.approx(expected, rel=1e-4)


def test_l2_with_lambda_zero_equals_plain_fine_tuning(tiny_model_dir, data_files, plain_model):
    model, summary = run_fine_tune(
        tiny_model_dir, data_files, "l2_zero", {"name": "l2", "lambda": 0.0}
    )
    assert_same_weights(model, plain_model)
    log = json.loads((model / "train_log.json").read_text())["log_history"]
    assert all(entry["l2"] >= 0 for entry in log if "loss" in entry)
    assert summary["method"] == "l2"


def test_l2_with_large_lambda_stays_closer_to_base(tiny_model_dir, data_files, plain_model):
    model, _ = run_fine_tune(tiny_model_dir, data_files, "l2_big", {"name": "l2", "lambda": 1e5})
    base = model_weights(tiny_model_dir)

    def distance(path):
        weights = model_weights(path)
        return sum(((weights[n] - base[n]) ** 2).sum().item() for n in base)

    assert distance(model) < 0.5 * distance(plain_model)


# --------------------------------------------------------------------------- WiSE-FT


def test_wiseft_ends_are_exactly_base_and_fine_tuned(tiny_model_dir, plain_model, tmp_path):
    for alpha, expected in ((0.0, tiny_model_dir), (1.0, plain_model)):
        out = tmp_path / f"alpha{alpha:g}"
        wiseft.main(
            ["--base", str(tiny_model_dir), "--finetuned", str(plain_model)]
            + ["--alpha", str(alpha), "--out", str(out)]
        )
        assert_same_weights(out, expected)
    out = tmp_path / "alpha0.5"
    wiseft.main(
        ["--base", str(tiny_model_dir), "--finetuned", str(plain_model)]
        + ["--alpha", "0.5", "--out", str(out)]
    )
    base, tuned, mid = (model_weights(p) for p in (tiny_model_dir, plain_model, out))
    for name in base:
        torch.testing.assert_close(mid[name], (base[name] + tuned[name]) / 2)
    prov = json.loads((out / "cfs_provenance.json").read_text())
    assert prov["settings"] == {"alpha": 0.5}


def test_wiseft_rejects_alpha_outside_unit_interval():
    with pytest.raises(SettingsError, match="alpha"):
        wiseft.interpolate({}, {}, 1.5)


# --------------------------------------------------------------------------- LoRA

LORA = {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.0}


def test_lora_trains_only_adapters_and_saves_a_loadable_model(tiny_model_dir, data_files):
    model = load_model(tiny_model_dir, "float32")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = train.add_lora(model, {**LORA, "target_modules": ["q_proj", "v_proj"]}, seed=0)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)

    out, summary = run_fine_tune(
        tiny_model_dir,
        data_files,
        "lora",
        {**LORA, "target_modules": ["q_proj", "v_proj"]},
    )
    merged = model_weights(out)
    base = model_weights(tiny_model_dir)
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    # merging moves only the adapted projections; everything else is the base model
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed)
    assert not any("lora" in name for name in merged)
    # in the wrapped model the base weights are frozen: only adapters can move
    frozen = {n for n, p in wrapped.named_parameters() if not p.requires_grad}
    assert len(frozen) == len(before)
    reloaded = load_model(out, "float32")
    tokenizer = load_tokenizer(out)
    ids = torch.tensor([tokenizer("2 + 2 =", add_special_tokens=False)["input_ids"]])
    assert torch.isfinite(reloaded(input_ids=ids).logits).all()
    assert summary["method"] == "lora"


# --------------------------------------------------------------------------- weighted synthetic


def test_weighted_synthetic_lambda_zero_equals_plain_and_logs_the_term(
    tiny_model_dir, data_files, plain_model
):
    method = {"name": "weighted_synthetic", "lambda": 0.0, "ratio": 1.0}
    model, summary = run_fine_tune(tiny_model_dir, data_files, "ws0", method, synthetic=True)
    assert_same_weights(model, plain_model)
    assert summary["num_synthetic_term_samples"] == 8
    log = json.loads((model / "train_log.json").read_text())["log_history"]
    terms = [entry["synthetic_nll"] for entry in log if "loss" in entry]
    assert terms and all(value > 0 for value in terms)


def test_weighted_synthetic_lambda_positive_changes_training(
    tiny_model_dir, data_files, plain_model
):
    method = {"name": "weighted_synthetic", "lambda": 1.0, "ratio": 1.0}
    model, _ = run_fine_tune(tiny_model_dir, data_files, "ws1", method, synthetic=True)
    assert_weights_differ(model, plain_model)


def test_weighted_synthetic_without_samples_is_a_settings_error(tiny_model_dir, data_files):
    method = {"name": "weighted_synthetic", "lambda": 1.0, "ratio": 1.0}
    with pytest.raises(SettingsError, match="synthetic"):
        run_fine_tune(tiny_model_dir, data_files, "ws_missing", method)


def test_synthetic_batches_depend_only_on_position():
    examples = [{"input_ids": [i], "labels": [i]} for i in range(5)]
    batches = objectives.SyntheticBatches(examples, 2, accumulation=1, seed=3, collator=None)
    first = [batches.indices(step, 0) for step in range(6)]
    again = objectives.SyntheticBatches(examples, 2, accumulation=1, seed=3, collator=None)
    assert [again.indices(step, 0) for step in reversed(range(6))] == first[::-1]
    # each cycle through the pool uses every sample once
    flat = [i for batch in first for i in batch]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))


# --------------------------------------------------------------------------- KL to base


def test_kl_term_is_zero_when_the_model_is_the_base(tiny_model_dir, tokenizer):
    base = load_model(tiny_model_dir, "float32")
    same = load_model(tiny_model_dir, "float32")
    built = examples.build_examples(
        [{**sample, "kind": "context_free"} for sample in cf_samples(4)], tokenizer, 64, "x"
    )
    batches = objectives.SyntheticBatches(built, 2, 1, 0, examples.padding_collator(tokenizer))
    term = objectives.KLToBase(batches, base_model=base)
    value, share = term(same, 0, 0)
    assert value.item() == pytest.approx(0.0, abs=1e-6) and share == 1.0
    with torch.no_grad():
        next(same.parameters()).add_(0.5)
    assert term(same, 0, 0)[0].item() > 1e-4


def test_token_kl_matches_the_definition():
    torch.manual_seed(0)
    base, model = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, 3, -100, -100]])
    value = objectives.token_kl(base, model, labels).item()
    p, q = base.log_softmax(-1), model.log_softmax(-1)
    positions = [(0, 0), (0, 1), (1, 0)]  # logits at t predict labels at t + 1
    expected = sum((p[b, t].exp() * (p[b, t] - q[b, t])).sum() for b, t in positions) / 3
    assert value == pytest.approx(expected.item(), rel=1e-5)


def test_kl_regularizer_trains_and_logs(tiny_model_dir, data_files, plain_model):
    method = {"name": "kl_to_base", "lambda": 1.0, "ratio": 0.5}
    model, summary = run_fine_tune(tiny_model_dir, data_files, "kl", method, synthetic=True)
    assert summary["num_synthetic_term_samples"] == 4
    log = json.loads((model / "train_log.json").read_text())["log_history"]
    kl = [entry["kl_to_base"] for entry in log if "loss" in entry]
    assert kl and kl[0] == pytest.approx(0.0, abs=1e-6)  # the first step starts at the base
    assert_weights_differ(model, plain_model)


# --------------------------------------------------------------------------- packing


def test_packed_and_padded_micro_batches_give_the_same_loss(tiny_model_dir, tokenizer):
    model = load_model(tiny_model_dir, "float32")
    model.config.use_cache = False
    records = task_records(3) + [{**s, "kind": "context_free"} for s in cf_samples(2)]
    built = examples.build_examples(records, tokenizer, 64, "x")
    padded = examples.training_collator(tokenizer, packing=False)(built)
    packed = examples.training_collator(tokenizer, packing=True)(built)
    assert packed["input_ids"].shape[0] == 1
    assert packed["input_ids"].shape[1] == sum(len(e["input_ids"]) for e in built)
    with torch.no_grad():
        torch.testing.assert_close(model(**packed).loss, model(**padded).loss)


# --------------------------------------------------------------------------- contextual


def test_contextual_samples_are_conditioned_on_the_task_prompts(tiny_model_dir, tmp_path):
    task = write_jsonl(tmp_path / "train.jsonl", task_records(3))
    out = tmp_path / "contextual" / "samples.jsonl"
    settings = generation_settings(num_samples=5, max_new_tokens=6, batch_size=2)
    generate.main(
        ["--model", str(tiny_model_dir), "--temperature", "1.0", "--prompts", str(task)]
        + ["--settings", json.dumps(settings), "--out", str(out)]
    )
    samples, prompts = read_jsonl(out), read_jsonl(task)
    tokenizer = load_tokenizer(tiny_model_dir)
    assert len(samples) == 5
    for index, sample in enumerate(samples):
        prompt = prompts[index % 3]["prompt"]  # prompts cycle in order
        assert sample["prompt"] == prompt
        assert (
            sample["prompt_token_ids"] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        )
        assert 1 <= len(sample["token_ids"]) <= 6
    prov = json.loads(out.with_suffix(".provenance.json").read_text())
    assert prov["stage"] == "generate_contextual" and prov["prompts"] == str(task)
    assert not out.with_name(out.name + ".partial.jsonl").exists()


def test_context_free_samples_see_only_the_prompt_token(tiny_model_dir, tmp_path):
    out = tmp_path / "cf.jsonl"
    settings = generation_settings(num_samples=3, max_new_tokens=4, batch_size=3)
    generate.main(
        ["--model", str(tiny_model_dir), "--temperature", "1.0"]
        + ["--settings", json.dumps(settings), "--out", str(out)]
    )
    for sample in read_jsonl(out):
        assert "prompt" not in sample and "prompt_token_ids" not in sample
        assert sample["prompt_token_id"] == 1


def test_contextual_training_example_masks_the_prompt(tokenizer):
    record = {"prompt_token_ids": [5, 6, 7], "token_ids": [8, 9, 2], "finish_reason": "eos"}
    example = examples.sample_example(record, SAMPLE_KINDS["contextual"], max_length=64)
    assert example["input_ids"] == [5, 6, 7, 8, 9, 2]
    assert example["labels"] == [-100, -100, -100, 8, 9, 2]


def test_mix_keeps_each_kinds_fields():
    contextual = [
        {"prompt": "p", "prompt_token_ids": [5], "token_ids": [6], "finish_reason": "eos"}
    ] * 2
    mixed = mix.mix_at_ratio(task_records(4), contextual, 0.5, seed=0, kind="contextual")
    synthetic = [r for r in mixed if r["kind"] == "contextual"]
    assert len(synthetic) == 2 and set(synthetic[0]) == {"kind", *SAMPLE_KINDS["contextual"].fields}


# --------------------------------------------------------------------------- generation resume


class Interrupted(RuntimeError):
    pass


def test_generation_resumes_from_finished_batches(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(tiny_model_dir, "float32").eval(), load_tokenizer(tiny_model_dir)
    sampler = generate.hf_sampler(model, tokenizer, temperature=1.0, top_p=1.0, max_new_tokens=5)
    prompts = [[1]] * 7
    reference = generate.sample_batches(sampler, prompts, batch_size=2, seed=4)

    calls = []

    def failing(batch, seed):
        if len(calls) == 2:
            raise Interrupted
        calls.append(seed)
        return sampler(batch, seed)

    path = tmp_path / "out.jsonl.partial.jsonl"
    with pytest.raises(Interrupted):
        generate.sample_batches(
            failing, prompts, batch_size=2, seed=4, partial=generate.PartialFile(path, "run")
        )
    resumed_calls = []

    def counting(batch, seed):
        resumed_calls.append(seed)
        return sampler(batch, seed)

    partial = generate.PartialFile(path, "run")
    assert sorted(partial.batches) == [0, 1]
    resumed = generate.sample_batches(counting, prompts, batch_size=2, seed=4, partial=partial)
    assert resumed == reference
    assert len(resumed_calls) == 2  # only batches 2 and 3 were sampled again
    # a partial file of another run is not reused
    assert generate.PartialFile(path, "other run").batches == {}


# --------------------------------------------------------------------------- replay


def test_replay_chunks_are_shaped_like_context_free_samples(tokenizer, tmp_path):
    docs = [("a", "short text"), ("b", " ".join(["word"] * 200))]
    chunks = replay.replay_chunks(iter(docs), tokenizer, 2, chunk_tokens=16, prompt_id=1)
    short, long = chunks
    assert short["finish_reason"] == "eos" and short["token_ids"][-1] == tokenizer.eos_token_id
    assert long["finish_reason"] == "length" and len(long["token_ids"]) == 16
    assert tokenizer.eos_token_id not in long["token_ids"]
    assert {c["prompt_token_id"] for c in chunks} == {1}
    with pytest.raises(DataError, match="fewer than 3"):
        replay.replay_chunks(iter(docs), tokenizer, 3, chunk_tokens=16, prompt_id=1)


def test_replay_from_the_python_standard_library(tiny_model_dir, tmp_path):
    out = tmp_path / "chunks.jsonl"
    settings = replay_settings({"python_stdlib": "*.py"}, num_chunks=6, chunk_tokens=12)
    replay.main(
        ["--model", str(tiny_model_dir), "--settings", json.dumps(settings)] + ["--out", str(out)]
    )
    chunks = read_jsonl(out)
    assert len(chunks) == 6
    stdlib = sysconfig.get_path("stdlib")
    assert all(c["source"].startswith(stdlib) and c["source"].endswith(".py") for c in chunks)
    again = tmp_path / "again.jsonl"
    replay.main(
        ["--model", str(tiny_model_dir), "--settings", json.dumps(settings)] + ["--out", str(again)]
    )
    assert read_jsonl(again) == chunks  # seeded document order
    mixed = mix.mix_at_ratio(task_records(4), chunks, 1.0, seed=0, kind="replay")
    assert sum(r["kind"] == "replay" for r in mixed) == 4


def test_replay_without_a_corpus_source_names_the_key():
    with pytest.raises(SettingsError, match="methods.replay.corpus"):
        list(replay.documents(replay_settings({})["corpus"], 0))
