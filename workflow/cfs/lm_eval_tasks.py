"""The evaluation's lm-eval tasks: found in the local task folder when it holds them all
(`local_task_manager`), each built with the options of its entry in the config (cfs.evaluate
task_entries: `num_fewshot`, `gen_kwargs` merged over the task's own, and `repeats`
answers per question averaged into pass@1), after seeding every random generator with the
eval seed (`build_tasks`)."""

from __future__ import annotations

from cfs.errors import SettingsError


def local_task_manager(include_path: str | list[str], tasks: list[str]):
    """Index only the local task folder when it holds every task: scanning lm-eval's
    thousands of built-in task files costs seconds in every evaluation job."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(task in local.all_tasks for task in tasks):
        return local
    return TaskManager(include_path=include_path)


def _is_take_first(step) -> bool:
    from lm_eval.filters.selection import TakeFirstFilter, TakeKFilter

    return getattr(step, "func", step) in (TakeFirstFilter, TakeKFilter)


def average_over_samples(task, repeats: int) -> None:
    """Make `task` sample `repeats` answers per question and score each question by the
    mean of its answers' scores: pass@1 estimated from `repeats` samples.

    lm-eval runs each request `repeats` times and, by default, keeps the first answer
    (a `take_first` filter). Here every filter pipeline keeps all answers (its take-first
    step dropped; extraction steps such as regex work answer by answer) and the task's own
    per-answer scoring runs on each answer, the scores then averaged."""
    from lm_eval.api.filter import FilterEnsemble

    task.set_config(key="repeats", value=repeats)
    task._filters = [
        FilterEnsemble(
            name=ensemble.name, filters=[f for f in ensemble.filters if not _is_take_first(f)]
        )
        for ensemble in task._filters
    ]
    score_one = task.process_results
    name = task.config.task

    def averaged(doc, results):
        (answers,) = results  # a generate_until task has one request per document
        answers = [answers] if isinstance(answers, str) else list(answers)
        scores = [score_one(doc, [answer]) for answer in answers]
        averaged_scores = {}
        for key in scores[0]:
            values = [score[key] for score in scores]
            if not all(isinstance(value, int | float) for value in values):
                raise SettingsError(
                    f"task '{name}': metric '{key}' is not scored answer by answer, so it "
                    "cannot be averaged over repeats"
                )
            averaged_scores[key] = sum(values) / len(values)
        return averaged_scores

    task.process_results = averaged


def configured_task(task_manager, entry: dict):
    """The task name, or the lm-eval Task object with this entry's options applied:
    `num_fewshot`, `gen_kwargs` (merged over the task's generation_kwargs) and `repeats`
    (answers sampled per question, averaged into pass@1)."""
    name = entry["task"]
    repeats = entry["repeats"]
    gen_kwargs = entry["gen_kwargs"]
    num_fewshot = entry["num_fewshot"]
    if repeats == 1 and not gen_kwargs and num_fewshot is None:
        return name
    if hasattr(task_manager, "load"):
        loaded = task_manager.load([name])["tasks"]
    else:  # lm-eval before TaskManager.load
        from lm_eval.tasks import get_task_dict

        loaded = get_task_dict([name], task_manager)
    if name not in loaded or len(loaded) != 1:
        raise SettingsError(
            f"evaluation task '{name}': repeats, gen_kwargs and num_fewshot apply to single "
            "tasks, not groups (list the group's tasks one by one)"
        )
    task = loaded[name]
    generative = task.get_config("output_type") == "generate_until"
    if (gen_kwargs or repeats > 1) and not generative:
        raise SettingsError(
            f"evaluation task '{name}' is not generative ({task.get_config('output_type')}): "
            "repeats and gen_kwargs apply to generate_until tasks only"
        )
    if num_fewshot is not None:
        task.set_config(key="num_fewshot", value=num_fewshot)
    if gen_kwargs:
        current = dict(task.get_config("generation_kwargs") or {})
        task.set_config(key="generation_kwargs", value={**current, **gen_kwargs})
    if repeats > 1:
        average_over_samples(task, repeats)
    return task


def seed_everything(seed: int) -> None:
    import random

    import numpy
    import torch

    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


def build_tasks(task_manager, entries: list[dict], seed: int) -> list:
    """The entries' tasks (names, or Task objects with their options applied), built after
    seeding `random`, numpy and torch with the eval seed. Some tasks draw random numbers
    while they are built: GPQA shuffles each question's choices in `process_docs`, which
    runs when the Task object is built, before lm-eval's simple_evaluate seeds anything;
    unseeded, base and post evals could see different answer orders."""
    seed_everything(seed)
    return [configured_task(task_manager, entry) for entry in entries]
