"""The embedded default task: word problems made by seeded code whose responses reason
step by step and end "The answer is: N" (the MetaMathQA answer format): GSM8K-style two-step
stories (`steps: 2`) or one-step sums and differences (`steps: 1`). cfs.data writes them
as the task's train and test records (`task.source: arithmetic`).

A problem's fact is its arithmetic: the operations of its reasoning, whatever the story,
the name and the item. Test problems have distinct facts, and no training problem has a
test problem's fact, so the target measures arithmetic learnt, not a sum recalled."""

from __future__ import annotations

import functools
import random

from cfs.cli import require
from cfs.errors import SettingsError

NAMES = [
    "Ava", "Ben", "Carla", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jack",
    "Kofi", "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara",
]  # fmt: skip
ITEMS = [
    "apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells",
    "cards", "balloons", "coins", "eggs",
]  # fmt: skip


Fact = tuple  # ((operator, left, right), ...): the equations of the reasoning


def _gain_then_loss(rng: random.Random) -> tuple[str, str, int, Fact]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start, gain = rng.randint(5, 40), rng.randint(2, 30)
    loss = rng.randint(1, start + gain - 1)
    total, answer = start + gain, start + gain - loss
    question = (
        f"{name} has {start} {item}. {name} gets {gain} more {item} and then gives away "
        f"{loss} {item}. How many {item} does {name} have now?"
    )
    response = (
        f"{name} starts with {start} {item} and gets {gain} more, so {start} + {gain} = "
        f"{total}. After giving away {loss}, {total} - {loss} = {answer}."
    )
    return question, response, answer, (("+", start, gain), ("-", total, loss))


def _groups_plus_extra(rng: random.Random) -> tuple[str, str, int, Fact]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    groups, size, extra = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 20)
    product = groups * size
    answer = product + extra
    question = (
        f"{name} buys {groups} boxes with {size} {item} in each box and already had {extra} "
        f"{item}. How many {item} does {name} have in total?"
    )
    response = (
        f"The boxes hold {groups} * {size} = {product} {item}. Adding the {extra} {name} "
        f"already had gives {product} + {extra} = {answer}."
    )
    return question, response, answer, (("*", groups, size), ("+", product, extra))


def _share_equally(rng: random.Random) -> tuple[str, str, int, Fact]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    other = rng.choice([friend for friend in NAMES if friend != name])
    people, each, kept = rng.randint(2, 8), rng.randint(2, 15), rng.randint(1, 10)
    shared = people * each
    total = shared + kept
    question = (
        f"{name} has {total} {item}, keeps {kept} and shares the rest equally among "
        f"{people} friends, including {other}. How many {item} does {other} get?"
    )
    response = (
        f"{name} shares {total} - {kept} = {shared} {item}. Split among {people} friends, "
        f"each gets {shared} / {people} = {each}."
    )
    return question, response, each, (("-", total, kept), ("/", shared, people))


def _price_change(rng: random.Random) -> tuple[str, str, int, Fact]:
    name = rng.choice(NAMES)
    count, price, paid_extra = rng.randint(2, 9), rng.randint(2, 20), rng.randint(1, 30)
    cost = count * price
    answer = cost + paid_extra
    question = (
        f"{name} buys {count} tickets that cost {price} dollars each and pays a {paid_extra} "
        f"dollar fee. How many dollars does {name} pay in total?"
    )
    response = (
        f"The tickets cost {count} * {price} = {cost} dollars. With the fee, "
        f"{cost} + {paid_extra} = {answer}."
    )
    return question, response, answer, (("*", count, price), ("+", cost, paid_extra))


def _one_step(rng: random.Random, subtract: bool) -> tuple[str, str, int, Fact]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    first, second = rng.randint(2, 20), rng.randint(2, 9)
    if subtract:
        start, answer = first + second, first
        question = f"{name} has {start} {item} and gives away {second}. How many {item} now?"
        return question, f"{start} - {second} = {answer}.", answer, (("-", start, second),)
    answer = first + second
    question = f"{name} has {first} {item} and gets {second} more. How many {item} now?"
    return question, f"{first} + {second} = {answer}.", answer, (("+", first, second),)


# Two-step stories (GSM8K-style), and one-step ones a 135M model can learn in minutes.
PROBLEM_KINDS = {
    2: (_gain_then_loss, _groups_plus_extra, _share_equally, _price_change),
    1: (functools.partial(_one_step, subtract=False), functools.partial(_one_step, subtract=True)),
}


# Consecutive draws that add nothing before the problem space counts as used up.
MAX_FRUITLESS_DRAWS = 10_000


def _draw(
    rng: random.Random,
    count: int,
    steps: int,
    excluded_facts: frozenset = frozenset(),
    distinct_facts: bool = False,
) -> tuple[list[dict], set]:
    seen, facts, problems, fruitless = set(), set(), [], 0
    while len(problems) < count:
        question, reasoning, answer, fact = rng.choice(PROBLEM_KINDS[steps])(rng)
        repeated = question in seen or (distinct_facts and fact in facts)
        if repeated or fact in excluded_facts:
            fruitless += 1
            if fruitless == MAX_FRUITLESS_DRAWS:
                what = "distinct facts" if distinct_facts else "problems outside the test facts"
                raise SettingsError(
                    f"{steps}-step arithmetic has no more {what} than {len(problems)}; "
                    f"{count} were asked for (task.num_train, task.num_test)"
                )
            continue
        seen.add(question)
        facts.add(fact)
        fruitless = 0
        response = f"{reasoning}\nThe answer is: {answer}"
        problems.append({"query": question, "response": response, "answer": str(answer)})
    return problems, facts


def arithmetic_problems(count: int, seed: int, steps: int = 2) -> list[dict]:
    """`count` distinct word problems of `steps` steps, deterministic in `seed`."""
    return _draw(random.Random(seed), count, steps)[0]


def render(records: list[dict], template: str) -> list[dict]:
    try:
        return [{**record, "prompt": template.format(query=record["query"])} for record in records]
    except KeyError as error:
        raise SettingsError(
            f"task.prompt_template uses unknown field {error}; only {{query}} is available"
        ) from None


def prepare_arithmetic(settings: dict) -> tuple[list[dict], list[dict]]:
    """The training and test problems: the test ones first, each of its own fact, then the
    training ones, none of them with a test problem's fact."""
    num_train, num_test = require(settings, "num_train"), require(settings, "num_test")
    steps, template = require(settings, "steps"), require(settings, "prompt_template")
    rng = random.Random(require(settings, "seed"))
    test, test_facts = _draw(rng, num_test, steps, distinct_facts=True)
    train, _ = _draw(rng, num_train, steps, excluded_facts=frozenset(test_facts))
    return render(train, template), render(test, template)
