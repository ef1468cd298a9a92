"""Everything the study reads from the Hugging Face hub, fetched into the cache (HF_HOME) by
the job after the evaluation-task check, on the submitting host: the study's hub models,
the fine-tuning task's hub dataset and the dataset of every evaluation task that reads one
from the hub.

Compute nodes often have no network. The stages that run there (prepare_model,
prepare_task_data, the evaluations) probe the hub, find it unreachable and read the cache
(cfs.hub), so every download has to have happened before: this runs as its own job right
after the evaluation-task check (workflow/rules/checks.smk), a local job on the submitting
host that the models' and the task's preparation wait on, and through them every GPU job.
A model or dataset that cannot be had (gated without HF_TOKEN, or neither reachable nor
cached) fails it there, by name, before any GPU job is queued.

    python -m cfs.fetch --settings '<the task check's settings as JSON>' \
        --fetch '{"models": [...], "task": ...}' --out results/checks/hub_fetch.json

Evaluation datasets are fetched with the call lm-eval itself makes when it builds a task
(`datasets.load_dataset(dataset_path, dataset_name, **dataset_kwargs)`), so lm-eval finds
them in the cache. Tasks whose data are local files (`dataset_path: json` with
`data_files`, as the `cfs_*` tasks) need nothing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from cfs.artifacts import provenance, write_json
from cfs.cli import run_as_process, stage_parser
from cfs.errors import SettingsError

log = logging.getLogger("cfs.fetch")
# `datasets` builders that read local files named in dataset_kwargs (no hub repository)
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "xml", "sql"}


def is_local_dataset(path: str) -> bool:
    return path in LOCAL_BUILDERS or Path(path).exists()


def task_datasets(name: str, index: dict, seen: set | None = None) -> list[dict]:
    """The datasets lm-eval loads for task, group or tag `name`, from its YAML: path, name
    and the keyword arguments of its load_dataset call."""
    seen = set() if seen is None else seen
    if name in seen or name not in index:
        return []
    seen.add(name)
    entry = index[name]
    if entry.kind.name == "TAG":
        return [d for member in sorted(entry.tags) for d in task_datasets(member, index, seen)]
    config = entry.cfg or {}
    if entry.kind.name == "GROUP":
        members = config.get("task") or []
        found = []
        for member in members if isinstance(members, list) else [members]:
            if isinstance(member, str):
                found += task_datasets(member, index, seen)
            elif isinstance(member, dict) and member.get("task") in index:
                found += task_datasets(member["task"], index, seen)
            elif isinstance(member, dict):
                found += dataset_of(member.get("task", name), member)
        return found
    return dataset_of(name, config)


def dataset_of(name: str, config: dict) -> list[dict]:
    path = config.get("dataset_path")
    if not isinstance(path, str):
        return []  # a Python task or a custom dataset function: nothing to name here
    kwargs = dict(config.get("dataset_kwargs") or {})
    kwargs.pop("trust_remote_code", None)  # lm-eval drops it for datasets >= 4
    return [{"task": name, "path": path, "name": config.get("dataset_name"), "kwargs": kwargs}]


def fetch_evaluation_datasets(entries: list[tuple[str, dict]], index: dict, reachable: bool):
    """Load each hub dataset of the evaluation tasks once (downloading it into the cache
    where the hub is reachable); a missing one stops here, naming the config key, the task
    and the dataset."""
    import datasets

    from cfs.hub import MissingFromHub, explain_hub_error

    fetched, loaded = [], {}
    for key, entry in entries:
        for dataset in task_datasets(entry["task"], index):
            record = {"key": key, **dataset, "kwargs": sorted(dataset["kwargs"])}
            if is_local_dataset(dataset["path"]):
                fetched.append({**record, "source": "local"})
                continue
            same = repr((dataset["path"], dataset["name"], sorted(dataset["kwargs"].items())))
            if same in loaded:  # a group's tasks often share one dataset
                fetched.append({**record, "source": "hub", "rows": loaded[same]})
                continue
            hint = (
                f"drop the task from {key}, or name a local task with the same data "
                "(evaluation.include_path)"
            )
            log.info("%s: %s reads %s", key, dataset["task"], dataset["path"])
            try:
                dataset_dict = datasets.load_dataset(
                    path=dataset["path"], name=dataset["name"], **dataset["kwargs"]
                )
            except (OSError, ValueError) as error:
                message = explain_hub_error(error, "dataset", dataset["path"], hint, reachable)
                raise MissingFromHub(
                    f"{key}: evaluation task '{dataset['task']}' cannot be evaluated: {message}"
                ) from None
            loaded[same] = {split: len(part) for split, part in dataset_dict.items()}
            fetched.append({**record, "source": "hub", "rows": loaded[same]})
    return fetched


def fetch_models(models: list[dict]) -> list[dict]:
    """Each hub model's snapshot in the cache (cfs.prepare_model links it from there)."""
    from cfs.prepare_model import fetch_model

    fetched = []
    for model in models:
        snapshot = fetch_model(model["hub_id"], model["revision"])
        log.info("models.%s: %s in %s", model["model"], model["hub_id"], snapshot)
        fetched.append({**model, "snapshot": snapshot.name})
    return fetched


def fetch_task_data(task: dict | None) -> dict | None:
    """The fine-tuning task's hub dataset, each split cfs.data reads."""
    if not task:
        return None
    if task["source"] != "hub":
        raise SettingsError("cfs.fetch: only a hub task dataset is fetched")
    from cfs.data import load_split

    splits = [task["split"], *([task["test_split"]] if task["test_split"] else [])]
    rows = {split: len(load_split(task, split)) for split in splits}
    log.info("task: %s, rows %s", task["dataset"], rows)
    return {"dataset": task["dataset"], "rows": rows}


def fetch_everything(fetch: dict, entries: list[tuple[str, dict]], index: dict) -> dict:
    """Models, task data, evaluation datasets, in that order; the record of the job. With
    nothing to fetch the hub is not even probed."""
    from cfs.hub import go_offline_unless_reachable

    wanted = [
        dataset
        for _, entry in entries
        for dataset in task_datasets(entry["task"], index)
        if not is_local_dataset(dataset["path"])
    ]
    reachable = None
    if fetch["models"] or fetch["task"] or wanted:
        reachable = go_offline_unless_reachable()
    return {
        "hub_reachable": reachable,
        "models": fetch_models(fetch["models"]),
        "task": fetch_task_data(fetch["task"]),
        "evaluation_datasets": fetch_evaluation_datasets(entries, index, bool(reachable)),
    }


class _TagTolerantLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs without resolving `!function` tags."""


_TagTolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def local_task_datasets(include_path) -> dict[str, bool]:
    """{task name: whether its data are local files} for the task YAMLs under
    `include_path` (a folder or a list), read when the DAG is built (no lm-eval import):
    a task whose `dataset_path` is a local builder reads no hub dataset."""
    folders = [include_path] if isinstance(include_path, str) else list(include_path or [])
    found = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.yaml")):
            try:
                config = yaml.load(path.read_text(), Loader=_TagTolerantLoader) or {}
            except yaml.YAMLError:
                continue
            if isinstance(config, dict) and isinstance(config.get("task"), str):
                found[config["task"]] = is_local_dataset(str(config.get("dataset_path", "")))
    return found


def reads_the_hub(fetch: dict, evaluation: dict) -> bool:
    """Whether a study reads anything from the hub: a hub model or task dataset, or an
    evaluation task that is not a local task on local files (lm-eval's own read the hub)."""
    if fetch["models"] or fetch["task"]:
        return True
    local = local_task_datasets(evaluation["include_path"])
    entries = [evaluation["target"], *evaluation["forgetting"]]
    return not all(local.get(entry["task"], False) for entry in entries)


def main(argv: list[str] | None = None) -> None:
    from cfs.task_check import entries_with_keys, task_index

    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--fetch",
        required=True,
        type=json.loads,
        help='these and the evaluation datasets: {"models": [...], "task": ...}',
    )
    parser.add_argument("--out", required=True, type=Path, help="JSON record of the fetch")
    args = parser.parse_args(argv)
    entries = entries_with_keys(args.settings)
    index = task_index(args.settings["include_path"], [entry["task"] for _, entry in entries])
    fetched = fetch_everything(args.fetch, entries, index)
    write_json(args.out, {**fetched, "provenance": provenance("fetch", args.fetch)})


if __name__ == "__main__":
    run_as_process(main)
