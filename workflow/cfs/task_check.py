"""Check the evaluation's lm-eval task names and metrics before any job runs.

A typo in a forgetting task's name would otherwise fail only inside the eval, after every
fine-tune has run. This reads lm-eval's task index (the built-in task YAMLs and those under
`evaluation.include_path`; YAML only: no dataset is downloaded, no task is built) and
checks, for the target and each forgetting task:

- the task name is known (an error names the config key and the nearest known name);
- the metric's filter (`acc,none`: filter `none`) is one of the task's filters (the names
  in its `filter_list`, or `none` for a task without one);
- the metric's name is in the task's `metric_list` (where the YAML has one).

    python -m cfs.task_check --settings '<config["evaluation"] as JSON>' \\
        --out results/checks/evaluation_tasks.json

What the study reads from the hub is fetched afterwards, by a job of its own (cfs.fetch).
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

from cfs.artifacts import provenance, write_json
from cfs.cli import require, run_as_process, stage_parser
from cfs.errors import SettingsError

log = logging.getLogger("cfs.task_check")


def metric_parts(metric: str) -> tuple[str, str]:
    """'acc,none' -> ('acc', 'none'): an lm-eval metric's name and its filter ('none' where
    the metric names none)."""
    name, _, filter_name = metric.partition(",")
    return name, filter_name or "none"


def entries_with_keys(settings: dict) -> list[tuple[str, dict]]:
    """(config key, entry) for the target and each forgetting task."""
    entries = [("evaluation.target", require(settings, "target"))]
    entries += [
        (f"evaluation.forgetting[{index}]", entry)
        for index, entry in enumerate(require(settings, "forgetting"))
    ]
    return entries


def nearest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.0)
    return close[0] if close else "(none)"


def task_filters(config: dict) -> list[str]:
    return [item.get("name", "none") for item in config.get("filter_list") or []] or ["none"]


def task_metrics(config: dict) -> list[str] | None:
    metric_list = config.get("metric_list")
    if not metric_list:
        return None  # the output type's default metrics: not listed in the YAML
    return [item["metric"] for item in metric_list if isinstance(item.get("metric"), str)]


def check_entry(key: str, entry: dict, index: dict) -> dict:
    """One entry's problems (a list of messages, empty when fine) and what was checked."""
    from lm_eval.tasks._index import Kind

    name, metric = entry["task"], entry["metric"]  # both required by the schema
    if not isinstance(name, str) or not name:
        return {"key": key, "problems": [f"{key}.task: no task name"]}
    if name not in index:
        return {
            "key": key,
            "task": name,
            "problems": [
                f"{key}.task: lm-eval knows no task '{name}' (built-in or under "
                f"evaluation.include_path); nearest known task: "
                f"'{nearest(name, sorted(index))}'"
            ],
        }
    found = index[name]
    record = {"key": key, "task": name, "kind": found.kind.name.lower(), "problems": []}
    if not isinstance(metric, str) or not metric:
        record["problems"].append(f"{key}.metric: no metric (e.g. 'acc,none')")
        return record
    metric_name, filter_name = metric_parts(metric)
    config = found.cfg or {}
    if found.kind is not Kind.TASK or not config:
        record["checked"] = "name only"  # groups, tags and Python tasks: no YAML metrics
        return record
    filters = task_filters(config)
    if filter_name not in filters:
        record["problems"].append(
            f"{key}.metric '{metric}': task '{name}' has no filter '{filter_name}' "
            f"(its filters: {', '.join(filters)}); nearest: "
            f"'{metric_name},{nearest(filter_name, filters)}'"
        )
    metrics = task_metrics(config)
    if metrics is not None and metric_name not in metrics:
        record["problems"].append(
            f"{key}.metric '{metric}': task '{name}' reports no metric '{metric_name}' "
            f"(its metrics: {', '.join(metrics)}); nearest: "
            f"'{nearest(metric_name, metrics)},{filter_name}'"
        )
    record["checked"] = "name, filter" + (", metric" if metrics is not None else "")
    record["filters"], record["metrics"] = filters, metrics
    return record


def task_index(include_path: str | list[str] | None, tasks: list[str] | None = None) -> dict:
    """lm-eval's index of task names: built-in tasks and those under `include_path` (a
    folder or a list of folders; a later folder's task of the same name wins). Where the
    folders hold every one of `tasks`, theirs alone, as the evaluations index them
    (cfs.lm_eval_tasks.local_task_manager)."""
    from lm_eval.tasks import TaskManager

    from cfs.lm_eval_tasks import local_task_manager

    listed = not isinstance(include_path, str)
    folders = list(include_path or []) if listed else [include_path]
    for index, folder in enumerate(folders):
        if not Path(folder).is_dir():
            key = f"evaluation.include_path[{index}]" if listed else "evaluation.include_path"
            raise SettingsError(f"{key}: '{folder}' is not a folder")
    if folders and tasks:
        return local_task_manager(folders, tasks).task_index
    return TaskManager(include_path=folders or None).task_index


def check_tasks(settings: dict, index: dict | None = None) -> dict:
    """Check every evaluation task; raise SettingsError listing every problem, or return
    the record of what was checked."""
    entries = entries_with_keys(settings)
    if index is None:
        index = task_index(settings["include_path"], [entry["task"] for _, entry in entries])
    records = [check_entry(key, entry, index) for key, entry in entries]
    problems = [problem for record in records for problem in record["problems"]]
    if problems:
        raise SettingsError("; ".join(problems))
    return {"tasks": records, "known_tasks": len(index)}


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="JSON record of the check")
    args = parser.parse_args(argv)
    record = check_tasks(args.settings)
    for checked in record["tasks"]:
        log.info("%s: %s (%s)", checked["key"], checked["task"], checked.get("checked"))
    record["provenance"] = provenance("check_evaluation_tasks", args.settings)
    write_json(args.out, record)


if __name__ == "__main__":
    run_as_process(main)
