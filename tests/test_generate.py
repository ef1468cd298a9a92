"""cfs.generate: context-free sampling from the single prompt token."""

from __future__ import annotations

import json

import pytest
from cfs import generate
from cfs.errors import SettingsError
from cfs.generate import sample_context_free
from cfs.modeling import load_model, load_tokenizer
from cfs.tokens import context_free_prompt_id, split_at_eos
from conftest import generation_settings, read_jsonl


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


# --------------------------------------------------------------------------- prompt id


def test_prompt_id_is_bos_when_the_tokenizer_has_one(tokenizer):
    assert context_free_prompt_id(tokenizer) == tokenizer.bos_token_id == 1


def test_prompt_id_is_end_of_document_without_bos(tokenizer_no_bos):
    prompt_id = context_free_prompt_id(tokenizer_no_bos)
    assert prompt_id == tokenizer_no_bos.eos_token_id
    assert tokenizer_no_bos.convert_ids_to_tokens(prompt_id) == "<|endoftext|>"


def test_prompt_id_override_wins(tokenizer, tokenizer_no_bos):
    assert context_free_prompt_id(tokenizer, override=7) == 7
    assert context_free_prompt_id(tokenizer_no_bos, override=0) == 0
    assert context_free_prompt_id(tokenizer, override=None) == 1


def test_prompt_id_without_bos_or_eos_is_a_settings_error():
    class Bare:
        bos_token_id = None
        eos_token_id = None

    with pytest.raises(SettingsError, match="prompt_token_id"):
        context_free_prompt_id(Bare())


# --------------------------------------------------------------------------- split_at_eos


def test_split_at_eos_keeps_up_to_first_eos():
    assert split_at_eos([5, 6, 2, 7, 2], {2}) == ([5, 6, 2], "eos")
    assert split_at_eos([5, 6, 7], {2}) == ([5, 6, 7], "length")
    assert split_at_eos([9, 3, 8], {2, 3}) == ([9, 3], "eos")


# --------------------------------------------------------------------------- sampling


def check_invariants(samples, eos_ids, prompt_id, max_new_tokens):
    for position, record in enumerate(samples):
        assert record["index"] == position
        assert record["prompt_token_id"] == prompt_id
        ids = record["token_ids"]
        assert 1 <= len(ids) <= max_new_tokens
        # EOS appears only as the last token, and "eos" iff it is there
        assert not any(token in eos_ids for token in ids[:-1])
        assert (record["finish_reason"] == "eos") == (ids[-1] in eos_ids)
        if record["finish_reason"] == "length":
            assert len(ids) == max_new_tokens
        else:
            assert record["finish_reason"] == "eos"


def test_samples_count_and_finish_reasons(loaded):
    model, tokenizer = loaded
    samples = sample(model, tokenizer, num_samples=6, batch_size=4, max_new_tokens=10)
    assert len(samples) == 6
    check_invariants(samples, generate.eos_token_ids(model.generation_config, tokenizer), 1, 10)
    assert samples[0]["text"] == tokenizer.decode(samples[0]["token_ids"])


def test_both_finish_reasons_with_a_frequent_stop_set(loaded, monkeypatch):
    """With ~8% of the vocabulary as the stop set, some samples end early; the finish
    reason and truncation must follow the stop set. (The stop set is the tokenizer's EOS
    alone, whatever the generation config says (test_eos_and_packages.py); it is
    widened here only to make early ends frequent.)"""
    model, tokenizer = loaded
    stop_ids = [tokenizer.eos_token_id] + list(range(300, 340))
    monkeypatch.setattr(generate, "eos_token_ids", lambda config, tokenizer: set(stop_ids))
    eos_ids = set(stop_ids)
    samples = sample(model, tokenizer, num_samples=16, batch_size=8, max_new_tokens=12)
    reasons = {record["finish_reason"] for record in samples}
    assert reasons == {"eos", "length"}, reasons
    check_invariants(samples, eos_ids, 1, 12)
    assert any(len(r["token_ids"]) < 12 for r in samples if r["finish_reason"] == "eos")


def test_same_seed_same_samples_other_seed_other_samples(loaded):
    model, tokenizer = loaded
    first = sample(model, tokenizer, seed=11)
    again = sample(model, tokenizer, seed=11)
    other = sample(model, tokenizer, seed=12)
    assert [r["token_ids"] for r in first] == [r["token_ids"] for r in again]
    assert [r["token_ids"] for r in first] != [r["token_ids"] for r in other]


def test_samples_do_not_depend_on_earlier_generation_in_the_process(loaded):
    model, tokenizer = loaded
    first = sample(model, tokenizer, seed=4)
    sample(model, tokenizer, seed=99, num_samples=3)  # disturbs the global RNG
    again = sample(model, tokenizer, seed=4)
    assert [r["token_ids"] for r in first] == [r["token_ids"] for r in again]


def test_temperature_changes_the_samples(loaded):
    model, tokenizer = loaded
    cold = sample(model, tokenizer, temperature=0.3)
    hot = sample(model, tokenizer, temperature=1.5)
    assert [r["token_ids"] for r in cold] != [r["token_ids"] for r in hot]


# --------------------------------------------------------------------------- CLI


def run_cli(model_dir, out, temperature="1.0", **settings):
    base = generation_settings(num_samples=5, max_new_tokens=8, seed=2, batch_size=2)
    base.update(settings)
    generate.main(
        [
            "--model",
            str(model_dir),
            "--temperature",
            temperature,
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
    assert prov["packages"]["torch"]
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
    assert first == again
    assert [r["token_ids"] for r in first] != [r["token_ids"] for r in other]


def test_cli_rejects_non_positive_temperature(tiny_model_dir, tmp_path):
    out = tmp_path / "x.jsonl"
    with pytest.raises(SettingsError, match="temperature"):
        run_cli(tiny_model_dir, out, temperature="0")
    assert not out.exists()


def test_cli_missing_setting_names_it(tiny_model_dir, tmp_path):
    out = tmp_path / "x.jsonl"
    with pytest.raises(SettingsError, match="num_samples"):
        generate.main(
            [
                "--model",
                str(tiny_model_dir),
                "--temperature",
                "1",
                "--settings",
                json.dumps({k: v for k, v in generation_settings().items() if k != "num_samples"}),
                "--out",
                str(out),
            ]
        )
    assert not out.exists()
