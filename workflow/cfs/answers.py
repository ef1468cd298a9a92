"""Answers of a reasoning model that never finished thinking.

With `think_end_token` in `evaluation.model_args`, lm-eval scores only the text after the
last think-end token (lm_eval.models.utils.postprocess_generated_text). An answer cut at
the token limit before that token has no such text, and lm-eval then scores the whole
thinking, whose drafts and restatements of the options a lenient filter (GPQA's
flexible-extract) can read as an answer. Here such an answer is scored as no answer (an
empty string, which every extraction filter turns into its fallback) and marked, so each
eval.json counts them per task (`cut_answers`).
"""

from __future__ import annotations

import contextlib
import sys


class CutAnswer(str):
    """An answer cut before the think-end token: empty, and recognisable as cut (it keeps
    its class through lm-eval's request cache, which pickles answers)."""


def marks_cut_answers(think_end_token) -> bool:
    """Whether answers without `think_end_token` are marked: for a token given as text. A
    token id (an integer, or digits, which lm-eval's hf backend reads as one) leaves the
    answers as lm-eval makes them."""
    if not isinstance(think_end_token, str):
        return False
    return bool(think_end_token) and not think_end_token.isdigit()


@contextlib.contextmanager
def cut_answers_marked(think_end_token):
    """While active, lm-eval's backends (vllm, hf, cfs-hf) turn an answer without
    `think_end_token` into CutAnswer("")."""
    if not marks_cut_answers(think_end_token):
        yield
        return
    from lm_eval.models import utils

    original = utils.postprocess_generated_text

    def postprocess_generated_text(generation, stop, think_end_token):
        if think_end_token and think_end_token not in generation:
            return CutAnswer("")
        return original(generation, stop, think_end_token)

    # the backends import the function by name: replace it where each of them holds it
    # (read from each module's own namespace: getattr would make lazy modules, such as
    # transformers', import their submodules and what those need)
    holders = [
        module
        for module in list(sys.modules.values())
        if getattr(module, "__dict__", {}).get("postprocess_generated_text") is original
    ]
    for module in holders:
        module.postprocess_generated_text = postprocess_generated_text
    try:
        yield
    finally:
        for module in holders:
            module.postprocess_generated_text = original


def count_cut_answers(samples: dict[str, list[dict]], filters: dict[str, str]) -> dict:
    """{task: {"answers": n, "cut": m}} from lm-eval's logged samples (each task's answers
    counted once, in the samples of the filter `filters[task]`), for generative tasks."""
    counts = {}
    for task, logged in samples.items():
        chosen = [sample for sample in logged if sample["filter"] == filters.get(task, "none")]
        answers = [
            answer
            for sample in chosen
            for request in sample["resps"]
            for answer in (request if isinstance(request, list) else [request])
            if isinstance(answer, str)
        ]
        if answers:
            counts[task] = {
                "answers": len(answers),
                "cut": sum(isinstance(answer, CutAnswer) for answer in answers),
            }
    return counts
