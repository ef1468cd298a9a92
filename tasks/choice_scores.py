"""Per-item scores of the cfs_* multiple-choice tasks.

`acc` and `acc_norm` are lm-eval's multiple_choice metrics, computed as lm-eval computes
them (argmax of the choices' log-likelihoods, raw and divided by the choice's length in
characters). `p_correct` is the probability the model puts on the correct choice among the
choices (a softmax of their log-likelihoods, as in lm-eval's brier_score): a continuous
accuracy that moves when the model's confidence in what it knows moves, long before an
argmax flips. A short fine-tune that leaves accuracy in place still shows up in it.
`p_correct_norm` is the same over the log-likelihoods divided by each choice's length in
characters (as acc_norm divides them): for a task whose right answers are often longer,
rarer words than its distractors, where a raw sum of log-probabilities is unfair to them
(cfs_animals).
"""

import numpy as np


def process_results(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    loglikelihoods = np.array([loglikelihood for loglikelihood, _ in results])
    lengths = np.array([float(len(choice)) for choice in doc["choices"]])
    gold = int(doc["answer"])
    return {
        "acc": float(np.argmax(loglikelihoods) == gold),
        "acc_norm": float(np.argmax(loglikelihoods / lengths) == gold),
        "p_correct": float(softmax(loglikelihoods)[gold]),
        "p_correct_norm": float(softmax(loglikelihoods / lengths)[gold]),
    }


def softmax(scores: np.ndarray) -> np.ndarray:
    probabilities = np.exp(scores - scores.max())
    return probabilities / probabilities.sum()
