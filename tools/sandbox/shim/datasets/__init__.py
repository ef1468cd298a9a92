"""A stand-in for Hugging Face `datasets` where it cannot be installed (it needs pyarrow, a
49-55 MB binary wheel): the calls the stages make, `Dataset.from_list`, `save_to_disk` and
`load_from_disk` (cfs.training_set) and `load_dataset("json", data_files=...)` (lm-eval's
local tasks), on plain lists of dicts (saved as JSON lines, not memory-mapped).
benchmarks/gpu_check.sh puts it on the path only where `import datasets` fails."""

from __future__ import annotations

import enum
import json
from pathlib import Path

__version__ = "0.0.0+cfs.shim"


class DownloadMode(enum.Enum):
    REUSE_DATASET_IF_EXISTS = "reuse_dataset_if_exists"
    REUSE_CACHE_IF_EXISTS = "reuse_cache_if_exists"
    FORCE_REDOWNLOAD = "force_redownload"


class Dataset:
    """Rows in memory: indexing, iteration, columns, map, filter and select."""

    def __init__(self, rows: list[dict]):
        self._rows = list(rows)

    @classmethod
    def from_list(cls, rows: list[dict]) -> Dataset:
        return cls(rows)

    @property
    def features(self) -> dict:
        return {key: None for key in (self._rows[0] if self._rows else {})}

    @property
    def column_names(self) -> list[str]:
        return list(self.features)

    @property
    def num_rows(self) -> int:
        return len(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self):
        return iter(self._rows)

    def __getitem__(self, key):
        if isinstance(key, str):
            return [row[key] for row in self._rows]
        if isinstance(key, slice):
            rows = self._rows[key]
            return {column: [row[column] for row in rows] for column in self.features}
        return self._rows[key]

    def to_list(self) -> list[dict]:
        return list(self._rows)

    def select(self, indices) -> Dataset:
        return Dataset([self._rows[index] for index in indices])

    def map(self, function, with_indices: bool = False, **_ignored) -> Dataset:
        rows = []
        for index, row in enumerate(self._rows):
            update = function(row, index) if with_indices else function(row)
            rows.append({**row, **(update or {})})
        return Dataset(rows)

    def filter(self, function, **_ignored) -> Dataset:
        return Dataset([row for row in self._rows if function(row)])

    def save_to_disk(self, folder) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(row) + "\n" for row in self._rows]
        (Path(folder) / "rows.jsonl").write_text("".join(lines), encoding="utf-8")


def load_from_disk(folder) -> Dataset:
    return Dataset(_read(Path(folder) / "rows.jsonl"))


class DatasetDict(dict):
    pass


def _read(path) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")
    if str(path).endswith(".json") and text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_dataset(path: str, name=None, data_files=None, **_ignored) -> DatasetDict:
    if path != "json" or data_files is None:
        raise NotImplementedError(f"the datasets stand-in reads local JSON(L) only, not {path!r}")
    if not isinstance(data_files, dict):
        data_files = {"train": data_files}
    splits = DatasetDict()
    for split, files in data_files.items():
        files = [files] if isinstance(files, str | Path) else files
        splits[split] = Dataset([row for file in files for row in _read(file)])
    return splits
