"""cfs.objectives: the regularising terms of the study's methods beside the task loss (L2
toward the original weights, the lambda-weighted synthetic NLL, the KL to the base model),
their values on their own and in fine-tunes on a tiny model (cfs.train.fine_tune), the
token KL computed in chunks (the unchunked value and gradient, with or without gradient,
and no float32 log-probabilities kept for the backward pass), and the synthetic samples
each optimizer step draws, in one process or split over several; the registry of
objectives the method table names, and a method with a loss term of its own."""

from __future__ import annotations

import logging

import pytest
import torch
from cfs import budget, examples, objectives, stage_settings, study
from cfs.errors import SettingsError
from cfs.modeling import load_model
from cfs.objectives import SyntheticBatches
from cfs.tokens import IGNORE_INDEX
from conftest import (
    TOY_METHOD,
    TOY_OBJECTIVE,
    assert_same_weights,
    assert_weights_differ,
    context_free_samples,
    fine_tune_into,
    model_weights,
    quick_train_settings,
    task_records,
    train_log,
    write_jsonl,
)

SETTINGS = quick_train_settings(save_steps=100)
SAMPLE_TOKENS = (60, 70, 80, 90)  # context-free samples of 4 tokens


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectives_data")
    return {
        "task": write_jsonl(root / "task.jsonl", task_records(8, seed=1)),
        "samples": write_jsonl(
            root / "context_free.jsonl", context_free_samples(8, SAMPLE_TOKENS, kind=False)
        ),
        "root": root,
    }


def run_fine_tune(model_dir, data_files, name, method=None, synthetic=False):
    settings = dict(SETTINGS)
    if method is not None:
        settings["method"] = method
    return fine_tune_into(
        data_files["root"] / name,
        model_dir,
        data_files["task"],
        settings,
        synthetic=data_files["samples"] if synthetic else None,
    )


def logged(model_dir, term: str) -> list[float]:
    """The term's value at each logged step of the fine-tune."""
    return [entry[term] for entry in train_log(model_dir)["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def plain_model(tiny_model_dir, data_files):
    return run_fine_tune(tiny_model_dir, data_files, "plain")[0]


# --------------------------------------------------------------------------- L2


def test_l2_penalty_is_zero_at_start_and_grows_as_weights_move(tiny_model_dir):
    model = load_model(tiny_model_dir, "float32")
    penalty = objectives.L2ToInitial("mean")
    penalty.setup(model.parameters())  # the Trainer does it on the wrapped model's
    assert penalty(model, 0, 0).item() == 0.0
    first = next(model.parameters())
    values = []
    with torch.no_grad():
        for _ in range(3):
            first.add_(0.01)
            values.append(penalty(model, 0, 0).item())
    assert 0 < values[0] < values[1] < values[2], f"penalties {values}, expected growing"
    # sum of squares over all parameters / n_params: one tensor moved by 0.03 everywhere
    expected = first.numel() * 0.03**2 / penalty.num_params
    assert values[2] == pytest.approx(expected, rel=1e-4)


def test_l2_sum_reduction_is_the_squared_distance(tiny_model_dir):
    model = load_model(tiny_model_dir, "float32")
    penalty = objectives.L2ToInitial("sum")
    penalty.setup(model.parameters())
    first = next(model.parameters())
    with torch.no_grad():
        first.add_(0.03)
    assert penalty(model, 0, 0).item() == pytest.approx(first.numel() * 0.03**2, rel=1e-4)


def test_a_negligible_l2_term_is_warned_about_and_flagged(tiny_model_dir, data_files, caplog):
    """A term below 1e-3 of the loss changes nothing: the fine-tune says so in its log and
    its summary; a term that bites is logged beside the loss and not flagged."""
    tiny = {"name": "l2", "lambda": 1e-3, "reduction": "mean"}
    with caplog.at_level(logging.WARNING, logger="cfs.trainer"):
        model, summary = run_fine_tune(tiny_model_dir, data_files, "l2_tiny", tiny)
    assert summary["regularizer"]["negligible"] is True, summary["regularizer"]
    assert summary["regularizer"]["largest_share_of_loss"] < 1e-3
    assert train_log(model)["summary"]["regularizer"]["negligible"] is True
    assert "stayed below 0.001 of the loss" in caplog.text, caplog.text
    caplog.clear()
    biting = {"name": "l2", "lambda": 1.0, "reduction": "sum"}
    with caplog.at_level(logging.WARNING, logger="cfs.trainer"):
        model, summary = run_fine_tune(tiny_model_dir, data_files, "l2_sum", biting)
    assert summary["regularizer"]["negligible"] is False, summary["regularizer"]
    assert "stayed below" not in caplog.text
    entries = [entry for entry in train_log(model)["log_history"] if "loss" in entry]
    last = entries[-1]
    assert last["l2_weighted"] == pytest.approx(last["l2"])  # lambda 1
    assert last["l2_share"] == pytest.approx(last["l2_weighted"] / last["loss"])
    assert last["l2_share"] >= 1e-3, entries


def test_a_fine_tune_shorter_than_its_logging_interval_still_weighs_its_term(
    tiny_model_dir, data_files
):
    """No step is logged when the run is shorter than train.logging_steps: the term's share
    is logged against the run's mean loss at the end, so a no-op is still flagged."""
    settings = {**SETTINGS, "logging_steps": 10_000}
    tiny = {"name": "l2", "lambda": 1e-3, "reduction": "mean"}
    folder = data_files["root"] / "l2_unlogged"
    model, summary = fine_tune_into(
        folder, tiny_model_dir, data_files["task"], {**settings, "method": tiny}
    )
    assert summary["regularizer"]["largest_share_of_loss"] is not None, summary
    assert summary["regularizer"]["negligible"] is True, summary["regularizer"]
    final = train_log(model)["log_history"][-1]
    assert final["l2_share"] == pytest.approx(final["l2_weighted"] / final["train_loss"])


def test_l2_with_lambda_zero_equals_plain_fine_tuning(tiny_model_dir, data_files, plain_model):
    method = {"name": "l2", "lambda": 0.0, "reduction": "mean"}
    model, summary = run_fine_tune(tiny_model_dir, data_files, "l2_zero", method)
    assert_same_weights(plain_model, model)
    terms = logged(model, "l2")
    assert len(terms) == 2 and min(terms) >= 0, f"logged L2 terms {terms}, expected 2, >= 0"
    assert summary["method"] == "l2"


def test_l2_with_large_lambda_stays_closer_to_base(tiny_model_dir, data_files, plain_model):
    model, _ = run_fine_tune(
        tiny_model_dir, data_files, "l2_big", {"name": "l2", "lambda": 1e5, "reduction": "mean"}
    )
    base = model_weights(tiny_model_dir)

    def distance(path):
        weights = model_weights(path)
        return sum(((weights[n] - base[n]) ** 2).sum().item() for n in base)

    regularised, plain = distance(model), distance(plain_model)
    assert regularised < 0.5 * plain, f"squared distance to base {regularised} vs plain {plain}"


# --------------------------------------------------------------------------- weighted synthetic


def test_weighted_synthetic_lambda_zero_equals_plain_and_logs_the_term(
    tiny_model_dir, data_files, plain_model
):
    method = {"name": "weighted_synthetic", "lambda": 0.0, "ratio": 1.0}
    model, summary = run_fine_tune(tiny_model_dir, data_files, "ws0", method, synthetic=True)
    assert_same_weights(plain_model, model)
    assert summary["num_synthetic_term_samples"] == 8
    terms = logged(model, "synthetic_nll")
    assert len(terms) == 2 and min(terms) > 0, f"logged terms {terms}, expected 2, positive"


def test_weighted_synthetic_lambda_positive_changes_training(
    tiny_model_dir, data_files, plain_model
):
    method = {"name": "weighted_synthetic", "lambda": 1.0, "ratio": 1.0}
    model, _ = run_fine_tune(tiny_model_dir, data_files, "ws1", method, synthetic=True)
    assert_weights_differ(plain_model, model)


def test_weighted_synthetic_without_samples_is_a_settings_error(tiny_model_dir, data_files):
    method = {"name": "weighted_synthetic", "lambda": 1.0, "ratio": 1.0}
    with pytest.raises(SettingsError, match="synthetic"):
        run_fine_tune(tiny_model_dir, data_files, "ws_missing", method)


# --------------------------------------------------------------------------- KL to base


def test_kl_term_is_zero_when_the_model_is_the_base(tiny_model_dir, tokenizer):
    base = load_model(tiny_model_dir, "float32")
    same = load_model(tiny_model_dir, "float32")
    built = examples.build_examples(context_free_samples(4, SAMPLE_TOKENS), tokenizer, 64, "x")
    batches = SyntheticBatches(built, 2, 1, 0, examples.padding_collator(tokenizer))
    term = objectives.KLToBase(batches, base_model=base)
    value, share = term(same, 0, 0)
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    assert share == 1.0
    with torch.no_grad():
        next(same.parameters()).add_(0.5)
    moved = term(same, 0, 0)[0].item()
    assert moved > 1e-4, f"KL {moved} after moving a weight, expected above 1e-4"


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_kl_term_base_computes_in_the_training_precision(tiny_model_dir, tokenizer, precision):
    """accelerate autocasts only the model that trains; the frozen base follows it."""
    base = load_model(tiny_model_dir, "float32")
    built = examples.build_examples(context_free_samples(4, SAMPLE_TOKENS), tokenizer, 64, "x")
    batches = SyntheticBatches(built, 2, 1, 0, examples.padding_collator(tokenizer))
    term = objectives.KLToBase(batches, base_model=base, precision=precision)
    seen = []
    base.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    term(load_model(tiny_model_dir, "float32"), 0, 0)
    assert seen == [getattr(torch, precision)]


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
    kl = logged(model, "kl_to_base")
    assert len(kl) == 2, f"logged KL terms {kl}, expected one per step"
    assert kl[0] == pytest.approx(0.0, abs=1e-6)  # the first step starts at the base
    assert_weights_differ(plain_model, model)


def kl_inputs(positions: int, vocab: int = 512, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(2, positions, vocab, generator=generator)
    model = torch.randn(2, positions, vocab, generator=generator, requires_grad=True)
    labels = torch.randint(0, vocab, (2, positions), generator=generator)
    labels[0, : positions // 4] = IGNORE_INDEX  # prompt positions carry no loss
    return base, model, labels


def unchunked_kl(base, model, labels):
    """KL(base || model) over the trained positions in one piece, as autograd sees it."""
    import torch.nn.functional as F

    mask = labels[:, 1:] != IGNORE_INDEX
    target = F.log_softmax(base[:, :-1][mask].float(), dim=-1)
    current = F.log_softmax(model[:, :-1][mask].float(), dim=-1)
    return F.kl_div(current, target, log_target=True, reduction="sum") / mask.sum()


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunked_kl_has_the_unchunked_value_and_gradient(chunk):
    base, model, labels = kl_inputs(300)
    expected = unchunked_kl(base, model, labels)
    (expected_grad,) = torch.autograd.grad(expected, model)
    value = objectives.token_kl(base, model, labels, chunk=chunk)
    (grad,) = torch.autograd.grad(value, model)
    torch.testing.assert_close(value, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)


def saved_bytes(positions: int, chunk: int) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of token_kl (distinct
    storages), beyond the logits given to it."""
    base, model, labels = kl_inputs(positions)
    given = {base.untyped_storage().data_ptr(), model.untyped_storage().data_ptr()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in given:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        objectives.token_kl(base, model, labels, chunk=chunk)
    return sum(kept.values())


def test_kl_keeps_no_float32_log_probabilities_for_the_backward():
    """Chunks alone bound the forward pass only: every chunk's float32 log-softmax (and
    the base's) would stay saved until the backward, 8 bytes x positions x vocabulary in
    all. With each chunk recomputed in the backward pass, what is kept besides the logits
    does not grow with the chunks, and stays under one chunk's float32 log-probabilities."""
    vocab, chunk = 512, 64
    one_chunk = chunk * vocab * 4
    small, large = saved_bytes(256, chunk), saved_bytes(2048, chunk)
    assert large < one_chunk, (small, large, one_chunk)
    assert large - small < 2048 * 2 * 8, "kept memory grows with the number of chunks"


def test_kl_without_gradient_computes_the_same_value():
    base, model, labels = kl_inputs(100)
    with torch.no_grad():
        value = objectives.token_kl(base, model, labels, chunk=16)
    torch.testing.assert_close(value, unchunked_kl(base, model, labels).detach(), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- synthetic batches


def test_synthetic_batches_depend_only_on_position():
    pool = [{"input_ids": [i], "labels": [i]} for i in range(5)]
    batches = SyntheticBatches(pool, 2, accumulation=1, seed=3, collator=None)
    first = [batches.indices(step, 0) for step in range(6)]
    again = SyntheticBatches(pool, 2, accumulation=1, seed=3, collator=None)
    backwards = [again.indices(step, 0) for step in reversed(range(6))]
    assert backwards == first[::-1], "the samples of a step depend on the steps drawn before"
    # each cycle through the pool uses every sample once
    flat = [i for batch in first for i in batch]
    assert (sorted(flat[:5]), sorted(flat[5:10])) == (list(range(5)), list(range(5)))


@pytest.mark.parametrize(
    "per_step, world, accumulation", [(2, 2, 2), (64, 8, 16), (6, 3, 4), (4, 1, 8), (8, 2, 1)]
)
def test_synthetic_batches_split_the_global_batch_disjointly(per_step, world, accumulation):
    pool = [{"id": i} for i in range(1000)]
    for step in range(3):
        drawn_by_rank = []
        for rank in range(world):
            batches = SyntheticBatches(pool, per_step, accumulation, 0, list, rank, world)
            indices = [i for m in range(accumulation) for i in batches.indices(step, m)]
            assert sum(batches.share(step, m) for m in range(accumulation)) == pytest.approx(1)
            drawn_by_rank.append(indices)
        everything = [i for indices in drawn_by_rank for i in indices]
        assert len(everything) == per_step, "the ratio holds for the global batch"
        assert len(set(everything)) == per_step, "processes draw disjoint samples"
        # every process has samples in the same micro-steps (no lone forward under FSDP)
        for m in range(accumulation):
            counts = {
                len(
                    SyntheticBatches(pool, per_step, accumulation, 0, list, r, world).indices(
                        step, m
                    )
                )
                for r in range(world)
            }
            assert len(counts) == 1, f"step {step}, micro-step {m}: processes draw {counts}"


def test_synthetic_ratio_below_one_sample_per_micro_batch():
    """Ratio 0.5 with micro-batch 1 (the reasoning config): 64 samples per step of 128,
    not one per micro-batch (128)."""
    batches = SyntheticBatches([{"id": i} for i in range(500)], 64, 16, 0, list, 0, 8)
    per_process = [len(batches.indices(0, m)) for m in range(16)]
    assert (sum(per_process), set(per_process)) == (8, {0, 1})


def test_synthetic_batches_refuse_an_uneven_split():
    with pytest.raises(ValueError, match="evenly over 3 processes"):
        SyntheticBatches([{"id": 0}], 4, 1, 0, list, 0, 3)


# --------------------------------------------------------------------------- the registry


def test_every_method_that_trains_names_a_registered_objective():
    trained = {spec.trains for spec in study.METHODS.values() if spec.trains}
    assert trained <= set(objectives.OBJECTIVES), trained - set(objectives.OBJECTIVES)


def test_an_unknown_objective_is_a_settings_error():
    with pytest.raises(SettingsError, match="not one of"):
        objectives.objective_for("no_such_objective")


@pytest.fixture
def toy_method(monkeypatch):
    """The toy method of the end-to-end test, a Method with a loss of its own: its line of
    the method table and its objective, in a copy of the registry."""
    monkeypatch.setattr(objectives, "OBJECTIVES", dict(objectives.OBJECTIVES))
    monkeypatch.setattr(study, "METHODS", dict(study.METHODS))
    exec(TOY_METHOD, vars(study))  # the line a user adds to cfs.study
    exec(TOY_OBJECTIVE, dict(vars(objectives)))  # registers its objective
    # cfs.train reads the table it imported
    monkeypatch.setattr("cfs.train.METHODS", study.METHODS)
    return study.METHODS["toy"]


def test_a_method_with_a_loss_of_its_own_trains_and_logs_its_term(
    tiny_model_dir, data_files, plain_model, toy_method
):
    method = {"name": "toy", "lambda": 1.0, "ratio": 1.0}
    model, summary = run_fine_tune(tiny_model_dir, data_files, "toy", method, synthetic=True)
    terms = logged(model, "toy_loss")
    assert len(terms) == 2 and min(terms) > 0, f"logged terms {terms}, expected 2, positive"
    assert summary["objective"] == "toy_loss"
    assert summary["regularizer"]["name"] == "toy_loss"
    assert summary["synthetic_term"]["steps"] == 2  # what the inherited term drew
    assert_weights_differ(plain_model, model)


def test_the_budget_prices_a_method_with_a_loss_of_its_own(toy_method):
    config = stage_settings.load_config(stage_settings.REPO / "config" / "reasoning.yaml")
    model = study.Study(config).study["models"][0]
    spec = budget.ASSUMPTIONS[config["models"][model]["hub_id"]]
    toy = budget.train_job(config, model, "toy/temp1/ratio0.5/lambda1", 0, spec, budget.Hardware())
    weighted = budget.train_job(
        config, model, "cf_weighted/temp1/ratio0.5/lambda1", 0, spec, budget.Hardware()
    )
    assert toy.tokens == weighted.tokens and toy.hours == weighted.hours
