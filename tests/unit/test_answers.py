"""cfs.answers: answers of a reasoning model cut before its think-end token. While
cut_answers_marked is active, lm-eval's backends (its utils and hf, and cfs-hf) turn such an
answer into an empty CutAnswer, leave a finished one as lm-eval makes it, and are restored
afterwards; count_cut_answers counts them per task under its scored filter; and a cut
answer is still recognised after lm-eval's request cache pickles it. (Counted in a whole
evaluation: tests/unit/test_evaluate.py.)"""

from __future__ import annotations

import sys
import types

from cfs.answers import CutAnswer, count_cut_answers, cut_answers_marked


def test_answers_without_the_think_end_token_are_cut_and_counted():
    import cfs.lm_eval_model as cfs_backend
    from lm_eval.models import huggingface, utils

    original = utils.postprocess_generated_text
    with cut_answers_marked("</think>"):
        for module in (utils, huggingface, cfs_backend):
            cut = module.postprocess_generated_text("thinking, (A) maybe", ["\n\n"], "</think>")
            assert isinstance(cut, CutAnswer) and cut == ""
            done = module.postprocess_generated_text(
                "think</think> The answer is (B)", ["\n\n"], "</think>"
            )
            assert done == "The answer is (B)" and not isinstance(done, CutAnswer)
    assert utils.postprocess_generated_text is original
    assert huggingface.postprocess_generated_text is original
    assert cfs_backend.postprocess_generated_text is original
    with cut_answers_marked(None):  # no thinking model: nothing changes
        assert utils.postprocess_generated_text is original
    samples = {
        "gpqa": [
            {"filter": f, "resps": [[CutAnswer(""), "x"], ["y", "z"]]}
            for f in ("flexible-extract", "strict-match")
        ],
        "mc": [{"filter": "none", "resps": [[(-1.0, False)]]}],
    }
    counts = count_cut_answers(samples, {"gpqa": "flexible-extract", "mc": "none"})
    assert counts == {"gpqa": {"answers": 4, "cut": 1}}


def test_cut_answers_survive_the_request_cache():
    """lm-eval's cache pickles answers; a cut one is still recognised from it."""
    import pickle

    restored = pickle.loads(pickle.dumps(CutAnswer("")))
    assert isinstance(restored, CutAnswer) and restored == ""


def test_marking_cut_answers_leaves_lazy_modules_unloaded(monkeypatch):
    """Finding lm-eval's backends must not touch a lazy module's attributes: transformers'
    would import submodules whose packages an environment need not have (torchvision)."""

    class LazyModule(types.ModuleType):
        def __getattr__(self, name):
            raise ModuleNotFoundError(f"No module named 'torchvision' (asked for {name})")

    monkeypatch.setitem(sys.modules, "lazy_with_missing_dependency", LazyModule("lazy"))
    with cut_answers_marked("</think>"):
        pass
