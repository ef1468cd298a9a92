"""cfs.lm_eval_model (`cfs-hf`) against lm-eval's stock HF model on a tiny random model:
the same log-likelihoods (within 1e-5) and greedy flags for multiple-choice and whole-
sequence requests, the same greedy generations, with and without shared contexts, at
batch sizes 1 and many; and fewer positions computed for it."""

from __future__ import annotations

import pytest
from cfs.lm_eval_model import PositionCounter, SharedPrefixHFLM
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

LOGLIKELIHOOD_ATOL = 1e-5
QUESTIONS = [
    "The capital of France is",
    "A dog says",
    "Question: 2 + 3 = ? Answer:",
    "yes",
]
CHOICES = [" Paris", " woof woof", " 5", " no no no no", " A", " True False"]


def model(cls, model_dir, batch_size):
    return cls(pretrained=str(model_dir), batch_size=batch_size, device="cpu", dtype="float32")


def instances(kind, arguments):
    return [
        Instance(request_type=kind, doc={}, arguments=args, idx=index)
        for index, args in enumerate(arguments)
    ]


def multiple_choice():
    """Every question with every choice: contexts shared by several requests."""
    return [(question, choice) for question in QUESTIONS for choice in CHOICES]


def unshared():
    """One request per context, of different lengths."""
    return [(question, choice) for question, choice in zip(QUESTIONS, CHOICES, strict=False)]


def assert_same_loglikelihoods(stock, ours):
    assert len(ours) == len(stock), f"{len(ours)} answers to {len(stock)} requests"
    for number, ((stock_ll, stock_greedy), (our_ll, our_greedy)) in enumerate(
        zip(stock, ours, strict=True)
    ):
        assert abs(stock_ll - our_ll) <= LOGLIKELIHOOD_ATOL, (
            f"request {number}: {our_ll} vs {stock_ll}"
        )
        assert our_greedy == stock_greedy, (
            f"request {number}: greedy {our_greedy} vs {stock_greedy}"
        )


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    return {
        (cls, batch): model(cls, tiny_model_dir, batch)
        for cls in (HFLM, SharedPrefixHFLM)
        for batch in (1, 16)
    }


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("requests", [multiple_choice, unshared])
def test_loglikelihoods_are_the_stock_models(models, batch, requests):
    stock = models[(HFLM, batch)].loglikelihood(instances("loglikelihood", requests()))
    ours = models[(SharedPrefixHFLM, batch)].loglikelihood(instances("loglikelihood", requests()))
    assert_same_loglikelihoods(stock, ours)


@pytest.mark.parametrize("batch", [1, 16])
def test_whole_sequence_loglikelihoods_are_the_stock_models(models, batch):
    texts = [(" ".join(QUESTIONS[: n + 1]) * 3,) for n in range(len(QUESTIONS))]
    stock = models[(HFLM, batch)].loglikelihood_rolling(instances("loglikelihood_rolling", texts))
    ours = models[(SharedPrefixHFLM, batch)].loglikelihood_rolling(
        instances("loglikelihood_rolling", texts)
    )
    assert stock == pytest.approx(ours, abs=LOGLIKELIHOOD_ATOL)


GENERATION = {"until": ["\n\n", "###"], "do_sample": False, "max_gen_toks": 12}


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize(
    "gen_kwargs",
    [GENERATION, {**GENERATION, "until": [" the", "e"]}, {**GENERATION, "max_gen_toks": 3}],
    ids=["default", "early-stops", "short"],
)
@pytest.mark.parametrize("template", ["{}", "### Instruction:\n{}\n\n### Response:\n"])
def test_greedy_generations_are_the_stock_models(models, batch, gen_kwargs, template):
    """With and without a beginning that every prompt shares (computed once)."""
    prompts = [(template.format(question), dict(gen_kwargs)) for question in QUESTIONS * 2]
    stock = models[(HFLM, batch)].generate_until(instances("generate_until", prompts))
    ours = models[(SharedPrefixHFLM, batch)].generate_until(
        instances("generate_until", [(p, dict(g)) for p, g in prompts])
    )
    assert ours == stock
    assert any(text for text in ours), "every generation is empty: the test shows nothing"


def test_sampled_generation_goes_to_the_stock_path(models, monkeypatch):
    ours = models[(SharedPrefixHFLM, 16)]
    called = []
    monkeypatch.setattr(HFLM, "generate_until", lambda self, requests, *a: called.append(1) or [])
    ours.generate_until(instances("generate_until", [("x", {"do_sample": True})]))
    assert called == [1]


def test_a_shared_prompt_beginning_is_computed_once(models):
    template = "### Instruction:\n{}\n\n### Response:\n"
    prompts = [(template.format(q), dict(GENERATION)) for q in QUESTIONS]
    counts = {}
    for cls in (HFLM, SharedPrefixHFLM):
        counter = PositionCounter(models[(cls, 16)].model)
        models[(cls, 16)].generate_until(instances("generate_until", prompts))
        counts[cls] = counter.remove()
    shared = len(models[(HFLM, 16)].tok_encode("### Instruction:\n"))
    saved = counts[HFLM]["layer_positions"] - counts[SharedPrefixHFLM]["layer_positions"]
    assert saved >= (len(QUESTIONS) - 1) * (shared - 1), counts


def test_shared_contexts_compute_fewer_positions(models):
    counts = {}
    for cls in (HFLM, SharedPrefixHFLM):
        lm = models[(cls, 16)]
        counter = PositionCounter(lm.model)
        lm.loglikelihood(instances("loglikelihood", multiple_choice()))
        counts[cls] = counter.remove()
    stock, ours = counts[HFLM], counts[SharedPrefixHFLM]
    assert ours["layer_positions"] < stock["layer_positions"] * 0.75, counts
    assert ours["head_positions"] < stock["head_positions"] * 0.5, counts
