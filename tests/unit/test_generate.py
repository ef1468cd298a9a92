"""cfs.generate: context-free sampling from the single prompt token, contextual sampling
from the task prompts, where samples end, seeds, the command line, and resuming from the
batches a killed run finished."""

from __future__ import annotations

import json

import pytest
from cfs import generate
from cfs.errors import SettingsError
from cfs.generate import sample_context_free
from cfs.modeling import load_model, load_tokenizer
from cfs.tokens import context_free_prompt_id
from conftest import generation_settings, read_jsonl, task_records, write_jsonl
from transformers import GenerationConfig


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir, "float32").eval(), load_tokenizer(tiny_model_dir)


def sample(model, tokenizer, **overrides):
    kwargs = dict(
        num_samples=6,
        max_new_tokens=10,
        temperature=1.0,
        top_p=1.0,
        seed=0,
        batch_size=4,
        prompt_token_id=context_free_prompt_id(tokenizer),
    )
    kwargs.update(overrides)
    return sample_context_free(model, tokenizer, **kwargs)


# --------------------------------------------------------------------------- where samples end


def test_samples_end_at_the_tokenizers_eos_only(tokenizer_no_bos, tokenizer):
    """OLMo-1B-hf's generation_config says eos_token_id 0 while its tokenizer's EOS is
    <|endoftext|> (50279): stop at the tokenizer's only. Here the OLMo-like tokenizer's EOS
    is 0 and its generation_config names 1 and 2."""
    olmo_like = GenerationConfig(eos_token_id=[1, 2])
    assert generate.eos_token_ids(olmo_like, tokenizer_no_bos) == {0}
    # a SmolLM2- / R1-like model whose generation_config agrees with its tokenizer
    assert generate.eos_token_ids(GenerationConfig(eos_token_id=2), tokenizer) == {2}
    assert generate.eos_token_ids(None, tokenizer) == {2}


# --------------------------------------------------------------------------- sampling


def check_invariants(samples, eos_ids, prompt_id, max_new_tokens):
    for position, record in enumerate(samples):
        assert record["index"] == position
        assert record["prompt_token_id"] == prompt_id
        ids = record["token_ids"]
        assert 1 <= len(ids) <= max_new_tokens, f"{len(ids)} tokens, at most {max_new_tokens}"
        # EOS appears only as the last token, and "eos" iff it is there
        inner = [token for token in ids[:-1] if token in eos_ids]
        assert inner == [], f"EOS before the end of sample {position}: {ids}"
        expected = "eos" if ids[-1] in eos_ids else "length"
        assert record["finish_reason"] == expected, f"sample {position}: {record}"
        if expected == "length":
            assert len(ids) == max_new_tokens, f"sample {position} cut early: {ids}"


def test_samples_count_and_finish_reasons(loaded):
    model, tokenizer = loaded
    samples = sample(model, tokenizer, num_samples=6, batch_size=4, max_new_tokens=10)
    assert len(samples) == 6
    check_invariants(samples, generate.eos_token_ids(model.generation_config, tokenizer), 1, 10)
    assert samples[0]["text"] == tokenizer.decode(samples[0]["token_ids"])


def test_both_finish_reasons_with_a_frequent_stop_set(loaded, monkeypatch):
    """With ~8% of the vocabulary as the stop set, some samples end early; the finish
    reason and truncation must follow the stop set. (The stop set is the tokenizer's EOS
    alone, whatever the generation config says (test_samples_end_at_the_tokenizers_eos_only);
    it is widened here only to make early ends frequent.)"""
    model, tokenizer = loaded
    stop_ids = [tokenizer.eos_token_id] + list(range(300, 340))
    monkeypatch.setattr(generate, "eos_token_ids", lambda config, tokenizer: set(stop_ids))
    eos_ids = set(stop_ids)
    samples = sample(model, tokenizer, num_samples=16, batch_size=8, max_new_tokens=12)
    reasons = {record["finish_reason"] for record in samples}
    assert reasons == {"eos", "length"}, reasons
    check_invariants(samples, eos_ids, 1, 12)
    early = [r for r in samples if r["finish_reason"] == "eos" and len(r["token_ids"]) < 12]
    assert len(early) > 0, "no sample ended at an EOS before the length limit"


def test_same_seed_same_samples_other_seed_other_samples(loaded):
    model, tokenizer = loaded
    first = sample(model, tokenizer, seed=11)
    again = sample(model, tokenizer, seed=11)
    other = sample(model, tokenizer, seed=12)
    assert [r["token_ids"] for r in first] == [r["token_ids"] for r in again], "same seed"
    assert [r["token_ids"] for r in first] != [r["token_ids"] for r in other], (
        "seeds 11 and 12 gave the same samples"
    )


def test_samples_do_not_depend_on_earlier_generation_in_the_process(loaded):
    model, tokenizer = loaded
    first = sample(model, tokenizer, seed=4)
    sample(model, tokenizer, seed=99, num_samples=3)  # disturbs the global RNG
    again = sample(model, tokenizer, seed=4)
    assert [r["token_ids"] for r in first] == [r["token_ids"] for r in again], (
        "sampling before changed the samples of seed 4"
    )


def test_temperature_changes_the_samples(loaded):
    model, tokenizer = loaded
    cold = sample(model, tokenizer, temperature=0.3)
    hot = sample(model, tokenizer, temperature=1.5)
    assert [r["token_ids"] for r in cold] != [r["token_ids"] for r in hot], (
        "temperatures 0.3 and 1.5 gave the same samples"
    )


# --------------------------------------------------------------------------- CLI


def run_cli(model_dir, out, temperature=1.0, **settings):
    base = generation_settings(num_samples=5, max_new_tokens=8, seed=2, batch_size=2)
    base.update(settings, temperature=temperature)
    generate.main(
        [
            "--model",
            str(model_dir),
            "--settings",
            json.dumps(base),
            "--out",
            str(out),
        ]
    )
    return read_jsonl(out), json.loads(out.with_suffix(".provenance.json").read_text())


def test_cli_records_prompt_id_per_line_and_in_provenance(tiny_model_dir, tmp_path):
    samples, prov = run_cli(tiny_model_dir, tmp_path / "t1" / "context_free.jsonl")
    assert len(samples) == 5
    assert {record["prompt_token_id"] for record in samples} == {1}
    assert prov["prompt_token_id"] == 1
    assert prov["prompt_token"] == "<|im_start|>"
    assert prov["temperature"] == 1.0
    assert prov["seed"] == 2
    assert prov["num_samples"] == 5
    assert prov["num_tokens"] == sum(len(r["token_ids"]) for r in samples)
    assert prov["num_finished_with_eos"] == sum(r["finish_reason"] == "eos" for r in samples)
    assert prov["packages"]["torch"], f"no torch version in {prov['packages']}"
    check_invariants(samples, {2}, 1, 8)


def test_cli_without_bos_prompts_with_end_of_document(tiny_model_no_bos_dir, tmp_path):
    samples, prov = run_cli(tiny_model_no_bos_dir, tmp_path / "olmo.jsonl")
    assert {record["prompt_token_id"] for record in samples} == {0}
    assert prov["prompt_token_id"] == 0
    assert prov["prompt_token"] == "<|endoftext|>"


def test_cli_explicit_prompt_token_id(tiny_model_dir, tmp_path):
    samples, prov = run_cli(tiny_model_dir, tmp_path / "o.jsonl", prompt_token_id=0)
    assert {record["prompt_token_id"] for record in samples} == {0}
    assert prov["prompt_token_id"] == 0


def test_cli_same_seed_same_file(tiny_model_dir, tmp_path):
    first, _ = run_cli(tiny_model_dir, tmp_path / "a.jsonl", seed=5)
    again, _ = run_cli(tiny_model_dir, tmp_path / "b.jsonl", seed=5)
    other, _ = run_cli(tiny_model_dir, tmp_path / "c.jsonl", seed=6)
    assert first == again, "the same seed wrote another file"
    assert [r["token_ids"] for r in first] != [r["token_ids"] for r in other], (
        "seeds 5 and 6 wrote the same samples"
    )


def test_cli_rejects_non_positive_temperature(tiny_model_dir, tmp_path):
    out = tmp_path / "x.jsonl"
    with pytest.raises(SettingsError, match="temperature"):
        run_cli(tiny_model_dir, out, temperature=0)
    assert not out.exists(), f"{out} written for a refused temperature"


def test_cli_missing_setting_names_it(tiny_model_dir, tmp_path):
    out = tmp_path / "x.jsonl"
    with pytest.raises(SettingsError, match="num_samples"):
        generate.main(
            [
                "--model",
                str(tiny_model_dir),
                "--settings",
                json.dumps({k: v for k, v in generation_settings().items() if k != "num_samples"}),
                "--out",
                str(out),
            ]
        )
    assert not out.exists(), f"{out} written without num_samples"


# --------------------------------------------------------------------------- contextual


def test_contextual_samples_are_conditioned_on_the_task_prompts(tiny_model_dir, tmp_path):
    task = write_jsonl(tmp_path / "train.jsonl", task_records(3, seed=1))
    out = tmp_path / "contextual" / "samples.jsonl"
    settings = generation_settings(num_samples=5, max_new_tokens=6, batch_size=2)
    generate.main(
        ["--model", str(tiny_model_dir), "--prompts", str(task)]
        + ["--settings", json.dumps(settings), "--out", str(out)]
    )
    samples, prompts = read_jsonl(out), read_jsonl(task)
    tokenizer = load_tokenizer(tiny_model_dir)
    assert len(samples) == 5
    for index, sample in enumerate(samples):
        prompt = prompts[index % 3]["prompt"]  # prompts cycle in order
        assert sample["prompt"] == prompt
        expected_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert sample["prompt_token_ids"] == expected_ids
        assert 1 <= len(sample["token_ids"]) <= 6, f"sample {index}: {sample['token_ids']}"
    prov = json.loads(out.with_suffix(".provenance.json").read_text())
    assert (prov["stage"], prov["prompts"]) == ("generate_contextual", str(task))
    assert not out.with_name(out.name + ".partial.jsonl").exists(), "partial file left"


def test_context_free_samples_see_only_the_prompt_token(tiny_model_dir, tmp_path):
    out = tmp_path / "cf.jsonl"
    settings = generation_settings(num_samples=3, max_new_tokens=4, batch_size=3)
    generate.main(
        ["--model", str(tiny_model_dir)] + ["--settings", json.dumps(settings), "--out", str(out)]
    )
    samples = read_jsonl(out)
    assert len(samples) == 3
    for sample in samples:
        assert {"prompt", "prompt_token_ids"} & set(sample) == set(), f"a prompt in {sample}"
        assert sample["prompt_token_id"] == 1


# --------------------------------------------------------------------------- resume


class Interrupted(RuntimeError):
    pass


def test_generation_resumes_from_finished_batches(loaded, tmp_path):
    model, tokenizer = loaded
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
    assert resumed == reference, "the resumed samples differ from an uninterrupted run's"
    assert len(resumed_calls) == 2, "only batches 2 and 3 are sampled again"
    # a partial file of another run is not reused
    assert generate.PartialFile(path, "other run").batches == {}
