"""Reading and writing stage outputs: atomic writes, checked JSONL, provenance records."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path

from cfs.errors import DataError

TRACKED_PACKAGES = (
    "cfs",
    "torch",
    "transformers",
    "datasets",
    "accelerate",
    "lm_eval",
    "snakemake",
)
SECRET_ENV_KEYS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
SECRET_KEYS = {"token", "hf_token", "use_auth_token", "api_token", "password"}


def add_folder_fingerprint(digest, folder: Path) -> None:
    """Add each file of `folder` (name, size, modification time) to the hash `digest`: a
    model folder rewritten since (another model at the same path) changes the hash."""
    for path in sorted(Path(folder).glob("*")):
        if path.is_file():
            digest.update(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())


class Records(list):
    """Records read from a JSONL file, remembering the file line each came from."""

    line_numbers: list[int]


def line_numbers(records: list[dict]) -> list[int]:
    """File line of each record (1-based); records not read from a file count from 1."""
    return getattr(records, "line_numbers", None) or list(range(1, len(records) + 1))


def read_jsonl(path: str | Path) -> Records:
    """Read a JSONL file; a malformed line raises DataError naming file and line."""
    path = Path(path)
    records = Records()
    records.line_numbers = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            records.append(parse_jsonl_line(line, path, line_number))
            records.line_numbers.append(line_number)
    return records


def parse_jsonl_line(line: str | bytes, path: str | Path, line_number: int) -> dict:
    """One JSONL line as a dict; anything else raises DataError naming file and line."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = getattr(error, "msg", None) or str(error)
        raise DataError(f"{path}:{line_number}: malformed JSON line ({reason})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{line_number}: expected a JSON object, got {record!r:.60}")
    return record


def require_fields(records: Iterable[dict], fields: Iterable[str], path: str | Path) -> None:
    """Raise DataError naming the file line of the first record lacking one of `fields`."""
    fields = list(fields)
    for line_number, record in zip(line_numbers(records), records, strict=True):
        require_record_fields(record, fields, path, line_number)


def require_record_fields(record: dict, fields, path: str | Path, line_number: int) -> None:
    missing = [field for field in fields if field not in record]
    if missing:
        raise DataError(f"{path}:{line_number}: missing field(s) {', '.join(missing)}")


@contextlib.contextmanager
def atomic_path(final: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    target = tmp if directory else tmp / final.name
    try:
        yield target
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return Path(path)


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: malformed JSON ({error.msg})") from None


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    commit = out.stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=Path(__file__).resolve().parent,
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()
    return commit + ("-dirty" if dirty else "")


def scrub_secrets(value):
    """Drop anything that looks like a token from a structure about to be recorded."""
    if isinstance(value, dict):
        return {
            key: scrub_secrets(item)
            for key, item in value.items()
            if str(key).lower() not in SECRET_KEYS
        }
    if isinstance(value, list):
        return [scrub_secrets(item) for item in value]
    if isinstance(value, str):
        for key in SECRET_ENV_KEYS:
            secret = os.environ.get(key)
            if secret and secret in value:
                value = value.replace(secret, "***")
    return value


def provenance(stage: str, settings: dict, seed: int | None = None, **extra) -> dict:
    """What produced an output: stage, settings, seed, package versions, git commit."""
    record = {
        "stage": stage,
        "settings": scrub_secrets(settings),
        "seed": seed,
        "packages": package_versions(),
        "git_commit": git_commit(),
    }
    record.update(scrub_secrets(extra))
    return record
