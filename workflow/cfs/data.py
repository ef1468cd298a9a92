"""Prepare the fine-tuning task: records of {prompt, response, ...} for train and test.

Two kinds of source:
- `arithmetic` (the embedded default): seeded word problems (cfs.arithmetic);
- `hub` / `local`: any dataset, from the Hugging Face hub (`dataset`, optional
  `dataset_config`, `revision`) or from local JSONL / JSON / Parquet / CSV files
  (`data_files`). `fields` maps template names to the dataset's columns (e.g.
  {query: question, reasoning: reasoning, answer: answer}); `prompt_template` and
  `response_template` are filled from them (`{query}` is required, the response defaults
  to `{response}`). `num_train` examples are drawn at random (seeded) from `split`, and
  `num_test` held-out examples from `test_split`, or from the rest of `split`.

    python -m cfs.data --settings '{"source": "arithmetic", ...}' \
        --train train.jsonl --test test.jsonl
"""

from __future__ import annotations

import itertools
import logging
import random
from pathlib import Path

from cfs.arithmetic import prepare_arithmetic
from cfs.artifacts import provenance, write_json, write_jsonl
from cfs.cli import require, run_as_process, stage_parser
from cfs.errors import SettingsError

log = logging.getLogger("cfs.data")

# --------------------------------------------------------------------------- any dataset

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def local_builder(data_files) -> str:
    """The `datasets` builder for local files, from their extension (all must agree)."""
    files = (
        [f for group in data_files.values() for f in _as_list(group)]
        if isinstance(data_files, dict)
        else _as_list(data_files)
    )
    if not files:
        raise SettingsError("task.data_files: no files given")
    builders = set()
    for name in files:
        suffix = Path(name).suffix.lower()
        if suffix not in LOCAL_BUILDERS:
            raise SettingsError(
                f"task.data_files: '{name}' is not a JSONL, JSON, Parquet or CSV file "
                f"(known extensions: {', '.join(LOCAL_BUILDERS)})"
            )
        if not any(ch in name for ch in "*?[") and not Path(name).is_file():
            raise SettingsError(f"task.data_files: no file '{name}' (relative to {Path.cwd()})")
        builders.add(LOCAL_BUILDERS[suffix])
    if len(builders) > 1:
        raise SettingsError(f"task.data_files: mixes file kinds ({', '.join(sorted(builders))})")
    return builders.pop()


def load_split(settings: dict, split: str):
    """One split of the configured dataset, as a `datasets.Dataset`."""
    source = require(settings, "source")
    if source == "local":
        data_files = require(settings, "data_files")
        builder = local_builder(data_files)
        if not isinstance(data_files, dict):
            data_files = {settings["split"]: data_files}
        if split not in data_files:
            raise SettingsError(
                f"task.data_files has no split '{split}' (has: {', '.join(data_files)})"
            )
        import datasets

        return datasets.load_dataset(builder, data_files=data_files, split=split)
    repo_id = require(settings, "dataset")
    from cfs.hub import MissingFromHub, explain_hub_error, go_offline_unless_reachable

    reachable = go_offline_unless_reachable()  # before `datasets` reads HF_HUB_OFFLINE
    import datasets

    if not reachable:
        datasets.config.HF_HUB_OFFLINE = True  # in case datasets was imported already
    hint = (
        f"download its files and set `task.source: local` with `task.data_files` pointing "
        f"at them instead of `task.dataset: {repo_id}`"
    )
    try:
        return datasets.load_dataset(
            repo_id,
            name=settings["dataset_config"],
            split=split,
            revision=settings["revision"],
        )
    except ValueError as error:
        if "split" in str(error).lower():
            raise SettingsError(f"task.split / task.test_split: {error}") from None
        raise
    except OSError as error:  # ConnectionError, DatasetNotFoundError, hub HTTP errors
        raise MissingFromHub(
            explain_hub_error(error, "dataset", repo_id, hint, reachable)
        ) from None


def field_map(settings: dict) -> dict[str, str]:
    fields = dict(require(settings, "fields"))
    if "query" not in fields:
        raise SettingsError(
            "task.fields must map `query` to a dataset column (the text {query} in "
            "task.prompt_template)"
        )
    return fields


def render_example(row: dict, fields: dict[str, str], prompt_template: str, response_template: str):
    """{prompt, response, <field>: value...} for one dataset row, or None when its query
    or response is empty. Missing optional values render as an empty string."""
    values = {
        name: "" if row.get(column) is None else str(row.get(column))
        for name, column in fields.items()
    }
    try:
        prompt = prompt_template.format_map(values)
        response = response_template.format_map(values)
    except KeyError as error:
        raise SettingsError(
            f"task.prompt_template / task.response_template use {error}, which task.fields "
            f"does not map (mapped: {', '.join(sorted(fields))}); write literal braces as "
            "{{ and }}"
        ) from None
    if not values["query"].strip() or not response.strip():
        return None
    return {"prompt": prompt, "response": response, **values}


def check_columns(dataset, fields: dict[str, str], where: str) -> None:
    missing = sorted({column for column in fields.values()} - set(dataset.column_names))
    if missing:
        raise SettingsError(
            f"task.fields: column(s) {', '.join(missing)} not in {where} "
            f"(columns: {', '.join(dataset.column_names)})"
        )


def shuffled_records(dataset, fields, prompt_template, response_template, seed: int):
    """The split's rows in a seeded random order, rendered, skipping empty ones; each record
    keeps its row index in the source split. Lazy: only the rows taken are read."""
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    rows = dataset.select_columns(sorted(set(fields.values()))).select(order)
    for index, row in zip(order, rows, strict=True):
        record = render_example(row, fields, prompt_template, response_template)
        if record is not None:
            yield {**record, "source_index": index}


def prepare_dataset(settings: dict) -> tuple[list[dict], list[dict], dict]:
    """Train and test records from a hub or local dataset, and what was drawn (for the
    provenance record): a seeded random `num_train` of `split`, and `num_test` held out
    from `test_split` or from the rest of `split`. Rows with an empty query or response
    are skipped."""
    fields = field_map(settings)
    prompt_template = require(settings, "prompt_template")
    response_template = require(settings, "response_template")
    if "{response}" in response_template and "response" not in fields:
        raise SettingsError(
            "task.fields has no `response`; map it, or set task.response_template from the "
            "mapped fields (e.g. '{reasoning}\\n</think>\\n\\n{answer}')"
        )
    num_train, num_test = require(settings, "num_train"), require(settings, "num_test")
    seed = require(settings, "seed")
    split = require(settings, "split")
    test_split = require(settings, "test_split")
    train_data = load_split(settings, split)
    check_columns(train_data, fields, f"split '{split}'")
    records = shuffled_records(train_data, fields, prompt_template, response_template, seed)
    train = list(itertools.islice(records, num_train))
    if len(train) < num_train:
        log.warning(
            "task.num_train is %d but split '%s' has %d usable rows: using all",
            num_train,
            split,
            len(train),
        )
    if test_split:
        test_data = load_split(settings, test_split)
        check_columns(test_data, fields, f"split '{test_split}'")
        records = shuffled_records(test_data, fields, prompt_template, response_template, seed)
    test = list(itertools.islice(records, num_test))  # else: the rest of `split`, held out
    if not train:
        raise SettingsError(f"task: no usable training examples in split '{split}'")
    drawn = {
        "rows_in_split": len(train_data),
        "split": split,
        "test_split": test_split or f"{split} (held out from the training draw)",
    }
    log.info(
        "%d train and %d test examples (%d rows in split '%s')",
        len(train),
        len(test),
        len(train_data),
        split,
    )
    return train, test, drawn


SOURCES = ("arithmetic", "hub", "local")


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, type=Path)
    parser.add_argument("--test", required=True, type=Path)
    args = parser.parse_args(argv)
    source = require(args.settings, "source")
    if source not in SOURCES:
        raise SettingsError(
            f"task.source '{source}' is not supported (supported: {', '.join(SOURCES)})"
        )
    drawn: dict = {}
    if source == "arithmetic":
        train, test = prepare_arithmetic(args.settings)
    else:
        train, test, drawn = prepare_dataset(args.settings)
    write_jsonl(args.train, train)
    write_jsonl(args.test, test)
    write_json(
        args.train.with_suffix(".provenance.json"),
        provenance(
            "prepare_task_data",
            args.settings,
            seed=args.settings["seed"],
            num_train=len(train),
            num_test=len(test),
            **drawn,
        ),
    )


if __name__ == "__main__":
    run_as_process(main)
