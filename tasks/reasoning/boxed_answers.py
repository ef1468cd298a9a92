"""Reading a multiple-choice letter from a reasoning model's answer: the last `\\boxed{}`
first, then the task's usual extraction.

A reasoning model writes its final answer as `\\boxed{B}` (DeepSeek-R1 and its distills do,
as their math training asks), which lm-eval's GPQA `flexible-extract` does not read: its
regex looks for `(B)`, its fallbacks for a choice's text or `: B`, so a boxed letter scores
0. The `boxed_first` filter step rewrites an answer whose last `\\boxed{...}` holds a choice
letter (`B`, `(B)`, `B)`, `B. text`, `\\text{B}`, `\\textbf{(B)}`, `Option B`) as `(B)`, which
the following `multi_choice_regex` step reads; every other answer goes on unchanged.
"""

from __future__ import annotations

import re

BOXED = "\\boxed"
# a LaTeX command wrapping the letter (\text{B}, \textbf{(B)}, \mathrm{B}) and $ signs
LATEX = re.compile(r"\\[A-Za-z]+\s*|\$")
LETTER = re.compile(r"^(?:(?:option|answer|choice)\s*:?\s*)?\(?([A-J])\)?(?![A-Za-z0-9])", re.I)


def boxed_contents(text: str) -> list[str]:
    """The contents of every `\\boxed{...}` in `text`, braces balanced, in order."""
    contents = []
    start = text.find(BOXED)
    while start >= 0:
        brace = start + len(BOXED)
        while brace < len(text) and text[brace] == " ":
            brace += 1
        if brace < len(text) and text[brace] == "{":
            depth, end = 1, brace + 1
            while end < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                end += 1
            if depth == 0:
                contents.append(text[brace + 1 : end - 1])
        start = text.find(BOXED, start + len(BOXED))
    return contents


def boxed_letter(text: str, letters: str = "ABCD") -> str | None:
    """The choice letter in the last `\\boxed{}` of `text`, or None."""
    contents = boxed_contents(text)
    if not contents:
        return None
    plain = LATEX.sub("", contents[-1]).replace("{", "").replace("}", "").strip()
    match = LETTER.match(plain)
    if match and match.group(1).upper() == match.group(1) and match.group(1) in letters:
        return match.group(1)
    return None


def boxed_first(resps, docs):
    """lm-eval `custom` filter step: per document, each answer with a boxed choice letter
    as `(X)` (the letters of the document's choices), the others as they are."""
    filtered = []
    for answers, doc in zip(resps, docs, strict=True):
        letters = "ABCDEFGHIJ"[: len(doc.get("choices") or "ABCD")]
        filtered.append(
            [
                f"({letter})" if (letter := boxed_letter(answer, letters)) else answer
                for answer in answers
            ]
        )
    return filtered


def medqa_docs(dataset):
    """MedQA (4 options) with the fields the generative variant reads: the choices in
    order and the answer as a parenthesised letter, as GPQA's are."""

    def process(doc):
        choices = [doc[f"ending{index}"] for index in range(4)]
        return {"choices": choices, "answer": f"({'ABCD'[doc['label']]})"}

    return dataset.map(process)


def medqa_prompt(doc) -> str:
    """The question and its options as the fine-tuning prompt lays them out
    (`{question}\\n{options}`, MedReason's `Answer Choices:` list), for the chat template."""
    options = "\n".join(f"{'ABCD'[index]}. {text}" for index, text in enumerate(doc["choices"]))
    return f"{doc['sent1']}\nAnswer Choices:\n{options}"
